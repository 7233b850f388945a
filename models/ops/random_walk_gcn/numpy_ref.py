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
        out_dtype = g.dtype
        work = np.promote_types(out_dtype, np.float32)  # float16 inputs are computed in float32
        phi, psi, g = phi.astype(work), psi.astype(work), g.astype(work)
        scores = phi @ np.swapaxes(psi, 1, 2) / np.sqrt(phi.shape[-1]).astype(work)
        valid = mask[:, None, :]
        if affinity == "softmax":
            # masked columns: the dtype's most negative finite value (a fully masked row stays uniform)
            scores = np.where(valid, scores, np.finfo(work).min)
            weights = np.exp(scores - scores.max(axis=-1, keepdims=True))
        else:
            weights = (np.maximum(scores, 0) + eps) * valid
        p = weights / np.maximum(weights.sum(axis=-1, keepdims=True), eps)
        return (((p @ g) * mask[..., None]).astype(out_dtype),)
