"""Locust users that load the served ensembles over gRPC with `tritonclient` (not HTTP scripts).

Run by `xmr load` (see `xmr.clients.load`), or by hand against a running server:

    locust -f perf/locustfile.py --headless -u 8 -r 2 -t 60s --host 127.0.0.1:8001 \\
        --xmr-repository build/repository [--xmr-weights text_search=3,image_embed=1] --csv out/locust

At start the users' task table is built from what the server serves: its repository index and model
configs give the READY ensembles, `xmr.clients.load.RECIPES` how to build their requests (from the
repository's manifest: Shapes captions, images of the served size), `--xmr-weights` their weights
(default 1 each). Each task sends one request (batch 1) of its ensemble and fires Locust's `request`
event (request_type "grpc", name = the ensemble, response time in ms, response size in bytes, the
exception if it failed), so Locust's own statistics, CSV and HTML report cover it. Users wait for
nothing between requests (a closed loop: N users keep N requests in flight).

Each good request's answer is compared with the answer the server gave it before the load started
(`REFERENCE`, built at setup): a changed answer is a failed request. With `--xmr-hostile W` a task of
weight W sends requests that the server must refuse (`xmr.clients.load.HOSTILE`), under the name
`<ensemble> (hostile)`: refused with INVALID_ARGUMENT is a success, anything else (an answer, another
status) a failure.

gRPC's blocking calls are made cooperative with gevent (`grpc.experimental.gevent.init_gevent`, before any
channel exists), otherwise one user's call would block every other user of the process.
"""

from __future__ import annotations

import csv
import gc
import logging
import os
import sys
import time
from pathlib import Path

import grpc.experimental.gevent as grpc_gevent

grpc_gevent.init_gevent()

import locust.stats  # noqa: E402
import numpy as np  # noqa: E402
import tritonclient.grpc as tc  # noqa: E402
from locust import User, constant, events  # noqa: E402
from tritonclient.utils import InferenceServerException  # noqa: E402

from xmr.clients.load import (  # noqa: E402
    CLIENT_TIMEOUT_S,
    HOSTILE_STATUS,
    HOSTILE_SUFFIX,
    build_hostile,
    build_requests,
    infer_inputs,
    load_content,
    parse_weights,
    plan_tasks,
    read_manifest,
    same_answer,
    served_ensembles,
)

REQUESTS: dict[str, list[list]] = {}  # ensemble -> prebuilt InferInput lists, shared by all users
REFERENCE: dict[str, list[dict]] = {}  # ensemble -> each prebuilt request's answer before the load
HOSTILE_REQUESTS: list[tuple[str, list]] = []  # (ensemble, InferInputs) the server must refuse
SAMPLES: dict[str, list] = {"t": [], "name": [], "ms": [], "failed": []}
locust.stats.CSV_STATS_FLUSH_INTERVAL_SEC = 2  # the history on disk lags 2 s, not 10 (`xmr load` progress)


@events.init_command_line_parser.add_listener
def _options(parser) -> None:
    parser.add_argument("--xmr-repository", type=str, default="", help="the served model repository")
    parser.add_argument("--xmr-weights", type=str, default="", help="ENSEMBLE=W,... (default 1 each)")
    parser.add_argument("--xmr-captions", type=str, default="", help="text file, one caption a line")
    parser.add_argument("--xmr-samples", type=str, default="", help="write every request's latency (npz)")
    parser.add_argument("--xmr-hostile", type=int, default=0, help="weight of the hostile task (0: none)")


def _task(name: str):
    def send(user: EnsembleUser) -> None:
        user.infer(name)

    send.__name__ = name
    return send


@events.init.add_listener
def _setup(environment, **_) -> None:
    """Discover the served ensembles, build the requests, set the weighted task table."""
    opts = environment.parsed_options
    if opts is None or not getattr(opts, "xmr_repository", ""):
        raise SystemExit("xmr locustfile: --xmr-repository is required (the served model repository)")
    client = tc.InferenceServerClient(environment.host)
    try:
        served = served_ensembles(client)
        plan = plan_tasks(served, parse_weights([opts.xmr_weights]))
        manifest = read_manifest(Path(opts.xmr_repository))
        content = load_content(manifest, Path(opts.xmr_captions) if opts.xmr_captions else None)
        for name, requests in build_requests(manifest, plan, content).items():
            REQUESTS[name] = [infer_inputs(tc, r) for r in requests]
            REFERENCE[name] = [
                _answer(client.infer(name, r, client_timeout=CLIENT_TIMEOUT_S)) for r in REQUESTS[name]
            ]
    finally:
        client.close()
    EnsembleUser.tasks = [_task(name) for name, weight in plan.items() for _ in range(weight)]
    if opts.xmr_hostile > 0:
        spoilt = build_hostile(manifest, plan, content)
        for i in range(max(map(len, spoilt.values()), default=0)):  # the ensembles interleaved
            for name, requests in spoilt.items():
                if i < len(requests):
                    HOSTILE_REQUESTS.append((name, infer_inputs(tc, requests[i])))
        if HOSTILE_REQUESTS:
            EnsembleUser.tasks += [_hostile_task] * opts.xmr_hostile
    environment.events.quitting.add_listener(_final_csv)
    environment.events.quit.add_listener(_exit_now)
    if opts.xmr_samples:
        environment.events.request.add_listener(_record)
        environment.events.quitting.add_listener(lambda **kw: _write_samples(Path(opts.xmr_samples)))


def _answer(result) -> dict[str, np.ndarray]:
    """Every output of a tritonclient result, by name."""
    return {o.name: result.as_numpy(o.name) for o in result.get_response().outputs}


def _hostile_task(user: EnsembleUser) -> None:
    user.hostile()


def _final_csv(**_) -> None:
    """Write Locust's CSV files once more with the final stats and flush them. Locust 2.18 rewrites them
    every second from a greenlet that stops before the last requests and never flushes its buffered history
    at exit, so its `_stats.csv` would miss the last second and `_stats_history.csv` up to the last 10 s.
    (Its writer is not reachable from the environment; it is the one StatsCSVFileWriter alive.)"""
    now = time.time()
    for w in [o for o in gc.get_objects() if isinstance(o, locust.stats.StatsCSVFileWriter)]:
        for handle, write in (
            (w.requests_csv_filehandle, w.requests_csv),
            (w.failures_csv_filehandle, w.failures_csv),
            (w.exceptions_csv_filehandle, w.exceptions_csv),
        ):
            handle.seek(0)
            write(csv.writer(handle))
            handle.truncate()
            handle.flush()
        w._stats_history_data_rows(w.stats_history_csv_writer, now)
        w.stats_history_flush()


def _exit_now(exit_code: int, **_) -> None:
    """Leave at once with Locust's exit code once everything is written (`quit` is Locust's last event
    before `sys.exit`): with gRPC made cooperative, the interpreter's own shutdown can hang on gRPC's
    channel threads (seen at 16 users), which would keep `xmr load` waiting on a finished run."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(exit_code)


def _record(request_type, name, response_time, response_length, exception=None, **_) -> None:
    SAMPLES["t"].append(time.time())
    SAMPLES["name"].append(name)
    SAMPLES["ms"].append(response_time)
    SAMPLES["failed"].append(exception is not None)


def _write_samples(path: Path) -> None:
    names = sorted(set(SAMPLES["name"]))
    index = {n: i for i, n in enumerate(names)}
    np.savez(
        path,
        names=np.array(names),
        index=np.array([index[n] for n in SAMPLES["name"]], dtype=np.int16),
        t=np.array(SAMPLES["t"], dtype=np.float64),
        ms=np.array(SAMPLES["ms"], dtype=np.float64),
        failed=np.array(SAMPLES["failed"], dtype=bool),
    )


class EnsembleUser(User):
    """One client of the server: a gRPC channel and a round robin over each ensemble's requests."""

    wait_time = constant(0)
    tasks = []  # set by _setup from the served ensembles and the weights

    def on_start(self) -> None:
        self.client = tc.InferenceServerClient(self.host)
        self._next = {name: int(np.random.randint(len(reqs))) for name, reqs in REQUESTS.items()}
        self._next_hostile = int(np.random.randint(max(1, len(HOSTILE_REQUESTS))))

    def on_stop(self) -> None:
        self.client.close()

    def infer(self, name: str) -> None:
        requests = REQUESTS[name]
        i = self._next[name]
        self._next[name] = (i + 1) % len(requests)
        exception, length = None, 0
        start = time.perf_counter()
        try:
            result = self.client.infer(name, requests[i], client_timeout=CLIENT_TIMEOUT_S)
            length = result.get_response().ByteSize()
            changed = same_answer(_answer(result), REFERENCE[name][i])
            if changed is not None:
                exception = AnswerChanged(f"{name} request {i}: {changed!r} differs from its answer before")
        except Exception as e:  # noqa: BLE001 - every failure is a failed request in Locust's stats
            exception = e
        self._fire(name, start, length, exception)

    def hostile(self) -> None:
        """One request the server must refuse with INVALID_ARGUMENT (then it counts as a success)."""
        name, inputs = HOSTILE_REQUESTS[self._next_hostile]
        self._next_hostile = (self._next_hostile + 1) % len(HOSTILE_REQUESTS)
        exception, length = None, 0
        start = time.perf_counter()
        try:
            result = self.client.infer(name, inputs, client_timeout=CLIENT_TIMEOUT_S)
            length = result.get_response().ByteSize()
            exception = AnswerChanged(f"{name} answered a hostile request instead of refusing it")
        except InferenceServerException as e:
            if str(e.status()) != HOSTILE_STATUS:
                exception = e
        except Exception as e:  # noqa: BLE001
            exception = e
        self._fire(name + HOSTILE_SUFFIX, start, length, exception)

    def _fire(self, name: str, start: float, length: int, exception) -> None:
        self.environment.events.request.fire(
            request_type="grpc",
            name=name,
            response_time=(time.perf_counter() - start) * 1000.0,
            response_length=length,
            exception=exception,
            context={},
        )


class AnswerChanged(Exception):
    """A request's answer differs from the one it had before the load (or a hostile request answered)."""
