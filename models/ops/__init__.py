"""The ops TensorRT has no layer for, one folder each: `deform_sample` (CDNet's deformable offsets sampling)
and `random_walk_gcn` (ViSERN's graph reasoning). Each folder holds every implementation of its op, one
concern per file:

    reference.py   the op in plain torch: its definition, and the "standard" export form
    torch_op.py    the torch custom op `xmr::<op>` (autograd recomputes the reference), the call forms, and
                   the layer that calls the op
    onnx_op.py     the `xmr::<OpType>` ONNX schema, its shape inference, its onnxscript translation
    numpy_ref.py   the numpy op that runs the ONNX node in onnx.reference.ReferenceEvaluator
    triton.py      the forward as OpenAI-Triton kernels: the custom op's CUDA kernel (imported on first
                   CUDA call, so the package imports without triton)

An implementation is one more file in the folder, and one more parameter of the op's parity test
(tests/test_op_<op>.py), which runs every implementation against the torch reference. `onnx_domain`
collects the folders' ONNX parts into the `xmr` domain; an op is one more folder, named in `OPS`.

A layer that calls an op carries `op_form`: "standard" (the torch reference, which the ONNX exporter
decomposes into standard ops) or "plugin" (the registered torch custom op, exported as one `xmr` node).
"""

from __future__ import annotations

from torch import nn

OPS = ("deform_sample", "random_walk_gcn")  # the op folders
OP_FORMS = ("standard", "plugin")


def use_op_form(model: nn.Module, form: str) -> nn.Module:
    """Select the call form of every custom op in `model` ("standard" or "plugin"); returns the model."""
    if form not in OP_FORMS:
        raise ValueError(f"custom-ops form {form!r}; valid: {', '.join(OP_FORMS)}")
    for module in model.modules():
        if hasattr(module, "op_form"):
            module.op_form = form
    return model
