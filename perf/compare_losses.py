"""Train RVSE++ on Shapes with every training objective, several seeds, the same budget; compare.

    python -m xmr.perf.compare_losses --out perf/results/losses [--seeds 0 1 2] [--epochs 4] [--n-train 2000]

For each loss in `LOSSES` and each seed: train (same data, same epochs, same batch size and learning rate),
then score the best-on-validation model on the test split: Recall@1/5/10 both directions, rSum, and NDCG@10
against the continuous labels (lexical caption similarity, `image_text.relevance`) in both directions. Writes
`losses.csv` (one row per run), `losses.md` (mean ± std per loss, the table the README shows) and
`losses.png`. Nothing here is a test: it is a comparison anyone can rerun.
"""

from __future__ import annotations

import argparse
import csv
import json
import tempfile
import time
from pathlib import Path

import numpy as np

from xmr.models.checkpoint import load_run
from xmr.models.data import load_split
from xmr.models.evaluate.image_text import embed_images, embed_texts
from xmr.models.evaluate.retrieval import retrieval_metrics
from xmr.models.image_text.relevance import ndcg_at_k, relevance
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


def previous_rows(path: Path, keep_losses: set[str]) -> list[dict]:
    """Rows of an earlier run of the losses not rerun now, so `--losses a b` refreshes just those."""
    if not path.is_file():
        return []
    with open(path, newline="") as f:
        rows = [row for row in csv.DictReader(f) if row["loss"] in keep_losses]
    return [
        {k: v if k == "loss" else int(float(v)) if k == "seed" else float(v) for k, v in row.items()}
        for row in rows
    ]


def summary_markdown(rows: list[dict], budget: str) -> str:
    lines = [f"| loss | {' | '.join(COLUMNS)} |", "|---" * (len(COLUMNS) + 1) + "|"]
    for name in LOSSES:
        runs = [r for r in rows if r["loss"] == name]
        if not runs:
            continue
        cells = [f"{np.mean([r[c] for r in runs]):.1f} ± {np.std([r[c] for r in runs]):.1f}" for c in COLUMNS]
        lines.append(f"| {name} | {' | '.join(cells)} |")
    return "\n".join([f"Shapes test split, mean ± std over seeds; {budget}", "", *lines, ""])


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [n for n in LOSSES if any(r["loss"] == n for r in rows)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for ax, metric in zip(axes, ("rsum", "t2i_NDCG@10"), strict=True):
        values = [[r[metric] for r in rows if r["loss"] == n] for n in names]
        ax.bar(names, [np.mean(v) for v in values], yerr=[np.std(v) for v in values], capsize=4)
        ax.set_title(metric)
        ax.tick_params(axis="x", rotation=30)
    fig.suptitle("RVSE++ on Shapes: training objectives (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m xmr.perf.compare_losses", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--out", type=Path, default=Path("perf/results/losses"))
    parser.add_argument("--losses", nargs="+", default=list(LOSSES), choices=list(LOSSES))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--n-train", type=int, default=2000, help="training images (of 5000)")
    parser.add_argument("--n-eval", type=int, default=1000, help="val/test images (of 1000)")
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)

    test = load_split("shapes", "test").subset(args.n_eval)
    labels = relevance(test.captions, "lexical")  # (N_img, N_cap) continuous labels for NDCG
    rows = previous_rows(args.out / "losses.csv", keep_losses=set(LOSSES) - set(args.losses))
    for name in args.losses:
        for seed in args.seeds:
            cfg = TrainConfig(
                loss=name, seed=seed, epochs=args.epochs, n_train=args.n_train, n_eval=args.n_eval
            )
            with tempfile.TemporaryDirectory(prefix="xmr-compare-") as tmp:
                start = time.time()
                train(cfg, Path(tmp) / "run")
                row = {
                    "loss": name,
                    "seed": seed,
                    **score(Path(tmp) / "run", test, labels),
                    "train_s": round(time.time() - start, 1),
                }
            rows.append(row)
            print(
                json.dumps({k: round(v, 2) if isinstance(v, float) else v for k, v in row.items()}),
                flush=True,
            )
            with open(
                args.out / "losses.csv", "w", newline=""
            ) as f:  # rewritten after every run: partial results
                writer = csv.DictWriter(f, ["loss", "seed", *COLUMNS, "train_s"], extrasaction="ignore")
                writer.writeheader()
                writer.writerows(sorted(rows, key=lambda r: (list(LOSSES).index(r["loss"]), r["seed"])))
    budget = (
        f"{args.epochs} epochs on the first {args.n_train} training images, batch 128, lr 2e-3, "
        f"seeds {args.seeds}; NDCG@10 gains = lexical caption-similarity labels"
    )
    (args.out / "losses.md").write_text(summary_markdown(rows, budget))
    plot(rows, args.out / "losses.png")
    print(summary_markdown(rows, budget))


if __name__ == "__main__":
    main()
