"""The speed / recall frontier of CPU INT8 on one artifact: how many nodes must stay FP32, at what cost.

    python -m xmr.perf.int8_frontier artifacts/rvse-minilm --out perf/figures

`xmr optimize --precision int8` (with `--activations` and `--rounding` as given here: per-token inputs and
GPTQ-rounded weights by default, as `xmr optimize`'s; the README's figure is `--rounding nearest`) keeps
the fewest FP32 nodes that pass the gate on the dev split. This script shows the whole curve behind that
choice, for the text tower (the image tower stays as `xmr optimize` converts it): with SmoothQuant off and
at the alpha `xmr optimize` would choose, the text tower's MatMul/Gemm nodes are ranked by the error each
causes alone on dev inputs (the search's ranking), and for each k of `--ks` the top k are kept in FP32.
Each point records the dev and test R@1 drop of both directions against the FP32 graphs, the text
embedding's mean error (1 - mean cosine against FP32 on dev inputs), and the text tower's throughput at
batch 64 on real test captions relative to FP32 (`--threads` intra-op threads): FP32 and the variant run
alternately, `--repeats` times each after warm-up, and the ratio of their median times is reported, so
that other load on the machine weighs on both alike.

Writes `int8_frontier.csv`, `int8_frontier.md` (the README table, with the machine) and `int8_frontier.png`.
"""

from __future__ import annotations

import argparse
import csv
import os
import statistics
import tempfile
import time
from pathlib import Path

from xmr.export.manifest import read_manifest
from xmr.export.optimize import (
    ACTIVATION_SCALES,
    ROUNDINGS,
    OptimizeConfig,
    Optimizer,
    gate_drop,
    output_error,
)
from xmr.export.runners import OnnxRunner
from xmr.export.scoring import ArtifactTask, run_of
from xmr.perf.precision import tower_inputs
from xmr.perf.tables import cpu_model

TOWER = "text_encoder"


def paired_speedup(fp32: OnnxRunner, variant: OnnxRunner, feeds: dict, repeats: int) -> float:
    """FP32's median time over the variant's, the two timed alternately."""
    for runner in (fp32, variant, fp32, variant):  # warm-up
        runner.run(feeds)
    times: dict[int, list[float]] = {0: [], 1: []}
    for _ in range(repeats):
        for i, runner in enumerate((fp32, variant)):
            start = time.perf_counter()
            runner.run(feeds)
            times[i].append(time.perf_counter() - start)
    return statistics.median(times[0]) / statistics.median(times[1])


def frontier(
    artifact: Path,
    ks: list[int],
    threads: int,
    repeats: int,
    dev_items: int,
    activations: str = "per-token",
    rounding: str | None = None,
) -> list[dict]:
    manifest = read_manifest(artifact)
    task = ArtifactTask.of(manifest)
    test = task.split("test")
    feeds = tower_inputs(task, TOWER, 64)
    fp32 = OnnxRunner(artifact / f"{TOWER}.onnx", task.specs[TOWER], threads)
    rows = []
    for smooth in ("off", "auto"):
        with tempfile.TemporaryDirectory(prefix="xmr-frontier-") as work:
            cfg = OptimizeConfig(
                "int8",
                dev_items=dev_items,
                smooth=smooth,
                threads=threads,
                activations=activations,
                rounding=rounding,
            )
            opt = Optimizer(artifact, manifest, task, cfg, Path(work))
            test_fp32 = task.score(opt.fp32, test)
            ranking = [(g, n) for _, g, n in opt.sensitivity() if g == TOWER]
            for k in [k for k in ks if k <= len(ranking)]:
                keep = set(ranking[:k])
                dev, paths = opt.dev_score(keep, f"keep{k}")
                runners = opt.runners(paths)
                tested = task.score(run_of(runners), test)
                runner = OnnxRunner(paths[TOWER], task.specs[TOWER], threads)
                rows.append({
                    "artifact": artifact.name,
                    "activations": activations,
                    "rounding": cfg.rounding,
                    "smoothquant_alpha": opt.smoothing[TOWER]["alpha"],
                    "kept_fp32": k,
                    "candidates": len(ranking),
                    "text_error": output_error(opt.dev_outputs[TOWER], runner.run(opt.dev_feeds[TOWER])),
                    "dev_R@1_drop": gate_drop(task, opt.dev_fp32, dev),
                    "test_i2t_R@1_drop": test_fp32["i2t_R@1"] - tested["i2t_R@1"],
                    "test_t2i_R@1_drop": test_fp32["t2i_R@1"] - tested["t2i_R@1"],
                    "test_R@1_drop": gate_drop(task, test_fp32, tested),
                    "speedup_b64": paired_speedup(fp32, runner, feeds, repeats),
                })  # fmt: skip
                print({k: round(v, 4) if isinstance(v, float) else v for k, v in rows[-1].items()})
    return rows


def write(rows: list[dict], out: Path, threads: int) -> None:
    out.mkdir(parents=True, exist_ok=True)
    with open(out / "int8_frontier.csv", "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    import onnxruntime

    lines = [
        f"CPU: {cpu_model()}, {os.cpu_count()} logical cores; ONNX Runtime {onnxruntime.__version__}, "
        f"{threads} intra-op threads; text tower at batch 64, speed-up against FP32 in the same run.",
        "",
        "| SmoothQuant alpha | text nodes kept FP32 | text error (1 - cos) | dev R@1 drop "
        "| test i2t R@1 drop | test t2i R@1 drop | x FP32 (batch 64) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['smoothquant_alpha'] or 'off'} | {r['kept_fp32']} of {r['candidates']} "
            f"| {r['text_error']:.1e} | {r['dev_R@1_drop']:.2f} | {r['test_i2t_R@1_drop']:.2f} "
            f"| {r['test_t2i_R@1_drop']:.2f} | {r['speedup_b64']:.2f} |"
        )
    (out / "int8_frontier.md").write_text("\n".join(lines) + "\n")
    plot(rows, out / "int8_frontier.png")


def plot(rows: list[dict], path: Path) -> None:
    """Test R@1 drop (worst direction) against the speed-up, one line per SmoothQuant setting."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.5, 3.8))
    for alpha in dict.fromkeys(r["smoothquant_alpha"] for r in rows):
        sel = [r for r in rows if r["smoothquant_alpha"] == alpha]
        label = f"SmoothQuant alpha {alpha}" if alpha is not None else "no SmoothQuant"
        ax.plot([r["speedup_b64"] for r in sel], [r["test_R@1_drop"] for r in sel], "o-", label=label)
        for r in sel:
            ax.annotate(str(r["kept_fp32"]), (r["speedup_b64"], r["test_R@1_drop"]), fontsize=7,
                        xytext=(3, 3), textcoords="offset points")  # fmt: skip
    ax.axhline(0.5, color="gray", ls="--", lw=0.8, label="gate: 0.5 point")
    ax.axvline(1.8, color="gray", ls=":", lw=0.8, label="target: 1.8x")
    ax.set_xlabel("text tower throughput, x FP32 (batch 64)")
    ax.set_ylabel("test R@1 drop, worst direction (points)")
    scales = rows[0].get("activations", "per-token")
    ax.set_title(f"CPU INT8 ({scales} scales): nodes kept FP32 (labels) vs speed and recall", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m xmr.perf.int8_frontier", description=__doc__.split("\n")[0]
    )
    parser.add_argument("artifact", type=Path)
    parser.add_argument("--out", type=Path, default=Path("perf/results/int8_frontier"))
    parser.add_argument("--ks", type=int, nargs="+", default=[0, 2, 4, 6, 9, 12, 18, 24])
    parser.add_argument("--activations", choices=ACTIVATION_SCALES, default="per-token")
    parser.add_argument("--rounding", choices=ROUNDINGS, default=None, help="default: as xmr optimize")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--dev-items", type=int, default=1000)
    args = parser.parse_args()
    rows = frontier(
        args.artifact, args.ks, args.threads, args.repeats, args.dev_items, args.activations, args.rounding
    )
    write(rows, args.out, args.threads)
    print(f"wrote {args.out}/int8_frontier.{{csv,md,png}}")


if __name__ == "__main__":
    main()
