"""What the RVSE image tower takes from a split's images: normalised pixels, or region features."""

from __future__ import annotations

import numpy as np
import torch

from xmr.models.image_text.preprocess import preprocess_images
from xmr.models.image_text.rvse import RVSEConfig


def image_inputs(images: np.ndarray, cfg: RVSEConfig) -> torch.Tensor:
    """The image tower's input for a batch of a split's images: normalised pixels or region features."""
    if images.dtype == np.uint8:
        return torch.from_numpy(preprocess_images(images, cfg.pixel_mean, cfg.pixel_std))
    return torch.tensor(np.asarray(images), dtype=torch.float32)  # a copy: split arrays may be read-only
