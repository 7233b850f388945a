"""Image preprocessing, the one definition shared by training, export parity and the Triton `preprocess`
model. numpy only, so the served model does not import torch."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from xmr.models.errors import InputError


def preprocess_images(images: np.ndarray, mean: Sequence[float], std: Sequence[float]) -> np.ndarray:
    """uint8 (B, H, W, 3) -> normalised float32 (B, 3, H, W): (x / 255 - mean) / std per channel."""
    images = np.asarray(images)
    if images.dtype != np.uint8:
        raise InputError(f"images have dtype {images.dtype}; expected uint8 pixels (B, H, W, 3)")
    if images.ndim != 4 or images.shape[-1] != 3:
        raise InputError(f"images have shape {images.shape}; expected (B, H, W, 3)")
    x = images.transpose(0, 3, 1, 2).astype(np.float32) / np.float32(255.0)
    mean_a = np.asarray(mean, dtype=np.float32).reshape(1, 3, 1, 1)
    std_a = np.asarray(std, dtype=np.float32).reshape(1, 3, 1, 1)
    return np.ascontiguousarray((x - mean_a) / std_a)
