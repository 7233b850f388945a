"""Loader for the public "precomputed region features" format of the VSE family (VSE++, SCAN, VSRN, GPO).

A data folder (e.g. ``f30k_precomp/``) holds, per split, ``{split}_ims.npy`` with (N, R, D) bottom-up
region features (R = 36 regions of D = 2048 for the Faster R-CNN features SCAN released) and
``{split}_caps.txt`` with one caption per line, ``captions_per_image`` consecutive lines per image.
Some released splits store every image row ``captions_per_image`` times (rows == caption lines);
those are de-duplicated by taking every ``captions_per_image``-th row, as the SCAN data loader does.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xmr.models.data.base import RetrievalSplit
from xmr.models.errors import InputError


def _check_paths(root: Path, split: str) -> tuple[Path, Path]:
    if not split or "/" in split or "\\" in split:
        raise InputError(f"split {split!r} is not a plain name; expected e.g. 'train', 'dev' or 'test'")
    ims, caps = root / f"{split}_ims.npy", root / f"{split}_caps.txt"
    if not root.is_dir():
        raise InputError(
            f"precomputed feature folder {root} does not exist; "
            f"expected a folder with {ims.name} and {caps.name}"
        )
    for path in (ims, caps):
        if not path.is_file():
            raise InputError(f"missing {path}; expected {ims.name} and {caps.name} in {root}")
    return ims, caps


def _read_captions(path: Path) -> list[str]:
    lines = path.read_text(encoding="utf-8").splitlines()
    while lines and not lines[-1].strip():  # tolerate trailing blank lines
        lines.pop()
    captions = [line.strip().lower() for line in lines]
    for i, c in enumerate(captions):
        if not c:
            raise InputError(f"{path} line {i + 1} is empty; expected one caption per line")
    return captions


def _read_features(path: Path) -> np.ndarray:
    try:
        ims = np.load(path, mmap_mode="r", allow_pickle=False)
    except ValueError as e:
        raise InputError(
            f"{path} is not a plain numpy array file ({e}); expected (N, R, D) float features"
        ) from e
    if ims.ndim != 3:
        raise InputError(f"{path} has shape {ims.shape}; expected (N, R, D) region features (3 dims)")
    return ims


def load_precomputed(root: str | Path, split: str, captions_per_image: int = 5) -> RetrievalSplit:
    """Load ``{split}_ims.npy`` and ``{split}_caps.txt`` from ``root`` as a ``kind="regions"`` split."""
    if captions_per_image < 1:
        raise InputError(f"captions_per_image is {captions_per_image}; expected at least 1")
    root = Path(root)
    ims_path, caps_path = _check_paths(root, split)
    ims = _read_features(ims_path)
    captions = _read_captions(caps_path)
    n_caps, cpi = len(captions), captions_per_image
    if n_caps == 0 or n_caps % cpi:
        raise InputError(
            f"{caps_path} has {n_caps} captions; expected a positive multiple of {cpi} ({cpi} per image)"
        )
    n_images = n_caps // cpi
    if len(ims) == n_caps and n_caps != n_images:
        ims = ims[::cpi]  # one feature row per caption: keep the first row of each image
    elif len(ims) != n_images:
        raise InputError(
            f"{ims_path} has {len(ims)} rows but {caps_path} has {n_caps} captions; "
            f"expected {n_images} rows (one per image) or {n_caps} (one per caption)"
        )
    grouped = [captions[i * cpi : (i + 1) * cpi] for i in range(n_images)]
    images = np.ascontiguousarray(ims, dtype=np.float32)
    return RetrievalSplit(name="precomputed", split=split, images=images, captions=grouped, kind="regions")
