"""The manifest that travels with every exported artifact folder, and the checks made against it."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from xmr.models.errors import InputError


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
    path = Path(artifacts) / "manifest.json"
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
