"""`random_walk_gcn` in numpy: the `xmr::RandomWalkGCN` op for `onnx.reference.ReferenceEvaluator`, so the
plugin-form graph runs on any CPU (and the tests compare it with PyTorch)."""

from __future__ import annotations

import numpy as np
from onnx.reference.op_run import OpRun

from xmr.models.ops.onnx_domain import DOMAIN


class RandomWalkGCN(OpRun):
    """numpy reference of xmr::RandomWalkGCN."""

    op_domain = DOMAIN

    def _run(self, phi, psi, g, mask, affinity="softmax", eps=1e-6):
        affinity = affinity.decode() if isinstance(affinity, bytes) else affinity
        scores = phi @ np.swapaxes(psi, 1, 2) / np.sqrt(phi.shape[-1]).astype(phi.dtype)
        valid = mask[:, None, :]
        if affinity == "softmax":
            scores = np.where(valid, scores, -1e9)
            weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        else:
            weights = (np.maximum(scores, 0) + eps) * valid
        p = weights / np.maximum(weights.sum(axis=-1, keepdims=True), eps)
        return (((p @ g) * mask[..., None]).astype(g.dtype),)
