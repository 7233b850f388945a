"""Start and stop the real Triton Inference Server that ships inside the `nvidia-pytriton` wheel.

No Docker and no look-alike server: `TritonServer` runs the `tritonserver` binary (2.51) directly on a
model repository. The wheel carries the binary, the python backend library and one backend *stub* per
Python version; the stub must sit in the `backends/python/` folder that is passed as
`--backend-directory`, so we lay out a small backend folder of symlinks in a temporary directory.

The python-backend models import `xmr` and onnxruntime/faiss from this interpreter's environment, which
the stub only sees when this environment's `bin/` comes first on PATH. The stub links `libpython3.X.so`
dynamically; the loader would take the system's copy (another patch release than this interpreter's
standard library, which breaks `threading` in subtle ways), so this interpreter's own `LIBDIR` comes first
on LD_LIBRARY_PATH.

Process hygiene, the server's life tied to ours:
- tritonserver gets SIGTERM (a graceful stop that also stops its stubs) when the process that started it
  dies, however it dies (Linux's parent-death signal);
- its stubs share its process group; `stop()` and `watch()` kill what is left of the group, so a SIGKILLed
  server leaves no orphan stub;
- the python backend's shared-memory regions carry a prefix naming the owner's pid and the server's port
  (`xmr_triton_<pid>_<port>_`); `stop()` removes its server's regions, `start()` those of owners that
  are dead (earlier runs that were killed), never anyone else's.
- `dead_stubs()` names the python models whose stub process died: Triton keeps such a model "ready" and
  fails every request to it, so `xmr serve` (`watch`) stops the server and exits non-zero instead of
  serving an outage behind green health checks.

Every endpoint binds to 127.0.0.1 unless another address is asked for explicitly.

Serving checks the repository first: `start()` verifies its artifact files (weights, gallery, clip store)
against the sha256 record `xmr repo` wrote in serving.json (`repository.verify_repository`) and refuses a
corrupted one with an InputError naming the file, before the server starts (each python model checks
its own files again at load, for a server started without this wrapper).

Stopping: `--exit-timeout-secs` (EXIT_TIMEOUT_S) bounds how long a graceful stop waits for in-flight
requests and for the models to unload. Triton 2.51's ensemble scheduler leaks one in-flight count per
ensemble request in which one of two parallel steps failed while the other was still running (the
`moment_search` ensemble: the tokenizer and the clip store run in parallel; a bad text or an unknown
video id): once the first step's error is sent, the other step's completion is dropped without
releasing the request (core `EnsembleContext::PrepareSteps` skips `UpdateEnsembleState` once the
ensemble status is an error), so the server counts that request in flight forever and a graceful stop
waited out Triton's default 30 s. The same path now and then crashes the server (SIGSEGV), which is why
the cpu target serves `moment_search` as one python model (`repository.FORMS`); the gpu target's
ensemble keeps the problem. Our requests take milliseconds, so a few seconds of drain are plenty.

Limits Triton 2.51 does not have (checked with `tritonserver --help`): no request size limit on HTTP (no
`--http-max-input-size`; it arrived in later releases) and none configurable on gRPC (the server accepts
messages up to 2 GiB); no limit on the decompressed size of a gzip/deflate HTTP body. Oversize inputs are
refused by the served models, as early as the python backend lets them (`adapters`: a text's bytes before
it is decoded), after Triton has read and copied the request.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import socket
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from xmr.models.errors import InputError

LOOPBACK = "127.0.0.1"
SHM_PREFIX = "xmr_triton_"  # + owner pid + "_": the python backend's shared-memory regions of our servers
SHM_DIR = Path("/dev/shm")
PR_SET_PDEATHSIG = 1
STUB = "triton_python_backend_stub"
EXIT_TIMEOUT_S = 5  # graceful stop: how long Triton waits for in-flight requests (see the docstring)


class ServerError(RuntimeError):
    """The server failed to start, answered with an error, or could not be reached; the message says which."""


def free_port(host: str = LOOPBACK) -> int:
    """A TCP port that is free right now on `host` (the OS picks it)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((host, 0))
        return s.getsockname()[1]


def _pytriton_root() -> Path:
    try:
        import pytriton
    except ImportError as e:  # the `serve` extra is missing
        raise InputError(
            "the Triton server needs the `serve` extra: pip install 'xmr[serve]' (nvidia-pytriton)"
        ) from e
    return Path(pytriton.__file__).parent


def tritonserver_binary() -> Path:
    """Path of the `tritonserver` binary shipped in the nvidia-pytriton wheel."""
    binary = _pytriton_root() / "tritonserver" / "bin" / "tritonserver"
    if not binary.is_file():
        raise InputError(f"tritonserver binary not found at {binary}; reinstall nvidia-pytriton")
    return binary


def server_libs() -> Path:
    """The folder of shared libraries bundled with the wheel (libcudart, libb64, ...)."""
    return _pytriton_root().parent / "nvidia_pytriton.libs"


def interpreter_libdir() -> str | None:
    """The folder holding this interpreter's own libpython (None for a static build)."""
    libdir, name = sysconfig.get_config_var("LIBDIR"), sysconfig.get_config_var("LDLIBRARY")
    return libdir if libdir and name and (Path(libdir) / name).exists() else None


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the parent dies (Linux prctl; elsewhere nothing)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_stale_shm(shm_dir: Path = SHM_DIR) -> list[str]:
    """Remove the shared-memory regions of our servers whose owner process is dead; returns their names."""
    removed = []
    for path in shm_dir.glob(f"{SHM_PREFIX}*"):
        owner = path.name[len(SHM_PREFIX) :].split("_", 1)[0]
        if owner.isdigit() and not _alive(int(owner)):
            path.unlink(missing_ok=True)
            removed.append(path.name)
    return removed


def verify(repository: Path) -> int:
    """Check a repository written by `xmr repo` against the sha256 record of its serving.json; InputError
    naming the first artifact file that differs (one line: the file, its size or hash, what is expected).
    A repository without serving.json (not ours) is not checked. Returns the number of files checked."""
    from xmr.export.manifest import SERVING, verify_repository

    if not (Path(repository) / SERVING).is_file():
        return 0
    return verify_repository(Path(repository))


def make_backend_dir(dest: Path) -> Path:
    """Lay out `dest/python/` with the python backend and the stub for this interpreter's version."""
    root = _pytriton_root() / "tritonserver"
    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    stub = root / "python_backend_stubs" / version / "triton_python_backend_stub"
    if not stub.is_file():
        raise InputError(
            f"nvidia-pytriton has no python backend stub for Python {version} (looked at {stub})"
        )
    python_dir = dest / "python"
    python_dir.mkdir(parents=True, exist_ok=True)
    for src in [*(root / "backends" / "python").iterdir(), stub]:
        if src.name != "__pycache__":
            (python_dir / src.name).symlink_to(src)
    return dest


@dataclass
class TritonServer:
    """A `tritonserver` process on a model repository; use as a context manager or call start/stop.

    Ports default to free ones picked at start; `host` is the address every endpoint binds to.
    """

    repository: Path
    host: str = LOOPBACK
    grpc_port: int | None = None
    http_port: int | None = None
    metrics_port: int | None = None  # None: metrics off
    log_path: Path | None = None  # server output; default: a file in the work dir, removed at stop
    verbose: bool = False
    exit_timeout_s: int = EXIT_TIMEOUT_S
    _proc: subprocess.Popen | None = field(default=None, init=False, repr=False)
    _workdir: Path | None = field(default=None, init=False, repr=False)
    _stubs: dict[int, str] = field(default_factory=dict, init=False, repr=False)  # pid -> model, once seen

    @property
    def shm_prefix(self) -> str:
        """This server's shared-memory region prefix: our pid (the owner) and the server's own gRPC port."""
        return f"{SHM_PREFIX}{os.getpid()}_{self.grpc_port}_"

    @property
    def grpc_url(self) -> str:
        return f"{self.host}:{self.grpc_port}"

    @property
    def http_url(self) -> str:
        return f"{self.host}:{self.http_port}"

    def command(self, backend_dir: Path) -> list[str]:
        cmd = [
            str(tritonserver_binary()),
            f"--model-repository={Path(self.repository).resolve()}",
            f"--backend-directory={backend_dir}",
            f"--http-address={self.host}",
            f"--http-port={self.http_port}",
            f"--grpc-address={self.host}",
            f"--grpc-port={self.grpc_port}",
            "--allow-sagemaker=false",
            "--allow-vertex-ai=false",
            "--strict-readiness=true",
            "--exit-on-error=true",
            f"--exit-timeout-secs={self.exit_timeout_s}",
            f"--log-verbose={1 if self.verbose else 0}",
            f"--backend-config=python,shm-region-prefix-name={self.shm_prefix}",
        ]
        if self.metrics_port is None:
            cmd.append("--allow-metrics=false")
        else:
            cmd += [f"--metrics-address={self.host}", f"--metrics-port={self.metrics_port}"]
        return cmd

    def env(self) -> dict[str, str]:
        env = os.environ.copy()
        env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
        paths = [interpreter_libdir(), env.get("LD_LIBRARY_PATH"), str(server_libs())]
        env["LD_LIBRARY_PATH"] = os.pathsep.join(p for p in paths if p)
        env.setdefault("OMP_NUM_THREADS", "1")  # ONNX Runtime/torch inside python models: no oversubscription
        return env

    def start(self, timeout_s: float = 120.0) -> TritonServer:
        repo = Path(self.repository)
        if not repo.is_dir():
            raise InputError(f"model repository {repo} does not exist; build one with `xmr repo`")
        verify(repo)
        remove_stale_shm()
        self.grpc_port = self.grpc_port or free_port(self.host)
        self.http_port = self.http_port or free_port(self.host)
        self._workdir = Path(tempfile.mkdtemp(prefix="xmr-triton-"))
        backend_dir = make_backend_dir(self._workdir / "backends")
        self.log_path = self.log_path or self._workdir / "tritonserver.log"
        log = open(self.log_path, "wb")  # noqa: SIM115 (the child process owns it)
        self._proc = subprocess.Popen(
            self.command(backend_dir),
            stdout=log,
            stderr=subprocess.STDOUT,
            env=self.env(),
            start_new_session=True,
            preexec_fn=_die_with_parent,
        )
        log.close()
        try:
            self.wait_ready(timeout_s)
        except BaseException:
            self.stop()
            raise
        return self

    def wait_ready(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        url = f"http://{self.http_url}/v2/health/ready"
        while time.monotonic() < deadline:
            self.stubs()  # each stub's model is read while it lives: a stub dead on arrival has no name
            if self._proc is not None and self._proc.poll() is not None:
                raise ServerError(
                    f"tritonserver exited with code {self._proc.returncode}:\n{self.log_errors()}"
                )
            try:
                with urllib.request.urlopen(url, timeout=1) as r:
                    if r.status == 200:
                        self._forget_reaped_stubs()
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise ServerError(
            f"tritonserver not ready after {timeout_s:.0f} s:\n{self.log_errors() or self.log_tail()}"
        )

    def log_errors(self) -> str:
        """The error lines of the server log, without the CUDA complaints of a GPU-less host."""
        lines = self.log_tail(n=10_000).splitlines()
        harmless = ("CudaDriverHelper", "CUDA driver", "cuda", "CUDA")
        return "\n".join(
            ln
            for ln in lines
            if (ln.startswith("E") or ln.startswith("error")) and not any(h in ln for h in harmless)
        )

    def log_tail(self, n: int = 40) -> str:
        if self.log_path is None or not Path(self.log_path).exists():
            return ""
        return "\n".join(Path(self.log_path).read_text(errors="replace").splitlines()[-n:])

    @property
    def pid(self) -> int | None:
        """The tritonserver process id while it runs."""
        return self._proc.pid if self._proc is not None else None

    def is_running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def wait(self) -> int:
        """Block until the server exits; returns its exit code."""
        assert self._proc is not None
        return self._proc.wait()

    def stubs(self) -> dict[int, str]:
        """{pid: model} of the server's python-backend stub processes (dead ones included, while unreaped)."""
        import psutil

        if self._proc is None:
            return {}
        out = {}
        try:
            children = psutil.Process(self._proc.pid).children()
        except psutil.NoSuchProcess:
            return {}
        for child in children:
            try:
                name = child.name()  # a zombie still has its name (truncated to 15 characters)
                cmd = child.cmdline()
            except psutil.ZombieProcess:
                cmd = []
            except psutil.NoSuchProcess:
                continue
            stub = cmd[0].endswith(STUB) if cmd else name.startswith(STUB[:15])
            if child.pid in self._stubs or stub:
                self._stubs.setdefault(child.pid, Path(cmd[1]).parent.parent.name if len(cmd) > 1 else "?")
                out[child.pid] = self._stubs[child.pid]
        return out

    def _forget_reaped_stubs(self) -> None:
        """At readiness: drop the stubs Triton started and reaped while loading (it runs one per model to
        complete the config, then the model's own); a killed serving stub stays as an unreaped zombie."""
        import psutil

        self._stubs = {pid: m for pid, m in self._stubs.items() if psutil.pid_exists(pid)}
        self.stubs()

    def dead_stubs(self) -> list[str]:
        """The models whose stub process has died since the server became ready (Triton still calls them
        ready, and fails each of their requests)."""
        import psutil

        alive = {}
        for pid in self.stubs():
            try:
                alive[pid] = psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
            except psutil.NoSuchProcess:
                alive[pid] = False
        return sorted({self._stubs[pid] for pid in self._stubs if not alive.get(pid, False)})

    def watch(self, interval_s: float = 0.5) -> str:
        """Block while the server serves; return why it stopped serving: its exit, or a dead stub (then the
        server is stopped, so the health endpoints go red with it)."""
        assert self._proc is not None
        self.stubs()  # the stubs started with the server
        while True:
            code = self._proc.poll()
            if code is not None:
                self._kill_group()
                return f"tritonserver exited with code {code}"
            dead = self.dead_stubs()
            if dead:
                try:  # a dying server orphans its stubs: then the server's exit is the reason
                    code = self._proc.wait(1.0)
                    self._kill_group()
                    return f"tritonserver exited with code {code}"
                except subprocess.TimeoutExpired:
                    pass
                self.stop()
                return f"the python-backend stub of {', '.join(dead)} died; the server was stopped"
            time.sleep(interval_s)

    def _kill_group(self) -> None:
        """SIGKILL whatever is left of the server's process group (stubs orphaned by a killed server)."""
        if self._proc is not None:
            try:
                os.killpg(self._proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass

    def stop(self, timeout_s: float | None = None) -> None:
        """SIGINT (Triton's graceful shutdown: in-flight requests get `exit_timeout_s`, then the models
        unload), then SIGKILL to the whole process group if it hangs past `timeout_s` (default: the exit
        timeout and 10 s to unload)."""
        if self._proc is not None and self._proc.poll() is None:
            self._proc.send_signal(signal.SIGINT)
            try:
                self._proc.wait(self.exit_timeout_s + 10.0 if timeout_s is None else timeout_s)
            except subprocess.TimeoutExpired:
                pass
        self._kill_group()  # a hung server, or stubs outliving it
        if self._proc is not None:
            self._proc.wait()
        self._proc = None
        self._stubs.clear()
        for region in SHM_DIR.glob(f"{self.shm_prefix}*"):  # left by a killed server or stub
            region.unlink(missing_ok=True)
        if self._workdir is not None:
            shutil.rmtree(self._workdir, ignore_errors=True)
            self._workdir = None

    def __enter__(self) -> TritonServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
