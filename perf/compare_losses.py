"""Train RVSE++ on Shapes with every training objective, several seeds, the same budget; compare.

    python -m xmr.perf.compare_losses [--out perf/figures] [--seeds 5] [--epochs 4] [--n-train 2000]

For each loss in `LOSSES` and each seed 0 .. N-1: train with exactly the same protocol (same data, epochs,
batch size, learning rate and schedule; the same learning-rate warm-up epoch for all and no loss-specific
warm-up objective: `TrainConfig.warmup_loss` stays None for every loss), then score the best-on-validation
model on the test split: Recall@1/5/10 both directions, rSum, and NDCG@10 against the continuous labels
(`image_text.relevance`, kind "bcls", MiniLM by default) in both directions. One seed of one loss takes
about 30-40 s on 2 CPU cores at the default budget (plus a one-off ~1 min to embed the captions with
MiniLM, cached in `--cache`), so `--seeds 5` over the eight losses is about 25 minutes.

Writes, all in `--out` (the figures folder): `losses.csv` (one row per run, rewritten after each run),
`losses.md` (mean ± sample std per loss, and for rSum and t2i NDCG@10 each loss against the best one:
the difference, Welch's t-test p-value, and whether the difference exceeds the seed noise, p < 0.05)
and `losses.png`. Nothing here is a test: it is a comparison anyone can rerun.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.stats import ttest_ind

from xmr.models.checkpoint import load_run
from xmr.models.data import load_split
from xmr.models.evaluate.image_text import embed_images, embed_texts
from xmr.models.evaluate.retrieval import retrieval_metrics
from xmr.models.image_text.relevance import MEASURES, ndcg_at_k, relevance
from xmr.models.losses import LOSSES
from xmr.models.train.image_text import TrainConfig, train

COLUMNS = (
    "i2t_R@1",
    "i2t_R@5",
    "i2t_R@10",
    "t2i_R@1",
    "t2i_R@5",
    "t2i_R@10",
    "rsum",
    "i2t_NDCG@10",
    "t2i_NDCG@10",
)
TESTED = ("rsum", "t2i_NDCG@10")  # the columns whose differences are tested against the seed noise
ALPHA = 0.05


def score(run: Path, test, labels: np.ndarray) -> dict[str, float]:
    """Recall@K and NDCG@10 (gains = continuous labels) of a trained run on `test`."""
    model, tokenizer, _ = load_run(run)
    img = embed_images(model, test.images)
    txt = embed_texts(model, tokenizer, test.flat_captions())
    sim = img @ txt.T  # (N_img, N_cap)
    metrics = retrieval_metrics(sim, test.caption_image_index())
    metrics["i2t_NDCG@10"] = float(100 * ndcg_at_k(sim, labels, 10).mean())
    metrics["t2i_NDCG@10"] = float(100 * ndcg_at_k(sim.T, labels.T, 10).mean())
    return metrics


def previous_rows(path: Path, keep_losses: set[str], protocol: str) -> list[dict]:
    """Rows of an earlier run under the same protocol of the losses not rerun now, so `--losses a b`
    refreshes just those; rows of another protocol (budget, labels, warm-up) are never mixed in."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = [
            row for row in csv.DictReader(f) if row["loss"] in keep_losses and row.get("protocol") == protocol
        ]
    return [
        {
            k: v if k in ("loss", "protocol") else int(float(v)) if k == "seed" else float(v)
            for k, v in row.items()
        }
        for row in rows
    ]


def compare(rows: list[dict], column: str) -> list[dict]:
    """Per loss: mean, sample std, n, and against the best mean: difference, Welch p, exceeds noise."""
    stats = {}
    for name in LOSSES:
        values = np.array([r[column] for r in rows if r["loss"] == name], dtype=float)
        if len(values):
            stats[name] = values
    if not stats:
        return []
    best = max(stats, key=lambda n: stats[n].mean())
    out = []
    for name, values in stats.items():
        entry = {
            "loss": name,
            "mean": float(values.mean()),
            "std": float(values.std(ddof=1)) if len(values) > 1 else float("nan"),
            "n": len(values),
            "best": name == best,
            "diff": float(values.mean() - stats[best].mean()),
            "p": float("nan"),
            "exceeds_noise": None,
        }
        if name != best and len(values) > 1 and len(stats[best]) > 1:
            p = float(ttest_ind(values, stats[best], equal_var=False).pvalue)
            entry["p"], entry["exceeds_noise"] = p, bool(p < ALPHA)
        out.append(entry)
    return out


def fmt_std(values: list[float]) -> str:
    return f"{np.std(values, ddof=1):.1f}" if len(values) > 1 else "n/a"


def summary_markdown(rows: list[dict], budget: str) -> str:
    lines = [f"| loss | {' | '.join(COLUMNS)} |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name in LOSSES:
        runs = [r for r in rows if r["loss"] == name]
        if not runs:
            continue
        cells = [f"{np.mean([r[c] for r in runs]):.1f} ± {fmt_std([r[c] for r in runs])}" for c in COLUMNS]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    out = [f"Shapes test split, mean ± sample std over seeds; {budget}", "", *lines, ""]
    for column in TESTED:
        out += [
            f"{column}: each loss against the best (Welch's t-test over seeds; 'yes' = p < {ALPHA}, the "
            "difference exceeds the seed noise)",
            "",
            "| loss | mean | std | seeds | diff to best | p | exceeds noise |",
            "|---|---|---|---|---|---|---|",
        ]
        for e in compare(rows, column):
            verdict = (
                "best"
                if e["best"]
                else "n/a"
                if e["exceeds_noise"] is None
                else ("yes" if e["exceeds_noise"] else "no")
            )
            p = "" if np.isnan(e["p"]) else f"{e['p']:.3f}"
            std = "n/a" if np.isnan(e["std"]) else f"{e['std']:.1f}"
            out.append(
                f"| {e['loss']} | {e['mean']:.1f} | {std} | {e['n']} | {e['diff']:+.1f} | {p} | {verdict} |"
            )
        out.append("")
    return "\n".join(out)


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in LOSSES if any(r["loss"] == n for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, metric in zip(axes, TESTED, strict=True):
        values = [[r[metric] for r in rows if r["loss"] == n] for n in names]
        stds = [np.std(v, ddof=1) if len(v) > 1 else 0.0 for v in values]
        ax.bar(names, [np.mean(v) for v in values], yerr=stds, capsize=4)
        for i, v in enumerate(values):  # every seed, so the spread is visible, not only its summary
            ax.plot([i] * len(v), v, "k.", alpha=0.6)
        ax.set_title(metric)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle("RVSE on Shapes: training objectives (mean ± sample std over seeds, dots = seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m xmr.perf.compare_losses", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=Path("perf/figures"), help="csv, md and png go here")
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    parser.add_argument("--seeds", type=int, default=3, help="number of seeds: 0 .. N-1")
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--n-train", type=int, default=2000, help="training images (of 5000)")
    parser.add_argument("--n-eval", type=int, default=1000, help="val/test images (of 1000)")
    parser.add_argument("--relevance", default="minilm", choices=sorted(MEASURES), help="continuous labels")
    parser.add_argument("--cache", type=Path, default=Path("runs/cache/relevance"), help="label vectors")
    args = parser.parse_args(argv)
    if args.seeds < 1:
        parser.error("--seeds must be >= 1")
    args.out.mkdir(parents=True, exist_ok=True)
    seeds = list(range(args.seeds))
    budget = (
        f"{args.epochs} epochs on the first {args.n_train} training images, batch 128, lr 2e-3 (one epoch of "
        f"linear lr warm-up, then cosine), no warm-up objective for any loss, seeds {seeds}; continuous "
        f"labels and NDCG@10 gains = {args.relevance} caption similarity"
    )
    protocol = f"e{args.epochs}-n{args.n_train}-v{args.n_eval}-{args.relevance}-nowarmloss"

    test = load_split("shapes", "test").subset(args.n_eval)
    labels = relevance(test.captions, args.relevance, args.cache)  # (N_img, N_cap) gains for NDCG
    csv_path = args.out / "losses.csv"
    rows = previous_rows(csv_path, set(LOSSES) - set(args.losses), protocol)
    for name in args.losses:
        for seed in seeds:
            cfg = TrainConfig(
                loss=name,
                seed=seed,
                epochs=args.epochs,
                n_train=args.n_train,
                n_eval=args.n_eval,
                warmup_loss=None,  # the same for every loss
                relevance=args.relevance,
                relevance_cache=str(args.cache),
            )
            with tempfile.TemporaryDirectory(prefix="xmr-compare-") as tmp:
                start = time.time()
                train(cfg, Path(tmp) / "run")
                row = {
                    "loss": name,
                    "seed": seed,
                    **score(Path(tmp) / "run", test, labels),
                    "train_s": round(time.time() - start, 1),
                    "protocol": protocol,
                }
            rows.append(row)
            print(
                json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}),
                flush=True,
            )
            with open(csv_path, "w", newline="") as f:  # rewritten after every run: partial results
                writer = csv.DictWriter(
                    f, ["loss", "seed", *COLUMNS, "train_s", "protocol"], extrasaction="ignore"
                )
                writer.writeheader()
                writer.writerows(sorted(rows, key=lambda r: (list(LOSSES).index(r["loss"]), r["seed"])))
    summary = summary_markdown(rows, budget)
    (args.out / "losses.md").write_text(summary)
    plot(rows, args.out / "losses.png")
    print(summary)


if __name__ == "__main__":
    main()
