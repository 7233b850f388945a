"""Every served entry point under perf_analyzer, beside the same models run in-process.

    python -m xmr.perf.bench_served ARTIFACT [ARTIFACT ...] --out perf/results/served
        [--batch-sizes 1] [--concurrency 1 4 16] [--repository BUILT_REPO]

One cpu repository is built from the artifact folders (any mix of families, as `xmr repo` builds it) and
served by the real `tritonserver` on free loopback ports. For each entry point it serves (`text_search`,
`image_embed`, `text_video_search`, `video_embed`, `moment_search`, ProTA's `text_video_rerank`: the
ensembles, and the one-model entry points of the cpu target), at each batch size and concurrency:

- `served`: Triton's `perf_analyzer` over gRPC in concurrency mode (time windows until three agree), its
  input data the requests `xmr load` sends (`clients/load.py`'s recipes: Shapes captions and images at the
  served size, a top-k, valid video ids; inputs without a recipe filled by dtype);
- `in-process`: the same python models, loaded from the same repository folder the server reads (each
  model's `model.py` shim imported and initialised as the python backend does), called directly from N
  threads with no server between them; an ensemble's steps run in its config's order with its tensor maps,
  and a BLS model (`text_video_rerank`) calls the models it calls on the server directly (`direct_call`).
  Run right after the served point, for as many requests as perf_analyzer counted (at least
  `--min-requests`), so the two sides of a ratio are measured seconds apart.

The server's own per-hop statistics are diffed around each served point (`xmr.clients.stats`).

Writes OUT/served.csv (endpoint, backend, batch, concurrency, items/s, p50/p90/p99 ms, requests),
OUT/served_ratio.csv (served / in-process throughput per point), OUT/served_hops.csv, OUT/served.png (one
panel per entry point) and OUT/environment.json. Throughput counts batch items (captions, images, videos,
queries) per second; latency is per request.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import io
import itertools
import json
import os
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, fields, replace
from pathlib import Path

import numpy as np
from rich.console import Console
from rich.table import Table

from xmr.clients.load import Content, build_requests, load_content, repository_ensembles
from xmr.clients.load import read_manifest as repository_manifest
from xmr.clients.server import TritonServer
from xmr.clients.stats import breakdown_csv
from xmr.export.iospec import ModelSpec
from xmr.models.errors import InputError
from xmr.perf.bench_text_search import (
    Point,
    Settings,
    environment,
    link_perf_analyzer_libs,
    measure_served,
    run_measurement,
    settings_problem,
    summarise,
    throughput_ratios,
    tritonserver_version,
    write_atomic,
)

POOL = 64  # distinct requests per entry point, cycled


# ----------------------------------------------------------------------------- in-process


def model_config(folder: Path):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    return text_format.Parse((folder / "config.pbtxt").read_text(), model_config_pb2.ModelConfig())


def load_python_model(folder: Path):
    """The python-backend model of a repository folder, as the backend loads it: its `1/model.py` imported,
    `TritonPythonModel()` made and `initialize`d with the config as JSON and its version folder."""
    from google.protobuf.json_format import MessageToDict

    cfg = model_config(folder)
    spec = importlib.util.spec_from_file_location(f"xmr_bench_{folder.name}", folder / "1" / "model.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model = module.TritonPythonModel()
    config = MessageToDict(cfg, preserving_proto_field_name=True)
    model.initialize(
        {"model_config": json.dumps(config), "model_repository": str(folder), "model_version": "1"}
    )
    return model


class InProcessEndpoint:
    """A served entry point without the server: its python models, called in its ensemble's step order."""

    def __init__(self, repository: Path, name: str):
        cfg = model_config(repository / name)
        if cfg.platform == "ensemble":
            self.steps = [
                (s.model_name, dict(s.input_map), dict(s.output_map)) for s in cfg.ensemble_scheduling.step
            ]
        else:  # one python model with the entry point's own I/O
            spec = ModelSpec.from_dict(json.loads((repository / name / "1" / "spec.json").read_text()))
            self.steps = [(name, {n: n for n in spec.input_names}, {t.name: t.name for t in spec.outputs})]
        self.models = {m: load_python_model(repository / m) for m, _, _ in self.steps}
        for model in self.models.values():
            if hasattr(model, "connect"):  # a BLS model (text_video_rerank): its called models, directly
                called = {name: load_python_model(repository / name) for name in model.models.values()}
                model.connect(direct_call(called))

    def __call__(self, inputs: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tensors = dict(inputs)
        for model, inputs_map, outputs_map in self.steps:
            feeds = {own: tensors[outer] for own, outer in inputs_map.items()}
            self.models[model].check(feeds)
            (result,) = self.models[model].run([feeds])
            if isinstance(result, Exception):
                raise result
            tensors.update({outer: result[own] for own, outer in outputs_map.items()})
        return tensors


def direct_call(models: dict):
    """A BLS model's `Call` without a server: the named python model checked and run in this process, its
    one-value-per-row inputs reshaped (B, 1) -> (B,) as Triton's config reshape does."""

    def call(name: str, inputs: dict[str, np.ndarray], outputs: tuple[str, ...]) -> dict[str, np.ndarray]:
        model = models[name]
        feeds = {
            t.name: inputs[t.name].reshape(-1) if model.spec.batched and len(t.shape) == 1 else inputs[t.name]
            for t in model.spec.inputs
        }
        model.check(feeds)
        (result,) = model.run([feeds])
        if isinstance(result, Exception):
            raise InputError(f"model {name!r}: {result}")
        return {o: result[o] for o in outputs}

    return call


def one_faiss_thread() -> None:
    """One OpenMP thread for FAISS in the calling thread, as the served models (OMP_NUM_THREADS=1)."""
    try:
        import faiss
    except ImportError:
        return
    faiss.omp_set_num_threads(1)


def batched(requests: list[dict], batch: int) -> list[dict[str, np.ndarray]]:
    """len(requests) requests of `batch` consecutive rows each (wrapping), as arrays by input name."""
    n = len(requests)
    return [
        {
            name: np.concatenate([requests[(k * batch + j) % n][name] for j in range(batch)])
            for name in requests[0]
        }
        for k in range(n)
    ]


def run_in_process(
    endpoint: InProcessEndpoint, batches: list[dict], concurrency: int, requests: int
) -> Point:
    """`requests` calls from `concurrency` threads, each taking the next as soon as it is free."""
    counter = itertools.count()
    latencies: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        one_faiss_thread()
        while (i := next(counter)) < requests:
            start = time.perf_counter()
            endpoint(batches[i % len(batches)])
            elapsed = time.perf_counter() - start
            with lock:
                latencies.append(elapsed)

    batch = len(next(iter(batches[0].values())))
    start = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        for future in [pool.submit(worker) for _ in range(concurrency)]:
            future.result()
    return summarise("in-process", batch, concurrency, latencies, time.perf_counter() - start)


# ----------------------------------------------------------------------------- served


def perf_analyzer_data(requests: list[dict]) -> dict:
    """perf_analyzer's --input-data JSON: one step per request, each a batch-1 row (shape without batch)."""

    def tensor(array: np.ndarray) -> dict:
        row = array[0]
        content = [x.decode("utf-8") for x in row.ravel()] if row.dtype == object else row.ravel().tolist()
        return {"content": content, "shape": list(row.shape)}

    return {"data": [{name: tensor(array) for name, (array, _) in r.items()} for r in requests]}


def measure_endpoint(
    server: TritonServer,
    repository: Path,
    name: str,
    requests: list[dict],
    settings: Settings,
    env: dict,
    tmp: Path,
    console: Console,
) -> tuple[list[Point], list[str], list[dict]]:
    endpoint = InProcessEndpoint(repository, name)
    rows = [{k: array for k, (array, _) in r.items()} for r in requests]
    for r in rows[:8]:  # warm-up, and a request the in-process side cannot answer stops here
        endpoint(r)
    input_json = tmp / f"{name}.json"
    input_json.write_text(json.dumps(perf_analyzer_data(requests)))

    def in_process(batch: int, concurrency: int, counted: int) -> Point:
        return run_in_process(
            endpoint, batched(rows, batch), concurrency, max(settings.min_requests, counted)
        )

    return measure_served(server, input_json, replace(settings, model=name), env, console, in_process)


def max_batch(repository: Path, name: str) -> int:
    return int(model_config(repository / name).max_batch_size)


def measure(repository: Path, settings: Settings, console: Console, only: list[str] | None = None):
    manifest = repository_manifest(repository)
    names = [n for n in repository_ensembles(repository) if not only or n in only]
    if not names:
        raise InputError(f"{repository} serves none of {only}; it serves {repository_ensembles(repository)}")
    content: Content = load_content(manifest, n=POOL)
    requests = build_requests(manifest, names, content, n=POOL)
    points: dict[str, list[Point]] = {}
    failures, hops = [], []
    with tempfile.TemporaryDirectory(prefix="xmr-bench-served-") as tmp:
        env = {**os.environ, "LD_LIBRARY_PATH": str(link_perf_analyzer_libs(Path(tmp)))}
        with TritonServer(repository) as server:
            triton_version = tritonserver_version(server)
            console.print(f"tritonserver {triton_version} ready on gRPC {server.grpc_url}; serving {names}")
            for name in names:
                limit = max_batch(repository, name)
                batches = [b for b in settings.batch_sizes if b <= max(limit, 1)]
                got, failed, hop_rows = measure_endpoint(
                    server, repository, name, requests[name], replace(settings, batch_sizes=batches), env,
                    Path(tmp), console,
                )  # fmt: skip
                points[name] = got
                failures += failed
                hops += [{"endpoint": name, **h} for h in hop_rows]
    report = environment(settings, repository, triton_version, {})
    report["settings"].pop("model", None)
    report["endpoints"] = names
    report["perf_analyzer_failures"] = failures
    return points, hops, report


# ----------------------------------------------------------------------------- reports


def points_csv(points: dict[str, list[Point]]) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, ["endpoint", *(f.name for f in fields(Point))], lineterminator="\n")
    writer.writeheader()
    for name, group in points.items():
        for p in group:
            row = {k: round(v, 4) if isinstance(v, float) else v for k, v in asdict(p).items()}
            writer.writerow({"endpoint": name, **row})
    return out.getvalue()


def ratios_csv(points: dict[str, list[Point]]) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["endpoint", "batch", "concurrency", "served_over_in_process"])
    for name, group in points.items():
        for (batch, concurrency), ratio in sorted(throughput_ratios(group).items()):
            writer.writerow([name, batch, concurrency, round(ratio, 3)])
    return out.getvalue()


def plot(points: dict[str, list[Point]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(points)
    fig, axes = plt.subplots(1, len(names), figsize=(4.2 * len(names), 3.8), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        group = points[name]
        batches = sorted({p.batch for p in group})
        for backend, batch in itertools.product(("served", "in-process"), batches):
            line = sorted(
                (p for p in group if p.backend == backend and p.batch == batch), key=lambda p: p.concurrency
            )
            if line:
                ax.plot(
                    [p.concurrency for p in line],
                    [p.throughput_qps for p in line],
                    marker="o",
                    color=f"C{batches.index(batch)}",
                    linestyle="-" if backend == "served" else "--",
                    label=f"{backend}, batch {batch}",
                )
        concurrencies = sorted({p.concurrency for p in group})
        ax.set_xscale("log", base=2)
        ax.set_xticks(concurrencies, [str(c) for c in concurrencies])
        ax.set_title(name)
        ax.set_xlabel("concurrency")
        ax.grid(True, alpha=0.3)
    axes[0][0].set_ylabel("items / s")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Triton (perf_analyzer, gRPC; solid) vs the same python models in-process (dashed)")
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)


def results_table(points: dict[str, list[Point]]) -> Table:
    table = Table(title="served (Triton, perf_analyzer) vs in-process, items/s and served / in-process")
    for column in ("endpoint", "batch", "concurrency", "served", "in-process", "ratio", "served p50 ms"):
        table.add_column(column, justify="left" if column == "endpoint" else "right")
    for name, group in points.items():
        by = {(p.backend, p.batch, p.concurrency): p for p in group}
        for (batch, concurrency), ratio in sorted(throughput_ratios(group).items()):
            served, local = by[("served", batch, concurrency)], by[("in-process", batch, concurrency)]
            table.add_row(
                name, str(batch), str(concurrency), f"{served.throughput_qps:,.0f}",
                f"{local.throughput_qps:,.0f}", f"{ratio:.2f}", f"{served.p50_ms:.2f}",
            )  # fmt: skip
    return table


# ----------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m xmr.perf.bench_served",
        description="perf_analyzer on every served entry point, beside the same python models in-process.",
    )
    parser.add_argument("artifacts", type=Path, nargs="*", help="exported artifact folders (any families)")
    parser.add_argument("--repository", type=Path, help="a built cpu repository instead of the artifacts")
    parser.add_argument(
        "--out", type=Path, default=Path("perf/results/served"), help="folder for the outputs"
    )
    parser.add_argument("--only", nargs="+", help="measure only these entry points")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1], help="items per request")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16], help="requests in flight")
    parser.add_argument("--window-ms", type=int, default=1000, help="perf_analyzer measurement window")
    parser.add_argument("--stability", type=int, default=25, help="%% 3 windows may differ (perf_analyzer)")
    parser.add_argument("--max-trials", type=int, default=10, help="windows before perf_analyzer gives up")
    parser.add_argument("--min-requests", type=int, default=100, help="in-process requests per point, min")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 120)
    settings = Settings(
        args.batch_sizes, args.concurrency, args.window_ms, args.stability, args.max_trials,
        args.min_requests, captions=POOL, top_k=0,
    )  # fmt: skip
    if problem := settings_problem(settings):
        console.print(f"error: {problem}")
        return 2
    if not args.artifacts and args.repository is None:
        console.print("error: give artifact folders or --repository")
        return 2
    started = time.perf_counter()
    measured, code = run_measurement(
        console,
        args.artifacts,
        args.repository,
        lambda repository: measure(repository, settings, console, args.only),
    )
    if measured is None:
        return code
    points, hops, report = measured
    report["wall_s"] = round(time.perf_counter() - started, 1)
    args.out.mkdir(parents=True, exist_ok=True)
    write_atomic(args.out / "served.csv", lambda p: p.write_text(points_csv(points)))
    write_atomic(args.out / "served_ratio.csv", lambda p: p.write_text(ratios_csv(points)))
    write_atomic(args.out / "served_hops.csv", lambda p: p.write_text(breakdown_csv(hops)))
    write_atomic(args.out / "served.png", lambda p: plot(points, p))
    write_atomic(args.out / "environment.json", lambda p: p.write_text(json.dumps(report, indent=2) + "\n"))
    console.print(results_table(points))
    console.print(
        f"{report['machine']['cpu']}, {report['machine']['cores']} cores; wall {report['wall_s']} s"
    )
    console.print(
        f"wrote {args.out}/served.csv, served_ratio.csv, served_hops.csv, served.png, environment.json"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
