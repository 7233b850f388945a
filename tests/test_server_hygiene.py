"""The server's life tied to the wrapper's: dead stubs stop `xmr serve`, killed processes leave no orphans
or shared memory, and the stub runs this environment's own libpython. Faults: a SIGKILLed server restarted
on the same ports answers as before; a repository whose artifact file differs from its sha256 record (64
flipped bytes, a truncated gallery or graph, a missing file) is refused before serving, in one line, and by
the served model itself when the wrapper's check is bypassed."""

import json
import os
import re
import shutil
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


# ----------------------------------------------------------------------------- faults


def reference_answers(server: TritonServer) -> dict[str, np.ndarray]:
    from xmr.clients.triton_client import XmrClient

    client = XmrClient(server.grpc_url)
    found = client.text_search(["a red circle", "a big blue square"], 5)
    image = np.full((1, 64, 64, 3), 128, np.uint8)
    return {"ids": found.ids, "scores": found.scores, "image": client.image_embed(image)}


def test_a_sigkilled_server_restarted_on_the_same_ports_gives_the_same_answers(tiny_repository):
    server = TritonServer(tiny_repository, grpc_port=free_port(), http_port=free_port())
    server.start()
    try:
        before = reference_answers(server)
        os.kill(server.pid, signal.SIGKILL)
        assert server.watch(interval_s=0.1).startswith("tritonserver exited with code -9")
    finally:
        server.stop()
    assert not ready(server.http_port)
    again = TritonServer(tiny_repository, grpc_port=server.grpc_port, http_port=server.http_port)
    again.start()
    try:
        after = reference_answers(again)
    finally:
        again.stop()
    np.testing.assert_array_equal(after["ids"], before["ids"])
    np.testing.assert_allclose(after["scores"], before["scores"], atol=1e-6)
    np.testing.assert_allclose(after["image"], before["image"], atol=1e-6)


def flip_bytes(path: Path, n: int = 64) -> None:
    """Invert `n` bytes in the middle of `path` (its size unchanged)."""
    data = bytearray(path.read_bytes())
    middle = len(data) // 2
    data[middle : middle + n] = bytes(b ^ 0xFF for b in data[middle : middle + n])
    path.write_bytes(bytes(data))


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


CORRUPTIONS = {
    "onnx-64-flipped-bytes": (
        "text_encoder/1/model.onnx",
        flip_bytes,
        r"sha256 [0-9a-f]{16}\.\.\.; expected",
    ),
    "gallery-truncated": (
        "gallery_topk/1/gallery.npy",
        truncate,
        r"\d+ bytes; expected \d+ bytes with sha256",
    ),
    "onnx-truncated": ("text_search/1/model.onnx", truncate, r"\d+ bytes; expected \d+ bytes with sha256"),
    "gallery-missing": ("text_search/1/gallery.npy", lambda p: p.unlink(), r"is missing; expected"),
}


@pytest.mark.parametrize("corruption", list(CORRUPTIONS))
def test_a_corrupted_repository_file_is_refused_before_serving(tiny_repository, tmp_path, corruption):
    from xmr.models.errors import InputError

    rel, corrupt, message = CORRUPTIONS[corruption]
    repository = tmp_path / "repository"
    shutil.copytree(tiny_repository, repository)
    corrupt(repository / rel)
    server = TritonServer(repository)
    with pytest.raises(InputError, match=rf"repository file {repository / rel} (is corrupted: )?" + message):
        server.start()
    assert server.pid is None  # refused before a server process existed


def test_xmr_serve_refuses_a_corrupted_repository_in_one_line(tiny_repository, tmp_path):
    repository = tmp_path / "repository"
    shutil.copytree(tiny_repository, repository)
    flip_bytes(repository / "image_encoder/1/model.onnx")
    done = subprocess.run(
        [sys.executable, "-m", "xmr.clients.cli", "serve", str(repository), "--grpc-port", str(free_port()),
         "--http-port", str(free_port())],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert done.returncode == 2, done.stdout + done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in done.stderr, done.stderr
    assert f"repository file {repository}/image_encoder/1/model.onnx is corrupted" in lines[0]
    assert re.search(r"sha256 [0-9a-f]{16}\.\.\.; expected \d+ bytes with sha256 [0-9a-f]{16}", lines[0])


def test_a_served_model_refuses_its_corrupted_file_at_load(tiny_repository, tmp_path, monkeypatch):
    """A server started without the wrapper's check (plain tritonserver on the repository): the python
    model checks its own files at load and fails with the same one-line reason, instead of a bare numpy
    reshape error on a truncated gallery."""
    import xmr.clients.server as server_module
    from xmr.clients.server import ServerError

    repository = tmp_path / "repository"
    repository.mkdir()
    shutil.copytree(tiny_repository / "gallery_topk", repository / "gallery_topk")
    shutil.copy(tiny_repository / "serving.json", repository / "serving.json")
    truncate(repository / "gallery_topk/1/gallery.npy")
    monkeypatch.setattr(server_module, "verify", lambda repository: 0)
    with pytest.raises(ServerError) as refused:
        TritonServer(repository).start()
    assert f"repository file {repository}/gallery_topk/1/gallery.npy is corrupted" in str(refused.value)
    assert "reshape" not in str(refused.value)
