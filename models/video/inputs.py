"""What the video towers take from a `VideoFeatures` split: regions for ViSERN, frame tokens for ProTA."""

from __future__ import annotations

import numpy as np
import torch

from xmr.models.data.video import VideoFeatures
from xmr.models.video.prota import ProTA


def video_inputs(model, data: VideoFeatures, idx: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
    """What the model's video tower takes: regions (B, F, K, D) for ViSERN, frames (B, F, D) for ProTA."""
    mask = torch.from_numpy(np.ascontiguousarray(data.mask[idx]))
    if isinstance(model, ProTA):
        return torch.from_numpy(np.ascontiguousarray(data.frames[idx])), mask
    return torch.from_numpy(np.ascontiguousarray(data.regions[idx])), mask
