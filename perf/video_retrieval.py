"""Train ViSERN and ProTA on MovingShapes, export them, and tabulate PyTorch vs ONNX retrieval.

    python -m xmr.perf.video_retrieval --out perf/results/video [--epochs 8]

For each model: `train_video` (the same code as `xmr train visern|prota`), then `export_video_run` in the
standard form (ONNX Runtime, the whole test split) and, for ViSERN, the plugin form (the `xmr::RandomWalkGCN`
nodes run in the ONNX reference evaluator with our numpy op, on the first 48 test videos). Writes
`video_retrieval.md` (the README's table) and `video_retrieval.json`. Chance on the 300-video test split:
text->video R@1 = 0.33%.
"""

from __future__ import annotations

import json

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


def main(argv: list[str] | None = None) -> None:
    parser = report_parser("video_retrieval", __doc__, "perf/results/video", epochs=8)
    parser.add_argument("--models", nargs="+", default=["visern", "prota"], choices=["visern", "prota"])
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = header(("model", "backend"), HEADER)
    report = {}
    for model in args.models:
        run = args.out / "runs" / model
        metrics = train_video(VideoTrainConfig(model=model, epochs=args.epochs), run)
        standard = export_video_run(run, args.out / "artifacts" / f"{model}-standard", "standard")
        report[model] = {"train": metrics, "standard": standard["parity"]}
        lines.append(row((model, "PyTorch"), standard["parity"]["recall"]["pytorch"], COLUMNS))
        lines.append(
            row((model, "ONNX Runtime (standard ops)"), standard["parity"]["recall"]["onnx"], COLUMNS)
        )
        if model == "visern":
            plugin = export_video_run(run, args.out / "artifacts" / f"{model}-plugin", "plugin")
            report[model]["plugin"] = plugin["parity"]
            n = plugin["parity"]["n_videos"]
            lines.append(
                row((model, f"PyTorch, first {n} videos"), plugin["parity"]["recall"]["pytorch"], COLUMNS)
            )
            lines.append(
                row(
                    (model, f"xmr plugin nodes (reference evaluator), first {n} videos"),
                    plugin["parity"]["recall"]["onnx"],
                    COLUMNS,
                )
            )
        (args.out / "video_retrieval.json").write_text(json.dumps(report, indent=2))
    budget = f"{args.epochs} epochs on MovingShapes train (2000 videos), test split 300 videos x 4 captions"
    (args.out / "video_retrieval.md").write_text("\n".join([budget, "", *lines, ""]))
    print("\n".join([budget, "", *lines]))


if __name__ == "__main__":
    main()
