"""Which serving design closes the gap to the in-process pipeline: the same benchmark on repository variants.

Every variant is a copy of one built cpu repository with its rendered `config.pbtxt` files edited (dynamic
batching delay, instance counts) and/or the fused one-hop text search (`xmr.export.fused`) in place of the
`text_search` ensemble, or a perf_analyzer transport (system shared memory, gRPC streaming). Each variant is
measured by `bench_text_search.measure` (its own served run, then the in-process pipeline right after), so
each ratio comes from one run; the per-hop server breakdown of every point is kept.

    python -m xmr.perf.served_overhead artifacts/demo --out perf/results/overhead [--variants base d0]

writes OUT/overhead.csv (variant, batch, concurrency, served and in-process captions/s, ratio),
OUT/overhead_hops.csv (variant, batch, concurrency, one row per hop) and prints the ratio table.
"""

from __future__ import annotations

import argparse
import csv
import io
import re
import shutil
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from xmr.clients.stats import breakdown_csv
from xmr.export.fused import add_fused_text_search
from xmr.export.repository import build_repository
from xmr.perf.bench_text_search import Settings, measure, throughput_ratios, write_atomic


@dataclass(frozen=True)
class Variant:
    delay_us: int | None = None  # every dynamically batched model's max_queue_delay_microseconds
    instances: dict = field(default_factory=dict)  # {model: instance count}
    fused: dict | None = None  # add_fused_text_search kwargs (delay_us, instances), replacing the ensemble
    shared_memory: str = "none"
    streaming: bool = False


VARIANTS: dict[str, Variant] = {
    "base": Variant(),
    "d0": Variant(delay_us=0),
    "d100": Variant(delay_us=100),
    "d0-towers-i2": Variant(delay_us=0, instances={"text_encoder": 2, "gallery_topk": 2}),
    "fused-d0-i1": Variant(fused={"delay_us": 0, "instances": 1}),
    "fused-d0-i2": Variant(fused={"delay_us": 0, "instances": 2}),
    "fused-d100-i2": Variant(fused={"delay_us": 100, "instances": 2}),
    "fused-d0-i2-shm": Variant(fused={"delay_us": 0, "instances": 2}, shared_memory="system"),
    "fused-d0-i2-stream": Variant(fused={"delay_us": 0, "instances": 2}, streaming=True),
}


def make_variant(base: Path, out: Path, artifacts: Path, v: Variant) -> Path:
    shutil.copytree(base, out)
    for cfg in out.glob("*/config.pbtxt"):
        text = cfg.read_text()
        if v.delay_us is not None:
            text = re.sub(
                r"max_queue_delay_microseconds: \d+", f"max_queue_delay_microseconds: {v.delay_us}", text
            )
        if cfg.parent.name in v.instances:
            text = re.sub(r"count: \d+", f"count: {v.instances[cfg.parent.name]}", text)
        cfg.write_text(text)
    if v.fused is not None:
        add_fused_text_search(out, artifacts, "text_search", **v.fused)
    return out


def summary_rows(name: str, points) -> list[dict]:
    by = {(p.backend, p.batch, p.concurrency): p for p in points}
    return [
        {
            "variant": name,
            "batch": b,
            "concurrency": c,
            "served_qps": round(by[("served", b, c)].throughput_qps, 1),
            "in_process_qps": round(by[("in-process", b, c)].throughput_qps, 1),
            "served_p50_ms": round(by[("served", b, c)].p50_ms, 2),
            "ratio": round(r, 3),
        }
        for (b, c), r in sorted(throughput_ratios(points).items())
    ]


def to_csv(rows: list[dict]) -> str:
    out = io.StringIO()
    if rows:
        writer = csv.DictWriter(out, list(rows[0]), lineterminator="\n")
        writer.writeheader()
        writer.writerows(rows)
    return out.getvalue()


def ratio_table(rows: list[dict]) -> Table:
    keys = sorted({(r["batch"], r["concurrency"]) for r in rows})
    table = Table(title="served / in-process throughput by variant (each from its own run)")
    table.add_column("variant")
    for b, c in keys:
        table.add_column(f"b{b} c{c}", justify="right")
    for name in dict.fromkeys(r["variant"] for r in rows):
        cells = {(r["batch"], r["concurrency"]): r for r in rows if r["variant"] == name}
        table.add_row(
            name,
            *(
                f"{cells[k]['ratio']:.2f} ({cells[k]['served_qps']:,.0f})" if k in cells else "-"
                for k in keys
            ),
        )
    return table


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m xmr.perf.served_overhead")
    parser.add_argument("artifacts", type=Path)
    parser.add_argument("--out", type=Path, default=Path("perf/results/overhead"))
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--window-ms", type=int, default=1000)
    parser.add_argument("--min-requests", type=int, default=200)
    args = parser.parse_args(argv)
    console = Console(width=None if sys.stdout.isatty() else 140)
    settings = Settings(args.batch_sizes, args.concurrency, args.window_ms, 25, 10, args.min_requests, 48, 10)
    rows, hops = [], []
    args.out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="xmr-overhead-") as tmp:
        base = build_repository(args.artifacts, Path(tmp) / "_built", "cpu")
        for name in args.variants:
            v = VARIANTS[name]
            console.rule(f"variant {name}: {v}")
            repo = make_variant(base, Path(tmp) / name, args.artifacts, v)
            run = replace(settings, shared_memory=v.shared_memory, streaming=v.streaming)
            points, env = measure(args.artifacts, repo, run, console)
            rows += summary_rows(name, points)
            hops += [{"variant": name, **h} for h in env["hops"]]
            shutil.rmtree(repo, ignore_errors=True)
            # written after every variant: a long run that dies keeps what it measured
            for file, text in (("overhead.csv", to_csv(rows)), ("overhead_hops.csv", breakdown_csv(hops))):
                write_atomic(args.out / file, lambda p, text=text: p.write_text(text))
            console.print(ratio_table(rows))
    console.print(f"wrote {args.out}/overhead.csv, overhead_hops.csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
