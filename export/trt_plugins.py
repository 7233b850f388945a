"""TensorRT plugins for the two `xmr` ONNX ops, running the OpenAI-Triton kernels (TensorRT's Python plugins).

The "plugin" export form keeps each custom op as one node of the ONNX domain `xmr`: `xmr::DeformSample`
(CDNet) and `xmr::RandomWalkGCN` (ViSERN). This module registers one TensorRT plugin per op with TensorRT's
Python plugin API (`tensorrt.plugin`, TensorRT >= 10.6, "quickly deployable plugins"):

- `@trtp.register("xmr::<OpType>")`: the descriptor. Its signature is the op's ONNX schema
  (`models/ops/<op>/onnx_op.py`): the node's inputs, in order, as `TensorDesc`s, then the node's attributes
  with their Python types; it returns the output's `TensorDesc` (shape expressions and dtype), the same
  shape inference as the schema's.
- `@trtp.impl("xmr::<OpType>")`: the implementation, run by TensorRT on its CUDA stream. It wraps the
  TensorRT tensors as torch CUDA tensors (no copy) and calls the op's OpenAI-Triton function,
  `xmr.models.ops.<op>.triton.<op>_triton`, which has the contract of the op's `reference.py`.

How TensorRT's ONNX parser finds them: a node of an op the parser does not know is imported as a plugin
looked up in TensorRT's plugin registry by name = the node's `op_type` ("DeformSample"), version = the
node's `plugin_version` attribute (default "1", what `tensorrt.plugin` registers) and namespace = the
node's `plugin_namespace` attribute; recent parsers fall back to the node's domain ("xmr") when that
attribute is absent. `trtp.register("xmr::DeformSample")` registers name "DeformSample" in namespace
"xmr", so the exported nodes match as they are; `with_plugin_namespaces` (used by `trt_engine.py` before
parsing) also writes `plugin_namespace="xmr"` onto a copy of the graph, for parsers without the fallback.
The parser passes the node's other attributes as plugin fields, by name (`affinity`, `eps`).

Registration happens when this module is imported; where `tensorrt.plugin` cannot be imported (no
TensorRT, or TensorRT < 10.6) it is skipped: `REGISTERED` is False and `SKIPPED` says why, and the module
still imports (the plugin tables below are plain data, used by tests and the engine manifest).

An engine built with these plugins holds Python callbacks (a JIT plugin): it runs in a Python process that
has imported this module (`trt_engine.TensorRTRunner` does), not in a C++ runtime such as Triton's
`tensorrt_plan` backend.
"""

# No `from __future__ import annotations` here: `tensorrt.plugin` reads the descriptor's and the
# implementation's annotations as types (`issubclass(annotation, TensorDesc)`), not as strings.

import importlib

from xmr.models.ops.onnx_domain import DOMAIN

NAMESPACE = DOMAIN  # the plugins' namespace is the ONNX domain of the nodes they implement

# plugin (= ONNX op type) -> (input names in node order, {attribute: Python type}), as in the op's schema
PLUGINS: dict[str, tuple[tuple[str, ...], dict[str, type]]] = {
    "DeformSample": (("value", "mask", "positions", "weights"), {}),
    "RandomWalkGCN": (("phi", "psi", "g", "mask"), {"affinity": str, "eps": float}),
}

REGISTERED = False  # True once both plugins are in TensorRT's plugin registry
SKIPPED: str | None = None  # why registration was skipped


def plugin_id(op_type: str) -> str:
    """The `tensorrt.plugin` id of an `xmr` op: "xmr::DeformSample"."""
    return f"{NAMESPACE}::{op_type}"


def with_plugin_namespaces(model):
    """A copy of an `onnx.ModelProto` whose `xmr` nodes carry `plugin_namespace="xmr"` (see the module
    docstring: what TensorRT's ONNX parser reads to find the plugin's namespace)."""
    import onnx

    model = onnx.ModelProto.FromString(model.SerializeToString())
    for node in model.graph.node:
        if node.domain == DOMAIN and not any(a.name == "plugin_namespace" for a in node.attribute):
            node.attribute.append(onnx.helper.make_attribute("plugin_namespace", NAMESPACE))
    return model


def _triton(op: str):
    """The op's OpenAI-Triton function, imported when a plugin first runs (it needs CUDA and `triton`)."""
    return getattr(importlib.import_module(f"xmr.models.ops.{op}.triton"), f"{op}_triton")


def _define(trtp) -> None:
    """Register the descriptor and the implementation of every plugin with `tensorrt.plugin` (`trtp`)."""
    import torch

    TensorDesc, Tensor = trtp.TensorDesc, trtp.Tensor

    def cuda(*tensors):
        return [torch.as_tensor(t, device="cuda") for t in tensors]

    # ----------------------------------------------------------------- xmr::DeformSample (no attributes)

    @trtp.register(plugin_id("DeformSample"))
    def deform_sample_desc(
        value: TensorDesc, mask: TensorDesc, positions: TensorDesc, weights: TensorDesc
    ) -> TensorDesc:
        """out (B, Q, G, C): (B, Q, G) of `positions`, C of `value`'s last dim, `value`'s dtype."""
        p, v = positions.shape_expr, value.shape_expr
        return trtp.from_shape_expr((p[0], p[1], p[2], v[value.ndim - 1]), dtype=value.dtype)

    @trtp.impl(plugin_id("DeformSample"))
    def deform_sample_impl(
        value: Tensor,
        mask: Tensor,
        positions: Tensor,
        weights: Tensor,
        outputs: tuple[Tensor],
        stream: int,
    ) -> None:
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            out = cuda(outputs[0])[0]
            out.copy_(_triton("deform_sample")(*cuda(value, mask, positions, weights)))

    # ----------------------------------------------------------------- xmr::RandomWalkGCN (affinity, eps)

    @trtp.register(plugin_id("RandomWalkGCN"))
    def random_walk_gcn_desc(
        phi: TensorDesc, psi: TensorDesc, g: TensorDesc, mask: TensorDesc, affinity: str, eps: float
    ) -> TensorDesc:
        """out has the shape and dtype of `g` (N, K, C)."""
        return g.like()

    @trtp.impl(plugin_id("RandomWalkGCN"))
    def random_walk_gcn_impl(
        phi: Tensor,
        psi: Tensor,
        g: Tensor,
        mask: Tensor,
        affinity: str,
        eps: float,
        outputs: tuple[Tensor],
        stream: int,
    ) -> None:
        # a string attribute arrives as the bytes of a CHAR plugin field: drop a C terminator if present
        affinity = affinity.rstrip("\x00")
        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            out = cuda(outputs[0])[0]
            fn = _triton("random_walk_gcn")
            out.copy_(fn(*cuda(phi, psi, g, mask), affinity=affinity, eps=float(eps)))


def register() -> bool:
    """Register the plugins once per process; False (and `SKIPPED` set) where `tensorrt.plugin` is missing."""
    global REGISTERED, SKIPPED
    if REGISTERED:
        return True
    try:
        import tensorrt.plugin as trtp
    except ImportError as e:  # no TensorRT, or one older than 10.6 (no Python plugin API)
        SKIPPED = f"tensorrt.plugin cannot be imported ({e}); the xmr TensorRT plugins are not registered"
        return False
    _define(trtp)
    REGISTERED, SKIPPED = True, None
    return True


register()
