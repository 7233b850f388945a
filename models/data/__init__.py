"""Image-caption retrieval datasets, all loaded into one ``RetrievalSplit`` form.

``shapes`` is generated on the fly (synthetic, deterministic, no download); ``precomputed`` reads
the VSE++/SCAN region-feature folders. ``load_split`` is the one entry point the CLI and the
training loop use; ``DATASETS`` is the registry it dispatches on.
"""

from __future__ import annotations

from xmr.models.data.base import RetrievalSplit, config_with
from xmr.models.data.precomputed import load_precomputed
from xmr.models.data.shapes import ShapesConfig, make_shapes
from xmr.models.errors import InputError

DATASETS = {
    "shapes": make_shapes,  # (split, ShapesConfig) -> pixels
    "precomputed": load_precomputed,  # (root, split, captions_per_image) -> region features
}

__all__ = ["DATASETS", "RetrievalSplit", "ShapesConfig", "load_split", "load_precomputed", "make_shapes"]


def load_split(name: str, split: str, root: str | None = None, **overrides) -> RetrievalSplit:
    """Load ``split`` of dataset ``name``; ``overrides`` are ShapesConfig fields for shapes, and
    ``captions_per_image`` for precomputed (which also needs ``root``). Shapes ignores ``root``."""
    if name not in DATASETS:
        raise InputError(f"unknown dataset {name!r}; expected one of {sorted(DATASETS)}")
    if name == "shapes":
        return make_shapes(split, config_with(ShapesConfig, overrides, "shapes"))
    if root is None:
        raise InputError(
            "dataset 'precomputed' needs root: the folder with {split}_ims.npy and {split}_caps.txt"
        )
    unknown = sorted(set(overrides) - {"captions_per_image"})
    if unknown:
        raise InputError(f"unknown precomputed option(s) {unknown}; expected only ['captions_per_image']")
    return load_precomputed(root, split, **overrides)
