"""The CPU INT8 form's per-token products (`xmr.export.ort_int8`) against numpy's per-token arithmetic.

The fusions (`fuse_for_ort`) are tested on the real MiniLM graph in tests/test_minilm_tower.py.
"""

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto, helper, numpy_helper

from xmr.export.ort_int8 import (
    QMAX,
    ZERO_POINT,
    fuse_for_ort,
    gptq_round,
    int8_matmuls,
    outlier_channels,
    per_token_int8,
)

RNG = np.random.default_rng(0)
W1 = RNG.standard_normal((8, 6)).astype(np.float32)  # MatMul weight (K, N)
B1 = RNG.standard_normal(6).astype(np.float32)
W2 = RNG.standard_normal((5, 8)).astype(np.float32)  # Gemm B, transposed: (N, K)
C2 = RNG.standard_normal(5).astype(np.float32)
ALPHA, BETA = 0.5, 2.0


def graph() -> onnx.ModelProto:
    """x (B, T, 8) -> MatMul W1 -> + B1 -> y;  z (B, 8) -> Gemm(z, W2', alpha, beta * C2) -> g;
    x -> MatMul(x, x') -> a (an activation product: not converted)."""
    nodes = [
        helper.make_node("MatMul", ["x", "W1"], ["xw"], name="mm"),
        helper.make_node("Add", ["xw", "B1"], ["y"], name="bias"),
        helper.make_node("Gemm", ["z", "W2", "C2"], ["g"], name="gemm", transB=1, alpha=ALPHA, beta=BETA),
        helper.make_node("Transpose", ["x"], ["xt"], perm=[0, 2, 1]),
        helper.make_node("MatMul", ["x", "xt"], ["a"], name="activations"),
    ]
    inits = [numpy_helper.from_array(v, k) for k, v in (("W1", W1), ("B1", B1), ("W2", W2), ("C2", C2))]
    g = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", "t", 8]),
         helper.make_tensor_value_info("z", TensorProto.FLOAT, ["b", 8])],
        [helper.make_tensor_value_info(n, TensorProto.FLOAT, shape)
         for n, shape in (("y", ["b", "t", 6]), ("g", ["b", 5]), ("a", ["b", "t", "t"]))],  # fmt: skip
        inits,
    )  # fmt: skip
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def run(model: onnx.ModelProto, x: np.ndarray, z: np.ndarray) -> dict[str, np.ndarray]:
    session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
    return dict(zip(("y", "g", "a"), session.run(["y", "g", "a"], {"x": x, "z": z}), strict=True))


def per_token(x: np.ndarray, w: np.ndarray) -> np.ndarray:
    """numpy's per-token INT8 product: rows of x (last axis K) scaled by their own absmax, w per column."""
    rows = x.reshape(-1, x.shape[-1]).astype(np.float64)
    s = np.maximum(np.abs(rows).max(axis=1, keepdims=True) / QMAX, 1e-12)
    q = np.clip(np.round(rows / s) + ZERO_POINT, 0, 255) - ZERO_POINT  # QuantizeLinear: UINT8 around 128
    ws = np.abs(w).max(axis=0) / QMAX
    wq = np.clip(np.round(w / ws), -QMAX, QMAX)
    return ((q @ wq) * s * ws).reshape(*x.shape[:-1], w.shape[1])


def inputs(b=3, t=4):
    return RNG.standard_normal((b, t, 8)).astype(np.float32), RNG.standard_normal((b, 8)).astype(np.float32)


def test_the_products_are_numpys_per_token_arithmetic():
    x, z = inputs()
    x[1, 2] *= 50  # one outlier token: only its own row's scale grows
    got = run(per_token_int8(graph()), x, z)
    np.testing.assert_allclose(got["y"], per_token(x, W1) + B1, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["g"], per_token(z, ALPHA * W2.T) + BETA * C2, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(got["a"], x @ x.transpose(0, 2, 1), rtol=1e-5)  # activation x activation: FP32
    exact = run(graph(), x, z)
    assert 0 < np.abs(got["y"] - exact["y"]).max() < 0.05 * np.abs(exact["y"]).max()


def test_a_row_does_not_depend_on_the_others():
    x, z = inputs()
    before = run(per_token_int8(graph()), x, z)
    x[0] *= 1000
    z[0] *= 1000
    after = run(per_token_int8(graph()), x, z)
    for name in ("y", "g"):
        np.testing.assert_array_equal(after[name][1:], before[name][1:])


def test_standard_op_form_gives_the_same_numbers_without_contrib_ops():
    x, z = inputs()
    model = per_token_int8(graph(), contrib=False)
    assert all(n.domain in ("", "ai.onnx") for n in model.graph.node)
    assert {o.domain for o in model.opset_import} <= {"", "ai.onnx"}
    onnx.checker.check_model(model, full_check=True)
    from onnx.reference import ReferenceEvaluator  # what runs the plugin-form graphs

    want = run(per_token_int8(graph()), x, z)
    reference = dict(zip(("y", "g", "a"), ReferenceEvaluator(model).run(None, {"x": x, "z": z}), strict=True))
    for got in (run(model, x, z), reference):
        for name in want:
            np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)


def test_outlier_channels_are_multiplied_in_fp32_and_leave_the_scales_to_the_rest():
    x, z = inputs()
    x[..., 5] *= 40  # one channel far larger than the others, in every token (a LayerNorm outlier)
    absmax = {"x": np.abs(x).max(axis=(0, 1)), "z": np.abs(z).max(axis=0)}
    chosen = outlier_channels(absmax, 1)
    assert chosen["x"].tolist() == [5] and outlier_channels(absmax, 0) == {}
    plain, split = run(per_token_int8(graph()), x, z), run(per_token_int8(graph(), outliers=chosen), x, z)
    inliers = x.copy()
    inliers[..., 5] = 0
    w_rest = W1.copy()
    w_rest[5] = 0  # the outlier's weight row no longer widens its columns' scales
    want = per_token(inliers, w_rest) + x[..., 5:6] * W1[5] + B1  # INT8 for the rest + the FP32 channel
    np.testing.assert_allclose(split["y"], want, rtol=1e-5, atol=1e-5)
    exact = x @ W1 + B1
    assert np.abs(split["y"] - exact).max() < np.abs(plain["y"] - exact).max() / 5


def test_excluded_nodes_stay_fp32_and_only_weight_products_are_candidates():
    assert [n.name for n in int8_matmuls(graph())] == ["mm", "gemm"]
    model = per_token_int8(graph(), exclude={"mm"})
    ops = {n.name: n.op_type for n in model.graph.node if n.name}
    assert ops["mm"] == "MatMul" and ops["gemm"] == "MatMulIntegerToFloat"
    x, z = inputs()
    np.testing.assert_allclose(run(model, x, z)["y"], x @ W1 + B1, rtol=1e-5, atol=1e-5)
    assert per_token_int8(graph(), exclude={"mm", "gemm"}).SerializeToString() == graph().SerializeToString()


def test_a_graph_without_attention_is_not_rewritten(tmp_path):
    onnx.save(graph(), tmp_path / "g.onnx")
    assert fuse_for_ort(tmp_path / "g.onnx", tmp_path / "fused.onnx") == {}
    assert onnx.load(tmp_path / "fused.onnx").SerializeToString() == graph().SerializeToString()


@pytest.mark.parametrize("contrib", [True, False])
def test_converted_graph_passes_the_checker(contrib):
    from xmr.models.ops.onnx_domain import register_schemas

    register_schemas()
    model = per_token_int8(graph(), contrib=contrib)
    onnx.checker.check_model(model, full_check=True)


def test_gptq_rounds_to_the_same_grid_and_moves_the_product_less():
    rng = np.random.default_rng(3)
    mix = rng.standard_normal((16, 16))
    x = rng.standard_normal((512, 16)) @ mix  # correlated inputs: where GPTQ's compensation pays
    w = rng.standard_normal((16, 8)).astype(np.float32)
    scale = np.abs(w).max(axis=0) / QMAX
    nearest = np.clip(np.round(w / scale), -QMAX, QMAX) * scale
    rounded = gptq_round(w, x.T @ x)
    steps = rounded / scale
    np.testing.assert_allclose(steps, np.round(steps), atol=1e-3)  # on the per-column INT8 grid
    assert np.abs(steps).max() <= QMAX + 1e-3
    assert np.linalg.norm(x @ (rounded - w)) < 0.8 * np.linalg.norm(x @ (nearest - w))
    # uncorrelated inputs: nothing to compensate, so GPTQ rounds to nearest
    np.testing.assert_allclose(gptq_round(w, np.eye(16) * 512), nearest, atol=1e-6)


def test_rounded_weights_replace_the_nearest_rounding():
    x, z = inputs()
    scale = np.abs(W1).max(axis=0) / QMAX
    shifted = (np.clip(np.round(W1 / scale), -QMAX, QMAX) + 1 * (np.arange(8)[:, None] == 0)) * scale
    got = run(per_token_int8(graph(), rounded={"mm": shifted.astype(np.float32)}), x, z)
    plain = run(per_token_int8(graph()), x, z)
    # row 0 of the weight moved one step: the product moves by x[..., 0] * scale (x[..., 0] as quantized,
    # within half a step of its token's scale), nothing else
    step = np.abs(x).max(axis=-1, keepdims=True) / QMAX
    assert np.all(np.abs(got["y"] - plain["y"] - x[..., :1] * scale) <= 0.51 * step * scale + 1e-6)
    np.testing.assert_array_equal(got["g"], plain["g"])
