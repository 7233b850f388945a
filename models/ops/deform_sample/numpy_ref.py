"""`deform_sample` in numpy: the `xmr::DeformSample` op for `onnx.reference.ReferenceEvaluator`, so the
plugin-form graph runs on any CPU (and the tests compare it with PyTorch)."""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

from xmr.models.ops.onnx_domain import DOMAIN


def _hat(positions: np.ndarray, size: int) -> np.ndarray:
    """Linear-interpolation weights with zero padding: (..., ) positions -> (..., size) = max(0, 1-|p-i|)."""
    return np.maximum(0.0, 1.0 - np.abs(positions[..., None] - np.arange(size, dtype=np.float64)))


class DeformSample(OpRun):
    """numpy reference of xmr::DeformSample, as a dense hat-kernel contraction (not a gather).

    Interpolation with zero padding is sum_t v[t] * max(0, 1 - |p - t|); trilinear is the product of the
    three axes' hats. Cost O(B Q G P T[H W] C): a reference for tests, not for long videos.
    """

    op_domain = DOMAIN

    def _run(self, value, mask, positions, weights):
        pos = positions.astype(np.float64)
        valid = mask.astype(np.float64)[:, None, None, None, :]  # (B, 1, 1, 1, T)
        w = weights.astype(np.float64)
        v = value.astype(np.float64)
        if value.ndim == 4:
            kt = _hat(pos, value.shape[1]) * valid  # (B, Q, G, P, T)
            out = np.einsum("bqgp,bqgpt,btgc->bqgc", w, kt, v, optimize=True)
        else:
            kt = _hat(pos[..., 0], value.shape[1]) * valid
            ky, kx = _hat(pos[..., 1], value.shape[2]), _hat(pos[..., 2], value.shape[3])
            out = np.einsum("bqgp,bqgpt,bqgpy,bqgpx,btyxgc->bqgc", w, kt, ky, kx, v, optimize=True)
        return (out.astype(value.dtype),)
