"""`random_walk_gcn` in ONNX: the `xmr::RandomWalkGCN` schema with its shape inference, and the onnxscript
translation that turns `torch.ops.xmr.random_walk_gcn` into that one node at export (the "plugin" form)."""

from __future__ import annotations

import torch
from onnx.defs import OpSchema

from xmr.models.ops.onnx_domain import op_schema

OP_TYPE = "RandomWalkGCN"


def _infer(ctx) -> None:
    """out has the type and shape of `g` (input 2)."""
    ctx.set_output_type(0, ctx.get_input_type(2))


def schema() -> OpSchema:
    return op_schema(
        OP_TYPE,
        doc="Per-frame random-walk graph aggregation: out = D^-1 A~(phi psi^T / sqrt(C)) g, masked.",
        inputs=[
            ("phi", "T", "(N, K, C)"),
            ("psi", "T", "(N, K, C)"),
            ("g", "T", "(N, K, C)"),
            ("mask", "B", "(N, K) valid regions"),
        ],
        outputs=[("out", "T", "(N, K, C)")],
        attributes=[
            ("affinity", OpSchema.AttrType.STRING, "softmax | relu"),
            ("eps", OpSchema.AttrType.FLOAT, "relu affinity floor"),
        ],
        infer=_infer,
    )


def translation(opset):
    """(torch op, onnxscript function emitting the node in `opset`), for torch.onnx's translation table."""

    def random_walk_gcn(phi, psi, g, mask, affinity: str, eps: float):
        return opset.RandomWalkGCN(phi, psi, g, mask, affinity=affinity, eps=eps)

    return torch.ops.xmr.random_walk_gcn.default, random_walk_gcn
