"""SmoothQuant's graph rewrite: exact in FP32; it makes per-tensor INT8 of outlier activations accurate."""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from xmr.export.smoothquant import activation_absmax, smooth, smoothable


def encoder_block(tmp_path, outlier: float = 60.0):
    """x -> LayerNorm -> {q, k: MatMul} and a residual Add; LayerNorm's gamma makes 3 of 64 channels
    `outlier` times larger than the rest, the pattern that breaks per-tensor activation quantization."""
    rng = np.random.default_rng(0)
    c, n = 64, 48
    gamma = np.ones(c, np.float32)
    gamma[[3, 17, 40]] = outlier
    inits = [
        numpy_helper.from_array(gamma, "gamma"),
        numpy_helper.from_array(np.zeros(c, np.float32), "beta"),
        numpy_helper.from_array(rng.normal(0, 0.1, (c, n)).astype(np.float32), "wq"),
        numpy_helper.from_array(rng.normal(0, 0.1, (c, n)).astype(np.float32), "wk"),
        numpy_helper.from_array(rng.normal(0, 0.1, (n, c)).astype(np.float32), "wo"),
        numpy_helper.from_array(rng.normal(0, 0.1, (n, c)).astype(np.float32), "shared"),
    ]
    nodes = [
        helper.make_node("LayerNormalization", ["x", "gamma", "beta"], ["h"], name="ln", axis=-1),
        helper.make_node("MatMul", ["h", "wq"], ["q"], name="mm_q"),
        helper.make_node("MatMul", ["h", "wk"], ["k"], name="mm_k"),
        helper.make_node("Add", ["q", "k"], ["qk"], name="add"),
        helper.make_node("MatMul", ["qk", "wo"], ["o"], name="mm_o"),
        helper.make_node("Add", ["o", "h"], ["y"], name="residual"),
        # a weight read by two MatMuls cannot take two different scalings: it must be left alone
        helper.make_node("MatMul", ["q", "shared"], ["s1"], name="mm_s1"),
        helper.make_node("MatMul", ["k", "shared"], ["s2"], name="mm_s2"),
        helper.make_node("Add", ["s1", "s2"], ["z"], name="add_s"),
    ]
    graph = helper.make_graph(
        nodes,
        "block",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", "tokens", c])],
        [
            helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", "tokens", c]),
            helper.make_tensor_value_info("z", TensorProto.FLOAT, ["batch", "tokens", c]),
        ],
        inits,
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    path = tmp_path / "block.onnx"
    onnx.save(model, path)
    feeds = [{"x": rng.normal(0, 1, (8, 12, c)).astype(np.float32)} for _ in range(4)]
    return path, feeds


def run(model_or_path, feeds):
    source = model_or_path if isinstance(model_or_path, str) else model_or_path.SerializeToString()
    session = ort.InferenceSession(source, providers=["CPUExecutionProvider"])
    return session.run(["y", "z"], feeds)


def test_only_unshared_constant_weights_are_smoothed(tmp_path):
    path, _ = encoder_block(tmp_path)
    groups = {g.activation: sorted(g.nodes) for g in smoothable(onnx.load(path))}
    assert groups == {"h": ["mm_k", "mm_q"], "qk": ["mm_o"]}  # q and k read one weight: left alone


def test_absmax_is_the_per_channel_maximum_over_every_batch(tmp_path):
    path, feeds = encoder_block(tmp_path)
    got = activation_absmax(path, ["h"], feeds)["h"]
    assert got.shape == (64,)
    xs = np.concatenate([f["x"].reshape(-1, 64) for f in feeds])
    h = (xs - xs.mean(1, keepdims=True)) / np.sqrt(xs.var(1, keepdims=True) + 1e-5)
    h[:, [3, 17, 40]] *= 60.0
    np.testing.assert_allclose(got, np.abs(h).max(0), rtol=1e-4)


@pytest.mark.parametrize("alpha", [0.0, 0.5, 0.85, 1.0])
def test_the_rewrite_is_exact_in_fp32_and_stays_sorted(tmp_path, alpha):
    path, feeds = encoder_block(tmp_path)
    model = onnx.load(path)
    smoothed = smooth(model, activation_absmax(path, ["h", "qk"], feeds), alpha)
    onnx.checker.check_model(smoothed, full_check=True)  # topologically sorted, every name defined once
    for f in feeds:
        for want, got in zip(run(str(path), f), run(smoothed, f), strict=True):
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    muls = [n for n in smoothed.graph.node if n.op_type == "Mul"]
    assert [m.input[0] for m in muls] == ["h", "qk"]
    assert len(model.graph.node) == 9  # the input model is not modified


def test_bad_alpha_is_refused(tmp_path):
    path, feeds = encoder_block(tmp_path)
    with pytest.raises(ValueError, match="alpha 1.5"):
        smooth(onnx.load(path), activation_absmax(path, ["h", "qk"], feeds), 1.5)


def test_smoothing_makes_dynamic_int8_accurate_on_outlier_channels(tmp_path):
    """The point of the method: with a few 60x channels, per-tensor activation quantization rounds the
    other 61 channels to a handful of levels; after smoothing the INT8 graph is more than twice closer."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path, feeds = encoder_block(tmp_path)
    smoothed = tmp_path / "smoothed.onnx"
    onnx.save(smooth(onnx.load(path), activation_absmax(path, ["h", "qk"], feeds), 0.5), smoothed)
    errors = {}
    for name, source in (("plain", path), ("smoothed", smoothed)):
        q = tmp_path / f"{name}.int8.onnx"
        quantize_dynamic(source, q, op_types_to_quantize=["MatMul"], per_channel=True,
                         weight_type=QuantType.QInt8)  # fmt: skip
        want, got = run(str(path), feeds[0])[0], run(str(q), feeds[0])[0]
        errors[name] = float(np.abs(got - want).mean() / np.abs(want).mean())
    assert errors["smoothed"] < errors["plain"] / 2, errors


def test_partial_quantization_of_a_smoothed_graph_loads(tmp_path):
    """Regression: the scaling Mul used to be appended after its readers; ONNX Runtime's quantizer then
    defined the smoothed tensor twice when some of its readers were excluded."""
    from onnxruntime.quantization import QuantType, quantize_dynamic

    path, feeds = encoder_block(tmp_path)
    smoothed = tmp_path / "smoothed.onnx"
    onnx.save(smooth(onnx.load(path), activation_absmax(path, ["h", "qk"], feeds), 0.8), smoothed)
    q = tmp_path / "partial.onnx"
    quantize_dynamic(smoothed, q, op_types_to_quantize=["MatMul"], per_channel=True,
                     weight_type=QuantType.QInt8, nodes_to_exclude=["mm_k"])  # fmt: skip
    onnx.checker.check_model(str(q))
    assert all(np.isfinite(o).all() for o in run(str(q), feeds[0]))
