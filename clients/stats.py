"""Where a served request spends its time, per hop, from Triton's own statistics extension.

Triton keeps cumulative per-model counters since it started (`get_inference_statistics`): for successful
requests their count and total ns, and the total ns spent queued (`queue`, including dynamic-batching
waits), copying inputs in (`compute_input`), executing (`compute_infer`: for a python-backend model the
round trip to its stub process and the Python `execute`) and copying outputs out (`compute_output`), plus
the number of inferences (batch elements) and executions (model calls; inferences / executions is the
average dynamic batch). `StatsProbe` reads them before and after a measurement and diffs them, so every
figure is about that measurement only:

    probe = StatsProbe("127.0.0.1:8001", "text_search").start()
    ...  # perf_analyzer, a client loop
    breakdown = probe.stop()
    Console().print(breakdown_table(breakdown))

A `Breakdown` has one `Hop` per model: the ensemble first (its `total` is the server's end-to-end time of
one ensemble request), then its steps in ensemble order, then `between hops` = ensemble total minus the
steps' totals (the ensemble scheduler handing tensors from one step to the next). All times are
microseconds per request (`*_us`) and per inference, i.e. per batch element (`*_us_per_inference`).

Counters are per model (all versions summed), so a diff is only clean while nothing else sends requests.
A request that is counted in a compute stage is counted once for every request of its dynamic batch
(Triton attributes the batch's compute time to each of its requests).
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterable
from dataclasses import dataclass, fields

from rich.table import Table

from xmr.clients.server import ServerError

STAGES = ("queue", "compute_input", "compute_infer", "compute_output")
BETWEEN = "between hops"


@dataclass(frozen=True)
class Counters:
    """One model's cumulative counters at one moment (all versions summed)."""

    model: str
    success: int = 0  # successful requests
    fail: int = 0
    inferences: int = 0  # batch elements
    executions: int = 0  # model executions (a dynamic batch is one)
    success_ns: int = 0  # end-to-end server time of the successful requests
    queue_ns: int = 0
    compute_input_ns: int = 0
    compute_infer_ns: int = 0
    compute_output_ns: int = 0

    def __sub__(self, other: Counters) -> Counters:
        return Counters(
            self.model, *(getattr(self, f.name) - getattr(other, f.name) for f in fields(self)[1:])
        )

    def __add__(self, other: Counters) -> Counters:
        return Counters(
            self.model, *(getattr(self, f.name) + getattr(other, f.name) for f in fields(self)[1:])
        )


@dataclass(frozen=True)
class Hop:
    """One row of a breakdown: a model's (or the ensemble's) time per request, in microseconds."""

    model: str
    role: str  # "model", "ensemble", "step", "between" (ensemble total - its steps' totals)
    requests: int
    inferences: int
    executions: int
    failures: int
    queue_us: float
    compute_input_us: float
    compute_infer_us: float
    compute_output_us: float
    total_us: float  # end-to-end server time of one request of this model

    @property
    def batch(self) -> float:
        """Average inferences per request (the client's batch)."""
        return self.inferences / self.requests if self.requests else 0.0

    @property
    def dynamic_batch(self) -> float:
        """Average requests per execution: what dynamic batching gathered."""
        return self.requests / self.executions if self.executions else 0.0

    def per_inference(self, us: float) -> float:
        return us / self.batch if self.batch else 0.0

    def as_dict(self) -> dict:
        row = {f.name: getattr(self, f.name) for f in fields(self)}
        row["dynamic_batch"] = self.dynamic_batch
        for name in (*(f"{s}_us" for s in STAGES), "total_us"):
            row[f"{name}_per_inference"] = self.per_inference(getattr(self, name))
        return row


def hop(counters: Counters, role: str) -> Hop:
    n = counters.success

    def us(ns: int) -> float:
        return ns / n / 1e3 if n else 0.0

    return Hop(
        counters.model,
        role,
        n,
        counters.inferences,
        counters.executions,
        counters.fail,
        *(us(getattr(counters, f"{s}_ns")) for s in STAGES),
        us(counters.success_ns),
    )


@dataclass
class Breakdown:
    """The per-hop time of one measurement: the ensemble, its steps in order, the time between them."""

    ensemble: str
    hops: list[Hop]

    def __getitem__(self, model: str) -> Hop:
        for h in self.hops:
            if h.model == model:
                return h
        raise KeyError(model)

    @property
    def total_us(self) -> float:
        return self.hops[0].total_us

    def rows(self, **labels) -> list[dict]:
        """One dict per hop, `labels` (e.g. batch=8, concurrency=4) first."""
        return [{**labels, **h.as_dict()} for h in self.hops]


def breakdown_from(ensemble: str, steps: list[str], before: dict, after: dict) -> Breakdown:
    """The diff of two snapshots ({model: Counters}) as a Breakdown of `ensemble` and its `steps`."""
    diffs = {m: after[m] - before.get(m, Counters(m)) for m in [ensemble, *steps]}
    hops = [hop(diffs[ensemble], "ensemble" if steps else "model")]
    hops += [hop(diffs[m], "step") for m in steps]
    if steps:
        # ensemble total - the steps' totals, per ensemble request (each step runs once per ensemble
        # request): the scheduler's hand-offs; signed, as the two come from different clocks' reads
        n = hops[0].requests
        steps_ns = sum(diffs[m].success_ns for m in steps)
        residual = (diffs[ensemble].success_ns - steps_ns) / n / 1e3 if n else 0.0
        between = Hop(BETWEEN, "between", n, hops[0].inferences, hops[0].executions, 0, 0, 0, 0, 0, residual)
        hops.append(between)
    return Breakdown(ensemble, hops)


# ----------------------------------------------------------------------------- reading the server


def _ns(duration) -> tuple[int, int]:
    return int(duration.count), int(duration.ns)


def counters_from_pb(stat) -> Counters:
    """Counters of one `ModelStatistics` protobuf message (tritonclient.grpc's service_pb2)."""
    s = stat.inference_stats
    success, success_ns = _ns(s.success)
    return Counters(
        stat.name,
        success,
        int(s.fail.count),
        int(stat.inference_count),
        int(stat.execution_count),
        success_ns,
        *(int(getattr(s, stage).ns) for stage in STAGES),
    )


def snapshot(client, models: Iterable[str] | None = None) -> dict[str, Counters]:
    """{model: Counters} now, for `models` (all loaded models when None); versions summed."""
    from tritonclient.utils import InferenceServerException

    try:
        response = client.get_inference_statistics(model_name="")
    except InferenceServerException as e:
        raise ServerError(f"cannot read the server's statistics: {e.message()}") from e
    wanted = None if models is None else set(models)
    out: dict[str, Counters] = {}
    for stat in response.model_stats:
        if wanted is not None and stat.name not in wanted:
            continue
        c = counters_from_pb(stat)
        out[c.model] = out[c.model] + c if c.model in out else c
    return out


def ensemble_steps(client, model: str) -> list[str]:
    """The composing models of an ensemble in step order (nested ensembles flattened); [] for a model."""
    config = client.get_model_config(model).config
    steps: list[str] = []
    for step in config.ensemble_scheduling.step:
        inner = ensemble_steps(client, step.model_name)
        steps += [step.model_name] if not inner else [step.model_name, *inner]
    return steps


class StatsProbe:
    """Diff of the server's statistics of one ensemble (or model) and its steps around a measurement."""

    def __init__(self, url: str, model: str):
        import tritonclient.grpc as grpcclient

        self.model = model
        self.client = grpcclient.InferenceServerClient(url)
        self.steps = ensemble_steps(self.client, model)
        self.before: dict[str, Counters] = {}

    def start(self) -> StatsProbe:
        self.before = snapshot(self.client, [self.model, *self.steps])
        return self

    def stop(self) -> Breakdown:
        after = snapshot(self.client, [self.model, *self.steps])
        return breakdown_from(self.model, self.steps, self.before, after)

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> StatsProbe:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


# ----------------------------------------------------------------------------- reports

CSV_FIELDS = [
    "model",
    "role",
    "requests",
    "inferences",
    "executions",
    "failures",
    "dynamic_batch",
    *(f"{s}_us" for s in STAGES),
    "total_us",
    *(f"{s}_us_per_inference" for s in STAGES),
    "total_us_per_inference",
]


def breakdown_csv(rows: list[dict]) -> str:
    """CSV of `Breakdown.rows()` dicts (label columns first, then CSV_FIELDS); floats to 0.1 us."""
    if not rows:
        return ""
    labels = [k for k in rows[0] if k not in CSV_FIELDS]
    out = io.StringIO()
    writer = csv.DictWriter(out, [*labels, *CSV_FIELDS], extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for r in rows:
        writer.writerow({k: round(v, 1) if isinstance(v, float) else v for k, v in r.items()})
    return out.getvalue()


def breakdown_table(b: Breakdown, title: str | None = None) -> Table:
    """A rich table: one row per hop, us per request (and the total per inference)."""
    table = Table(title=title or f"{b.ensemble}: server time per request by hop (us)")
    for name in ("hop", "requests", "req/exec", "queue", "c.input", "c.infer", "c.output", "total"):
        table.add_column(name, justify="left" if name == "hop" else "right")
    table.add_column("total / inference", justify="right")
    for h in b.hops:
        if h.role == "between":
            stages = ["", "", "", ""]
        else:
            stages = [f"{getattr(h, f'{s}_us'):,.0f}" for s in STAGES]
        table.add_row(
            h.model if h.role != "step" else f"  {h.model}",
            f"{h.requests:,}",
            f"{h.dynamic_batch:.2f}" if h.executions else "",
            *stages,
            f"{h.total_us:,.0f}",
            f"{h.per_inference(h.total_us):,.0f}",
        )
    return table
