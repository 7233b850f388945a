"""FP32 vs INT8 (and FP16) towers in ONNX Runtime on this CPU: latency, throughput and the recall they cost.

    python -m xmr.perf.precision artifacts/rvse-minilm [artifacts/demo ...] --out perf/figures

For each artifact (an `xmr export` folder of the image-text family), `xmr optimize` makes its `int8`,
`int8-qdq` and `fp16` versions with the default gate (R@1 may drop 0.5 point on the test split; nodes that
cost recall on the dev split stay FP32), plus `int8` with its weights rounded to nearest instead of by
GPTQ (`--rounding nearest`) and with 4 outlier channels per input in FP32 (`--outliers 4`, whose weights
are rounded to nearest), and `int8` and `int8-qdq` with the search and gate switched off (everything
quantized: for `int8-qdq` what naive calibration does; for `int8` its speed is then measured even where
the gated run failed); `--variants` makes only the named ones.
Then each tower of each variant runs in ONNX Runtime (`--threads` intra-op threads, ORT_ENABLE_ALL) on real
test inputs at batch 1 and batch 64: median latency over `--repeats` runs after warm-up, and throughput
(items per second). The recall columns come from the variant's manifest (the test split, against the FP32
graphs in the same run). FP16 runs on ONNX Runtime's CPU provider, which has few FP16 kernels: its speed
here says nothing about a GPU; its recall does.

Writes `precision.csv` (one row per artifact, variant, tower, batch), `precision.md` (the README table,
with the machine's facts) and `precision.png`. Nothing here is a test: it is a measurement anyone can rerun.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from xmr.export.manifest import read_manifest
from xmr.export.optimize import OptimizeConfig, RecallGateError, optimize
from xmr.export.runners import OnnxRunner
from xmr.export.scoring import ArtifactTask
from xmr.models.tokenizer import TextLimits, encode_batch
from xmr.perf.tables import cpu_model

VARIANTS = {  # name -> `xmr optimize` settings; a gate of 100 points switches the dev search off
    "int8": {"precision": "int8"},
    "int8 (no search)": {"precision": "int8", "max_recall_drop": 100.0},
    "int8, nearest rounding": {"precision": "int8", "rounding": "nearest"},
    "int8, 4 outlier channels": {"precision": "int8", "outliers": 4},
    "int8-qdq": {"precision": "int8-qdq"},
    "int8-qdq (no search)": {"precision": "int8-qdq", "max_recall_drop": 100.0},
    "fp16": {"precision": "fp16"},
}
TOWERS = ("text_encoder", "image_encoder")
BATCHES = (1, 64)


def tower_inputs(task: ArtifactTask, tower: str, batch: int) -> dict[str, np.ndarray]:
    """`batch` real test inputs of `tower`: captions (tokenised) or images."""
    test = task.split("test")
    if tower == "text_encoder":
        ids, lengths = encode_batch(
            task.tokenizer, test.flat_captions()[:batch], TextLimits(max_tokens=task.model.cfg.max_tokens)
        )
        return {"input_ids": ids, "lengths": lengths}
    from xmr.models.image_text.inputs import image_inputs

    name = task.specs["image_encoder"].inputs[0].name
    return {name: image_inputs(test.images[:batch], task.model.cfg).numpy()}


def time_runner(runner: OnnxRunner, feeds: dict[str, np.ndarray], repeats: int) -> float:
    """Median seconds of one run, after warm-up runs."""
    for _ in range(3):
        runner.run(feeds)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        runner.run(feeds)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def variants_of(artifact: Path, work: Path, variants: dict[str, dict] = VARIANTS) -> dict[str, dict]:
    """{variant: {"folder", "report"}} with FP32 first; a variant that fails its gate keeps its report."""
    out = {"fp32": {"folder": artifact, "report": None}}
    for name, settings in variants.items():
        folder = work / "".join(c if c.isalnum() or c == "-" else "_" for c in name)
        cfg = OptimizeConfig(**settings)
        start = time.perf_counter()
        try:
            report = optimize(artifact, folder, cfg)["optimization"]
        except RecallGateError as e:
            folder, report = None, e.report | {"failed_gate": str(e)}
        report["optimize_seconds"] = time.perf_counter() - start
        out[name] = {"folder": folder, "report": report}
        print(f"{artifact.name} {name}: gate drop {report['gate']['test_drop']:.2f}", flush=True)
    return out


def measure(
    artifacts: list[Path], out: Path, threads: int, repeats: int, variants: dict[str, dict] = VARIANTS
) -> list[dict]:
    rows = []
    for artifact in artifacts:
        manifest = read_manifest(artifact)
        if manifest["model"] != "rvse":
            raise SystemExit(f"{artifact}: the precision benchmark takes image-text artifacts (rvse)")
        task = ArtifactTask.of(manifest)
        inputs = {(tower, batch): tower_inputs(task, tower, batch) for tower in TOWERS for batch in BATCHES}
        with tempfile.TemporaryDirectory(prefix="xmr-precision-") as work:
            made = variants_of(artifact, Path(work), variants)
            fp32_metrics = next(v["report"] for v in made.values() if v["report"])["metrics"]["onnx_fp32"]
            for name, v in made.items():
                report = v["report"]
                metrics = report["metrics"][report["precision"]] if report else fp32_metrics
                for tower in TOWERS:
                    if v["folder"] is not None:
                        runner = OnnxRunner(v["folder"] / f"{tower}.onnx", task.specs[tower], threads)
                    for batch in BATCHES:
                        row = {
                            "artifact": artifact.name,
                            "text_tower": task.model.cfg.to_dict().get("text_tower", "gru"),
                            "variant": name,
                            "tower": tower,
                            "batch": batch,
                            "passed_gate": report is None or "failed_gate" not in report,
                            "kept_fp32": sum(len(n) for n in report["kept_fp32"].values()) if report else 0,
                            "i2t_R@1": metrics["i2t_R@1"],
                            "t2i_R@1": metrics["t2i_R@1"],
                            "rsum": metrics["rsum"],
                            "R@1_drop": report["gate"]["test_drop"] if report else 0.0,
                            "min_cosine": (
                                min(p["min_cosine"] for p in report["parity_vs_pytorch"][tower].values())
                                if report
                                else 1.0
                            ),
                        }
                        if v["folder"] is not None:
                            seconds = time_runner(runner, inputs[tower, batch], repeats)
                            row["latency_ms"] = 1000 * seconds
                            row["items_per_s"] = batch / seconds
                        rows.append(row)
    for row in rows:  # speed-up against FP32, same artifact, tower and batch
        key = (row["artifact"], row["tower"], row["batch"])
        base = next(
            r for r in rows if r["variant"] == "fp32" and (r["artifact"], r["tower"], r["batch"]) == key
        )
        if "items_per_s" in row:
            row["speedup"] = row["items_per_s"] / base["items_per_s"]
    return rows


def write(rows: list[dict], out: Path, threads: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    fields = sorted(
        {k for r in rows for k in r}, key=lambda k: list(rows[0]).index(k) if k in rows[0] else 99
    )
    with open(out / "precision.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        w.writerows(rows)
    import onnxruntime

    lines = [
        f"CPU: {cpu_model()}, {os.cpu_count()} logical cores; ONNX Runtime {onnxruntime.__version__}, "
        f"{threads} intra-op threads, ORT_ENABLE_ALL; median of repeated runs after warm-up.",
        "",
        "| artifact | variant | tower | batch | ms / batch | items/s | x FP32 | t2i R@1 | i2t R@1 | R@1 drop "
        "| min cos vs PyTorch | FP32 nodes kept |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        speed = (
            f"{r['latency_ms']:.2f} | {r['items_per_s']:.0f} | {r['speedup']:.2f}"
            if "latency_ms" in r
            else "failed the gate | - | -"
        )
        lines.append(
            f"| {r['artifact']} | {r['variant']} | {r['tower']} | {r['batch']} | {speed} "
            f"| {r['t2i_R@1']:.2f} | {r['i2t_R@1']:.2f} | {r['R@1_drop']:.2f} | {r['min_cosine']:.4f} "
            f"| {r['kept_fp32']} |"
        )
    (out / "precision.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "precision.png")


def plot(rows: list[dict], path: Path) -> None:
    """Throughput at batch 64 (bars) and R@1 drop (dots) per variant, one panel per artifact and tower."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["artifact"], r["tower"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 4.2), squeeze=False)
    for ax, (artifact, tower) in zip(axes[0], panels, strict=True):
        sel = [r for r in rows if (r["artifact"], r["tower"], r["batch"]) == (artifact, tower, 64)]
        names = [r["variant"] for r in sel]
        ax.bar(names, [r.get("items_per_s", 0) for r in sel], color="tab:blue")
        ax.set_title(f"{artifact} / {tower}", fontsize=9)
        ax.set_ylabel("items/s at batch 64")
        ax.set_xticks(range(len(names)), names, rotation=40, ha="right", fontsize=7)
        twin = ax.twinx()
        twin.plot(names, [r["R@1_drop"] for r in sel], "o", color="tab:red")
        twin.set_ylabel("R@1 drop (points)", color="tab:red")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m xmr.perf.precision", description=__doc__.split("\n")[0])
    parser.add_argument("artifacts", type=Path, nargs="+")
    parser.add_argument("--out", type=Path, default=Path("perf/results/precision"))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument(
        "--variants", nargs="+", choices=list(VARIANTS), default=list(VARIANTS), help="the variants to make"
    )
    args = parser.parse_args()
    chosen = {name: VARIANTS[name] for name in args.variants}
    rows = measure(args.artifacts, args.out, args.threads, args.repeats, chosen)
    write(rows, args.out, args.threads)
    print(f"wrote {args.out}/precision.{{csv,md,png}}")


if __name__ == "__main__":
    main()
