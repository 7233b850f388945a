"""Which serving design closes the gap to the in-process pipeline: the same benchmark on repository variants.

Every variant is a copy of one built cpu repository (whose `text_search` is the one-hop python model
`TextSearchModel`) with its `config.pbtxt` files edited (dynamic batching delay, preferred batch sizes
or no dynamic batching at all, instance counts, ONNX Runtime threads per instance) and/or the three-hop
ensemble (the gpu target's form, `repository.add_ensemble_form`) in place of `text_search`, or a
perf_analyzer transport or mode (system shared memory, gRPC streaming, `--async`). Each variant is
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
import shutil
import sys
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path

from rich.console import Console
from rich.table import Table

from xmr.clients.stats import breakdown_csv
from xmr.export.repository import add_ensemble_form, build_repository
from xmr.perf.bench_text_search import Settings, measure, throughput_ratios, write_atomic


@dataclass(frozen=True)
class Variant:
    delay_us: int | None = None  # every dynamically batched model's max_queue_delay_microseconds
    instances: dict = field(default_factory=dict)  # {model: instance count}
    ensemble: bool = False  # text_search as the tokenizer -> text_encoder -> gallery_topk ensemble
    shared_memory: str = "none"
    streaming: bool = False
    threads: dict = field(default_factory=dict)  # {model: ONNX Runtime intra-op threads per instance}
    asynchronous: bool = False  # perf_analyzer --async (one completion thread instead of N blocking ones)
    preferred: tuple | None = None  # every dynamically batched model's preferred_batch_size (rows; () none)
    batching: bool = True  # False: dynamic batching removed, every request is its own execution


VARIANTS: dict[str, Variant] = {
    "base": Variant(),  # what `xmr repo` writes: one-hop text_search, 2 instances, no delay, preferred 8
    "i2": Variant(instances={"text_search": 2}),
    "d100-i2": Variant(delay_us=100, instances={"text_search": 2}),
    "i2-shm": Variant(instances={"text_search": 2}, shared_memory="system"),
    "i2-stream": Variant(instances={"text_search": 2}, streaming=True),
    "i3": Variant(instances={"text_search": 3}),
    "i4": Variant(instances={"text_search": 4}),
    "i2-async": Variant(instances={"text_search": 2}, asynchronous=True),
    "i2-shm-async": Variant(instances={"text_search": 2}, shared_memory="system", asynchronous=True),
    "i2-shm-stream": Variant(instances={"text_search": 2}, shared_memory="system", streaming=True),
    # preferred sizes: when an instance frees, it takes the largest preferred batch the queue holds (base:
    # 8, so two queued batch-8 requests go to two instances); without, everything queued, in one run
    "no-preferred": Variant(preferred=()),
    "pref1-8": Variant(preferred=(1, 8)),  # under 8 rows queued: one request per run
    "nobatch": Variant(batching=False),
    "i1-t2": Variant(instances={"text_search": 1}, threads={"text_search": 2}),
    "d500-i1-t2": Variant(delay_us=500, instances={"text_search": 1}, threads={"text_search": 2}),
    "ensemble-d500": Variant(delay_us=500, ensemble=True),  # the design before the one-hop model
    "ensemble-d0": Variant(ensemble=True),
    "ensemble-d100": Variant(delay_us=100, ensemble=True),
    "ensemble-d0-towers-i2": Variant(ensemble=True, instances={"text_encoder": 2, "gallery_topk": 2}),
}


def make_variant(base: Path, out: Path, v: Variant) -> Path:
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    shutil.copytree(base, out)
    if v.ensemble:
        add_ensemble_form(out, "text_search")
    for path in out.glob("*/config.pbtxt"):
        cfg = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
        if v.delay_us is not None and cfg.HasField("dynamic_batching"):
            cfg.dynamic_batching.max_queue_delay_microseconds = v.delay_us
        if v.preferred is not None and cfg.HasField("dynamic_batching"):
            cfg.dynamic_batching.preferred_batch_size[:] = list(v.preferred)
        if not v.batching:
            cfg.ClearField("dynamic_batching")
        if path.parent.name in v.instances:
            for group in cfg.instance_group:
                group.count = v.instances[path.parent.name]
        if path.parent.name in v.threads:
            cfg.parameters["threads"].string_value = str(v.threads[path.parent.name])
        path.write_text(text_format.MessageToString(cfg))
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
            repo = make_variant(base, Path(tmp) / name, v)
            run = replace(
                settings, shared_memory=v.shared_memory, streaming=v.streaming, asynchronous=v.asynchronous
            )
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
