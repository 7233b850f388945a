"""`deform_sample` as a torch custom op (`torch.ops.xmr.deform_sample`), its call forms, and its layer.

Why a plugin: in 1-D the op is Floor + Gather + Mul + MatMul in standard ONNX (the "standard" form exports
to exactly that), but the 3-D form is trilinear sampling over (t, y, x), and TensorRT's GridSample layer is
4-D only (bilinear over (y, x)); a fused kernel also avoids materialising the (B, Q, G, P*corners, C)
gathered tensor. One op covers both layouts (`xmr::deform_sample` in torch, one `xmr::DeformSample` ONNX
node; a TensorRT plugin dispatches on the input rank exactly as the reference does).

Two call forms, chosen per call by `form` (per module by `op_form`, see `DeformSampler`):
- "standard": the torch reference (`reference.py`); torch.onnx decomposes it into standard ONNX ops.
- "plugin": `torch.ops.xmr.deform_sample`, a registered custom op; the ONNX export turns it into one node
  (`onnx_op.py`).

The custom op's kernels: on CUDA, the Triton kernels (`triton.py`, imported on first use so the package
imports where triton is absent; float64 inputs, or no triton, fall back to the reference); on other
devices the reference. The backward, on every device CUDA included, recomputes the reference under
autograd (no Triton backward kernel): the gradients are exactly the reference's.
"""

from __future__ import annotations

import functools

import torch
from torch import nn

from xmr.models.ops.deform_sample.reference import deform_sample_reference


@torch.library.custom_op("xmr::deform_sample", mutates_args=())
def deform_sample_plugin(
    value: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The same computation behind an opaque custom op (one node in the exported graph)."""
    return deform_sample_reference(value, mask, positions, weights)


@functools.cache
def _triton_forward():
    """`deform_sample_triton`, or None where triton is not installed (imported on the first CUDA call)."""
    try:
        from xmr.models.ops.deform_sample.triton import deform_sample_triton
    except ImportError:
        return None
    return deform_sample_triton


def cuda_kernel(value, mask, positions, weights):
    """The op's CUDA kernel: the Triton kernels for what they implement, the reference otherwise."""
    forward = _triton_forward()
    if forward is not None:
        from xmr.models.ops.deform_sample.triton import DTYPES

        if all(x.dtype in DTYPES for x in (value, positions, weights)):
            return forward(value, mask, positions, weights)
    return deform_sample_reference(value, mask, positions, weights)


deform_sample_plugin.register_kernel("cuda")(cuda_kernel)


@deform_sample_plugin.register_fake
def _(value, mask, positions, weights):
    return value.new_empty((*positions.shape[:3], value.shape[-1]))


def _backward(ctx, grad):
    value, mask, positions, weights = ctx.saved_tensors
    with torch.enable_grad():
        inputs = [t.detach().requires_grad_(True) for t in (value, positions, weights)]
        out = deform_sample_reference(inputs[0], mask, inputs[1], inputs[2])
        gv, gp, gw = torch.autograd.grad(out, inputs, grad)
    return gv, None, gp, gw


def _setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


deform_sample_plugin.register_autograd(_backward, setup_context=_setup_context)

OP_FORMS = {"standard": deform_sample_reference, "plugin": deform_sample_plugin}


def deform_sample(value, mask, positions, weights, form: str = "standard") -> torch.Tensor:
    """(B, T[, H, W], G, C), (B, T) bool, (B, Q, G, P[, 3]), (B, Q, G, P) -> (B, Q, G, C)."""
    if form not in OP_FORMS:
        raise ValueError(f"op form {form!r}; valid: {', '.join(OP_FORMS)}")
    return OP_FORMS[form](value, mask, positions, weights)


class DeformSampler(nn.Module):
    """The op as a (parameter-free) module, so `use_op_form` can switch the form of a model's CDD layers."""

    def __init__(self):
        super().__init__()
        self.op_form = "standard"  # "plugin" for the custom-op export form (set by use_op_form)

    def forward(self, value, mask, positions, weights) -> torch.Tensor:
        return deform_sample(value, mask, positions, weights, form=self.op_form)
