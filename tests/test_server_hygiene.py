"""The server's life tied to the wrapper's: dead stubs stop `xmr serve`, killed processes leave no orphans
or shared memory, and the stub runs this environment's own libpython."""

import json
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import psutil
import pytest

from xmr.clients.server import (
    SHM_DIR,
    SHM_PREFIX,
    TritonServer,
    free_port,
    interpreter_libdir,
    remove_stale_shm,
)

pytestmark = [pytest.mark.server, pytest.mark.slow]


def ready(http_port: int) -> bool:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{http_port}/v2/health/ready", timeout=1) as r:
            return r.status == 200
    except OSError:
        return False


def wait_for(predicate, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.2)
    raise AssertionError(f"{what} not within {timeout_s:.0f} s")


def start_serve(repository: Path) -> tuple[subprocess.Popen, int, int]:
    """`xmr serve` in a child process on free ports, once the server is ready."""
    grpc_port, http_port = free_port(), free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "xmr.clients.cli",
            "serve",
            str(repository),
            "--grpc-port",
            str(grpc_port),
            "--http-port",
            str(http_port),
        ],  # fmt: skip
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    wait_for(lambda: ready(http_port) or proc.poll() is not None, 120, "xmr serve ready")
    assert proc.poll() is None, proc.stdout.read()
    return proc, grpc_port, http_port


def server_and_stubs(wrapper_pid: int) -> tuple[psutil.Process, list[psutil.Process]]:
    server = next(p for p in psutil.Process(wrapper_pid).children() if p.name() == "tritonserver")
    stubs = [p for p in server.children() if "triton_python_backend_stub" in " ".join(p.cmdline())]
    return server, stubs


def gone(procs: list[psutil.Process]) -> bool:
    def dead(p):
        try:
            return p.status() == psutil.STATUS_ZOMBIE
        except psutil.NoSuchProcess:
            return True

    return all(dead(p) for p in procs)


def test_a_dead_stub_stops_xmr_serve_with_an_error_naming_the_model(tiny_repository):
    proc, _, http_port = start_serve(tiny_repository)
    try:
        _, stubs = server_and_stubs(proc.pid)
        stub = next(s for s in stubs if "/text_encoder/" in " ".join(s.cmdline()))
        stub.kill()
        code = proc.wait(60)
        output = proc.stdout.read()
        assert code == 1
        assert "the python-backend stub of text_encoder died" in output
        assert not ready(http_port)  # the health check is no longer green
    finally:
        proc.kill()


def test_killing_the_wrapper_takes_the_server_and_its_stubs(tiny_repository):
    proc, _, http_port = start_serve(tiny_repository)
    server, stubs = server_and_stubs(proc.pid)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    wait_for(lambda: gone([server, *stubs]), 45, "tritonserver and its stubs gone after the wrapper's kill")
    assert not ready(http_port)
    remove_stale_shm()  # what the next start does: the dead wrapper's regions go
    assert not list(SHM_DIR.glob(f"{SHM_PREFIX}{proc.pid}_*"))


def test_a_killed_server_leaves_no_orphan_stub_or_shared_memory(tiny_repository):
    server = TritonServer(tiny_repository).start()
    try:
        stubs = [psutil.Process(pid) for pid in server.stubs()]
        assert len(stubs) >= 4 and list(SHM_DIR.glob(f"{server.shm_prefix}*"))
        os.kill(server.pid, signal.SIGKILL)
        assert server.watch(interval_s=0.1).startswith("tritonserver exited with code -9")
        wait_for(lambda: gone(stubs), 10, "the stubs of a killed server gone")
    finally:
        server.stop()
    assert not list(SHM_DIR.glob(f"{server.shm_prefix}*"))


def test_stale_regions_of_dead_owners_are_removed_and_no_one_elses(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    mine = f"{SHM_PREFIX}{os.getpid()}_1_region"
    stale = f"{SHM_PREFIX}{dead.pid}_1_region"
    foreign = "triton_python_backend_shm_region_x"
    for name in (mine, stale, foreign):
        (tmp_path / name).write_bytes(b"")
    assert remove_stale_shm(tmp_path) == [stale]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mine, foreign])


PROBE = """
import json, platform, sys
import numpy as np
import triton_python_backend_utils as pb_utils


class TritonPythonModel:
    def execute(self, requests):
        maps = open("/proc/self/maps").read().splitlines()
        libs = sorted({line.split()[-1] for line in maps if "libpython" in line})
        facts = json.dumps({"version": platform.python_version(), "libpython": libs})
        out = np.array([facts.encode()], dtype=object).reshape(1, 1)
        return [pb_utils.InferenceResponse([pb_utils.Tensor("facts", out)]) for _ in requests]
"""


def test_the_stub_runs_this_environments_libpython(tmp_path):
    """The stub links libpython dynamically; the environment's own copy must be the one loaded, not the
    system's (another patch release than this interpreter's standard library)."""
    import tritonclient.grpc as grpcclient
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2 as pb2

    version = tmp_path / "probe" / "1"
    version.mkdir(parents=True)
    (version / "model.py").write_text(PROBE)
    cfg = pb2.ModelConfig(name="probe", backend="python", max_batch_size=0)
    cfg.input.add(name="x", data_type=pb2.TYPE_FP32, dims=[1])
    cfg.output.add(name="facts", data_type=pb2.TYPE_STRING, dims=[1, 1])
    (tmp_path / "probe" / "config.pbtxt").write_text(text_format.MessageToString(cfg))
    with TritonServer(tmp_path) as server:
        client = grpcclient.InferenceServerClient(server.grpc_url)
        x = grpcclient.InferInput("x", [1], "FP32")
        x.set_data_from_numpy(np.zeros(1, np.float32))
        facts = json.loads(client.infer("probe", [x]).as_numpy("facts")[0, 0])
    import platform

    assert facts["version"] == platform.python_version()
    libdir = interpreter_libdir()
    if libdir is not None:
        assert facts["libpython"] and all(Path(p).parent == Path(libdir) for p in facts["libpython"])
