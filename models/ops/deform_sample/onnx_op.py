"""`deform_sample` in ONNX: the `xmr::DeformSample` schema with its shape inference, and the onnxscript
translation that turns `torch.ops.xmr.deform_sample` into that one node at export (the "plugin" form)."""

from __future__ import annotations

import onnx
import torch
from onnx.defs import OpSchema

from xmr.models.ops.onnx_domain import op_schema

OP_TYPE = "DeformSample"


def _infer(ctx) -> None:
    """out (B, Q, G, C): element type of `value`, (B, Q, G) from `positions`, C from `value`'s last dim."""
    value, positions = ctx.get_input_type(0), ctx.get_input_type(2)
    out = onnx.TypeProto()
    out.tensor_type.elem_type = value.tensor_type.elem_type
    v_shape, p_shape = value.tensor_type, positions.tensor_type
    if v_shape.HasField("shape") and p_shape.HasField("shape"):
        v_dims, p_dims = v_shape.shape.dim, p_shape.shape.dim
        want = {4: 4, 6: 5}.get(len(v_dims))
        if want is None or len(p_dims) != want:
            raise onnx.shape_inference.InferenceError(
                f"DeformSample: value rank {len(v_dims)} with positions rank {len(p_dims)}; expected "
                "value (B, T, G, C) + positions (B, Q, G, P) or (B, T, H, W, G, C) + (B, Q, G, P, 3)"
            )
        for dim in (*p_dims[:3], v_dims[-1]):
            out.tensor_type.shape.dim.add().CopyFrom(dim)
    ctx.set_output_type(0, out)


def schema() -> OpSchema:
    return op_schema(
        OP_TYPE,
        doc="Deformable-offsets sampling (CDNet CDD): out[b,q,g] = sum_p weights[b,q,g,p] * value sampled at "
        "positions[b,q,g,p], linear over clips (value rank 4) or trilinear over (t, y, x) (rank 6), "
        "align_corners=True on cell centres, zero padding, padded clips (mask False) read as zero.",
        inputs=[
            ("value", "T", "(B, T, G, C) or (B, T, H, W, G, C)"),
            ("mask", "B", "(B, T) valid clips"),
            ("positions", "T", "(B, Q, G, P) clip units, or (B, Q, G, P, 3) as (t, y, x) cells"),
            ("weights", "T", "(B, Q, G, P) attention weights"),
        ],
        outputs=[("out", "T", "(B, Q, G, C)")],
        infer=_infer,
    )


def translation(opset):
    """(torch op, onnxscript function emitting the node in `opset`), for torch.onnx's translation table."""

    def deform_sample(value, mask, positions, weights):
        return opset.DeformSample(value, mask, positions, weights)

    return torch.ops.xmr.deform_sample.default, deform_sample
