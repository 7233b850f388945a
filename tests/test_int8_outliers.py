"""The first-token split of `python -m xmr.perf.int8_outliers`: the same function in FP32, and after
dynamic INT8 the first token's rows come from an FP32 MatMul (exact), the rest from the quantized one; and
per-token INT8 against dynamic INT8 on an outlier token."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
from onnx import TensorProto, helper, numpy_helper

from xmr.export.ort_int8 import per_token_int8
from xmr.perf.int8_outliers import quantize, split_first_token, token_matmuls


def two_matmuls(c: int = 16) -> onnx.ModelProto:
    """x -> MatMul -> + bias -> Relu -> MatMul -> y, x of shape (batch, tokens, c)."""
    rng = np.random.default_rng(0)
    w1, w2 = (
        numpy_helper.from_array(rng.standard_normal((c, c)).astype(np.float32), n) for n in ("w1", "w2")
    )
    b1 = numpy_helper.from_array(rng.standard_normal(c).astype(np.float32), "b1")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["x", "w1"], ["h0"], name="mm1"),
            helper.make_node("Add", ["h0", "b1"], ["h"], name="bias1"),
            helper.make_node("Relu", ["h"], ["r"], name="relu"),
            helper.make_node("MatMul", ["r", "w2"], ["y"], name="mm2"),
        ],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", c])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", "t", c])],
        [w1, w2, b1],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    return onnx.shape_inference.infer_shapes(model)


def run(model_or_path, x):
    source = (
        model_or_path.SerializeToString()
        if isinstance(model_or_path, onnx.ModelProto)
        else str(model_or_path)
    )
    return ort.InferenceSession(source, providers=["CPUExecutionProvider"]).run(None, {"x": x})[0]


def test_split_is_exact_in_fp32_and_keeps_the_first_token_fp32_after_int8(tmp_path):
    model = two_matmuls()
    assert [n.name for n in token_matmuls(model)] == ["mm1", "mm2"]
    split, kept = split_first_token(model)
    assert kept == ["mm1/first", "mm2/first"]
    x = np.random.default_rng(1).standard_normal((3, 5, 16)).astype(np.float32)
    x[:, 0] *= 50  # an outlier first token, as MiniLM's [CLS]
    np.testing.assert_allclose(run(split, x), run(model, x), rtol=1e-5, atol=1e-4)

    onnx.save(model, tmp_path / "plain.onnx")
    onnx.save(split, tmp_path / "split.onnx")
    plain8 = run(quantize(tmp_path / "plain.onnx", tmp_path / "plain8.onnx", []), x)
    split8 = run(quantize(tmp_path / "split.onnx", tmp_path / "split8.onnx", kept), x)
    want = run(model, x)
    # the rest's scale no longer covers the outlier: the other tokens come out far closer
    rest = lambda y: np.abs(y[:, 1:] - want[:, 1:]).mean()  # noqa: E731
    assert rest(split8) < rest(plain8) / 5
    np.testing.assert_allclose(split8[:, 0], want[:, 0], rtol=1e-4, atol=1e-2)


def test_per_token_int8_is_close_to_fp32_and_independent_of_the_batch(tmp_path):
    model = two_matmuls()
    rng = np.random.default_rng(2)
    x = rng.standard_normal((3, 5, 16)).astype(np.float32)
    x[:, 0] *= 50  # an outlier first token, as MiniLM's [CLS]
    want = run(model, x)
    per_token = per_token_int8(model)
    assert [n.op_type for n in per_token.graph.node].count("MatMulIntegerToFloat") == 2
    got = run(per_token, x)
    onnx.save(model, tmp_path / "plain.onnx")
    plain8 = run(quantize(tmp_path / "plain.onnx", tmp_path / "plain8.onnx", []), x)
    err = lambda y: np.abs(y[:, 1:] - want[:, 1:]).mean() / np.abs(want[:, 1:]).mean()  # noqa: E731
    assert err(got) < 0.02 and err(got) < err(plain8) / 5  # each token at its own scale
    # a row's result does not depend on its batch-mates: the same sequence alone gives the same numbers
    np.testing.assert_allclose(run(per_token, x[1:2]), got[1:2], rtol=0, atol=1e-5)
    louder = x.copy()
    louder[0] *= 10  # another sequence of the batch gets larger
    np.testing.assert_allclose(run(per_token, louder)[1:], got[1:], rtol=0, atol=1e-5)
    assert (
        np.abs(
            run(quantize(tmp_path / "plain.onnx", tmp_path / "p8.onnx", []), louder)[1:] - plain8[1:]
        ).max()
        > 1e-2
    )
