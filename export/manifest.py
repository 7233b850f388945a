"""The manifest that travels with every exported artifact folder, and the checks made against it."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import platform
from dataclasses import dataclass
from pathlib import Path

from xmr.models.errors import InputError

MANIFEST = "manifest.json"
SERVING = "serving.json"  # a built repository's index (`repository.serving_index`)


def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_facts(folder: Path, files: list[str]) -> dict[str, dict]:
    """The manifest's `files` entry: sha256 and size of each artifact in `folder`."""
    return {
        f: {"sha256": sha256(Path(folder) / f), "bytes": (Path(folder) / f).stat().st_size} for f in files
    }


def read_manifest(artifacts: Path) -> dict:
    path = Path(artifacts) / MANIFEST
    if not path.is_file():
        raise InputError(f"{artifacts} has no manifest.json; create the artifacts with `xmr export`")
    return json.loads(path.read_text())


def verify_artifacts(artifacts: Path, manifest: dict) -> None:
    """Every file the manifest lists exists and has the recorded sha256."""
    for name, facts in manifest["files"].items():
        path = Path(artifacts) / name
        if not path.is_file():
            raise InputError(f"artifact {path} is missing (listed in {artifacts}/manifest.json)")
        if sha256(path) != facts["sha256"]:
            raise InputError(f"artifact {path} is corrupted: its sha256 differs from manifest.json")


def read_serving(repository: Path) -> dict:
    """The `serving.json` of a repository written by `build_repository`."""
    path = Path(repository) / SERVING
    if not path.is_file():
        raise InputError(f"{repository} has no {SERVING}; build the repository with `xmr repo`")
    return json.loads(path.read_text())


# A built repository's files against the record `xmr repo` wrote in its serving.json (`file_record` of
# repository.py); here, beside the artifacts' own check: the served models run it at load, and importing
# repository.py would load torch into every python-backend stub.


def check_file(repository: Path, rel: str, facts: dict) -> None:
    """InputError in one line naming the file and what it should be, unless `repository/rel` matches
    its record (size first, then sha256)."""
    path = Path(repository) / rel
    want = f"expected {facts['bytes']} bytes with sha256 {facts['sha256'][:16]}..."
    fix = "rebuild the repository with `xmr repo`"
    if not path.is_file():
        raise InputError(f"repository file {path} is missing; {want} ({SERVING}); {fix}")
    size = path.stat().st_size
    if size != facts["bytes"]:
        raise InputError(
            f"repository file {path} is corrupted: {size} bytes; {want} ({SERVING}, truncated or "
            f"replaced); {fix}"
        )
    digest = sha256(path)
    if digest != facts["sha256"]:
        raise InputError(
            f"repository file {path} is corrupted: sha256 {digest[:16]}...; {want} ({SERVING}); {fix}"
        )


def verify_repository(repository: Path, model: str | None = None) -> int:
    """Check the repository's artifact files (or those of `model` alone) against the record `xmr repo`
    wrote in serving.json; InputError naming the first that differs. Returns how many were checked (0 for
    a repository written before the record existed)."""
    record = read_serving(repository).get("files", {})
    checked = 0
    for rel, facts in sorted(record.items()):
        if model is None or rel.split("/", 1)[0] == model:
            check_file(repository, rel, facts)
            checked += 1
    return checked


def versions() -> dict[str, str]:
    """The manifest's `versions` entry: the libraries an export ran with."""
    import numpy as np
    import onnx
    import onnxruntime
    import torch

    return {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "onnx": onnx.__version__,
        "onnxruntime": onnxruntime.__version__,
        "numpy": np.__version__,
    }


@dataclass
class Manifest:
    """`manifest.json` of an exported artifact folder; every export writes one.

    The keys that readers use: `model` (the family), `specs` ({graph or served model: ModelSpec.to_dict()}),
    `preprocessing` (what the served models do before the graphs), `files` ({file: sha256, bytes}, see
    `file_facts`), `parity` (the export's checks against PyTorch), and where they apply `gallery` (the
    embedded gallery the server searches), `custom_ops` (the graphs' custom-op form), `optimization` (an
    FP16 / INT8 artifact's settings and figures, `export/optimize.py`) and `engines` (TensorRT plans,
    `export/engine.py`). The optional fields are left out of the file when unset.
    """

    model: str
    model_config: dict
    run: str
    specs: dict[str, dict]
    preprocessing: dict
    files: dict[str, dict]
    versions: dict[str, str]
    parity: dict
    custom_ops: str | None = None  # "standard" | "plugin"
    xmr_nodes: dict[str, list[str]] | None = None  # graph -> op types of its `xmr` nodes
    gallery: dict | None = None
    opset: int | None = None
    optimization: dict | None = None  # `xmr optimize`: precision, nodes kept in FP32, test parity and metrics
    engines: dict | None = None  # `xmr engine`: TensorRT plans, profiles, versions

    def to_dict(self) -> dict:
        optional = {f.name for f in dataclasses.fields(self) if f.default is None}
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None or k not in optional}

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        fields = dataclasses.fields(cls)
        missing = [f.name for f in fields if f.default is dataclasses.MISSING and f.name not in d]
        if missing:
            raise InputError(
                f"manifest has no {', '.join(missing)}; re-create the artifacts with `xmr export`"
            )
        return cls(**{f.name: d[f.name] for f in fields if f.name in d})

    def write(self, folder: Path) -> Path:
        """Write `folder/manifest.json` atomically (a temporary file renamed over it); returns its path."""
        path = Path(folder) / MANIFEST
        tmp = path.with_name(f".{MANIFEST}.{os.getpid()}.tmp")
        try:
            tmp.write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n")
            os.replace(tmp, path)
        finally:
            tmp.unlink(missing_ok=True)
        return path

    @classmethod
    def read(cls, folder: Path) -> Manifest:
        return cls.from_dict(read_manifest(folder))
