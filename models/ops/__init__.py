"""The two ops TensorRT has no layer for, one folder each: `deform_sample` (CDNet's deformable offsets
sampling) and `random_walk_gcn` (ViSERN's graph reasoning). Each folder holds every implementation of its
op; `onnx_domain` registers them as the `xmr` ONNX domain.

A layer that calls an op carries `op_form`: "standard" (the torch reference, which the ONNX exporter
decomposes into standard ops) or "plugin" (the registered torch custom op, exported as one `xmr` node).
"""

from __future__ import annotations

from torch import nn

OP_FORMS = ("standard", "plugin")


def use_op_form(model: nn.Module, form: str) -> nn.Module:
    """Select the call form of every custom op in `model` ("standard" or "plugin"); returns the model."""
    if form not in OP_FORMS:
        raise ValueError(f"custom-ops form {form!r}; valid: {', '.join(OP_FORMS)}")
    for module in model.modules():
        if hasattr(module, "op_form"):
            module.op_form = form
    return model
