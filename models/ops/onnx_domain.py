"""The `xmr` ONNX domain: the glue that collects every op folder's ONNX face into one domain.

Each op folder (`OPS` in this package) holds its own ONNX parts, one concern per file:
- `onnx_op.py`: `OP_TYPE`, `schema()` (an `onnx.defs.OpSchema` with typed inputs, attributes and a Python
  shape-inference function, so `onnx.checker` and `onnx.shape_inference` understand graphs that contain
  it) and `translation(opset)` (the torch custom op and the onnxscript function that turns it into one
  node of the domain: the "plugin" export form, ready to map onto a TensorRT plugin of the same name);
- `numpy_ref.py`: an `onnx.reference.op_run.OpRun` class named `OP_TYPE`, so
  `onnx.reference.ReferenceEvaluator` can run the plugin-form graph on any CPU.

This module holds what is domain-wide: its name and version, the schema builder the ops share, schema
registration (with its deregistration at exit), the translation table for torch.onnx, the evaluator.
"""

from __future__ import annotations

import atexit
import importlib
from collections.abc import Callable, Sequence
from types import ModuleType

import onnx
from onnx.defs import OpSchema

DOMAIN = "xmr"
VERSION = 1
FLOATS = ["tensor(float)", "tensor(float16)", "tensor(double)"]
TYPE_CONSTRAINTS = [("T", FLOATS, "float tensors"), ("B", ["tensor(bool)"], "mask")]


def op_schema(
    op_type: str,
    doc: str,
    inputs: Sequence[tuple[str, str, str]],
    outputs: Sequence[tuple[str, str, str]],
    infer: Callable,
    attributes: Sequence[tuple[str, OpSchema.AttrType, str]] = (),
) -> OpSchema:
    """A schema of the domain: inputs/outputs and attributes as (name, type, description), where a tensor's
    type is "T" (float tensors) or "B" (a bool mask); `infer(ctx)` is its type and shape inference."""
    param = OpSchema.FormalParameter
    schema = OpSchema(
        op_type,
        DOMAIN,
        VERSION,
        doc=doc,
        inputs=[param(*p) for p in inputs],
        outputs=[param(*p) for p in outputs],
        type_constraints=TYPE_CONSTRAINTS,
        attributes=[OpSchema.Attribute(*a) for a in attributes],
    )
    schema.set_type_and_shape_inference_function(infer)
    return schema


def op_parts(concern: str) -> list[ModuleType]:
    """Every op's file for one concern ("onnx_op", "numpy_ref", ...), in the order of `OPS`."""
    from xmr.models.ops import OPS

    return [importlib.import_module(f"xmr.models.ops.{op}.{concern}") for op in OPS]


def register_schemas() -> None:
    """Register every `xmr` schema with onnx (once per process).

    onnx's C++ registry keeps our Python shape-inference functions; left there, they are destroyed after the
    interpreter has shut down, which crashes the process at exit (a segmentation fault, seen with onnx 1.22).
    So each registration is undone at exit, while Python is still alive.
    """
    for part in op_parts("onnx_op"):
        try:
            onnx.defs.get_schema(part.OP_TYPE, VERSION, DOMAIN)
        except onnx.defs.SchemaError:
            onnx.defs.register_schema(part.schema())
            atexit.register(onnx.defs.deregister_schema, part.OP_TYPE, VERSION, DOMAIN)


def translation_table() -> dict:
    """torch custom op -> onnxscript function emitting the `xmr` node, for torch.onnx.export."""
    import onnxscript

    register_schemas()
    opset = onnxscript.values.Opset(DOMAIN, VERSION)
    return dict(part.translation(opset) for part in op_parts("onnx_op"))


def xmr_nodes(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The nodes of the `xmr` domain in a model's main graph."""
    return [n for n in model.graph.node if n.domain == DOMAIN]


def reference_ops() -> list[type]:
    """The numpy `OpRun` class of every op, for `onnx.reference.ReferenceEvaluator(new_ops=...)`."""
    return [
        getattr(numpy_part, onnx_part.OP_TYPE)
        for onnx_part, numpy_part in zip(op_parts("onnx_op"), op_parts("numpy_ref"), strict=True)
    ]


def reference_evaluator(model: onnx.ModelProto | str):
    """An onnx ReferenceEvaluator that also runs the `xmr` custom nodes (numpy implementations)."""
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(model, new_ops=reference_ops())
