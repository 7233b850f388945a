"""ProTA served as a two-stage retriever: Recall and time per query of the first stage alone, a shortlist of S
re-ranked by the pair scorer, and exhaustive pair scoring, side by side.

    python -m xmr.perf.prota_rerank [--run RUN] [--shortlist 10 20 50] [--backends onnxruntime pytorch]

The run: `--run` if given, else `OUT/runs/prota` if it holds one, else ProTA is trained there first
(`train_video`, the code of `xmr train prota`, on MovingShapes for `--epochs`). Its test split (300 videos x 4
captions) is the gallery; every caption is a text->video query (chance R@1 = 0.33%). The run is exported
(`export_video_run`, standard ops) to `OUT/artifact` unless already there; `onnxruntime` drives the exported
graphs (one intra-op thread each), `pytorch` the modules they were exported from, both through the same
`Run` callable and models/video/two_stage.py:
- first stage: the query's global embedding against a FAISS `flat` (exact inner product) index of the global
  video embeddings -> top 10;
- shortlist S + re-rank: the first stage's top S, re-scored with one `pair_scorer` call -> top 10 of S;
- exhaustive: one `pair_scorer` call over the whole gallery -> top 10.
Time per query: median (and 90th percentile) wall time of one query's search from its text-encoder outputs;
"+ text" adds the median time of encoding that one query (batch of 1). The gallery is encoded once, offline.
Writes `prota_rerank.csv`, `prota_rerank.md` and `prota_rerank.png` to `--figures` (default perf/figures).
"""

from __future__ import annotations

import csv
import json
import os
import time
from pathlib import Path

import numpy as np

from xmr.perf.tables import cpu_model, report_parser

COLUMNS = (
    "backend",
    "method",
    "shortlist",
    "fuse",
    "R@1",
    "R@5",
    "R@10",
    "ceiling",
    "ms_median",
    "ms_p90",
    "ms_text",
)
K = 10


def get_run(args) -> Path:
    """The run to measure: --run, an earlier run under OUT, or a fresh one trained there."""
    if args.run is not None:
        return args.run
    run = args.out / "runs" / "prota"
    if not (run / "config.json").is_file():
        from xmr.models.train.video import VideoTrainConfig, train_video

        train_video(VideoTrainConfig(model="prota", epochs=args.epochs), run)
    return run


def get_runs(run: Path, artifact: Path, backends: list[str]):
    """{backend: Run} over the run's PyTorch modules and/or its exported ONNX graphs."""
    from xmr.export.iospec import ModelSpec
    from xmr.export.runners import OnnxRunner, TorchRunner
    from xmr.export.scoring import run_of
    from xmr.export.video_export import export_video_run, modules_for
    from xmr.models.checkpoint import load_run

    if not (artifact / "manifest.json").is_file():
        export_video_run(run, artifact, "standard", parity_videos=16)
    manifest = json.loads((artifact / "manifest.json").read_text())
    specs = {name: ModelSpec.from_dict(d) for name, d in manifest["specs"].items()}
    model, tokenizer, config = load_run(run)
    runs = {}
    if "onnxruntime" in backends:
        runs["onnxruntime"] = run_of(
            {g: OnnxRunner(artifact / f"{g}.onnx", s, threads=1) for g, s in specs.items()}
        )
    if "pytorch" in backends:
        import torch

        torch.set_num_threads(1)
        modules = modules_for(model)
        runs["pytorch"] = run_of({g: TorchRunner(modules[g], s) for g, s in specs.items()})
    return runs, model, tokenizer, config


def timed(fn, *args):
    t0 = time.perf_counter()
    out = fn(*args)
    return out, 1e3 * (time.perf_counter() - t0)


def method_name(kind: str, s: int, fuse: float) -> str:
    base = f"shortlist {s} + re-rank" if kind == "shortlist" else "exhaustive pair scoring"
    return base if not fuse else f"{base}, fused ({fuse:g} x stage-1 cosine)"


def measure(
    run, model, split, tokenizer, shortlists: list[int], n_queries: int | None, fuses=(0.0,)
) -> list[dict]:
    """The rows of one backend: first stage, each shortlist + re-rank, exhaustive (each fusion weight)."""
    from tqdm.auto import tqdm

    from xmr.models.tokenizer import TextLimits, encode_batch
    from xmr.models.video.inputs import video_inputs
    from xmr.models.video.two_stage import (
        VideoGallery,
        encode_queries,
        exhaustive_search,
        faiss_first_stage,
        first_stage_search,
        recall_at,
        two_stage_search,
    )

    batches = [
        tuple(x.numpy() for x in video_inputs(model, split, np.arange(i, min(i + 32, len(split)))))
        for i in range(0, len(split), 32)
    ]
    gallery = VideoGallery.encode(run, batches)
    first = faiss_first_stage(gallery, "flat")
    texts, truth = split.flat_captions(), split.caption_video_index()
    n = len(texts) if n_queries is None else min(n_queries, len(texts))
    ids, lengths = encode_batch(tokenizer, texts[:n], TextLimits(max_tokens=model.cfg.max_tokens))
    methods = {("first stage", K, 0.0): lambda q: first_stage_search(first, q, K)}
    for f in fuses:
        for s in shortlists:
            methods[(method_name("shortlist", s, f), s, f)] = lambda q, s=s, f=f: two_stage_search(
                run, first, gallery, q, K, s, f
            )
        methods[(method_name("exhaustive", 0, f), len(gallery), f)] = lambda q, f=f: exhaustive_search(
            run, gallery, q, K, fuse=f
        )
    ranked = {m: [] for m in methods}
    ms = {m: [] for m in methods}
    text_ms, ceiling = [], {s: [] for s in shortlists}
    for i in tqdm(range(n), desc="queries", leave=False, disable=None):
        (query,), t = timed(encode_queries, run, ids[i : i + 1, : lengths[i]], lengths[i : i + 1])
        text_ms.append(t)
        for m, fn in methods.items():
            (got, _), t = timed(fn, query)
            ranked[m].append(got)
            ms[m].append(t)
        top = first_stage_search(first, query, max(shortlists))[0]
        for s in shortlists:
            ceiling[s].append(top[:s])
    rows = []
    for name, s, f in methods:
        r = recall_at(ranked[(name, s, f)], truth[:n])
        if name.startswith("shortlist"):
            cap = recall_at(ceiling[s], truth[:n], (s,))[f"R@{s}"]
        else:
            cap = 100.0 if name.startswith("exhaustive") else float("nan")
        rows.append(
            {
                "method": name,
                "shortlist": s,
                "fuse": f,
                **r,
                "ceiling": cap,
                "ms_median": float(np.median(ms[(name, s, f)])),
                "ms_p90": float(np.percentile(ms[(name, s, f)], 90)),
                "ms_text": float(np.median(text_ms)),
            }
        )
    return rows


def write_csv(rows: list[dict], path: Path) -> None:
    with open(path, "w", newline="") as f:
        writer = csv.DictWriter(f, COLUMNS)
        writer.writeheader()
        writer.writerows(rows)


def write_figure(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    markers = {"onnxruntime": "o", "pytorch": "s"}
    for backend in [b for b in markers if any(r["backend"] == b for r in rows)]:
        first = [r for r in rows if r["backend"] == backend and r["method"] == "first stage"]
        for fuse in sorted({r["fuse"] for r in rows if r["method"] != "first stage"}):
            mine = first + [
                r
                for r in rows
                if r["backend"] == backend and r["method"] != "first stage" and r["fuse"] == fuse
            ]
            x = [r["ms_median"] + r["ms_text"] for r in mine]
            y = [r["R@1"] for r in mine]
            label = backend if not fuse else f"{backend}, fused {fuse:g}"
            ax.plot(x, y, marker=markers[backend], linestyle="-" if not fuse else "--", label=label)
            for r, xi, yi in zip(mine, x, y, strict=True):
                text = (
                    "stage 1"
                    if r["method"] == "first stage"
                    else ("exhaustive" if r["method"].startswith("exhaustive") else f"S={r['shortlist']}")
                )
                ax.annotate(text, (xi, yi), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("median ms per query (text encoder + search), log scale")
    ax.set_ylabel("text->video R@1 (%)")
    ax.set_title("ProTA on MovingShapes test (300 videos): two-stage vs exhaustive")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def table(rows: list[dict]) -> list[str]:
    lines = [
        "| backend | method | R@1 | R@5 | R@10 | shortlist recall (R@S of stage 1) | ms/query search (p50) | "
        "ms/query search (p90) | ms/query + text |",
        "|---" * 9 + "|",
    ]
    for r in rows:
        cap = "" if np.isnan(r["ceiling"]) else f"{r['ceiling']:.1f}"
        lines.append(
            f"| {r['backend']} | {r['method']} | {r['R@1']:.1f} | {r['R@5']:.1f} | {r['R@10']:.1f} | {cap} | "
            f"{r['ms_median']:.2f} | {r['ms_p90']:.2f} | {r['ms_median'] + r['ms_text']:.2f} |"
        )
    return lines


def main(argv: list[str] | None = None) -> None:
    parser = report_parser("prota_rerank", __doc__, "perf/results/prota_rerank", epochs=8)
    parser.add_argument(
        "--run", type=Path, default=None, help="a trained ProTA run (default: OUT/runs/prota)"
    )
    parser.add_argument("--shortlist", type=int, nargs="+", default=[10, 20, 50], help="shortlist sizes S")
    parser.add_argument(
        "--backends", nargs="+", default=["onnxruntime", "pytorch"], choices=["onnxruntime", "pytorch"]
    )
    parser.add_argument(
        "--fuse",
        type=float,
        nargs="+",
        default=[0.0, 1.0],
        help="re-rank by pair score + FUSE x stage-1 cosine; 0 = the pair score alone (one row set each)",
    )
    parser.add_argument("--queries", type=int, default=None, help="the first N test captions (default all)")
    parser.add_argument("--figures", type=Path, default=Path("perf/figures"))
    args = parser.parse_args(argv)
    load = os.getloadavg()[0]
    args.out.mkdir(parents=True, exist_ok=True)
    args.figures.mkdir(parents=True, exist_ok=True)
    run = get_run(args)
    runs, model, tokenizer, config = get_runs(run, args.out / "artifact", args.backends)
    from xmr.models.data.video import VideoData

    split = VideoData.of(config["train_config"]).splits()["test"]
    shortlists = sorted(set(args.shortlist))
    rows = []
    for backend, backend_run in runs.items():
        rows += [
            {"backend": backend, **r}
            for r in measure(backend_run, model, split, tokenizer, shortlists, args.queries, args.fuse)
        ]

    write_csv(rows, args.figures / "prota_rerank.csv")
    write_figure(rows, args.figures / "prota_rerank.png")
    tc = config["train_config"]
    w_global = config["model_config"].get("w_global", 0.0)
    high = model.cfg.high_features  # 0: a run from before the high-dimension lift (Gram of the low cosine)
    high_space = f"a learned {high}-d high-dimension space" if high else "high term on the low cosine"
    n_queries = (
        len(split.flat_captions()) if args.queries is None else min(args.queries, len(split.flat_captions()))
    )
    head = [
        f"ProTA (w_global = {w_global}, {high_space}), {tc['epochs']} epochs on MovingShapes train; test "
        f"split: a gallery of {len(split)} videos, {n_queries} caption queries (text->video; chance R@1 = "
        f"{100 / len(split):.2f}%).",
        f"Top {K} returned per query. CPU: {cpu_model()}, one thread per backend, "
        f"load average at the start {load:.1f} (a shared machine: compare times within a table).",
        "",
    ]
    (args.figures / "prota_rerank.md").write_text("\n".join([*head, *table(rows), ""]))
    print("\n".join([*head, *table(rows)]))


if __name__ == "__main__":
    main()
