"""Shared fixtures: one tiny trained run, its ONNX export, and (for `server` tests) a real tritonserver.

The tiny run trains RVSE++ for one epoch on 256 Shapes images; it is far from converged, which is fine:
parity tests compare backends with each other, not with a target accuracy.
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import numpy as np
import pytest

from xmr.export.onnx_export import export_run
from xmr.export.repository import build_repository
from xmr.models.train.image_text import TrainConfig, train

HAS_TRITON = (
    importlib.util.find_spec("pytriton") is not None and importlib.util.find_spec("tritonclient") is not None
)
HAS_TRITON_LANG = importlib.util.find_spec("triton") is not None  # OpenAI Triton (kernels), not the server


def pytest_configure(config):
    """Without a GPU, the Triton kernels' tests run on CPU tensors under Triton's interpreter, which
    `@triton.jit` selects from TRITON_INTERPRET when a kernel is defined: set before a test imports one."""
    import torch

    config.addinivalue_line(
        "markers", "triton_interpreter: runs the Triton kernels under TRITON_INTERPRET=1 on the CPU"
    )
    if HAS_TRITON_LANG and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"


def pytest_collection_modifyitems(config, items):
    """Skip, with the reason, the tests whose marker (pyproject.toml) names what this machine lacks."""
    import torch

    has_cuda = torch.cuda.is_available()
    missing = {}  # marker -> why this machine cannot run its tests
    if not HAS_TRITON:
        missing["server"] = "needs the `serve` extra (nvidia-pytriton's tritonserver, tritonclient)"
    if not has_cuda:
        missing["gpu"] = "needs a CUDA device"
    if not (has_cuda and importlib.util.find_spec("tensorrt") is not None):
        missing["tensorrt"] = "needs the tensorrt package and a GPU"
    if not HAS_TRITON_LANG:
        missing["triton_interpreter"] = "needs the triton package (pip install triton)"
    elif has_cuda:
        missing["triton_interpreter"] = "a GPU is present: the Triton kernels run compiled (`gpu` tests)"
    skips = {marker: pytest.mark.skip(reason=reason) for marker, reason in missing.items()}
    for item in items:
        for marker, skip in skips.items():
            if item.get_closest_marker(marker):
                item.add_marker(skip)


@pytest.fixture(scope="session")
def precomputed_root(tmp_path_factory):
    """A tiny folder in the VSE precomputed format (train/dev/test); regions carry the caption's colour."""
    root = tmp_path_factory.mktemp("precomputed")
    rng = np.random.default_rng(0)
    colours = ["red", "green", "blue", "yellow"]
    for split, n_images in (("train", 64), ("dev", 16), ("test", 16)):
        feats = rng.normal(size=(n_images, 6, 16)).astype(np.float32)
        lines = []
        for i in range(n_images):
            c = i % len(colours)
            feats[i, :, c] += 3.0
            lines += [f"a {colours[c]} thing number {j}" for j in range(5)]
        np.save(root / f"{split}_ims.npy", feats)
        (root / f"{split}_caps.txt").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "tiny"
    train(TrainConfig(n_train=256, n_eval=64, epochs=1, batch_size=64, warmup_epochs=1, seed=0), out)
    return out


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("artifacts") / "tiny"
    export_run(tiny_run, out)
    return out


@pytest.fixture(scope="session")
def tiny_repository(tiny_artifacts, tmp_path_factory):
    return build_repository(tiny_artifacts, tmp_path_factory.mktemp("build") / "repository", "cpu")


@pytest.fixture(scope="session")
def triton(tiny_repository):
    from xmr.clients.server import TritonServer

    server = TritonServer(tiny_repository).start()
    yield server
    server.stop()


# the cheapest video and moment artifacts that serve: a few videos, a 2-step frame backbone, one epoch
CHEAP_VIDEO_DATA = {"n_train": 16, "n_val": 8, "n_test": 8}


def export_families(root: Path, data: dict, backbone_steps: int, batch_size: int) -> dict[str, Path]:
    """{"visern": artifact folder, "cdnet": artifact folder}: one-epoch runs on `data` (split sizes),
    exported in the standard form under `root`."""
    from xmr.export.moment_export import export_moment_run
    from xmr.export.video_export import export_video_run
    from xmr.models.train.moments import MomentTrainConfig, train_moment
    from xmr.models.train.video import VideoTrainConfig, train_video

    common = dict(epochs=1, batch_size=batch_size, cache_dir=str(root / "cache"), data_overrides=data)
    runs = root / "runs"
    train_video(VideoTrainConfig(model="visern", backbone_steps=backbone_steps, **common), runs / "visern")
    train_moment(MomentTrainConfig(backbone_steps=backbone_steps, **common), runs / "cdnet")
    export_video_run(runs / "visern", root / "visern", "standard")
    export_moment_run(runs / "cdnet", root / "cdnet", "standard")
    return {"visern": root / "visern", "cdnet": root / "cdnet"}


@pytest.fixture(scope="session")
def cheap_family_artifacts(tmp_path_factory):
    """Untuned tiny ViSERN and CDNet artifacts (`export_families`), for tests that need every served
    model (their answers, not their accuracy)."""
    return export_families(tmp_path_factory.mktemp("cheap_families"), CHEAP_VIDEO_DATA, 2, 8)


@pytest.fixture(scope="session")
def family_exporter():
    """`export_families`, for test modules that train their own video and moment artifacts."""
    return export_families


@pytest.fixture(scope="session")
def every_family_repository(tiny_artifacts, cheap_family_artifacts, tmp_path_factory):
    """One cpu repository serving every family: the tiny image-text artifact, a ViSERN and a CDNet."""
    folders = [tiny_artifacts, cheap_family_artifacts["visern"], cheap_family_artifacts["cdnet"]]
    return build_repository(folders, tmp_path_factory.mktemp("every_family") / "repository", "cpu")
