"""The `xmr` ONNX domain: our custom ops as ONNX nodes, their schemas, and their numpy references.

Each op has three faces, kept together here (ONNX's own `onnx/reference/ops` style):
- an ONNX schema (`onnx.defs.register_schema`) with typed inputs, attributes and a shape-inference
  function, so `onnx.checker` and `onnx.shape_inference` understand graphs that contain it;
- an onnxscript translation that `torch.onnx.export(..., custom_translation_table=...)` uses to turn the
  torch custom op (`torch.ops.xmr.*`) into one node of the `xmr` domain (the "plugin" export form, ready to
  map onto a TensorRT plugin of the same name);
- a numpy implementation (`onnx.reference.op_run.OpRun`) so `onnx.reference.ReferenceEvaluator` can run the
  plugin-form graph on any CPU and the tests can compare it with PyTorch.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx.defs import OpSchema
from onnx.reference.op_run import OpRun

DOMAIN = "xmr"
VERSION = 1
FLOATS = ["tensor(float)", "tensor(float16)", "tensor(double)"]


# ----------------------------------------------------------------------------- RandomWalkGCN


def _same_as_input(index: int):
    """Shape inference: output 0 has the type and shape of input `index`."""

    def infer(ctx) -> None:
        ctx.set_output_type(0, ctx.get_input_type(index))

    return infer


def _random_walk_gcn_schema() -> OpSchema:
    param = OpSchema.FormalParameter
    schema = OpSchema(
        "RandomWalkGCN", DOMAIN, VERSION,
        doc="Per-frame random-walk graph aggregation: out = D^-1 A~(phi psi^T / sqrt(C)) g, masked.",
        inputs=[param("phi", "T", "(N, K, C)"), param("psi", "T", "(N, K, C)"), param("g", "T", "(N, K, C)"),
                param("mask", "B", "(N, K) valid regions")],
        outputs=[param("out", "T", "(N, K, C)")],
        type_constraints=[("T", FLOATS, "float tensors"), ("B", ["tensor(bool)"], "mask")],
        attributes=[OpSchema.Attribute("affinity", OpSchema.AttrType.STRING, "softmax | relu"),
                    OpSchema.Attribute("eps", OpSchema.AttrType.FLOAT, "relu affinity floor")],
    )
    schema.set_type_and_shape_inference_function(_same_as_input(2))
    return schema


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


# ----------------------------------------------------------------------------- registry

SCHEMAS = {"RandomWalkGCN": _random_walk_gcn_schema}
REFERENCE_OPS = [RandomWalkGCN]


def register_schemas() -> None:
    """Register every `xmr` schema with onnx (once per process)."""
    for name, make in SCHEMAS.items():
        try:
            onnx.defs.get_schema(name, VERSION, DOMAIN)
        except onnx.defs.SchemaError:
            onnx.defs.register_schema(make())


def translation_table() -> dict:
    """torch custom op -> onnxscript function emitting the `xmr` node, for torch.onnx.export."""
    import onnxscript
    import torch

    import xmr.models.graph_ops  # noqa: F401 - registers torch.ops.xmr.random_walk_gcn

    register_schemas()
    opset = onnxscript.values.Opset(DOMAIN, VERSION)

    def random_walk_gcn(phi, psi, g, mask, affinity: str, eps: float):
        return opset.RandomWalkGCN(phi, psi, g, mask, affinity=affinity, eps=eps)

    return {torch.ops.xmr.random_walk_gcn.default: random_walk_gcn}


def xmr_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The nodes of the `xmr` domain in a model's main graph."""
    return [n for n in model.graph.node if n.domain == DOMAIN]


def reference_evaluator(model: onnx.ModelProto | str):
    """An onnx ReferenceEvaluator that also runs the `xmr` custom nodes (numpy implementations)."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model, new_ops=REFERENCE_OPS)

