"""The CPU INT8 form of a graph: ONNX Runtime's transformer fusions, then INT8 MatMuls with per-token scales.

`xmr optimize --precision int8` makes a graph for ONNX Runtime on a CPU in two steps, both here:

1. `fuse_for_ort(source, dest)`: the attention and normalisation fusions of onnxscript's ONNX Runtime
   rewriter (`onnxscript.rewriter.ort_fusions`, the maintained library that fuses graphs from torch's dynamo
   exporter). The exporter writes scaled-dot-product attention as some thirty small ops per layer (with
   IsNaN/Where around the softmax for fully masked rows) that ONNX Runtime's own graph optimiser does not
   recognise; on the MiniLM tower these unfused ops took more time than all of its INT8 products together.
   The fusions turn each layer's attention into one `com.microsoft.MultiHeadAttention` node (its Q/K/V
   biases folded in), residual + LayerNorm into `SkipLayerNormalization` and bias + erf-GELU into
   `BiasGelu`. The Q, K and V projections stay three MatMuls: we run onnxscript's fusion sequence without
   its last step (packing them into one `Attention` node, whose weights ONNX Runtime's quantizer does not
   convert when the node carries `qkv_hidden_sizes`, as the packed node does), so step 2 can quantize them.
   A graph with nothing to fuse (no attention: the GRU, ViSERN, ProTA and CDNet towers) is left as it is.
   The fusions write ONNX Runtime contrib ops, so plugin-form graphs (run by ONNX's reference evaluator)
   are not fused.
2. `per_token_int8(model, exclude)`: every MatMul (and Gemm) with a constant 2-D weight runs as INT8 with
   its weight quantized per output channel (symmetric) and its input quantized per token at run time: each
   row of the input (one token's channels, or one item's for 2-D inputs) gets its own scale, its largest
   |x| / 127, as UINT8 around 128. The product runs in ONNX Runtime's integer kernel
   (`com.microsoft.MatMulIntegerToFloat`: INT8 GEMM, then row scale x column scale in one pass).

On the MiniLM tower at batch 64 (2 threads; `python -m xmr.perf.int8_outliers`, whose table the README
shows), the fusions alone make FP32 about 1.2x faster, and the per-token INT8 graph is about 1.9x FP32.

Why per-token and not ONNX Runtime's `quantize_dynamic` (kept as `--activations per-tensor`): dynamic
quantization gives each MatMul input one scale, computed over the whole batch at run time. A few tokens
(the first, [CLS], above all) carry activations several times larger than the rest, so one scale wastes
most of the INT8 range on them, and since the scale depends on the batch, a caption's embedding depends on
which captions were batched with it (a served query's answer would depend on its batch-mates; identical
captions in different batches get different vectors). Per-token scales remove both: on the MiniLM tower
the text embedding's error against FP32 falls from 8.6e-3 to 2.9e-3 (1 - mean cosine) and the batch
dependence to float rounding, for about a tenth of the speed (the per-row absmax pass). The idea is the
token-wise activation quantization of "ZeroQuant: Efficient and Affordable Post-Training Quantization for
Large-Scale Transformers" (Yao et al.), written as plain ONNX ops around ONNX Runtime's integer kernel;
ONNX Runtime's quantization tools have no per-token mode.

Outlier channels (`outliers`, `xmr optimize --outliers K`, off by default): a few channels of a
LayerNorm output are far larger than the rest in every token, so they still set most rows' scales. The
mixed-precision decomposition of "LLM.int8(): 8-bit Matrix Multiplication for Transformers at Scale"
(Dettmers et al.) takes them out: the K channels of each input with the largest calibrated max |x| are
multiplied in FP32 by their weight rows and added to the INT8 product of the other channels (whose weight
columns' scales then no longer cover those rows either). Reconstructed: the paper picks outlier columns per
batch by a magnitude threshold (6.0); we fix K channels per input from calibration, since a graph's
shapes and kernels are fixed at export. It costs a gather, a small FP32 MatMul and an add per product: on
the default text tower about a fifth of the INT8 speed (`python -m xmr.perf.precision`).

Weight rounding (`rounded`; `xmr optimize`'s default for this form, `--rounding nearest` skips it):
`gptq_round` rounds each weight to the same per-column INT8 grid by GPTQ instead of to nearest, spreading
each row's rounding error over the rows not yet rounded so that the product with the calibration inputs
moves least. It changes no node and costs nothing at run time; on MiniLM (SmoothQuant 0.65) it took the
text tower's dev error from 1.0e-3 to 4.1e-4 (1 - mean cosine to FP32) and the test R@1 drop from 0.9 to
0.5 point (`python -m xmr.perf.precision`, whose table the README shows).

ONNX Runtime detail that shapes the graph: `MatMulIntegerToFloat`'s schema documents a per-tensor or
per-column scale for A; we pass an (M, 1) per-row scale, which its CPU kernel broadcasts as a per-row
scale (a test compares the node with numpy's per-token arithmetic, so an ONNX Runtime that stopped doing
so fails loudly). Its optional bias input is added before that multiplication, not after, so the bias
stays the graph's own `Add`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

QMAX = 127  # symmetric INT8 range; the activations are UINT8 around ZERO_POINT with the same step
ZERO_POINT = 128


def fuse_for_ort(source: Path, dest: Path) -> dict[str, int]:
    """Write `source` with onnxscript's ONNX Runtime fusions applied to `dest`; returns the count of each
    fusion made. With none made, `dest` is a copy of `source` (no constant folding or renaming either)."""
    import onnx_ir as ir
    import onnx_ir.passes.common as common_passes
    from onnxscript.optimizer import optimize
    from onnxscript.rewriter.ort_fusions import (
        bias_gelu,
        erfgelu,
        mha,
        mha_bias,
        mha_scale,
        sdpa,
        shape_optimization,
        skip_normalization,
    )

    model = ir.load(source)
    # onnxscript's own preparation for these fusions: shapes, constant folding, shape-arithmetic rules
    common_passes.ShapeInferencePass()(model)
    optimize(model)
    shape_optimization.rules.apply_to_model(model)
    optimize(model)
    counts = {
        "erf_gelu": erfgelu.fuse_erfgelu(model),
        "skip_layer_normalization": skip_normalization.fuse_skip_layer_normalization(model),
        "sdpa": sdpa.fuse_sdpa(model, apply_shape_inference=True),
        "mha1": mha.fuse_mha1(model),
        "mha2": mha.fuse_mha2(model),
        "mha_scale": mha_scale.fuse_mha_scale(model),
        "mha_bias": mha_bias.fuse_mha_bias(model),
        "bias_gelu": bias_gelu.fuse_bias_gelu(model),
    }
    counts = {k: v for k, v in counts.items() if v}
    if not counts:
        onnx.save(onnx.load(source), dest)
        return counts
    optimize(model)
    common_passes.ShapeInferencePass()(model)
    ir.save(model, dest)
    return counts


def int8_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The nodes `per_token_int8` converts: MatMuls whose second input is a constant 2-D weight, and Gemms
    with a constant 2-D B and an untransposed A."""
    inits = {i.name: i for i in model.graph.initializer}

    def weight(name: str) -> bool:
        return name in inits and len(inits[name].dims) == 2

    out = []
    for n in model.graph.node:
        if n.op_type == "MatMul" and n.input[0] not in inits and weight(n.input[1]):
            out.append(n)
        elif n.op_type == "Gemm" and weight(n.input[1]) and not _attr(n, "transA", 0):
            out.append(n)
    return out


def _attr(node: onnx.NodeProto, name: str, default):
    for a in node.attribute:
        if a.name == name:
            return helper.get_attribute_value(a)
    return default


def per_token_int8(
    model: onnx.ModelProto,
    exclude: set[str] = frozenset(),
    contrib: bool = True,
    outliers: dict[str, np.ndarray] | None = None,
    rounded: dict[str, np.ndarray] | None = None,
) -> onnx.ModelProto:
    """A copy of `model` with every `int8_matmuls` node not named in `exclude` as a per-token INT8 product
    (see the module docstring). The quantization of an input is shared by every converted node reading it
    (Q, K and V read one activation). `contrib=False` writes each product in standard ONNX ops instead of
    ONNX Runtime's fused node (`MatMulInteger` -> `Cast` -> `Mul` by row scale x column scale): the same
    numbers, some 10% slower in ONNX Runtime, but runnable by any ONNX runtime, ONNX's reference evaluator
    included (which runs the plugin-form graphs). `outliers` (activation name -> channel indices, from
    `outlier_channels`) takes those channels of an activation out of its INT8 product: they are multiplied
    in FP32 by their rows of the weight and added to the INT8 product of the other channels, whose scales
    then no longer have to cover them. `rounded` (node name -> its (K, N) weight, from `gptq_round`) gives
    a node's weight already rounded to its INT8 grid, used instead of rounding the graph's own to nearest."""
    outliers, rounded = outliers or {}, rounded or {}
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    inits = {i.name: i for i in g.initializer}
    consts = {
        "pt/axis1": np.array([1], np.int64),
        "pt/inv_qmax": np.array(1 / QMAX, np.float32),
        "pt/tiny": np.array(1e-12, np.float32),
        "pt/zero_point": np.array(ZERO_POINT, np.uint8),
    }
    targets = {n.name for n in int8_matmuls(model)} - set(exclude)
    if not targets:
        return model
    g.initializer.extend(numpy_helper.from_array(v, k) for k, v in consts.items())
    opset = next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx"))
    nodes, quantized = [], set()
    for n in g.node:
        if n.name not in targets:
            nodes.append(n)
            continue
        x, p = n.input[0], n.name
        w = numpy_helper.to_array(inits[n.input[1]]).astype(np.float32)
        bias = None
        if n.op_type == "Gemm":  # Y = alpha * X B' + beta * C
            w = (w.T if _attr(n, "transB", 0) else w) * _attr(n, "alpha", 1.0)
            if len(n.input) > 2 and n.input[2]:
                bias = n.input[2]
                beta = _attr(n, "beta", 1.0)
                if beta != 1.0:
                    nodes.append(helper.make_node("Mul", [bias, f"{p}/pt_beta"], [f"{p}/pt_bias"]))
                    g.initializer.append(numpy_helper.from_array(np.array(beta, np.float32), f"{p}/pt_beta"))
                    bias = f"{p}/pt_bias"
        k, cols = w.shape
        idx = outliers.get(x)
        if x not in quantized:
            nodes += _quantize_rows(x, k, opset, g, idx)
            quantized.add(x)
        if idx is not None:  # the outlier channels' rows go to an FP32 product of their own
            g.initializer.append(numpy_helper.from_array(w[idx], f"{p}/pt_w_outliers"))
            w = w.copy()
            w[idx] = 0.0
        scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / QMAX  # per output channel
        if p in rounded:  # already on this grid (GPTQ): the division recovers its integers
            w = rounded[p]
        g.initializer.extend([
            numpy_helper.from_array(np.clip(np.round(w / scale), -QMAX, QMAX).astype(np.int8), f"{p}/pt_w"),
            numpy_helper.from_array(scale.astype(np.float32), f"{p}/pt_w_scale"),
            numpy_helper.from_array(np.array([cols], np.int64), f"{p}/pt_cols"),
        ])  # fmt: skip
        inputs = [f"{x}/pt_q", f"{p}/pt_w", f"{x}/pt_row_scale", f"{p}/pt_w_scale", "pt/zero_point"]
        product = f"{p}/pt_product" if bias else n.output[0]
        if contrib:
            nodes.append(
                helper.make_node(
                    "MatMulIntegerToFloat", inputs, [f"{p}/pt_y"], domain="com.microsoft", name=p
                )
            )
        else:
            nodes += [
                helper.make_node("MatMulInteger", [*inputs[:2], inputs[4]], [f"{p}/pt_i32"], name=p),
                helper.make_node("Cast", [f"{p}/pt_i32"], [f"{p}/pt_f"], to=onnx.TensorProto.FLOAT),
                helper.make_node("Mul", [inputs[2], inputs[3]], [f"{p}/pt_scales"]),  # (rows, 1) x (cols,)
                helper.make_node("Mul", [f"{p}/pt_f", f"{p}/pt_scales"], [f"{p}/pt_y"]),
            ]
        y = f"{p}/pt_y"
        if idx is not None:
            nodes += [
                helper.make_node(
                    "MatMul", [f"{x}/pt_outliers", f"{p}/pt_w_outliers"], [f"{p}/pt_y_outliers"]
                ),
                helper.make_node("Add", [y, f"{p}/pt_y_outliers"], [f"{p}/pt_y_sum"]),
            ]
            y = f"{p}/pt_y_sum"
        nodes += [
            helper.make_node("Concat", [f"{x}/pt_lead", f"{p}/pt_cols"], [f"{p}/pt_shape"], axis=0),
            helper.make_node("Reshape", [y, f"{p}/pt_shape"], [product]),
        ]
        if bias:
            nodes.append(helper.make_node("Add", [product, bias], [n.output[0]]))
    del g.node[:]
    g.node.extend(nodes)
    if contrib and not any(o.domain == "com.microsoft" for o in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    used = {i for node in g.node for i in node.input}
    kept = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(kept)
    return model


def _quantize_rows(
    x: str, k: int, opset: int, g: onnx.GraphProto, outliers: np.ndarray | None = None
) -> list[onnx.NodeProto]:
    """Nodes that quantize activation `x` (..., k) per row: `<x>/pt_q` (rows, k) UINT8, `<x>/pt_row_scale`
    (rows, 1) and `<x>/pt_lead` (the shape of `x` without its last axis, to restore the product's). With
    `outliers`, those channels are zeroed before quantization and gathered into `<x>/pt_outliers`."""
    g.initializer.append(numpy_helper.from_array(np.array([-1, k], np.int64), f"{x}/pt_rows_shape"))
    split = []
    rows = f"{x}/pt_rows"
    if outliers is not None:
        mask = np.ones(k, np.float32)
        mask[outliers] = 0.0
        g.initializer.extend([
            numpy_helper.from_array(mask, f"{x}/pt_inlier_mask"),
            numpy_helper.from_array(np.asarray(outliers, np.int64), f"{x}/pt_outlier_index"),
        ])  # fmt: skip
        split = [
            helper.make_node("Gather", [rows, f"{x}/pt_outlier_index"], [f"{x}/pt_outliers"], axis=1),
            helper.make_node("Mul", [rows, f"{x}/pt_inlier_mask"], [f"{x}/pt_inliers"]),
        ]
        rows = f"{x}/pt_inliers"
    if opset >= 18:  # ReduceMax takes its axes as an input from opset 18, as an attribute before
        row_max = helper.make_node("ReduceMax", [f"{x}/pt_abs", "pt/axis1"], [f"{x}/pt_max"], keepdims=0)
    else:
        row_max = helper.make_node("ReduceMax", [f"{x}/pt_abs"], [f"{x}/pt_max"], axes=[1], keepdims=0)
    return [
        helper.make_node("Reshape", [x, f"{x}/pt_rows_shape"], [f"{x}/pt_rows"]),
        *split,
        helper.make_node("Abs", [rows], [f"{x}/pt_abs"]),
        row_max,
        helper.make_node("Mul", [f"{x}/pt_max", "pt/inv_qmax"], [f"{x}/pt_s"]),
        helper.make_node("Max", [f"{x}/pt_s", "pt/tiny"], [f"{x}/pt_scale"]),  # an all-zero row
        helper.make_node("Shape", [f"{x}/pt_scale"], [f"{x}/pt_n"]),
        helper.make_node(
            "ConstantOfShape",
            [f"{x}/pt_n"],
            [f"{x}/pt_zp"],
            value=numpy_helper.from_array(np.array([ZERO_POINT], np.uint8)),
        ),  # fmt: skip
        helper.make_node(
            "QuantizeLinear", [rows, f"{x}/pt_scale", f"{x}/pt_zp"], [f"{x}/pt_q"], axis=0
        ),  # fmt: skip
        helper.make_node("Unsqueeze", [f"{x}/pt_scale", "pt/axis1"], [f"{x}/pt_row_scale"]),
        helper.make_node("Shape", [x], [f"{x}/pt_lead"], end=-1),
    ]


def outlier_channels(absmax: dict[str, np.ndarray], count: int) -> dict[str, np.ndarray]:
    """The `count` channels of each activation with the largest calibrated max |x| (sorted indices)."""
    return {name: np.sort(np.argsort(m)[-count:]) for name, m in absmax.items() if 0 < count < len(m)}


def input_hessians(path: Path, nodes: list[onnx.NodeProto], feeds: list[dict]) -> dict[str, np.ndarray]:
    """X'X of the input of each MatMul of `nodes` (input rows over all calibration `feeds`): {node name:
    (K, K)}. Nodes reading one activation share its matrix."""
    from xmr.export.smoothquant import activation_values

    sums: dict[str, np.ndarray] = {}
    for values in activation_values(path, sorted({n.input[0] for n in nodes}), feeds):
        for name, x in values.items():
            rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
            sums[name] = sums.get(name, 0.0) + rows.T @ rows
    return {n.name: sums[n.input[0]] for n in nodes}


def gptq_round(w: np.ndarray, hessian: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """`w` (K, N) rounded to its per-column symmetric INT8 grid (scale max|w| / 127, as `per_token_int8`)
    by GPTQ ("GPTQ: Accurate Post-Training Quantization for Generative Pre-trained Transformers", Frantar
    et al.): the input rows are rounded one at a time, each rounding error spread over the rows not yet
    rounded through the inverse of the input's X'X (`hessian`), so the product with the calibration inputs
    moves as little as possible. Follows the paper's algorithm (Cholesky form of the inverse, dampening
    `damp` x the mean diagonal, dead inputs zeroed) without its lazy block updates (our K is at most a few
    thousand). Reconstructed: the inputs are the FP32 graph's activations, not those of the already
    quantized earlier layers, and one pass rounds every node."""
    w = w.astype(np.float64).copy()
    k = w.shape[0]
    scale = np.maximum(np.abs(w).max(axis=0), 1e-12) / QMAX
    h = hessian.astype(np.float64).copy()
    dead = np.diag(h) == 0
    h[dead, dead] = 1.0
    w[dead] = 0.0
    h += damp * np.mean(np.diag(h)) * np.eye(k)
    upper = np.linalg.cholesky(np.linalg.inv(h)).T
    out = np.empty_like(w)
    for i in range(k):
        out[i] = np.clip(np.round(w[i] / scale), -QMAX, QMAX) * scale
        err = (w[i] - out[i]) / upper[i, i]
        w[i + 1 :] -= np.outer(upper[i, i + 1 :], err)
    return out.astype(np.float32)
