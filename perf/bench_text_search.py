"""Served vs in-process throughput and latency of text search (text -> tokens -> text tower -> top-k).

Two backends answer the same real test-split captions with the same top-k, side by side in one run:

- `served`: the `text_search` ensemble (tokenizer -> text_encoder -> gallery_topk, python-backend models
  hosting ONNX Runtime and FAISS) in the real `tritonserver`, on free loopback ports, loaded by Triton's
  own `perf_analyzer` over gRPC in concurrency mode (synchronous requests, N in flight). It measures in
  time windows (`--window-ms`) until three in a row agree within `--stability` percent; the figures are
  those three windows'. (Its `--request-count` mode is not used: in 2.51 it rounds the measured duration
  up to whole seconds, which under-reports throughput by up to half on short runs.)
- `in-process`: the same functions the served models call (`encode_batch`, `OnnxRunner`,
  `GalleryIndex.search`) with the same settings (one ONNX Runtime thread, one FAISS thread), called
  directly from N Python threads that share one pipeline, for as many requests as perf_analyzer counted
  at the same point (at least `--min-requests`), right after that served point (the server idle), so the
  two sides of each ratio are measured seconds apart on a machine whose load drifts.

Around every perf_analyzer point the server's own statistics (Triton's statistics extension, read with
`xmr.clients.stats`) are diffed: the time per request in each hop (queue, compute input / infer / output,
the ensemble's total, the scheduler between steps) is printed and written to OUT/text_search_hops.csv.
The CPU each process used during a point is recorded beside it, in cores (CPU seconds over wall
seconds): for served points `tritonserver`, its python-backend stubs and perf_analyzer, for in-process
points this Python process (`CpuProbe`), so a ratio below 1 can be split into the server's own work, the
client's, and idle cores.
`--model` measures another served model with text_search's I/O (e.g. the three-hop ensemble form that
`xmr.export.repository.add_ensemble_form` adds beside the one-hop model), `--shared-memory system` /
`--streaming` other perf_analyzer transports.

A request carries `batch` captions; throughput is queries (captions) per second, i.e. requests/sec x batch
(perf_analyzer's "Inferences/Second" already counts batch elements); latency is per request, in ms.
Before measuring, every caption is searched once through both backends (a warm-up) and their top-k ids are
compared, so the figure compares two paths that answer alike.

    python -m xmr.perf.bench_text_search artifacts/probe10 --out perf/results

writes OUT/text_search.csv, OUT/text_search_hops.csv, OUT/text_search.png, OUT/environment.json and
prints the table and the served / in-process throughput ratio at each batch size and concurrency.
"""

from __future__ import annotations

import argparse
import contextlib
import csv
import io
import itertools
import json
import math
import os
import platform
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields, replace
from importlib.metadata import version
from pathlib import Path
from typing import TypeVar

import numpy as np
from rich.console import Console
from rich.table import Table
from tqdm.auto import tqdm

from xmr.clients.server import TritonServer, server_libs
from xmr.clients.stats import StatsProbe, breakdown_csv, breakdown_table
from xmr.clients.triton_client import XmrClient
from xmr.export.iospec import ModelSpec
from xmr.export.manifest import read_manifest
from xmr.export.repository import build_repository
from xmr.export.runtime import GalleryIndex, OnnxRunner
from xmr.models.data import load_split
from xmr.models.errors import InputError
from xmr.models.tokenizer import TextLimits, encode_batch, load_tokenizer
from xmr.perf.tables import cpu_model

MODEL = "text_search"
T = TypeVar("T")
# perf_analyzer links these sonames; the nvidia-pytriton wheel bundles them under hashed file names.
PERF_ANALYZER_LIBS = {"libb64.so.0d": "libb64-*.so.0d*", "libcudart.so.12": "libcudart-*.so.12*"}


@dataclass
class Settings:
    batch_sizes: list[int]  # captions per request
    concurrencies: list[int]  # requests in flight (perf_analyzer) / threads (in-process)
    window_ms: int  # perf_analyzer measurement window
    stability: int  # perf_analyzer: % by which 3 consecutive windows may differ
    max_trials: int  # perf_analyzer: windows before giving up on a stable measurement
    min_requests: int  # in-process requests per point, at least (else as many as perf_analyzer counted)
    captions: int  # distinct test-split captions, cycled through
    top_k: int
    threads: int = 1  # ONNX Runtime intra-op threads in-process, as the served text_encoder's "threads"
    model: str = (
        MODEL  # the served model perf_analyzer loads (the ensemble, or a drop-in such as the fused one)
    )
    shared_memory: str = "none"  # perf_analyzer --shared-memory: none | system (inputs/outputs via /dev/shm)
    streaming: bool = False  # perf_analyzer --streaming (gRPC bidirectional stream)
    asynchronous: bool = False  # perf_analyzer --async (requests completed by one thread, not N blocking)


@dataclass
class Point:
    """One measured (backend, batch, concurrency) point: a row of text_search.csv."""

    backend: str
    batch: int
    concurrency: int
    throughput_qps: float  # captions per second
    p50_ms: float  # per-request latency
    p90_ms: float
    p99_ms: float
    requests: int  # requests measured
    # where the CPU went while the point ran, in cores (CPU seconds / wall seconds; this machine has
    # os.cpu_count()): `tritonserver` itself, its python-backend stub processes, and the client
    # (perf_analyzer; for in-process points, this Python process running the pipeline); NaN: not measured
    cores_server: float = math.nan
    cores_stubs: float = math.nan
    cores_client: float = math.nan


# ----------------------------------------------------------------------------- captions


def sample_captions(manifest: dict, n: int) -> list[str]:
    """`n` captions spread evenly over the split the artifact's gallery was built from (e.g. shapes/test)."""
    dataset, split = manifest["gallery"]["split"].split("/")
    every = load_split(dataset, split).flat_captions()
    if n < 1 or n > len(every):
        raise InputError(f"--captions is {n}; expected 1..{len(every)} ({dataset}/{split} captions)")
    return [every[i] for i in np.linspace(0, len(every) - 1, n).astype(int)]


def request_batches(captions: list[str], batch: int) -> list[list[str]]:
    """len(captions) requests of `batch` captions each, consecutive and wrapping, so every caption is sent."""
    n = len(captions)
    return [[captions[(k * batch + j) % n] for j in range(batch)] for k in range(n)]


def perf_analyzer_input(captions: list[str], top_k: int) -> dict:
    """perf_analyzer's --input-data JSON: one step per caption, each a batch-1 row (dims [1])."""
    return {"data": [{"text": [c], "top_k": [top_k]} for c in captions]}


# ----------------------------------------------------------------------------- served: perf_analyzer


def perf_analyzer_binary() -> Path:
    binary = Path(sys.executable).parent / "perf_analyzer"
    if not binary.is_file():
        raise InputError(f"no perf_analyzer at {binary}; it ships in tritonclient==2.51.0 (serve extra)")
    return binary


def link_perf_analyzer_libs(dest: Path) -> Path:
    """Symlinks named as perf_analyzer expects (libb64.so.0d, ...) to the wheel's hashed-name copies."""
    libs = server_libs()
    for soname, pattern in PERF_ANALYZER_LIBS.items():
        found = sorted(libs.glob(pattern))
        if not found:
            raise InputError(f"no {pattern} in {libs}; perf_analyzer needs it as {soname}")
        (dest / soname).symlink_to(found[0])
    return dest


def perf_analyzer_command(
    url: str, input_json: Path, batch: int, concurrency: int, settings: Settings, csv_path: Path
) -> list[str]:
    return [
        str(perf_analyzer_binary()),
        *("-m", settings.model, "-i", "grpc", "-u", url, "-b", str(batch)),  # short options take no "="
        f"--input-data={input_json}",
        f"--concurrency-range={concurrency}",
        "--measurement-mode=time_windows",
        f"--measurement-interval={settings.window_ms}",
        f"--stability-percentage={settings.stability}",
        f"--max-trials={settings.max_trials}",
        *("-f", str(csv_path)),
        *([f"--shared-memory={settings.shared_memory}"] if settings.shared_memory != "none" else []),
        # variable-shape outputs (ids, scores: k per row) need a region size; 64 KiB holds k=1000 at batch 8
        *(["--output-shared-memory-size=65536"] if settings.shared_memory != "none" else []),
        *(["--streaming"] if settings.streaming else []),
        *(["--async"] if settings.asynchronous else []),
    ]


class PerfAnalyzerError(RuntimeError):
    """perf_analyzer exited with an error (e.g. no stable measurement); the message has its output."""


def parse_perf_csv(text: str, batch: int, requests: int = 0) -> list[Point]:
    """perf_analyzer's -f CSV -> one Point per concurrency row (latencies there are in microseconds)."""
    return [
        Point(
            backend="served",
            batch=batch,
            concurrency=int(row["Concurrency"]),
            throughput_qps=float(row["Inferences/Second"]),  # already counts every caption of a batch
            p50_ms=float(row["p50 latency"]) / 1e3,
            p90_ms=float(row["p90 latency"]) / 1e3,
            p99_ms=float(row["p99 latency"]) / 1e3,
            requests=requests,
        )
        for row in csv.DictReader(io.StringIO(text.strip()))
    ]


def parse_request_count(stdout: str) -> int:
    """The client's request count of the reported (last) measurement in perf_analyzer's console output."""
    counts = re.findall(r"^\s*Request count: (\d+)", stdout, flags=re.MULTILINE)
    return int(counts[-1]) if counts else 0


class CpuProbe:
    """CPU seconds used between `start()` and `stop()` by a server, its stub processes and this process's
    reaped children (perf_analyzer runs as one), as cores: the split behind a served/in-process ratio on a
    machine where the load generator and the server share the cores."""

    def __init__(self, server_pid: int | None):
        import psutil

        self.server = psutil.Process(server_pid) if server_pid else None

    def _seconds(self) -> tuple[float, float, float]:
        import psutil

        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        client = children.ru_utime + children.ru_stime
        if self.server is None:
            return math.nan, math.nan, client
        cpu = lambda p: sum(p.cpu_times()[:2])  # noqa: E731 (user + system)
        stubs = 0.0
        for child in self.server.children(recursive=True):
            with contextlib.suppress(psutil.Error):  # a stub that exited meanwhile
                stubs += cpu(child)
        return cpu(self.server), stubs, client

    def start(self) -> None:
        self.wall, self.before = time.perf_counter(), self._seconds()

    def stop(self) -> dict[str, float]:
        after, wall = self._seconds(), time.perf_counter() - self.wall
        names = ("cores_server", "cores_stubs", "cores_client")
        return {n: round((b - a) / wall, 3) for n, a, b in zip(names, self.before, after, strict=True)}


def self_cores(run: Callable[..., Point], *args) -> Point:
    """`run(*args)`'s point with the cores this process used meanwhile (the in-process side's CPU)."""
    before, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    point = run(*args)
    after, wall = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter() - wall
    used = (after.ru_utime + after.ru_stime) - (before.ru_utime + before.ru_stime)
    return replace(point, cores_client=round(used / wall, 3))


def run_perf_analyzer(
    url: str, input_json: Path, batch: int, concurrency: int, settings: Settings, env: dict[str, str]
) -> Point:
    with tempfile.TemporaryDirectory(prefix="xmr-pa-") as tmp:
        csv_path = Path(tmp) / "pa.csv"
        cmd = perf_analyzer_command(url, input_json, batch, concurrency, settings, csv_path)
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
        if done.returncode != 0 or not csv_path.is_file():
            raise PerfAnalyzerError(
                f"perf_analyzer exit {done.returncode} at batch {batch}, concurrency {concurrency}: "
                f"{' '.join(cmd)}\n{done.stdout[-1500:]}{done.stderr[-1500:]}"
            )
        (point,) = parse_perf_csv(csv_path.read_text(), batch, parse_request_count(done.stdout))
    return point


# ----------------------------------------------------------------------------- in-process pipeline


class InProcessPipeline:
    """What the served ensemble runs, as direct calls: tokenizer -> ONNX Runtime text tower -> FAISS top-k."""

    def __init__(self, artifacts: Path, manifest: dict, threads: int = 1):
        self.one_faiss_thread()
        pre = manifest["preprocessing"]
        self.tokenizer = load_tokenizer(artifacts / pre["tokenizer"])
        self.limits = TextLimits(max_tokens=pre["max_tokens"], max_bytes=pre["max_bytes"])
        spec = ModelSpec.from_dict(manifest["specs"]["text_encoder"])
        self.runner = OnnxRunner(artifacts / "text_encoder.onnx", spec, threads=threads)
        embeddings = np.load(artifacts / "gallery.npy", allow_pickle=False)
        ids = np.load(artifacts / "gallery_ids.npy", allow_pickle=False)
        self.index = GalleryIndex(embeddings, ids)

    @staticmethod
    def one_faiss_thread() -> None:
        """One OpenMP thread for FAISS in the calling thread, as the served gallery_topk (OMP_NUM_THREADS=1).

        OpenMP's thread count is per calling thread: each worker thread must set it again, otherwise FAISS
        starts a team of all cores there (on a 2-core box that made one search ~200x slower)."""
        import faiss

        faiss.omp_set_num_threads(1)

    def search(self, texts: list[str], k: int) -> tuple[np.ndarray, np.ndarray]:
        input_ids, lengths = encode_batch(self.tokenizer, texts, self.limits)  # (B, L), (B,)
        embedding = self.runner.run({"input_ids": input_ids, "lengths": lengths})["text_embedding"]  # (B, D)
        return self.index.search(embedding, k)  # ids (B, k), scores (B, k)


def percentiles_ms(latencies_s: list[float] | np.ndarray) -> tuple[float, float, float]:
    """p50, p90, p99 in ms of latencies in seconds."""
    p50, p90, p99 = np.percentile(np.asarray(latencies_s, dtype=np.float64) * 1e3, [50, 90, 99])
    return float(p50), float(p90), float(p99)


def summarise(backend: str, batch: int, concurrency: int, latencies_s: list[float], wall_s: float) -> Point:
    p50, p90, p99 = percentiles_ms(latencies_s)
    n = len(latencies_s)
    return Point(backend, batch, concurrency, n * batch / wall_s, p50, p90, p99, requests=n)


def run_in_process(
    pipeline: InProcessPipeline, batches: list[list[str]], k: int, concurrency: int, requests: int
) -> Point:
    """`requests` searches from `concurrency` threads, each taking the next request as soon as it is free
    (perf_analyzer's concurrency mode, without the network)."""
    counter = itertools.count()
    latencies: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        pipeline.one_faiss_thread()
        while (i := next(counter)) < requests:
            start = time.perf_counter()
            pipeline.search(batches[i % len(batches)], k)
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)

    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    return summarise("in-process", len(batches[0]), concurrency, latencies, time.perf_counter() - start)


# ----------------------------------------------------------------------------- warm-up and agreement


def served_ids(client: XmrClient, model: str, texts: list[str], k: int) -> np.ndarray:
    """Top-k ids (B, k) from the served `model` (text_search's I/O: text, top_k -> ids, ...)."""
    text = np.array([t.encode("utf-8") for t in texts], dtype=object).reshape(-1, 1)
    top_k = np.full((len(texts), 1), k, dtype=np.int64)
    # every output: asking a 2.51 ensemble for a subset fails ("unexpected deadlock, at least one output
    # is not set")
    outputs = ["ids", "scores", "text_embedding"]
    return client.raw_infer(model, {"text": (text, "BYTES"), "top_k": (top_k, "INT64")}, outputs)["ids"]


def warm_up_and_compare(
    client: XmrClient, pipeline: InProcessPipeline, captions: list[str], settings: Settings
) -> dict[str, str]:
    """Search every caption through both backends at every batch size (this warms both up); per batch
    size, how many captions got identical top-k ids from the two."""
    agreement = {}
    for batch in settings.batch_sizes:
        requests = request_batches(captions, batch)[: math.ceil(len(captions) / batch)]
        same = 0
        for texts in requests:
            served = served_ids(client, settings.model, texts, settings.top_k)  # (B, k)
            local, _ = pipeline.search(texts, settings.top_k)
            same += int((served == local).all(axis=1).sum())
        agreement[f"batch {batch}"] = f"{same}/{len(requests) * batch}"
    return agreement


# ----------------------------------------------------------------------------- reports


def write_atomic(path: Path, write: Callable[[Path], object]) -> None:
    """Call write(tmp_path), then rename onto `path`: no half-written file on failure."""
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def points_csv(points: list[Point]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, [f.name for f in fields(Point)], lineterminator="\n")
    writer.writeheader()
    for p in points:
        writer.writerow({k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(p).items()})
    return out.getvalue()


def throughput_ratios(points: list[Point]) -> dict[tuple[int, int], float]:
    """(batch, concurrency) -> served / in-process throughput, where both were measured."""
    by_key = {(p.backend, p.batch, p.concurrency): p.throughput_qps for p in points}
    return {
        (b, c): qps / by_key[("in-process", b, c)]
        for (backend, b, c), qps in by_key.items()
        if backend == "served" and ("in-process", b, c) in by_key
    }


def plot(points: list[Point], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_qps, ax_p50) = plt.subplots(1, 2, figsize=(11, 4.2))
    batch_sizes = sorted({p.batch for p in points})
    for (backend, batch), group in itertools.groupby(
        sorted(points, key=lambda p: (p.backend != "served", p.batch, p.concurrency)),
        key=lambda p: (p.backend, p.batch),
    ):
        group = list(group)
        style = {  # colour: batch size; solid: served, dashed: in-process
            "marker": "o",
            "color": f"C{batch_sizes.index(batch)}",
            "linestyle": "-" if backend == "served" else "--",
        }
        label = f"{backend}, batch {batch}"
        conc = [p.concurrency for p in group]
        ax_qps.plot(conc, [p.throughput_qps for p in group], label=label, **style)
        ax_p50.plot(conc, [p.p50_ms for p in group], label=label, **style)
    concurrencies = sorted({p.concurrency for p in points})
    for ax, ylabel in ((ax_qps, "throughput (captions/s)"), (ax_p50, "p50 latency per request (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
        ax.set_xlabel("concurrency (requests in flight / threads)")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax_qps.legend(fontsize=8)
    fig.suptitle("text_search: Triton (perf_analyzer, gRPC) vs in-process (same functions, no server)")
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)


def tritonserver_version(server: TritonServer) -> str:
    with urllib.request.urlopen(f"http://{server.http_url}/v2", timeout=5) as r:
        return json.load(r).get("version", "unknown")


def environment(settings: Settings, artifacts: Path, triton_version: str, agreement: dict) -> dict:
    import faiss
    import onnxruntime

    return {
        "machine": {"cpu": cpu_model(), "cores": os.cpu_count(), "platform": platform.platform()},
        "versions": {
            "python": platform.python_version(),
            "onnxruntime": onnxruntime.__version__,
            "faiss": faiss.__version__,
            "tokenizers": version("tokenizers"),
            "tritonserver": triton_version,
            "perf_analyzer (tritonclient)": version("tritonclient"),
            "nvidia-pytriton": version("nvidia-pytriton"),
        },
        "settings": {
            **asdict(settings),
            "artifacts": str(artifacts),
            "model": settings.model,
            "protocol": "grpc",
            "perf_analyzer mode": "concurrency, synchronous, time windows until 3 agree",
            "in-process": "threads sharing one pipeline; faiss omp threads 1",
        },
        "served_vs_in_process_identical_topk_rows": agreement,
    }


def results_table(points: list[Point]) -> Table:
    table = Table(title="text_search: served (Triton, perf_analyzer) vs in-process")
    for name in ("backend", "batch", "concurrency", "captions/s", "p50 ms", "p90 ms", "p99 ms"):
        table.add_column(name, justify="left" if name == "backend" else "right")
    for p in sorted(points, key=lambda p: (p.batch, p.concurrency, p.backend != "served")):
        table.add_row(
            p.backend,
            str(p.batch),
            str(p.concurrency),
            f"{p.throughput_qps:,.0f}",
            *(f"{v:.2f}" for v in (p.p50_ms, p.p90_ms, p.p99_ms)),
        )
    return table


def ratio_table(ratios: dict[tuple[int, int], float]) -> Table:
    table = Table(title="served / in-process throughput")
    for name in ("batch", "concurrency", "ratio"):
        table.add_column(name, justify="right")
    for (batch, concurrency), ratio in sorted(ratios.items()):
        table.add_row(str(batch), str(concurrency), f"{ratio:.2f}")
    return table


# ----------------------------------------------------------------------------- main


def measure_served(
    server: TritonServer,
    input_json: Path,
    settings: Settings,
    env: dict[str, str],
    console: Console,
    in_process: Callable[[int, int, int], Point] | None = None,
) -> tuple[list[Point], list[str], list[dict]]:
    """perf_analyzer at every (batch, concurrency); a point without a stable measurement is skipped.

    `in_process(batch, concurrency, requests)`, when given, runs right after each served point (the server
    idle), so the two sides of a ratio are measured seconds apart: on a shared machine whose load drifts,
    measuring all served points first and all in-process points after biased the ratios by the drift.
    Its points are returned with the served ones.

    Around each point the server's statistics are read and diffed (`xmr.clients.stats`): the per-hop
    breakdown of that point (all of perf_analyzer's windows, warm-up included) is printed and returned as
    rows labelled with batch and concurrency."""
    points, failures, hops = [], [], []
    grid = list(itertools.product(settings.batch_sizes, settings.concurrencies))
    probe, cpu = StatsProbe(server.grpc_url, settings.model), CpuProbe(server.pid)
    try:
        for batch, concurrency in (
            bar := tqdm(grid, desc="served (perf_analyzer)", unit="point", disable=None)
        ):
            bar.set_postfix(batch=batch, concurrency=concurrency)
            probe.start()
            cpu.start()
            try:
                point = run_perf_analyzer(server.grpc_url, input_json, batch, concurrency, settings, env)
            except PerfAnalyzerError as e:
                failures.append(str(e))
                tqdm.write(f"skipped: {e}")
                continue
            point = replace(point, **cpu.stop())
            breakdown = probe.stop()
            points.append(point)
            if in_process is not None:
                points.append(self_cores(in_process, batch, concurrency, point.requests))
            hops += breakdown.rows(batch=batch, concurrency=concurrency)
            title = (
                f"{settings.model}, batch {batch}, concurrency {concurrency}: "
                f"{point.throughput_qps:,.0f} captions/s; server time per request by hop (us)"
            )
            console.print(breakdown_table(breakdown, title))
    finally:
        probe.close()
    return points, failures, hops


def measure(
    artifacts: Path, repository: Path, settings: Settings, console: Console
) -> tuple[list[Point], dict]:
    manifest = read_manifest(artifacts)
    captions = sample_captions(manifest, settings.captions)
    pipeline = InProcessPipeline(artifacts, manifest, settings.threads)
    with tempfile.TemporaryDirectory(prefix="xmr-bench-") as tmp:
        input_json = Path(tmp) / "input_data.json"
        input_json.write_text(json.dumps(perf_analyzer_input(captions, settings.top_k)))
        env = {**os.environ, "LD_LIBRARY_PATH": str(link_perf_analyzer_libs(Path(tmp)))}
        with TritonServer(repository) as server:  # stopped on exit, whatever happens
            triton_version = tritonserver_version(server)
            console.print(f"tritonserver {triton_version} ready on gRPC {server.grpc_url}")
            client = XmrClient(server.grpc_url, "grpc")
            try:
                agreement = warm_up_and_compare(client, pipeline, captions, settings)
            finally:
                client.close()
            console.print(f"warm-up: identical top-{settings.top_k} ids, served vs in-process: {agreement}")

            def in_process(batch: int, concurrency: int, requests: int) -> Point:
                batches = request_batches(captions, batch)
                requests = max(settings.min_requests, requests)
                return run_in_process(pipeline, batches, settings.top_k, concurrency, requests)

            points, failures, hops = measure_served(server, input_json, settings, env, console, in_process)
    report = environment(settings, artifacts, triton_version, agreement)
    report["perf_analyzer_failures"] = failures
    report["hops"] = hops
    return points, report


def settings_problem(settings: Settings) -> str | None:
    """What is wrong with the grid and perf_analyzer settings a user gave, or None."""
    if min([*settings.batch_sizes, *settings.concurrencies, settings.window_ms, settings.max_trials]) < 1:
        return "batch sizes, concurrencies, --window-ms and --max-trials must be >= 1"
    return None


def run_measurement(
    console: Console, artifacts: list[Path] | Path, repository: Path | None, run: Callable[[Path], T]
) -> tuple[T | None, int]:
    """`run(repository)`: on `repository` as given, else on a cpu repository built from `artifacts` in a
    temporary folder (removed after). Returns (its result, 0), or (None, exit code) with the error printed:
    2 for bad input, 1 for a server or perf_analyzer failure."""
    try:
        if repository is not None:
            return run(repository), 0
        with tempfile.TemporaryDirectory(prefix="xmr-bench-repo-") as tmp:
            return run(build_repository(artifacts, Path(tmp) / "repository", "cpu")), 0
    except InputError as e:
        console.print(f"error: {e}")
        return None, 2
    except (RuntimeError, subprocess.TimeoutExpired) as e:  # ServerError, perf_analyzer hanging
        console.print(f"error: {e}")
        return None, 1


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m xmr.perf.bench_text_search",
        description="Throughput and latency of text search: served by Triton (perf_analyzer) vs in-process.",
    )
    parser.add_argument("artifacts", type=Path, help="exported artifact folder (manifest.json, ...)")
    parser.add_argument("--out", type=Path, default=Path("perf/results"), help="folder for csv/png/json")
    parser.add_argument("--repository", type=Path, help="a built cpu repository (default: build a temp one)")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8], help="captions per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="requests in flight")
    parser.add_argument("--window-ms", type=int, default=1000, help="perf_analyzer measurement window")
    parser.add_argument("--stability", type=int, default=25, help="%% 3 windows may differ (perf_analyzer)")
    parser.add_argument("--max-trials", type=int, default=10, help="windows before perf_analyzer gives up")
    parser.add_argument("--min-requests", type=int, default=200, help="in-process requests per point, min")
    parser.add_argument("--captions", type=int, default=48, help="distinct test-split captions to cycle")
    parser.add_argument("--top-k", type=int, default=10)
    parser.add_argument("--model", default=MODEL, help="served model (text_search's I/O) perf_analyzer loads")
    parser.add_argument(
        "--shared-memory", choices=("none", "system"), default="none", help="perf_analyzer's tensor transport"
    )
    parser.add_argument("--streaming", action="store_true", help="perf_analyzer over a gRPC stream")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 120)
    settings = Settings(
        args.batch_sizes,
        args.concurrency,
        args.window_ms,
        args.stability,
        args.max_trials,
        args.min_requests,
        args.captions,
        args.top_k,
        model=args.model,
        shared_memory=args.shared_memory,
        streaming=args.streaming,
    )
    if problem := settings_problem(settings):
        console.print(f"error: {problem}")
        return 2
    started = time.perf_counter()
    measured, code = run_measurement(
        console,
        args.artifacts,
        args.repository,
        lambda repository: measure(args.artifacts, repository, settings, console),
    )
    if measured is None:
        return code
    points, env = measured
    env["wall_s"] = round(time.perf_counter() - started, 1)

    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "text_search.csv", lambda p: p.write_text(points_csv(points)))
    write_atomic(args.out / "text_search.png", lambda p: plot(points, p))
    hops = env.pop("hops")
    write_atomic(args.out / "text_search_hops.csv", lambda p: p.write_text(breakdown_csv(hops)))
    write_atomic(args.out / "environment.json", lambda p: p.write_text(json.dumps(env, indent=2) + "\n"))
    console.print(results_table(points))
    console.print(ratio_table(throughput_ratios(points)))
    console.print(f"{env['machine']['cpu']}, {env['machine']['cores']} cores; wall {env['wall_s']} s")
    console.print(
        f"wrote {args.out}/text_search.csv, text_search_hops.csv, text_search.png, environment.json"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
