"""Tables (rich) and plots (matplotlib, PNG) of retrieval metrics across backends."""

from __future__ import annotations

from pathlib import Path

from rich.table import Table

COLUMNS = ("i2t_R@1", "i2t_R@5", "i2t_R@10", "t2i_R@1", "t2i_R@5", "t2i_R@10", "rsum")


def recall_table(
    rows: dict[str, dict[str, float]], title: str = "Recall@K (%)", item: str = "image"
) -> Table:
    """One row per backend; i2t / t2i read as v2t / t2v when the items are videos."""
    table = Table(title=title)
    table.add_column("backend")
    short = {"image": "i", "video": "v"}[item]
    for c in COLUMNS:
        table.add_column(
            c.replace("i2t", f"{short}2t").replace("t2i", f"t2{short}").replace("_", " "), justify="right"
        )
    for name, metrics in rows.items():
        table.add_row(name, *(f"{metrics[c]:.1f}" if c in metrics else "-" for c in COLUMNS))
    return table


def recall_plot(rows: dict[str, dict[str, float]], path: Path, title: str = "Recall@K by backend") -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = [c for c in COLUMNS if c != "rsum"]
    width = 0.8 / max(1, len(rows))
    fig, ax = plt.subplots(figsize=(9, 4))
    for i, (name, metrics) in enumerate(rows.items()):
        xs = [j + i * width for j in range(len(cols))]
        ax.bar(xs, [metrics.get(c, 0.0) for c in cols], width, label=name)
    ax.set_xticks(
        [j + width * (len(rows) - 1) / 2 for j in range(len(cols))], [c.replace("_", " ") for c in cols]
    )
    ax.set_ylabel("recall (%)")
    ax.set_ylim(0, 118)  # headroom for the legend above the bars
    ax.set_yticks(range(0, 101, 20))
    ax.set_title(title)
    ax.legend(loc="upper center", ncol=len(rows), fontsize=9)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return Path(path)
