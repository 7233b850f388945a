"""`xmr load`: a Locust load test of the served ensembles over gRPC, on the real tritonserver.

`run_load` starts the server on free loopback ports (`TritonServer`), checks that every ensemble it will
load answers a request built by its recipe (and warms the models up), runs Locust headless in a child
process on `xmr.perf.locustfile` (tritonclient gRPC users, one task per ensemble, weighted), samples the
memory of the server's process tree while it runs (psutil), stops everything (also on Ctrl-C, after
Locust has written its reports), and writes into OUT:

- `locust_stats.csv`, `locust_stats_history.csv`, `locust_failures.csv`, `locust_exceptions.csv` and
  `locust_report.html`: Locust's own reports; `locust.log`: its output;
- `locust_samples.npz`: every request's latency in float milliseconds (Locust's CSV rounds to whole ms,
  too coarse for ~3 ms requests), from which the summary's percentiles are computed;
- `summary.json` / `summary.csv`: per ensemble and in total, requests, failures, requests/s, p50/p95/p99
  (and Locust's own rounded figures beside them); `memory.csv`: RSS of the server over time;
- `load.png`: throughput, p50/p95 latency (from Locust's `_stats_history.csv`) and memory over time;
- `tritonserver.log`: the server's log.

What is loaded is data: `RECIPES` maps an ensemble to how a valid request is built from its I/O spec in
the repository's `manifest.json` (dynamic dim sizes, and a filler per input: Shapes captions, Shapes
images of the served size, a top-k). Inputs a recipe does not name are filled by their dtype. Loading a
new ensemble is one entry. Served ensembles without an entry are skipped (and reported as such). A served
entry point that is one model rather than an ensemble (the cpu target's `text_search`, one python model with
the ensemble's I/O) is loaded like an ensemble when it has an entry: what counts is the name and its spec.

Hostile traffic (`--hostile W`, what `make soak` mixes in): a task of weight W sends requests that the
server must refuse with INVALID_ARGUMENT, built from each loaded ensemble's recipe with one input spoiled
(`HOSTILE`: an empty text, a top_k of 0, an unknown video id, a mask with no real frame). Locust counts
such a request as a success when it is refused as expected (under `<ensemble> (hostile)`), as a failure
when it is answered or refused otherwise; every good request's answer is compared with its answer before
the load (the locustfile's reference), and a changed answer is a failure. So a run is `ok` only when no
good request failed or changed and every hostile one was refused, each naming its input.

This module imports neither Locust (which monkey-patches the process with gevent) nor anything heavy at
import time: the locustfile imports it for the recipes.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from xmr.models.errors import InputError

RUN_TIME_S = 60
SOAK_RUN_TIME_S = 600
TOP_K = 5
DEFAULT_DIM = 8  # size of a dynamic dim (frames, clips, ...) that a recipe does not set
POOL = 64  # distinct requests per ensemble (Shapes test images, 5 captions each)
CLIENT_TIMEOUT_S = 30.0
PREFIX = "locust"
PERCENTILES = (50, 95, 99)


@dataclass(frozen=True)
class Recipe:
    """How to build valid requests of one ensemble from its spec: a filler per input (a key of FILLERS;
    inputs left out are filled by dtype, see `default_filler`) and the sizes of its dynamic dims."""

    fill: Mapping[str, str] = field(default_factory=dict)
    sizes: Mapping[str, int] = field(default_factory=dict)


RECIPES: dict[str, Recipe] = {
    "text_search": Recipe({"text": "caption", "top_k": "top_k"}),
    "image_embed": Recipe({"image": "image"}),
    # inputs filled by dtype (text: captions, uint8: Shapes frames, bool: all true, float: N(0, 1))
    "text_video_search": Recipe(),
    "video_embed": Recipe(sizes={"frames": DEFAULT_DIM}),
    "moment_search": Recipe(),
    "text_video_rerank": Recipe(),  # ProTA's two-stage search (a BLS model)
}


# ensemble -> the spoilt variants of its recipe's requests ({input: filler}), sent by the hostile task
HOSTILE: dict[str, tuple[Mapping[str, str], ...]] = {
    "text_search": ({"text": "empty_text"}, {"top_k": "zeros"}, {"text": "oversize_text"}),
    "text_video_search": ({"text": "empty_text"}, {"top_k": "zeros"}),
    "moment_search": ({"video_id": "unknown_id"}, {"text": "invalid_utf8"}, {"top_k": "zeros"}),
    "video_embed": ({"frame_mask": "zeros"},),
    "text_video_rerank": ({"text": "empty_text"}, {"top_k": "zeros"}),
}
HOSTILE_SUFFIX = " (hostile)"  # the Locust name of an ensemble's hostile requests
HOSTILE_STATUS = "StatusCode.INVALID_ARGUMENT"


# ----------------------------------------------------------------------------- options


def parse_run_time(text: str | int | None, soak: bool = False) -> int:
    """Seconds from `90`, `90s`, `10m`, `1h30m` (Locust's forms); the default depends on `soak`."""
    if text is None or text == "":
        return SOAK_RUN_TIME_S if soak else RUN_TIME_S
    s = str(text).strip().lower()
    if s.isdigit():
        seconds = int(s)
    else:
        m = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", s)
        if not m or not any(m.groups()):
            raise InputError(f"--run-time {text!r}: expected seconds or a duration like 20s, 10m, 1h30m")
        h, mi, se = (int(g or 0) for g in m.groups())
        seconds = 3600 * h + 60 * mi + se
    if seconds < 1:
        raise InputError(f"--run-time {text!r} is under one second")
    return seconds


def parse_weights(items: list[str] | None) -> dict[str, int]:
    """`["text_search=3", "image_embed=1"]` (or one comma-separated item) -> {ensemble: weight}."""
    weights: dict[str, int] = {}
    for item in items or []:
        for part in filter(None, (p.strip() for p in item.split(","))):
            name, eq, value = part.partition("=")
            if not eq or not name.strip() or not value.strip().isdigit():
                raise InputError(f"--weight {part!r}: expected ENSEMBLE=WEIGHT with a whole number >= 0")
            weights[name.strip()] = int(value)
    return weights


def format_weights(weights: Mapping[str, int]) -> str:
    return ",".join(f"{k}={v}" for k, v in weights.items())


def plan_tasks(served: list[str], weights: Mapping[str, int]) -> dict[str, int]:
    """{ensemble: weight} of the tasks: every served ensemble with a recipe, weight 1 unless `weights`
    says otherwise (0 leaves it out). InputError naming an unknown ensemble, or if nothing is left."""
    for name in weights:
        if name not in served:
            raise InputError(
                f"--weight names unknown ensemble {name!r}; the repository serves: "
                f"{', '.join(served) or 'no ensembles'}"
            )
        if name not in RECIPES:
            raise InputError(
                f"--weight names ensemble {name!r}, which has no request recipe in xmr.clients.load.RECIPES; "
                f"loadable: {', '.join(n for n in served if n in RECIPES)}"
            )
    plan = {n: weights.get(n, 1) for n in served if n in RECIPES}
    plan = {n: w for n, w in plan.items() if w > 0}
    if not plan:
        raise InputError(
            f"nothing to load: served ensembles {', '.join(served) or '(none)'}; "
            f"with recipes: {', '.join(n for n in served if n in RECIPES) or '(none)'}; all weights 0?"
        )
    return plan


# ----------------------------------------------------------------------------- what is served


def entry_point(name: str, platform: str) -> bool:
    """Whether a served model is loaded as an ensemble: it is one, or it has a recipe (a one-model entry
    point such as the cpu target's `text_search`)."""
    return platform == "ensemble" or name in RECIPES


def repository_ensembles(repository: Path) -> list[str]:
    """The ensembles of a repository on disk (their `config.pbtxt` says `platform: "ensemble"`) and its
    one-model entry points with a recipe (`entry_point`)."""
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    repository = Path(repository)
    if not repository.is_dir():
        raise InputError(f"model repository {repository} does not exist; build one with `xmr repo`")
    names = []
    for config in sorted(repository.glob("*/config.pbtxt")):
        cfg = text_format.Parse(config.read_text(), model_config_pb2.ModelConfig())
        name = cfg.name or config.parent.name
        if entry_point(name, cfg.platform):
            names.append(name)
    return names


def served_ensembles(client) -> list[str]:
    """The READY ensembles (and one-model entry points, `entry_point`) of a running server, from its
    repository index and model configs (`client` is a `tritonclient.grpc.InferenceServerClient`)."""
    index = client.get_model_repository_index(as_json=True).get("models", [])
    ready = [m["name"] for m in index if m.get("state") == "READY"]
    return sorted(
        n
        for n in ready
        if entry_point(n, client.get_model_config(n, as_json=True)["config"].get("platform", ""))
    )


# ----------------------------------------------------------------------------- request content


@dataclass
class Content:
    """Real request content: Shapes test captions and images at the served image size."""

    captions: list[str]
    images: np.ndarray  # (N, S, S, 3) uint8


def load_content(manifest: dict, captions_file: Path | None = None, n: int = POOL) -> Content:
    from xmr.models.data.shapes import ShapesConfig, make_shapes

    size = int(manifest.get("preprocessing", {}).get("image_size", 64))
    split = make_shapes("test", ShapesConfig(n_test=n, image_size=size))
    captions = split.flat_captions()
    if captions_file is not None:
        captions = [ln.strip() for ln in Path(captions_file).read_text().splitlines() if ln.strip()]
        if not captions:
            raise InputError(f"{captions_file} has no captions (one per line)")
    return Content(captions, split.images)


def _caption(t, shape, i, content):
    return np.full(shape, content.captions[i % len(content.captions)].encode("utf-8"), dtype=object)


def _image(t, shape, i, content):
    """Shapes images where the trailing dims are (S, S, 3) (one per leading position: video frames get
    consecutive images), deterministic noise for any other uint8 shape."""
    n = len(content.images)
    if tuple(shape[-3:]) == content.images.shape[1:]:
        lead = int(np.prod(shape[:-3]))
        return content.images[(i + np.arange(lead)) % n].reshape(shape)
    return np.random.default_rng(i).integers(0, 256, size=shape, dtype=np.uint8)


def _top_k(t, shape, i, content):
    return np.full(shape, TOP_K, dtype=t.numpy_dtype)


def _ones(t, shape, i, content):
    return np.ones(shape, dtype=t.numpy_dtype)


def _zeros(t, shape, i, content):
    return np.zeros(shape, dtype=t.numpy_dtype)


def _normal(t, shape, i, content):
    return np.random.default_rng(i).standard_normal(shape).astype(t.numpy_dtype)


def _empty_text(t, shape, i, content):
    return np.full(shape, b"", dtype=object)


def _oversize_text(t, shape, i, content):
    return np.full(shape, b"a red circle " * 512, dtype=object)  # 6.5 KB, over the 4 KB max_bytes


def _invalid_utf8(t, shape, i, content):
    return np.full(shape, b"\xff\xfe a red circle", dtype=object)


def _unknown_id(t, shape, i, content):
    return np.full(shape, 10**12 + i, dtype=t.numpy_dtype)


FILLERS = {
    "caption": _caption,
    "image": _image,
    "top_k": _top_k,
    "ones": _ones,
    "zeros": _zeros,
    "normal": _normal,
    # hostile ones (HOSTILE)
    "empty_text": _empty_text,
    "oversize_text": _oversize_text,
    "invalid_utf8": _invalid_utf8,
    "unknown_id": _unknown_id,
}


def default_filler(t) -> str:
    if t.dtype == "bytes":
        return "caption"
    if t.name == "top_k" or t.name.endswith("_k"):
        return "top_k"
    if t.dtype == "uint8":
        return "image"
    if t.dtype == "bool":
        return "ones"
    if t.dtype.startswith("float"):
        return "normal"
    return "zeros"


def request_shape(t, sizes: Mapping[str, int]) -> list[int]:
    """One request row: batch 1, dynamic dims from `sizes`; a one-value-per-row input is [1, 1]."""
    rest = [d if isinstance(d, int) else sizes.get(d, DEFAULT_DIM) for d in t.shape[1:]]
    return [1, *(rest or [1])]


def build_requests(manifest: dict, names, content: Content, n: int = POOL) -> dict[str, list[dict]]:
    """{ensemble: n requests, each {input: (array, Triton datatype)}} from the recipes and the specs."""
    from xmr.export.iospec import ModelSpec

    out = {}
    for name in names:
        if name not in manifest.get("specs", {}):
            raise InputError(f"the repository's manifest.json has no spec of ensemble {name!r}")
        spec = ModelSpec.from_dict(manifest["specs"][name])
        recipe = RECIPES[name]
        unknown = set(recipe.fill) - set(spec.input_names)
        if unknown:
            raise InputError(
                f"RECIPES[{name!r}] fills {', '.join(sorted(unknown))}, which {name} does not take; "
                f"its inputs: {', '.join(spec.input_names)}"
            )
        requests = []
        for i in range(n):
            row = {}
            for t in spec.inputs:
                filler = FILLERS[recipe.fill.get(t.name, default_filler(t))]
                row[t.name] = (filler(t, request_shape(t, recipe.sizes), i, content), t.client_dtype)
            requests.append(row)
        out[name] = requests
    return out


def build_hostile(manifest: dict, names, content: Content, n: int = POOL) -> dict[str, list[dict]]:
    """{ensemble: n requests the server must refuse}: its recipe's requests, each with the inputs of one
    of its HOSTILE variants (in turn) spoilt. Ensembles without a HOSTILE entry get none."""
    from xmr.export.iospec import ModelSpec

    names = [name for name in names if name in HOSTILE]
    out = {}
    for name, requests in build_requests(manifest, names, content, n).items():
        spec = ModelSpec.from_dict(manifest["specs"][name])
        for i, request in enumerate(requests):
            for input_name, filler in HOSTILE[name][i % len(HOSTILE[name])].items():
                t = spec.input(input_name)
                array, dtype = request[input_name]
                request[input_name] = (FILLERS[filler](t, list(array.shape), i, content), dtype)
        out[name] = requests
    return out


def same_answer(got: dict[str, np.ndarray], want: dict[str, np.ndarray], atol: float = 1e-4) -> str | None:
    """None when two answers of one request agree (integers exactly, floats within `atol`), else the
    first output that differs."""
    for name, value in want.items():
        other = got.get(name)
        if other is None or other.shape != value.shape:
            return name
        if value.dtype.kind in "iub" and not np.array_equal(other, value):
            return name
        if value.dtype.kind == "f" and not np.allclose(other, value, atol=atol, rtol=0):
            return name
    return None


def infer_inputs(tc, request: dict) -> list:
    """tritonclient InferInputs (`tc`: tritonclient.grpc or .http) of one built request."""
    inputs = []
    for name, (array, dtype) in request.items():
        x = tc.InferInput(name, list(array.shape), dtype)
        x.set_data_from_numpy(array)
        inputs.append(x)
    return inputs


def read_manifest(repository: Path) -> dict:
    """The repository's manifest.json (a one-artifact repository's), its `specs` the served models' specs
    of serving.json where there is one (a video or moment artifact's manifest lists its graphs' specs; a
    repository of several artifacts has serving.json alone)."""
    path, serving = Path(repository) / "manifest.json", Path(repository) / "serving.json"
    if not path.is_file() and not serving.is_file():
        raise InputError(f"{repository} has no manifest.json; build the repository with `xmr repo`")
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    if serving.is_file():
        manifest = {**manifest, "specs": json.loads(serving.read_text())["specs"]}
    return manifest


# ----------------------------------------------------------------------------- the run


@dataclass
class LoadConfig:
    repository: Path
    out: Path
    users: int = 8
    spawn_rate: float = 2.0
    run_time_s: int = RUN_TIME_S
    weights: dict[str, int] = field(default_factory=dict)
    soak: bool = False
    hostile: int = 0  # weight of the hostile task (HOSTILE), 0: none
    captions: Path | None = None
    memory_interval_s: float | None = None  # default: 2 s, 5 s for a soak
    progress_every_s: float = 10.0


def locustfile() -> Path:
    """The installed `xmr.perf.locustfile` (found by module path, so a wheel has it too)."""
    import importlib.util

    spec = importlib.util.find_spec("xmr.perf.locustfile")
    if spec is None or spec.origin is None:
        raise InputError("xmr.perf.locustfile is not installed")
    return Path(spec.origin)


# `python -m locust` with Ctrl-C's default handler: a child inherits an ignored SIGINT (a background job of
# a shell, a CI runner), and Locust writes its HTML report and final CSV only on KeyboardInterrupt or its end
LOCUST_MAIN = (
    "import runpy, signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
    "sys.argv[0] = 'locust'; runpy.run_module('locust', run_name='__main__', alter_sys=True)"
)


def locust_command(cfg: LoadConfig, grpc_url: str, plan: Mapping[str, int]) -> list[str]:
    out = Path(cfg.out).resolve()
    cmd = [
        sys.executable,
        "-c",
        LOCUST_MAIN,
        "-f",
        str(locustfile()),
        "--headless",
        "--users",
        str(cfg.users),
        "--spawn-rate",
        f"{cfg.spawn_rate:g}",
        "--run-time",
        f"{cfg.run_time_s}s",
        "--host",
        grpc_url,
        "--csv",
        str(out / PREFIX),
        "--csv-full-history",
        "--html",
        str(out / f"{PREFIX}_report.html"),
        "--only-summary",
        "--stop-timeout",
        "10",
        "--exit-code-on-error",
        "1",
        "--xmr-repository",
        str(Path(cfg.repository).resolve()),
        "--xmr-weights",
        format_weights(plan),
        "--xmr-samples",
        str(out / f"{PREFIX}_samples.npz"),
    ]
    if cfg.captions is not None:
        cmd += ["--xmr-captions", str(Path(cfg.captions).resolve())]
    if cfg.hostile:
        cmd += ["--xmr-hostile", str(cfg.hostile)]
    return cmd


def preflight(
    grpc_url: str,
    manifest: dict,
    plan: Mapping[str, int],
    content: Content,
    n: int = 3,
    hostile: bool = False,
) -> None:
    """Every planned ensemble answers its recipe's first requests (this also warms the models up), and
    with `hostile` refuses each of its HOSTILE variants with INVALID_ARGUMENT; ServerError otherwise."""
    import tritonclient.grpc as tc
    from tritonclient.utils import InferenceServerException

    from xmr.clients.server import ServerError

    client = tc.InferenceServerClient(grpc_url)
    try:
        for name, requests in build_requests(manifest, plan, content, n).items():
            for request in requests:
                try:
                    client.infer(name, infer_inputs(tc, request), client_timeout=CLIENT_TIMEOUT_S)
                except InferenceServerException as e:
                    raise ServerError(
                        f"{name} refused a load-test request built by RECIPES[{name!r}]: {e.message()}"
                    ) from e
        spoilt = (
            build_hostile(manifest, plan, content, max(len(v) for v in HOSTILE.values())) if hostile else {}
        )
        for name, requests in spoilt.items():
            for request in requests:
                try:
                    client.infer(name, infer_inputs(tc, request), client_timeout=CLIENT_TIMEOUT_S)
                except InferenceServerException as e:
                    if str(e.status()) == HOSTILE_STATUS:
                        continue
                    raise ServerError(
                        f"{name} refused a hostile request with {e.status()}: {e.message()}"
                    ) from e
                raise ServerError(
                    f"{name} answered a hostile request (HOSTILE[{name!r}]) instead of refusing it"
                )
    finally:
        client.close()


class MemorySampler(threading.Thread):
    """RSS of a process and its children (the python-backend stubs), every `interval_s`, into rows."""

    def __init__(self, pid: int, interval_s: float):
        super().__init__(daemon=True)
        self.pid, self.interval_s = pid, interval_s
        self.rows: list[tuple[float, float, float]] = []  # (unix time, server MiB, tree MiB)
        self._stop_event = threading.Event()

    def sample(self) -> None:
        import psutil

        try:
            proc = psutil.Process(self.pid)
            own = proc.memory_info().rss
            tree = own
            for child in proc.children(recursive=True):
                try:
                    tree += child.memory_info().rss
                except psutil.Error:
                    pass
        except psutil.Error:
            return
        self.rows.append((time.time(), own / 2**20, tree / 2**20))

    def run(self) -> None:
        while not self._stop_event.is_set():
            self.sample()
            self._stop_event.wait(self.interval_s)

    def stop(self) -> None:
        self._stop_event.set()
        self.join(timeout=5)


def run_load(cfg: LoadConfig, console=None) -> dict:
    """Serve `cfg.repository`, load it with Locust, write the reports into `cfg.out`; the summary."""
    from rich.console import Console

    from xmr.clients.server import ServerError, TritonServer

    console = console or Console()
    import importlib.util

    if importlib.util.find_spec("locust") is None:
        raise InputError("xmr load needs the `perf` extra: pip install 'xmr[serve,perf]' (locust)")
    if cfg.users < 1 or cfg.spawn_rate <= 0:
        raise InputError("--users must be >= 1 and --spawn-rate > 0")
    served = repository_ensembles(cfg.repository)
    plan = plan_tasks(served, cfg.weights)  # bad --weight: an error before anything starts
    manifest = read_manifest(cfg.repository)
    content = load_content(manifest, cfg.captions)
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    for old in out.glob(f"{PREFIX}*"):  # a previous run's reports must not pass for this one's
        old.unlink()
    skipped = [n for n in served if n not in RECIPES]
    if skipped:
        console.print(f"[yellow]no request recipe, not loaded:[/yellow] {', '.join(skipped)}")

    server = TritonServer(cfg.repository, log_path=(out / "tritonserver.log").resolve())
    sampler = None
    interrupted = False
    started = time.time()
    try:
        server.start()
        console.print(f"tritonserver ready on gRPC {server.grpc_url} (log: {server.log_path})")
        preflight(server.grpc_url, manifest, plan, content, hostile=cfg.hostile > 0)
        interval = cfg.memory_interval_s or (5.0 if cfg.soak else 2.0)
        sampler = MemorySampler(server.pid, interval)  # the tritonserver process
        sampler.start()
        console.print(
            f"Locust: {cfg.users} users (spawn rate {cfg.spawn_rate:g}/s) for {cfg.run_time_s} s, "
            f"tasks {format_weights(plan)}; reports in {out}"
        )
        started = time.time()
        code, interrupted = _run_locust(locust_command(cfg, server.grpc_url, plan), out, cfg, console)
        if not server.is_running():
            raise ServerError(f"tritonserver died during the load test:\n{server.log_tail()}")
    finally:
        if sampler is not None:
            sampler.stop()
        server.stop()
    if not (out / f"{PREFIX}_stats.csv").is_file():
        raise ServerError(f"Locust wrote no report (exit code {code}):\n{_tail(out / 'locust.log')}")
    summary = summarize(out, cfg, plan, skipped, sampler.rows if sampler else [], started)
    summary["locust_exit_code"] = code
    summary["interrupted"] = interrupted
    write_summary(out, summary)
    plot_load(out, summary)
    console.print(summary_table(summary))
    if interrupted:
        raise KeyboardInterrupt
    return summary


def _run_locust(cmd: list[str], out: Path, cfg: LoadConfig, console) -> tuple[int, bool]:
    """Run Locust in its own session (Ctrl-C reaches it once, forwarded, so it writes its reports);
    print a progress line every `cfg.progress_every_s`. (exit code, interrupted)."""
    env = os.environ.copy()
    env["PYTHONUNBUFFERED"] = "1"
    with open(out / "locust.log", "wb") as log:
        proc = subprocess.Popen(
            cmd, stdout=log, stderr=subprocess.STDOUT, cwd=out, env=env, start_new_session=True
        )
    interrupted = False
    deadline = time.monotonic() + cfg.run_time_s + 120  # spawn, stop timeout, reports
    last = time.monotonic()
    try:
        while proc.poll() is None:
            time.sleep(0.5)
            if time.monotonic() - last >= cfg.progress_every_s:
                last = time.monotonic()
                line = _progress_line(out / f"{PREFIX}_stats_history.csv")
                if line:
                    console.print(line, highlight=False)
            if time.monotonic() > deadline:
                console.print("[red]Locust overran its run time; stopping it[/red]")
                proc.send_signal(signal.SIGINT)
                break
    except KeyboardInterrupt:
        interrupted = True
        console.print("interrupted: stopping Locust (it writes its reports), then the server")
        proc.send_signal(signal.SIGINT)
    try:
        code = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait()
    return code, interrupted


def _progress_line(history: Path) -> str | None:
    rows = [r for r in _read_csv(history) if r.get("Name") == "Aggregated"]
    if not rows:
        return None
    r = rows[-1]
    return (
        f"  users {r['User Count']:>3}  requests {r['Total Request Count']:>7}  "
        f"failures {r['Total Failure Count']}  {_float(r['Requests/s']):7.1f} req/s  "
        f"p50 {r['50%']} ms  p95 {r['95%']} ms  (last 10 s)"
    )


def _tail(path: Path, n: int = 30) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-n:]) if path.is_file() else ""


# ----------------------------------------------------------------------------- reports


def _read_csv(path: Path) -> list[dict]:
    if not Path(path).is_file():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _float(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return math.nan


def read_samples(path: Path) -> dict[str, dict[str, np.ndarray]] | None:
    """{ensemble: {t, ms, failed}} from the locustfile's samples, or None where it wrote none."""
    if not Path(path).is_file():
        return None
    with np.load(path) as z:
        names, index, t, ms, failed = (z[k] for k in ("names", "index", "t", "ms", "failed"))
    return {str(n): {"t": t[index == i], "ms": ms[index == i], "failed": failed[index == i]} for i, n in
            enumerate(names)}  # fmt: skip


def _figures(ms: np.ndarray, failed: np.ndarray) -> dict:
    ok = ms[~failed]
    figs = {f"p{p}_ms": float(np.percentile(ok, p)) if len(ok) else None for p in PERCENTILES}
    figs["mean_ms"] = float(ok.mean()) if len(ok) else None
    figs["max_ms"] = float(ok.max()) if len(ok) else None
    return figs


def summarize(out: Path, cfg: LoadConfig, plan, skipped, memory_rows, started: float) -> dict:
    """The run's figures: Locust's stats CSV for counts and requests/s, the float samples for the
    percentiles (Locust's own rounded ones kept beside them), memory from the sampler."""
    stats = {r["Name"]: r for r in _read_csv(out / f"{PREFIX}_stats.csv")}
    samples = read_samples(out / f"{PREFIX}_samples.npz")
    ensembles = {}
    hostile = [f"{n}{HOSTILE_SUFFIX}" for n in plan if n in HOSTILE] if cfg.hostile else []
    for name in [*plan, *hostile, "Aggregated"]:
        row = stats.get(name)
        if row is None:
            continue
        entry = {
            "requests": int(row["Request Count"]),
            "failures": int(row["Failure Count"]),
            "requests_per_s": _float(row["Requests/s"]),
        }
        if samples is not None:
            if name == "Aggregated":
                ms = np.concatenate([s["ms"] for s in samples.values()] or [np.zeros(0)])
                failed = np.concatenate([s["failed"] for s in samples.values()] or [np.zeros(0, bool)])
            else:
                s = samples.get(name, {"ms": np.zeros(0), "failed": np.zeros(0, bool)})
                ms, failed = s["ms"], s["failed"]
            entry.update(_figures(ms, failed))
            entry["sampled_requests"] = int(len(ms))
        else:  # the locustfile wrote no samples (it was killed): Locust's rounded percentiles
            entry.update({f"p{p}_ms": _float(row[f"{p}%"]) for p in PERCENTILES})
        entry["locust_p50_p95_p99_ms"] = [_float(row[f"{p}%"]) for p in PERCENTILES]
        ensembles["total" if name == "Aggregated" else name] = entry
    history = [r for r in _read_csv(out / f"{PREFIX}_stats_history.csv") if r.get("Name") == "Aggregated"]
    memory = {}
    if memory_rows:
        tree = np.array([r[2] for r in memory_rows])
        server_rss = np.array([r[1] for r in memory_rows])
        memory = {
            "samples": len(memory_rows),
            "interval_s": round(float(np.median(np.diff([r[0] for r in memory_rows]))), 2)
            if len(memory_rows) > 1
            else None,
            "tritonserver_rss_mib": {"first": server_rss[0], "last": server_rss[-1], "max": server_rss.max()},
            "with_stubs_rss_mib": {"first": tree[0], "last": tree[-1], "max": tree.max()},
        }
        memory = json.loads(json.dumps(memory, default=float))
        with open(out / "memory.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["timestamp", "elapsed_s", "tritonserver_rss_mib", "with_stubs_rss_mib"])
            for t, own, all_ in memory_rows:
                w.writerow([f"{t:.1f}", f"{t - started:.1f}", f"{own:.1f}", f"{all_:.1f}"])
    total = ensembles.get("total", {"requests": 0, "failures": 0})
    spoilt = [ensembles[n] for n in hostile if n in ensembles]
    return {
        "hostile": {
            "weight": cfg.hostile,
            "requests": sum(e["requests"] for e in spoilt),
            "refused_as_expected": sum(e["requests"] - e["failures"] for e in spoilt),
            "unexpected": sum(e["failures"] for e in spoilt),
        },
        "repository": str(Path(cfg.repository).resolve()),
        "users": cfg.users,
        "spawn_rate": cfg.spawn_rate,
        "run_time_s": cfg.run_time_s,
        "soak": cfg.soak,
        "weights": dict(plan),
        "not_loaded": list(skipped),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z", time.localtime(started)),
        "history_span_s": int(history[-1]["Timestamp"]) - int(history[0]["Timestamp"]) if history else 0,
        "ensembles": {k: v for k, v in ensembles.items() if k != "total"},
        "total": total,
        "ok": total["requests"] > 0 and total["failures"] == 0,
        "memory": memory,
        "machine": {"cpus": os.cpu_count(), "load_average_at_end": list(os.getloadavg())},
        "percentiles": "p50/p95/p99 of successful requests from every request's float latency "
        "(locust_samples.npz); locust_p50_p95_p99_ms: Locust's own, rounded to whole ms",
    }


def write_summary(out: Path, summary: dict) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    rows = {**summary["ensembles"], "total": summary["total"]}
    with open(out / "summary.csv", "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["ensemble", "requests", "failures", "requests_per_s", "p50_ms", "p95_ms", "p99_ms"])
        for name, e in rows.items():
            w.writerow(
                [name, e["requests"], e["failures"], f"{e['requests_per_s']:.2f}"]
                + [_fmt(e.get(f"p{p}_ms")) for p in PERCENTILES]
            )


def _fmt(x) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.2f}"


def summary_table(summary: dict):
    from rich.table import Table

    title = (
        f"Locust, {summary['users']} users, {summary['run_time_s']} s"
        + (" (soak)" if summary["soak"] else "")
        + f": {'no failures' if summary['ok'] else 'FAILURES'}"
    )
    spoilt = summary.get("hostile") or {}
    if spoilt.get("requests"):
        title += (
            f"; hostile: {spoilt['refused_as_expected']:,} of {spoilt['requests']:,} refused "
            "with INVALID_ARGUMENT"
        )
    table = Table(title=title)
    for col in ("ensemble", "weight", "requests", "failures", "req/s", "p50 ms", "p95 ms", "p99 ms"):
        table.add_column(col, justify="left" if col == "ensemble" else "right")
    rows = {**summary["ensembles"], "total": summary["total"]}
    for name, e in rows.items():
        table.add_row(
            name,
            str(summary["weights"].get(name, "")),
            f"{e['requests']:,}",
            str(e["failures"]),
            f"{e['requests_per_s']:.1f}",
            *(_fmt(e.get(f"p{p}_ms")) for p in PERCENTILES),
        )
    mem = summary.get("memory", {}).get("with_stubs_rss_mib")
    if mem:
        first, last, top = (f"{mem[k]:.0f}" for k in ("first", "last", "max"))
        table.caption = f"server RSS with python stubs: {first} -> {last} MiB (max {top})"
    return table


def plot_load(out: Path, summary: dict) -> Path:
    """load.png: requests/s (total and per ensemble), p50/p95 latency (Locust's 10 s window) and the
    server's memory over time, from Locust's `_stats_history.csv` and `memory.csv`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    history = _read_csv(out / f"{PREFIX}_stats_history.csv")
    memory = _read_csv(out / "memory.csv")
    t0 = min((int(r["Timestamp"]) for r in history), default=0)
    panels = 3 if memory else 2
    fig, axes = plt.subplots(panels, 1, figsize=(9, 2.6 * panels + 0.6), sharex=True)
    names = ["Aggregated", *summary["weights"]]
    for k, name in enumerate(names):
        rows = [r for r in history if r["Name"] == name and int(r["Total Request Count"]) > 0]
        if not rows:
            continue
        t = np.array([int(r["Timestamp"]) - t0 for r in rows])
        label = "all" if name == "Aggregated" else name
        style = {"color": f"C{k}", "lw": 2.0 if name == "Aggregated" else 1.0}
        axes[0].plot(t, [_float(r["Requests/s"]) for r in rows], label=label, **style)
        for p, ls in (("50%", "-"), ("95%", "--")):
            ms = [_float(r[p]) or math.nan for r in rows]  # 0: no request in Locust's window yet
            axes[1].plot(t, ms, ls, label=f"{label} p{p[:-1]}", **style)
    axes[0].set_ylabel("requests/s")
    axes[1].set_ylabel("latency (ms)")
    axes[0].legend(fontsize=8, ncol=3)
    axes[1].legend(fontsize=8, ncol=3)
    if memory:
        t = [float(r["timestamp"]) - t0 for r in memory]
        axes[2].plot(t, [float(r["tritonserver_rss_mib"]) for r in memory], label="tritonserver")
        axes[2].plot(t, [float(r["with_stubs_rss_mib"]) for r in memory], label="with python stubs")
        axes[2].set_ylabel("RSS (MiB)")
        axes[2].legend(fontsize=8)
    axes[-1].set_xlabel("seconds")
    total = summary["total"]
    fig.suptitle(
        f"xmr load: {summary['users']} gRPC users, {summary['run_time_s']} s, "
        f"{total['requests']:,} requests, {total['failures']} failures "
        f"(latency: Locust's 10 s window, whole ms)",
        fontsize=10,
    )
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out / "load.png"
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
