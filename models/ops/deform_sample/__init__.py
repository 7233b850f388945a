"""`deform_sample`, CDNet's deformable offsets sampling: every implementation of it lives in this folder."""

from xmr.models.ops.deform_sample.torch_op import (
    DeformSampler,
    deform_sample,
    deform_sample_plugin,
    deform_sample_reference,
)

__all__ = ["DeformSampler", "deform_sample", "deform_sample_plugin", "deform_sample_reference"]
