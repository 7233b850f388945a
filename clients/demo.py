"""`xmr demo` / `make demo`: the main job end to end on the CPU.

train (PyTorch) -> evaluate -> export (ONNX + parity) -> repository (cpu target) -> serve (real tritonserver
on free loopback ports) -> query every test caption and image through the ensembles -> one table of
Recall@K for PyTorch, ONNX Runtime and the served ensemble side by side, a few example queries with their
top results, and a PNG of the recall figures. The server is stopped at the end, whatever happens.
"""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console
from rich.table import Table

from xmr.clients.report import recall_plot, recall_table
from xmr.clients.served import served_metrics, served_outputs
from xmr.clients.server import TritonServer
from xmr.clients.triton_client import XmrClient
from xmr.export.onnx_export import export_run
from xmr.export.repository import build_repository
from xmr.models.checkpoint import WEIGHTS
from xmr.models.data import load_split
from xmr.models.train.image_text import TrainConfig, train

EXAMPLE_QUERIES = (
    "a large red circle to the left of a small blue square",
    "a small green triangle",
    "a yellow square above a white circle",
    "two shapes a purple diamond and a blue cross",
)
PARITY_TOL = 1.0  # recall points: ONNX Runtime / served vs PyTorch may differ only by near-ties


def run_demo(workdir: Path, epochs: int = 10, retrain: bool = False, console: Console | None = None) -> dict:
    console = console or Console()
    run, artifacts, repository = (
        workdir / "runs/demo",
        workdir / "artifacts/demo",
        workdir / "build/repository",
    )

    console.rule("1. train RVSE++ (RVSE + SelHN) on Shapes (PyTorch, CPU)")
    if retrain or not (run / WEIGHTS).is_file():
        train(TrainConfig(epochs=epochs, loss="selhn"), run)
    else:
        console.print(f"using the existing run {run} (--retrain to train again)")

    console.rule("2. export to ONNX, parity vs PyTorch on the test split")
    manifest = export_run(run, artifacts)
    parity = manifest["parity"]
    for tower in ("image_encoder", "text_encoder"):
        p = parity[tower]
        console.print(f"{tower}: max abs err {p['max_abs_err']:.2e}, min cosine {p['min_cosine']:.6f}")

    console.rule("3. Triton model repository (cpu target)")
    build_repository(artifacts, repository, "cpu")
    console.print(f"wrote {repository}")

    console.rule("4. serve with tritonserver and query the ensembles")
    test = load_split("shapes", "test")
    with TritonServer(repository) as server:
        console.print(
            f"tritonserver ready on gRPC {server.grpc_url}, HTTP {server.http_url} (127.0.0.1 only)"
        )
        client = XmrClient(server.grpc_url, "grpc")
        served = served_metrics(served_outputs(client, test), test)
        examples = {q: client.text_search([q], 3) for q in EXAMPLE_QUERIES}
        client.close()

    rows = {
        "PyTorch": parity["recall"]["pytorch"],
        "ONNX Runtime": parity["recall"]["onnxruntime"],
        "Triton (served ensemble)": served,
    }
    console.rule("5. results")
    console.print(
        recall_table(
            rows,
            title=f"Recall@K (%) on Shapes test ({len(test)} images, "
            f"{len(test) * test.captions_per_image} captions)",
        )
    )
    console.print(example_table(examples, test.captions))
    plot = recall_plot(
        rows, artifacts / "recall.png", title="RVSE++ on Shapes test: PyTorch vs ONNX Runtime vs Triton"
    )
    worst = max(abs(rows[b][m] - rows["PyTorch"][m]) for b in rows for m in rows["PyTorch"] if "_R@" in m)
    verdict = "within" if worst <= PARITY_TOL else "OUTSIDE"
    console.print(
        f"largest recall difference to PyTorch: {worst:.2f} points ({verdict} the {PARITY_TOL} point "
        f"tolerance); plot: {plot}"
    )
    report = {
        "recall": rows,
        "max_recall_diff": worst,
        "examples": {q: r.ids[0].tolist() for q, r in examples.items()},
    }
    (artifacts / "demo_report.json").write_text(json.dumps(report, indent=2))
    if worst > PARITY_TOL:
        raise SystemExit(1)
    return report


def example_table(examples: dict, captions: list[list[str]]) -> Table:
    table = Table(title="Example queries through text_search (top 3; each hit shown by its first caption)")
    table.add_column("query")
    table.add_column("rank", justify="right")
    table.add_column("score", justify="right")
    table.add_column("gallery image (its first test caption)")
    for query, result in examples.items():
        for rank, (i, s) in enumerate(zip(result.ids[0], result.scores[0], strict=True), 1):
            table.add_row(
                query if rank == 1 else "", str(rank), f"{float(s):.3f}", f"#{int(i)}: {captions[int(i)][0]}"
            )
    return table
