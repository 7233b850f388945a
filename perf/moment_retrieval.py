"""Train CDNet on MovingShapes moment queries (1-D and spatio-temporal CDD), export, tabulate vs baseline.

    python -m xmr.perf.moment_retrieval --out perf/results/moments [--epochs 12]

For each CDD variant (sampling over time only; trilinear over (t, y, x) of each clip's 4 x 4 grid):
`train_moment` (the same code as `xmr train cdnet [--grid]`), then `export_moment_run` in the standard form
(ONNX Runtime, all test queries) and the plugin form (`xmr::DeformSample` in the reference evaluator, the
first 32 queries). Writes `moment_retrieval.md` (the README's table) and `moment_retrieval.json`, with a
random-span baseline (10 random spans per query, random scores) for scale.
"""

from __future__ import annotations

import json

from xmr.export.moment_export import export_moment_run
from xmr.models.train.moments import MomentTrainConfig, train_moment
from xmr.perf.tables import header, report_parser, row

COLUMNS = ("R1@0.5", "R1@0.7", "mAP@0.5", "mAP@0.75", "mAP", "mIoU")


def main(argv: list[str] | None = None) -> None:
    parser = report_parser("moment_retrieval", __doc__, "perf/results/moments", epochs=12)
    args = parser.parse_args(argv)
    args.out.mkdir(parents=True, exist_ok=True)
    lines = header(("CDD sampling", "backend"), COLUMNS)
    report = {}
    for grid in (False, True):
        variant = "(t, y, x) trilinear" if grid else "t (1-D)"
        run = args.out / "runs" / ("cdnet-grid" if grid else "cdnet")
        metrics = train_moment(MomentTrainConfig(epochs=args.epochs, use_grid=grid), run)
        standard = export_moment_run(run, args.out / "artifacts" / f"{run.name}-standard", "standard")
        plugin = export_moment_run(run, args.out / "artifacts" / f"{run.name}-plugin", "plugin")
        report[variant] = {"train": metrics, "standard": standard["parity"], "plugin": plugin["parity"]}
        n = plugin["parity"]["n_queries"]
        lines += [
            row((variant, "random spans"), metrics["random_baseline"], COLUMNS),
            row((variant, "PyTorch"), standard["parity"]["moments"]["pytorch"], COLUMNS),
            row((variant, "ONNX Runtime (standard ops)"), standard["parity"]["moments"]["onnx"], COLUMNS),
            row((variant, f"PyTorch, first {n} queries"), plugin["parity"]["moments"]["pytorch"], COLUMNS),
            row(
                (variant, f"xmr plugin node (reference evaluator), first {n} queries"),
                plugin["parity"]["moments"]["onnx"],
                COLUMNS,
            ),
        ]
        (args.out / "moment_retrieval.json").write_text(json.dumps(report, indent=2))
    budget = (
        f"{args.epochs} epochs on MovingShapes train (2000 videos x 2 moment queries); "
        f"test split: 300 videos, 600 queries"
    )
    (args.out / "moment_retrieval.md").write_text("\n".join([budget, "", *lines, ""]))
    print("\n".join([budget, "", *lines]))


if __name__ == "__main__":
    main()
