"""Train ViSERN and ProTA on MovingShapes, export them, and tabulate PyTorch vs ONNX retrieval.

    python -m xmr.perf.video_retrieval --out perf/results/video [--epochs 8] [--figures perf/figures]

For each model: `train_video` (the same code as `xmr train visern|prota`), then `export_video_run` in the
standard form (ONNX Runtime, the whole test split) and, for ViSERN, the plugin form (the `xmr::RandomWalkGCN`
nodes run in the ONNX reference evaluator with our numpy op, on the first 48 test videos). Writes
`video_retrieval.md` (the README's table) and `video_retrieval.json` to `--out` and to `--figures` (default
perf/figures, where the committed copies live). ProTA's rows are its exhaustive token-level pair scoring
(the `pair_scorer` over the whole gallery); its two-stage search is perf/prota_rerank.py's. Both models
train with `train_video`'s defaults: the same learning-rate warm-up for both, no warm-up objective.
Chance on the 300-video test split: text->video R@1 = 0.33%.
"""

from __future__ import annotations

import json
from pathlib import Path

from xmr.export.video_export import export_video_run
from xmr.models.train.video import VideoTrainConfig, train_video
from xmr.perf.tables import header, report_parser, row

COLUMNS = (
    "t2i_R@1",
    "t2i_R@5",
    "t2i_R@10",
    "t2i_medr",
    "t2i_meanr",
    "i2t_R@1",
    "i2t_R@5",
    "i2t_R@10",
    "i2t_medr",
    "i2t_meanr",
    "rsum",
)
HEADER = (
    "t2v R@1",
    "t2v R@5",
    "t2v R@10",
    "t2v MdR",
    "t2v MnR",
    "v2t R@1",
    "v2t R@5",
    "v2t R@10",
    "v2t MdR",
    "v2t MnR",
    "rSum",
)


MODELS = ("visern", "prota")


def rows_of(model: str, entry: dict) -> list[str]:
    """The table rows of one model's report entry (standard form, and the plugin form where measured)."""
    recall = entry["standard"]["recall"]
    lines = [
        row((model, "PyTorch"), recall["pytorch"], COLUMNS),
        row((model, "ONNX Runtime (standard ops)"), recall["onnx"], COLUMNS),
    ]
    if "plugin" in entry:
        n, recall = entry["plugin"]["n_videos"], entry["plugin"]["recall"]
        lines.append(row((model, f"PyTorch, first {n} videos"), recall["pytorch"], COLUMNS))
        lines.append(
            row((model, f"xmr plugin nodes (reference evaluator), first {n} videos"), recall["onnx"], COLUMNS)
        )
    return lines


def kept_entries(path: Path, measured: dict, epochs: int) -> dict:
    """Entries of an earlier report (`--figures`' json) for the models not measured now, trained for the
    same number of epochs (the length of their training history): `--models prota` refreshes ProTA's rows
    and keeps ViSERN's."""
    if not path.is_file():
        return {}
    earlier = json.loads(path.read_text())
    return {
        m: e
        for m, e in earlier.items()
        if m not in measured and len(e.get("train", {}).get("history", [])) == epochs
    }


def main(argv: list[str] | None = None) -> None:
    parser = report_parser("video_retrieval", __doc__, "perf/results/video", epochs=8)
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--figures", type=Path, default=Path("perf/figures"))
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    args.figures.mkdir(parents=True, exist_ok=True)
    report = {}
    for model in args.models:
        run = args.out / "runs" / model
        metrics = train_video(VideoTrainConfig(model=model, epochs=args.epochs), run)
        standard = export_video_run(run, args.out / "artifacts" / f"{model}-standard", "standard")
        report[model] = {"train": metrics, "standard": standard["parity"]}
        if model == "visern":
            plugin = export_video_run(run, args.out / "artifacts" / f"{model}-plugin", "plugin")
            report[model]["plugin"] = plugin["parity"]
        (args.out / "video_retrieval.json").write_text(json.dumps(report, indent=2))
    kept = kept_entries(args.figures / "video_retrieval.json", report, args.epochs)
    report = {m: report.get(m, kept.get(m)) for m in MODELS if m in report or m in kept}
    lines = header(("model", "backend"), HEADER)
    for model, entry in report.items():
        lines += rows_of(model, entry)
    budget = f"{args.epochs} epochs on MovingShapes train (2000 videos), test split 300 videos x 4 captions"
    if kept:
        budget += (
            f"; measured in this run: {', '.join(args.models)}; rows of {', '.join(kept)} kept from an "
            "earlier run of this script (same budget)"
        )
    for folder in (args.out, args.figures):
        (folder / "video_retrieval.json").write_text(json.dumps(report, indent=2))
        (folder / "video_retrieval.md").write_text("\n".join([budget, "", *lines, ""]))
    print("\n".join([budget, "", *lines]))


if __name__ == "__main__":
    main()
