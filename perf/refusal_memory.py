"""Where the served memory goes under refused requests: each process's unique memory, phase by phase.

    python -m xmr.perf.refusal_memory REPOSITORY [--phases good hostile good hostile] [--seconds 90]
        [--threads 8] [--out perf/results/refusal_memory]

The 10-minute `make soak` with hostile traffic showed the server's memory rising slowly (about 22 MiB in
10 minutes) where good traffic alone had stayed flat. This separates the two: it starts the repository's
server, then runs phases of `text_search` traffic from `--threads` gRPC clients, either all good (captions)
or all refused (an empty text, top_k 0, a 6.5 KB text: INVALID_ARGUMENT each), and samples every process of
the server (tritonserver and each python-backend stub, by model instance) four times a phase: its USS
(unique set size, psutil) and RSS. Then, as a control, the same refused requests go through the served
model's own code in this process (its `model.py` shim loaded as the backend loads it, `check` + `run`) and
this process's USS and the Python objects it holds (tracemalloc) are compared before and after: growth
there would be the project's, growth only in the stub is the python backend's own.

Writes OUT/refusal_memory.csv (phase, seconds, requests refused and answered so far, process, USS and RSS
in MiB) and OUT/refusal_memory.json (per phase and process: USS growth per 10,000 refused requests; the
in-process control's growth).
"""

from __future__ import annotations

import argparse
import csv
import gc
import json
import threading
import time
import tracemalloc
from pathlib import Path

import numpy as np

from xmr.models.errors import InputError

HOSTILE = (  # (text, top_k): each refused with INVALID_ARGUMENT by text_search's boundary check
    (b"", 5),
    (b"a red circle", 0),
    (b"a red circle " * 512, 5),
)
GOOD = tuple((f"a red circle left of a blue square {i}".encode(), 5) for i in range(50))
MIB = 2**20


def inputs(grpc, text: bytes, k: int) -> list:
    x = grpc.InferInput("text", [1, 1], "BYTES")
    x.set_data_from_numpy(np.array([[text]], dtype=object))
    top_k = grpc.InferInput("top_k", [1, 1], "INT64")
    top_k.set_data_from_numpy(np.array([[k]], np.int64))
    return [x, top_k]


class Traffic:
    """`threads` gRPC clients sending `requests` round robin to text_search until stopped; counts."""

    def __init__(self, url: str, threads: int):
        self.url, self.threads = url, threads
        self.counts = {"refused": 0, "answered": 0}
        self.lock = threading.Lock()

    def run(self, requests, seconds: float, on_quarter) -> None:
        import tritonclient.grpc as grpc
        from tritonclient.utils import InferenceServerException

        stop = threading.Event()

        def client():
            c = grpc.InferenceServerClient(self.url)
            built = [inputs(grpc, t, k) for t, k in requests]
            i = 0
            while not stop.is_set():
                try:
                    c.infer("text_search", built[i % len(built)])
                    key = "answered"
                except InferenceServerException as e:
                    if e.status() != "StatusCode.INVALID_ARGUMENT":
                        raise
                    key = "refused"
                with self.lock:
                    self.counts[key] += 1
                i += 1

        workers = [threading.Thread(target=client, daemon=True) for _ in range(self.threads)]
        for w in workers:
            w.start()
        start = time.monotonic()
        for quarter in range(1, 5):
            time.sleep(max(0.0, start + seconds * quarter / 4 - time.monotonic()))
            on_quarter(time.monotonic() - start)
        stop.set()
        for w in workers:
            w.join()


def processes(server) -> dict[str, object]:
    """{name: psutil.Process} of a running server: "tritonserver" and each python-backend stub, named by
    its model and pid (a model with two instances has two stubs)."""
    import psutil

    out = {"tritonserver": psutil.Process(server.pid)}
    for pid, model in sorted(server.stubs().items(), key=lambda kv: kv[1]):
        out[f"{model} ({pid})"] = psutil.Process(pid)
    return out


def in_process_control(repository: Path, n: int) -> dict:
    """USS of this process before and after `n` refused requests through text_search's own model code."""
    import psutil

    from xmr.perf.bench_served import load_python_model

    model = load_python_model(repository / "text_search")
    requests = [{"text": np.array([[t]], dtype=object), "top_k": np.array([k], np.int64)} for t, k in HOSTILE]

    def refuse(count: int) -> None:
        for i in range(count):
            x = requests[i % len(requests)]
            try:
                model.check(x)
                (result,) = model.run([x])
            except InputError:
                continue
            assert isinstance(result, InputError), result

    me = psutil.Process()
    refuse(n // 4)  # warm-up: caches, allocator pools
    gc.collect()
    tracemalloc.start()
    before, traced_before = me.memory_full_info().uss, tracemalloc.get_traced_memory()[0]
    refuse(n)
    gc.collect()
    after, traced_after = me.memory_full_info().uss, tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    return {
        "refused": n,
        "uss_growth_mib": round((after - before) / MIB, 3),
        "python_objects_growth_kib": round((traced_after - traced_before) / 1024, 1),  # tracemalloc
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m xmr.perf.refusal_memory", description=__doc__.split("\n")[0]
    )
    parser.add_argument("repository", type=Path, help="a repository serving text_search (make demo's)")
    parser.add_argument("--phases", nargs="*", default=["good", "hostile", "good", "hostile"])
    parser.add_argument("--seconds", type=float, default=90.0, help="length of each phase")
    parser.add_argument("--threads", type=int, default=8, help="gRPC clients")
    parser.add_argument(
        "--control", type=int, default=60000, help="refused requests of the in-process control"
    )
    parser.add_argument("--out", type=Path, default=Path("perf/results/refusal_memory"))
    args = parser.parse_args()
    if unknown := set(args.phases) - {"good", "hostile"}:
        parser.error(f"--phases takes good and hostile, not {', '.join(sorted(unknown))}")

    args.out.mkdir(parents=True, exist_ok=True)
    summary = {"phases": served_phases(args), "control": in_process_control(args.repository, args.control)}
    (args.out / "refusal_memory.json").write_text(json.dumps(summary, indent=2))
    print(json.dumps(summary, indent=2))


def served_phases(args) -> list[dict]:
    """Run the phases against the served repository; write the samples' CSV; per phase, the USS growth of
    each process from its first sample to its last."""
    from xmr.clients.server import TritonServer

    if not args.phases:
        return []
    rows = []
    server = TritonServer(args.repository).start()
    try:
        procs = processes(server)
        traffic = Traffic(server.grpc_url, args.threads)

        def sample(phase: int, name: str, seconds: float) -> None:
            for proc_name, proc in procs.items():
                info = proc.memory_full_info()
                rows.append(
                    {
                        "phase": phase,
                        "traffic": name,
                        "seconds": round(seconds, 1),
                        **traffic.counts,
                        "process": proc_name,
                        "uss_mib": round(info.uss / MIB, 2),
                        "rss_mib": round(info.rss / MIB, 2),
                    }
                )
            last = {r["process"]: r["uss_mib"] for r in rows[-len(procs) :]}
            print(f"phase {phase} {name:7s} {seconds:5.0f} s {traffic.counts}", last, flush=True)

        sample(0, "idle", 0.0)
        for i, name in enumerate(args.phases, 1):
            traffic.run(
                HOSTILE if name == "hostile" else GOOD, args.seconds, lambda s, i=i, n=name: sample(i, n, s)
            )
    finally:
        server.stop()
    with (args.out / "refusal_memory.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    phases = []
    for i, name in enumerate(args.phases, 1):  # growth from the phase's first sample to its last
        phase = [r for r in rows if r["phase"] == i]
        first, last = phase[0], phase[-1]
        refused = last["refused"] - first["refused"]
        uss: dict[str, list[float]] = {}  # process -> its samples in this phase, in order
        for r in phase:
            uss.setdefault(r["process"], []).append(r["uss_mib"])
        growth = {proc: round(samples[-1] - samples[0], 2) for proc, samples in uss.items()}
        phases.append(
            {
                "traffic": name,
                "refused": refused,
                "answered": last["answered"] - first["answered"],
                "uss_growth_mib": growth,
            }
        )
    return phases


if __name__ == "__main__":
    main()
