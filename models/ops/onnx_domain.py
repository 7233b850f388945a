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

import atexit

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
        "RandomWalkGCN",
        DOMAIN,
        VERSION,
        doc="Per-frame random-walk graph aggregation: out = D^-1 A~(phi psi^T / sqrt(C)) g, masked.",
        inputs=[
            param("phi", "T", "(N, K, C)"),
            param("psi", "T", "(N, K, C)"),
            param("g", "T", "(N, K, C)"),
            param("mask", "B", "(N, K) valid regions"),
        ],
        outputs=[param("out", "T", "(N, K, C)")],
        type_constraints=[("T", FLOATS, "float tensors"), ("B", ["tensor(bool)"], "mask")],
        attributes=[
            OpSchema.Attribute("affinity", OpSchema.AttrType.STRING, "softmax | relu"),
            OpSchema.Attribute("eps", OpSchema.AttrType.FLOAT, "relu affinity floor"),
        ],
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


# ----------------------------------------------------------------------------- DeformSample


def _deform_sample_infer(ctx) -> None:
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


def _deform_sample_schema() -> OpSchema:
    param = OpSchema.FormalParameter
    schema = OpSchema(
        "DeformSample",
        DOMAIN,
        VERSION,
        doc="Deformable-offsets sampling (CDNet CDD): out[b,q,g] = sum_p weights[b,q,g,p] * value sampled at "
        "positions[b,q,g,p], linear over clips (value rank 4) or trilinear over (t, y, x) (rank 6), "
        "align_corners=True on cell centres, zero padding, padded clips (mask False) read as zero.",
        inputs=[
            param("value", "T", "(B, T, G, C) or (B, T, H, W, G, C)"),
            param("mask", "B", "(B, T) valid clips"),
            param("positions", "T", "(B, Q, G, P) clip units, or (B, Q, G, P, 3) as (t, y, x) cells"),
            param("weights", "T", "(B, Q, G, P) attention weights"),
        ],
        outputs=[param("out", "T", "(B, Q, G, C)")],
        type_constraints=[("T", FLOATS, "float tensors"), ("B", ["tensor(bool)"], "mask")],
    )
    schema.set_type_and_shape_inference_function(_deform_sample_infer)
    return schema


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


# ----------------------------------------------------------------------------- registry

SCHEMAS = {"RandomWalkGCN": _random_walk_gcn_schema, "DeformSample": _deform_sample_schema}
REFERENCE_OPS = [RandomWalkGCN, DeformSample]


def register_schemas() -> None:
    """Register every `xmr` schema with onnx (once per process).

    onnx's C++ registry keeps our Python shape-inference functions; left there, they are destroyed after the
    interpreter has shut down, which crashes the process at exit (a segmentation fault, seen with onnx 1.22).
    So each registration is undone at exit, while Python is still alive.
    """
    for name, make in SCHEMAS.items():
        try:
            onnx.defs.get_schema(name, VERSION, DOMAIN)
        except onnx.defs.SchemaError:
            onnx.defs.register_schema(make())
            atexit.register(onnx.defs.deregister_schema, name, VERSION, DOMAIN)


def translation_table() -> dict:
    """torch custom op -> onnxscript function emitting the `xmr` node, for torch.onnx.export."""
    import onnxscript
    import torch

    import xmr.models.ops.deform_sample  # noqa: F401 - registers torch.ops.xmr.deform_sample
    import xmr.models.ops.random_walk_gcn  # noqa: F401 - registers torch.ops.xmr.random_walk_gcn

    register_schemas()
    opset = onnxscript.values.Opset(DOMAIN, VERSION)

    def random_walk_gcn(phi, psi, g, mask, affinity: str, eps: float):
        return opset.RandomWalkGCN(phi, psi, g, mask, affinity=affinity, eps=eps)

    def deform_sample(value, mask, positions, weights):
        return opset.DeformSample(value, mask, positions, weights)

    return {
        torch.ops.xmr.random_walk_gcn.default: random_walk_gcn,
        torch.ops.xmr.deform_sample.default: deform_sample,
    }


def xmr_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The nodes of the `xmr` domain in a model's main graph."""
    return [n for n in model.graph.node if n.domain == DOMAIN]


def reference_evaluator(model: onnx.ModelProto | str):
    """An onnx ReferenceEvaluator that also runs the `xmr` custom nodes (numpy implementations)."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model, new_ops=REFERENCE_OPS)
