"""`deform_sample`, CDNet's deformable offsets sampling: every implementation of it lives in this folder.

`reference.py` (the op in plain torch), `torch_op.py` (custom op `xmr::deform_sample`, call forms,
`DeformSampler`), `onnx_op.py` (`xmr::DeformSample` schema + translation), `numpy_ref.py` (its numpy op).
"""

from xmr.models.ops.deform_sample.reference import deform_sample_reference
from xmr.models.ops.deform_sample.torch_op import DeformSampler, deform_sample, deform_sample_plugin

__all__ = ["DeformSampler", "deform_sample", "deform_sample_plugin", "deform_sample_reference"]
