"""SmoothQuant as an ONNX graph rewrite: move the activations' outlier channels into the weights before INT8.

Follows "SmoothQuant: Accurate and Efficient Post-Training Quantization for Large Language Models" (Xiao et
al.). A MatMul `Y = X W` is rewritten as `Y = (X diag(1/s)) (diag(s) W)`: exact in real arithmetic, but the
activation `X diag(1/s)` has its few large channels scaled down, so one per-tensor INT8 scale fits it far
better, while the weights (quantized per output channel) absorb the factor. With `alpha` the migration
strength, `s_j = max|X_j|^alpha / max|W_j|^(1 - alpha)`, per input channel `j`, with the activation maxima
from calibration inputs (the paper's formula).

What is reconstructed here, and why:
- The paper folds `1/s` into the preceding LayerNorm. In a post-LN encoder such as MiniLM the LayerNorm's
  output also feeds the residual branch, so folding would change it; instead an explicit `Mul` by `1/s` is
  inserted on the activation (one per activation, shared by every MatMul that reads it, e.g. Q, K and V).
  It costs one element-wise pass over the activation, and it is a plain ONNX op that ONNX Runtime and
  TensorRT run as they are.
- Every MatMul whose second input is a constant 2-D weight is smoothed (the paper smooths the linear layers
  of attention and MLP blocks: in an exported encoder these are exactly those MatMuls). The factors are
  clipped to [1e-3, 1e3] so that an all-zero channel cannot produce an infinite weight.
- `alpha` is not fixed: `xmr optimize` tries a small grid and keeps the value whose fully converted graph
  is closest to the FP32 outputs on dev inputs (the paper uses 0.5 for most models and up to 0.75-0.85 for
  those with severe outliers, which is the range the grid covers).
- No maintained ONNX implementation fits this stack: ONNX Runtime's own SmoothQuant option delegates to
  Intel Neural Compressor's ONNX adaptor, which neural-compressor 3 removed (its successor package pins
  numpy < 2).
"""

from __future__ import annotations

import tempfile
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from xmr.export.runners import Feeds

CLIP = (1e-3, 1e3)


@dataclass
class Smoothable:
    """One activation and the MatMuls (node names) that read it with constant weights (initializer names)."""

    activation: str
    nodes: list[str]
    weights: list[str]


def smoothable(model: onnx.ModelProto) -> list[Smoothable]:
    """The activations of `model` read by MatMuls whose second input is a constant 2-D weight."""
    inits = {i.name: i for i in model.graph.initializer}
    uses = Counter(name for node in model.graph.node for name in node.input)
    groups: dict[str, Smoothable] = {}
    for node in model.graph.node:
        if node.op_type != "MatMul" or node.input[1] not in inits or node.input[0] in inits:
            continue
        if len(inits[node.input[1]].dims) != 2 or uses[node.input[1]] > 1:  # a shared weight: leave it
            continue
        group = groups.setdefault(node.input[0], Smoothable(node.input[0], [], []))
        group.nodes.append(node.name)
        group.weights.append(node.input[1])
    return list(groups.values())


def activation_values(
    path: Path, activations: list[str], feeds: list[Feeds]
) -> Iterator[dict[str, np.ndarray]]:
    """For each batch of `feeds`, the values of the graph's tensors named in `activations` (ONNX Runtime, or
    the reference evaluator for a graph with `xmr` nodes, which no stock runtime has)."""
    import onnxruntime as ort

    model = onnx.load(path)
    outputs = {o.name for o in model.graph.output}
    for name in activations:
        if name not in outputs:
            model.graph.output.append(helper.make_empty_tensor_value_info(name))
    with tempfile.TemporaryDirectory() as tmp:
        augmented = Path(tmp) / "activations.onnx"
        onnx.save(model, augmented)
        if any(n.domain == "xmr" for n in model.graph.node):
            from xmr.models.ops.onnx_domain import reference_evaluator

            session = reference_evaluator(str(augmented))
        else:
            session = ort.InferenceSession(str(augmented), providers=["CPUExecutionProvider"])
    # every output, by the runtime's own names for them
    if hasattr(session, "get_outputs"):
        names = [o.name for o in session.get_outputs()]
    else:
        names = list(session.output_names)
    for batch in feeds:
        outputs = dict(zip(names, session.run(None, batch), strict=True))
        yield {name: outputs[name] for name in activations}


def activation_absmax(path: Path, activations: list[str], feeds: list[Feeds]) -> dict[str, np.ndarray]:
    """Per-channel (last axis) max |x| of each of `activations` over the calibration `feeds`."""
    absmax: dict[str, np.ndarray] = {}
    for values in activation_values(path, activations, feeds):
        for name, x in values.items():
            m = np.abs(x.reshape(-1, x.shape[-1])).max(axis=0)
            absmax[name] = np.maximum(absmax[name], m) if name in absmax else m
    return absmax


def smooth(model: onnx.ModelProto, absmax: dict[str, np.ndarray], alpha: float) -> onnx.ModelProto:
    """A copy of `model` with every smoothable MatMul rewritten for migration strength `alpha` (0..1)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha {alpha}: expected a migration strength in [0, 1]")
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    by_name = {n.name: n for n in graph.node}
    for group in smoothable(model):
        weights = [numpy_helper.to_array(inits[w]) for w in group.weights]
        w_max = np.max([np.abs(w).max(axis=1) for w in weights], axis=0)
        x_max = absmax[group.activation]
        s = np.maximum(x_max, 1e-5) ** alpha / np.maximum(w_max, 1e-5) ** (1.0 - alpha)
        s = np.clip(s, *CLIP).astype(np.float32)
        scale, smoothed = f"{group.activation}/smooth_scale", f"{group.activation}/smoothed"
        graph.initializer.append(numpy_helper.from_array((1.0 / s).astype(np.float32), scale))
        mul = helper.make_node(
            "Mul", [group.activation, scale], [smoothed], name=f"{group.activation}/smooth"
        )
        first = min(i for i, n in enumerate(graph.node) if n.name in group.nodes)
        graph.node.insert(first, mul)  # before its first reader: the graph stays topologically sorted
        for node_name, w_name, w in zip(group.nodes, group.weights, weights, strict=True):
            by_name[node_name].input[0] = smoothed
            inits[w_name].CopyFrom(numpy_helper.from_array((w * s[:, None]).astype(w.dtype), w_name))
    return model
