"""The `xmr` command line: train, eval, export, optimize, engine, repo, serve, search, moments, check, demo.

Bad input (a missing run, an empty query, an unknown option value) ends with `error: ...` naming the
problem and exit code 2; a server-side error with its message and exit code 1; never a traceback.
"""

from __future__ import annotations

import signal
import sys
from enum import Enum
from pathlib import Path

import typer
from rich.console import Console

from xmr.clients.server import LOOPBACK, ServerError
from xmr.clients.triton_client import XmrClient
from xmr.models.errors import InputError

app = typer.Typer(
    add_completion=False, no_args_is_help=True, help="Cross-modal retrieval: train, export, serve."
)
console = Console(width=None if sys.stdout.isatty() else 130)  # tables unwrapped in logs


class Protocol(str, Enum):
    grpc = "grpc"
    http = "http"


class Target(str, Enum):
    cpu = "cpu"
    gpu = "gpu"


# model -> default data
MODELS = {"rvse": "shapes", "visern": "moving-shapes", "prota": "moving-shapes", "cdnet": "moving-shapes"}


@app.command()
def train(
    model: str = typer.Argument(
        "rvse", help="rvse (image-text) | visern | prota (text-video) | cdnet (video moments)"
    ),
    data: str | None = typer.Option(
        None, help="rvse: shapes | precomputed; video: moving-shapes | video-features (default per model)"
    ),
    data_root: Path | None = typer.Option(None, help="folder of the precomputed / per-video feature format"),
    epochs: int = typer.Option(10, min=1),
    batch_size: int | None = typer.Option(None, min=2, help="default 128 (rvse), 64 (video)"),
    lr: float | None = typer.Option(None, help="default 2e-3 (rvse), 1e-3 (video)"),
    loss: str | None = typer.Option(None, help="a key of xmr.models.losses.LOSSES; default selhn (rvse)"),
    relevance: str = typer.Option(
        "minilm", help="continuous labels for kendall/bcls: minilm (the paper's) | lexical"
    ),
    seed: int = typer.Option(0),
    n_train: int | None = typer.Option(None, help="use only the first N training items"),
    n_eval: int | None = typer.Option(None, help="use only the first N val/test items"),
    out: Path | None = typer.Option(None, help="run folder to write (default runs/MODEL)"),
    grid: bool = typer.Option(
        False, help="cdnet: trilinear (t, y, x) sampling over each clip's spatial grid"
    ),
    text_tower: str = typer.Option(
        "gru", help="rvse: gru (trained from scratch) | minilm (frozen all-MiniLM-L6-v2 + trained projection)"
    ),
    text_cache: Path | None = typer.Option(
        None, help="rvse --text-tower minilm: folder caching the caption vectors"
    ),
):
    """Train a model and write OUT/{model.safetensors, config.json, tokenizer.json, metrics.json}."""
    if model not in MODELS:
        raise InputError(f"unknown model {model!r}; valid: {', '.join(MODELS)}")
    out = out or Path("runs") / model
    data = data or MODELS[model]
    root = str(data_root) if data_root else None
    common = dict(data=data, epochs=epochs, seed=seed, n_train=n_train, n_eval=n_eval)
    if model == "rvse":
        from xmr.models.train.image_text import TrainConfig
        from xmr.models.train.image_text import train as run_training

        cfg = TrainConfig(
            **common,
            data_root=root,
            batch_size=batch_size or 128,
            lr=lr or 2e-3,
            loss=loss or "selhn",
            relevance=relevance,
            text_tower=text_tower,
            text_cache=str(text_cache) if text_cache else None,
        )
        metrics = run_training(cfg, out)
    elif model == "cdnet":
        from xmr.models.train.moments import MomentTrainConfig, train_moment

        cfg = MomentTrainConfig(**common, batch_size=batch_size or 32, lr=lr or 5e-4, use_grid=grid)
        metrics = train_moment(cfg, out)
        _print_moments({"CDNet (test)": metrics["test"], "random spans": metrics["random_baseline"]})
        console.print(f"wrote {out}")
        return
    else:
        from xmr.models.train.video import VideoTrainConfig, train_video

        cfg = VideoTrainConfig(
            **common,
            model=model,
            data_root=root,
            batch_size=batch_size or 64,
            lr=lr or 1e-3,
            loss=loss or "triplet_hn",
        )
        metrics = train_video(cfg, out)
    _print_recall({"PyTorch (test)": metrics["test"]}, item="image" if model == "rvse" else "video")
    console.print(f"wrote {out}")


@app.command("eval")
def evaluate_cmd(run: Path, split: str = typer.Option("test", help="split to score")):
    """Print and write (RUN/eval_SPLIT.json) Recall@1/5/10 both directions, rSum, median and mean rank."""
    from xmr.models.checkpoint import load_run, write_json

    model, tokenizer, config = load_run(run)
    tc = config["train_config"]
    if config["model"] == "cdnet":
        from xmr.models.data.video import VideoData
        from xmr.models.evaluate.moments import evaluate_moments, random_baseline

        splits = VideoData.of(tc).splits()
        if split not in splits:
            raise InputError(f"unknown split {split!r}; valid: {', '.join(splits)}")
        metrics = evaluate_moments(model, tokenizer, splits[split])
        write_json(run / f"eval_{split}.json", metrics)
        baseline = random_baseline(splits[split], model.cfg.num_queries, tc.get("seed", 0))
        _print_moments({f"CDNet ({split})": metrics, "random spans": baseline})
        return
    if config["model"] == "rvse":
        from xmr.models.data import load_split
        from xmr.models.evaluate.image_text import evaluate

        data = load_split(tc["data"], split, root=tc.get("data_root"))
        data = data.subset(tc["n_eval"]) if tc.get("n_eval") else data
        metrics = evaluate(model, tokenizer, data)
    else:
        from xmr.models.data.video import VideoData
        from xmr.models.evaluate.video import evaluate_video

        splits = VideoData.of(tc).splits()
        roles = {"train": "train", "val": "val", "test": "test"}
        if split not in roles:
            raise InputError(f"unknown split {split!r}; valid: {', '.join(roles)}")
        metrics = evaluate_video(model, tokenizer, splits[roles[split]])
    write_json(run / f"eval_{split}.json", metrics)
    item = "image" if config["model"] == "rvse" else "video"
    _print_recall({f"PyTorch ({split})": metrics}, item=item)
    x = item[0]  # i2t / t2i read as v2t / t2v for videos
    console.print(
        f"median rank: {x}2t {metrics['i2t_medr']:.1f}, t2{x} {metrics['t2i_medr']:.1f}; "
        f"mean rank: {x}2t {metrics['i2t_meanr']:.1f}, t2{x} {metrics['t2i_meanr']:.1f}"
    )


class CustomOps(str, Enum):
    standard = "standard"
    plugin = "plugin"


@app.command()
def export(
    run: Path,
    out: Path = typer.Option(Path("artifacts/rvse"), help="artifact folder to write"),
    custom_ops: CustomOps = typer.Option(
        CustomOps.standard,
        help="standard: decomposed into standard ONNX ops; plugin: one xmr-domain node per op",
    ),
):
    """Export the towers to ONNX with a manifest (I/O specs, sha256, parity vs PyTorch)."""
    from xmr.models.checkpoint import read_run_config

    if read_run_config(run)["model"] == "cdnet":
        from xmr.export.moment_export import export_moment_run

        manifest = export_moment_run(run, out, custom_ops.value)
        parity = manifest["parity"]
        for name, p in parity["moment_model"].items():
            console.print(
                f"moment_model/{name}: max abs err {p['max_abs_err']:.2e}, min cosine {p['min_cosine']:.6f}"
            )
        console.print(f"xmr-domain nodes: {manifest['xmr_nodes']}  (checked with {parity['runtime']})")
        _print_moments({"PyTorch": parity["moments"]["pytorch"], "ONNX": parity["moments"]["onnx"]})
        console.print(f"wrote {out}")
        return
    if read_run_config(run)["model"] != "rvse":
        from xmr.export.video_export import export_video_run

        manifest = export_video_run(run, out, custom_ops.value)
        parity = manifest["parity"]
        for graph, outputs in parity.items():
            if isinstance(outputs, dict) and graph.endswith(("encoder", "scorer")):
                for name, p in outputs.items():
                    console.print(
                        f"{graph}/{name}: max abs err {p['max_abs_err']:.2e}, "
                        f"min cosine {p['min_cosine']:.6f}"
                    )
        console.print(f"xmr-domain nodes: {manifest['xmr_nodes']}  (checked with {parity['runtime']})")
        _print_recall(
            {"PyTorch": parity["recall"]["pytorch"], "ONNX": parity["recall"]["onnx"]}, item="video"
        )
        console.print(f"wrote {out}")
        return
    from xmr.export.onnx_export import export_run

    manifest = export_run(run, out)
    parity = manifest["parity"]
    for tower in ("image_encoder", "text_encoder"):
        console.print(
            f"{tower}: max abs err {parity[tower]['max_abs_err']:.2e}, "
            f"min cosine {parity[tower]['min_cosine']:.6f}"
        )
    _print_recall({"PyTorch": parity["recall"]["pytorch"], "ONNX Runtime": parity["recall"]["onnxruntime"]})
    console.print(f"wrote {out}")


class Precision(str, Enum):
    fp16 = "fp16"
    int8 = "int8"
    int8_qdq = "int8-qdq"


class Calibration(str, Enum):
    minmax = "minmax"
    entropy = "entropy"
    percentile = "percentile"


class Rounding(str, Enum):
    nearest = "nearest"
    gptq = "gptq"


class Activations(str, Enum):
    per_token = "per-token"
    per_tensor = "per-tensor"


@app.command()
def optimize(
    artifact: Path,
    precision: Precision = typer.Option(
        ..., help="fp16 (GPU targets) | int8 (ONNX Runtime integer ops, CPU) | int8-qdq (Q/DQ, for TensorRT)"
    ),
    out: Path = typer.Option(..., help="artifact folder to write"),
    calibration: int = typer.Option(
        256,
        min=1,
        help="training items whose inputs calibrate (int8-qdq ranges, SmoothQuant, outliers, GPTQ)",
    ),
    method: Calibration = typer.Option(Calibration.minmax, help="int8-qdq: calibration method"),
    max_recall_drop: float = typer.Option(
        0.5, min=0.0, help="gate: most R@1 points (R1@0.5 for moments) the test split may lose vs FP32"
    ),
    dev_items: int = typer.Option(500, min=1, help="val items the search for FP32 nodes scores on"),
    smooth: str = typer.Option(
        "auto", help="int8 forms: SmoothQuant alpha in [0, 1], auto (least dev error) or off"
    ),
    activations: Activations = typer.Option(
        Activations.per_token,
        help="int8: input scales per token (batch-independent) or per tensor (ONNX Runtime quantize_dynamic)",
    ),
    outliers: int = typer.Option(
        0, min=0, help="int8 per-token: channels per input with the largest range multiplied in FP32 instead"
    ),
    rounding: Rounding = typer.Option(
        None,
        help="int8 per-token weights: GPTQ on the calibration inputs (the default without --outliers) or "
        "round to nearest",
        show_default=False,
    ),
):
    """FP16 / INT8 graphs of an exported artifact; nodes that cost recall stay FP32; exit 1 past the gate."""
    from xmr.export.manifest import read_manifest
    from xmr.export.optimize import OptimizeConfig, RecallGateError
    from xmr.export.optimize import optimize as run_optimize

    cfg = OptimizeConfig(
        precision.value,
        calibration=calibration,
        method=method.value,
        max_recall_drop=max_recall_drop,
        dev_items=dev_items,
        smooth=smooth,
        activations=activations.value,
        outliers=outliers,
        rounding=rounding.value if rounding else None,
    )
    try:
        manifest = run_optimize(artifact, out, cfg)
    except RecallGateError as e:
        _print_optimization(e.report, read_manifest(artifact)["model"])
        Console(stderr=True, soft_wrap=True).print(f"[red]recall gate:[/red] {e}", highlight=False)
        raise typer.Exit(1) from None
    _print_optimization(manifest["optimization"], manifest["model"])
    console.print(f"wrote {out}")


@app.command()
def engine(
    artifact: Path,
    precision: str = typer.Option("fp16", help="fp16 | int8 (needs an int8-qdq artifact) | fp32 (reference)"),
    out: Path = typer.Option(..., help="artifact folder to write (the graphs beside their .plan engines)"),
):
    """Build TensorRT engines of an artifact's graphs (needs the tensorrt package and an NVIDIA GPU)."""
    from xmr.export.engine import build_engines

    build_engines(artifact, precision, out)
    console.print(f"wrote {out}")


@app.command()
def repo(
    artifacts: list[Path] = typer.Argument(..., help="artifact folders, at most one per family"),
    target: Target = typer.Option(Target.cpu),
    out: Path = typer.Option(Path("build/repository"), help="repository folder to write"),
):
    """Assemble ONE servable Triton model repository from exported artifacts (any mix of image-text,
    text-video and moment artifacts)."""
    from xmr.export.repository import build_repository, read_serving

    build_repository(artifacts, out, target.value)
    served = read_serving(out)["families"]
    ensembles = sorted(n for n in served if n.endswith(("_search", "_embed")))
    console.print(f"wrote {out} ({target.value} target): {', '.join(ensembles)}")


@app.command()
def serve(
    repository: Path = typer.Argument(Path("build/repository")),
    host: str = typer.Option(LOOPBACK, help="address every endpoint binds to"),
    grpc_port: int = typer.Option(8001),
    http_port: int = typer.Option(8000),
    metrics_port: int | None = typer.Option(
        None, help="serve Prometheus metrics on this port (off if unset)"
    ),
):
    """Run the real tritonserver (from nvidia-pytriton) on REPOSITORY until Ctrl-C / SIGTERM.

    Exits 1 when the server exits by itself or a python model's stub process dies (the server is stopped
    then: Triton would keep reporting that model ready while failing its every request)."""
    from xmr.clients.server import TritonServer

    server = TritonServer(
        repository, host=host, grpc_port=grpc_port, http_port=http_port, metrics_port=metrics_port
    )
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops the server as cleanly as Ctrl-C
    server.start()
    console.print(
        f"Triton ready: gRPC {server.grpc_url}  HTTP {server.http_url}"
        + (f"  metrics {host}:{metrics_port}" if metrics_port else "")
        + f"  (log: {server.log_path})"
    )
    try:
        reason = server.watch()  # returns when the server exits or a python model's stub dies
        Console(stderr=True, soft_wrap=True).print(f"[red]{reason}[/red]\n{server.log_tail()}")
        raise typer.Exit(1)
    except KeyboardInterrupt:
        console.print("stopping tritonserver")
    finally:
        server.stop()


@app.command()
def load(
    repository: Path = typer.Argument(Path("build/repository")),
    users: int = typer.Option(8, min=1, help="Locust users (each keeps one gRPC request in flight)"),
    spawn_rate: float = typer.Option(2.0, min=0.01, help="users started per second"),
    run_time: str | None = typer.Option(None, help="60, 90s, 10m, 1h30m (default 60 s; 10 min with --soak)"),
    weight: list[str] | None = typer.Option(
        None, help="ENSEMBLE=W task weight, repeatable (default 1 for every served ensemble; 0 skips it)"
    ),
    soak: bool = typer.Option(False, help="a soak test: 10 minutes unless --run-time says otherwise"),
    hostile: int = typer.Option(
        0, min=0, help="weight of a task of bad requests that must be refused (INVALID_ARGUMENT); 0: none"
    ),
    out: Path | None = typer.Option(None, help="report folder (default perf/results/load, .../soak)"),
    captions: Path | None = typer.Option(None, help="text file of captions, one a line (default: Shapes)"),
):
    """Serve REPOSITORY, load its ensembles with Locust over gRPC; reports, PNG; exit 1 on any failure."""
    from xmr.clients.load import LoadConfig, parse_run_time, parse_weights, run_load

    cfg = LoadConfig(
        repository,
        out or Path("perf/results") / ("soak" if soak else "load"),
        users=users,
        spawn_rate=spawn_rate,
        run_time_s=parse_run_time(run_time, soak),
        weights=parse_weights(weight),
        soak=soak,
        hostile=hostile,
        captions=captions,
    )
    signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM stops Locust and the server as cleanly as Ctrl-C
    try:
        summary = run_load(cfg, console)
    except KeyboardInterrupt:
        console.print("interrupted; partial reports in " + str(cfg.out))
        raise typer.Exit(130) from None
    console.print(f"wrote {cfg.out} (summary.json, load.png, locust_report.html, locust_*.csv)")
    if not summary["ok"]:
        total = summary["total"]
        console.print(f"[red]{total['failures']} of {total['requests']} requests failed[/red]")
        raise typer.Exit(1)


@app.command()
def search(
    text: str,
    k: int = typer.Option(5, "-k", help="how many results"),
    protocol: Protocol = typer.Option(Protocol.grpc),
    url: str | None = typer.Option(None, help="server address (default 127.0.0.1:8001 grpc / :8000 http)"),
    videos: bool = typer.Option(False, "--videos", help="search the video gallery (text_video_search)"),
    rerank: bool = typer.Option(
        False,
        "--rerank",
        help="with --videos: ProTA's shortlist re-ranked by its pair scorer (text_video_rerank)",
    ),
):
    """Query the served text_search (or text_video_search, text_video_rerank); print the top-k ids with
    scores."""
    if rerank and not videos:
        raise typer.BadParameter(
            "--rerank re-ranks the video search: pass --videos too", param_hint="--rerank"
        )
    client = XmrClient(url, protocol.value)
    if rerank:
        result = client.text_video_rerank([text], k)
    else:
        result = client.text_video_search([text], k) if videos else client.text_search([text], k)
    item = "video id" if videos else "gallery id"
    console.print(f"query: {text!r}")
    for rank, (i, s) in enumerate(zip(result.ids[0], result.scores[0], strict=True), 1):
        console.print(f"  {rank:2d}. {item} {int(i):6d}  score {float(s):.4f}")


@app.command()
def moments(
    query: str,
    video: int = typer.Option(..., "--video", help="video id (a row of the served clip store)"),
    k: int = typer.Option(5, "-k", help="how many moments"),
    protocol: Protocol = typer.Option(Protocol.grpc),
    url: str | None = typer.Option(None, help="server address (default 127.0.0.1:8001 grpc / :8000 http)"),
):
    """Query the served moment_search ensemble: the top-k [start, end] spans (seconds) of one video."""
    (windows,) = XmrClient(url, protocol.value).moment_search([query], [video], k)
    console.print(f"query: {query!r}  video {video}")
    for rank, (start, end, score) in enumerate(windows, 1):
        console.print(f"  {rank:2d}. {start:7.2f} s - {end:7.2f} s  score {score:.4f}")


@app.command()
def check(
    artifacts: list[Path] = typer.Argument(
        None, help="artifact folders, or a repository folder (every family it serves); default artifacts/rvse"
    ),
    protocol: Protocol = typer.Option(Protocol.grpc),
    url: str | None = typer.Option(None),
    n: int = typer.Option(32, help="how many fixed test queries (captions, images, videos) to send"),
    tol: float = typer.Option(1e-4, help="max abs error allowed on embeddings and scores (moments: 1e-3 s)"),
):
    """Send fixed test inputs to every family's ensembles; compare with PyTorch; exit 1 on mismatch."""
    from xmr.clients.served import check_artifact
    from xmr.export.repository import SERVING, read_serving

    folders = []
    for folder in artifacts or [Path("artifacts/rvse")]:
        if (folder / SERVING).is_file():  # a repository: the artifact of every family it serves
            folders += [Path(a["folder"]) for a in read_serving(folder)["artifacts"].values()]
        else:
            folders.append(folder)
    client = XmrClient(url, protocol.value)
    ok = True
    for folder in folders:
        result = check_artifact(client, folder, n, tol)
        for line in result.lines:
            console.print(f"{result.family} ({folder}): {line}", highlight=False)
        ok &= result.ok
    if not ok:
        console.print("[red]MISMATCH between the served models and PyTorch[/red]")
        raise typer.Exit(1)
    console.print("[green]served models match PyTorch[/green]")


@app.command()
def demo(
    epochs: int = typer.Option(10, min=1),
    workdir: Path = typer.Option(Path("."), help="where runs/, artifacts/ and build/ go"),
    retrain: bool = typer.Option(False, help="train again even if runs/demo exists"),
):
    """The whole job on the CPU: train, evaluate, export, build the repository, serve, query, compare."""
    from xmr.clients.demo import run_demo

    run_demo(workdir, epochs=epochs, retrain=retrain, console=console)


def _interrupt(signum, frame) -> None:
    raise KeyboardInterrupt


def _print_optimization(report: dict, model: str) -> None:
    """Parity vs PyTorch, the nodes kept in FP32, and the metrics table of an `xmr optimize` report."""
    for graph, outputs in report["parity_vs_pytorch"].items():
        for name, p in outputs.items():
            console.print(
                f"{graph}/{name}: max abs err {p['max_abs_err']:.2e}, min cosine {p['min_cosine']:.6f}"
            )
    for graph, d in report.get("batch_dependence", {}).items():
        console.print(
            f"{graph}: an item's outputs in a batch vs alone differ by up to {d[report['precision']]:.1e} "
            f"(FP32 {d['onnx_fp32']:.1e})"
        )
    alphas = {g: c["alpha"] for g, c in report.get("smoothing", {}).items() if c["alpha"] is not None}
    if alphas:
        console.print(f"SmoothQuant alpha: {alphas}")
    for graph, counts in report.get("fusions", {}).items():
        console.print(f"{graph}: fused " + ", ".join(f"{n} x{k}" for n, k in counts.items()))
    kept = {g: len(nodes) for g, nodes in report["kept_fp32"].items()}
    console.print(f"nodes kept in FP32: {kept} of {report['candidates']} candidates")
    precision = report["precision"]
    labels = {"pytorch": "PyTorch", "onnx_fp32": "ONNX FP32", precision: f"ONNX {precision}"}
    rows = {labels[k]: m for k, m in report["metrics"].items()}
    if model == "cdnet":
        _print_moments(rows)
    else:
        _print_recall(rows, item="image" if model == "rvse" else "video")
    gate = report["gate"]
    console.print(
        f"gate: {'/'.join(gate['metrics'])} drop {gate['test_drop']:.2f} points "
        f"(allowed {gate['max_drop']:g}) on {report['split']}"
    )


def _print_moments(rows: dict[str, dict[str, float]]) -> None:
    from rich.table import Table

    columns = ("R1@0.5", "R1@0.7", "mAP@0.5", "mAP@0.75", "mAP", "mIoU")
    table = Table(title="Moment retrieval (%)")
    table.add_column("model")
    for c in columns:
        table.add_column(c, justify="right")
    for name, m in rows.items():
        table.add_row(name, *(f"{m[c]:.1f}" for c in columns))
    console.print(table)


def _print_recall(rows: dict[str, dict[str, float]], item: str = "image") -> None:
    from xmr.clients.report import recall_table

    console.print(recall_table(rows, item=item))


def main() -> None:
    """Console entry point: clear one-line errors instead of tracebacks for bad input."""
    err = Console(stderr=True, soft_wrap=True)
    try:
        app()
    except InputError as e:
        err.print(f"[red]error:[/red] {e}", highlight=False)
        sys.exit(2)
    except ServerError as e:
        err.print(f"[red]server error:[/red] {e}", highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
