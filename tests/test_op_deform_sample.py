"""CDNet's deformable-offsets op (`xmr.models.ops.deform_sample`).

`test_every_implementation_matches_the_reference` runs each implementation of the op (one parameter each:
a new implementation is one more entry of IMPLEMENTATIONS) on the shared CASES (1-D and trilinear 3-D,
borders, out-of-range positions, padded clips, a fully padded video) against the torch reference in float64.
The other tests check what is not value parity: the reference against naive loops and hand-computed
values, the plugin form's gradients, the two export forms' graphs, and the schema's shape inference.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import onnx
import pytest
import torch

from xmr.export.iospec import ModelSpec, TensorSpec
from xmr.export.onnx_export import export_onnx
from xmr.export.runners import runner_for
from xmr.export.trt_engine import run_tensorrt
from xmr.models.ops.deform_sample import DeformSampler, deform_sample, deform_sample_reference
from xmr.models.ops.deform_sample.numpy_ref import DeformSample
from xmr.models.ops.onnx_domain import register_schemas, xmr_nodes

torch.set_num_threads(1)

INPUTS = ("value", "mask", "positions", "weights")
BORDER = [-1.5, -1.0, -0.5, -0.3, 0.0, 0.7, 1.0]  # plus T-1 + {-0.2, 0, 0.4, 1.0, 2.5}, added per T


# ----------------------------------------------------------------------------- cases


def make_1d(b=2, t=6, q=3, g=2, p=4, c=5, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    value = torch.randn(b, t, g, c, generator=gen, dtype=dtype)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[-1, t - 2 :] = False  # the last video is 2 clips shorter (padded)
    positions = torch.rand(b, q, g, p, generator=gen, dtype=dtype) * (t + 3) - 2  # partly out of range
    border = torch.tensor(BORDER + [t - 1 + d for d in (-0.2, 0.0, 0.4, 1.0, 2.5)], dtype=dtype)
    flat = positions.reshape(-1)
    flat[: len(border)] = border  # exact borders, fractional just outside, fully outside
    weights = torch.softmax(torch.randn(b, q, g, p, generator=gen, dtype=dtype), dim=-1)
    return value, mask, positions, weights


def make_3d(b=2, t=4, h=3, w=5, q=3, g=2, p=4, c=3, seed=1, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    value = torch.randn(b, t, h, w, g, c, generator=gen, dtype=dtype)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[-1, t - 1 :] = False
    scale = torch.tensor([t + 2, h + 2, w + 2], dtype=dtype)
    positions = torch.rand(b, q, g, p, 3, generator=gen, dtype=dtype) * scale - 1.5
    corners = torch.tensor(
        [
            [-0.3, 0.0, 0.0],
            [0.0, -0.5, w - 1 + 0.4],
            [t - 1, h - 1, w - 1],
            [t - 1 + 0.4, 1.5, 2.25],
            [1.5, h - 1 + 0.7, -0.2],
            [-1.0, 1.0, 1.0],
            [2.0, h, 1.0],
            [t - 1, 0.5, w - 1],
        ],
        dtype=dtype,
    )
    positions.view(-1, 3)[: len(corners)] = corners
    weights = torch.softmax(torch.randn(b, q, g, p, generator=gen, dtype=dtype), dim=-1)
    return value, mask, positions, weights


def fully_padded(make):
    """The first video has no valid clip at all: every one of its queries reads zeros."""

    def case():
        value, mask, positions, weights = make(seed=2)
        mask[0] = False
        return value, mask, positions, weights

    return case


def out_of_range(make):
    """Every position a cell or more beyond a border, below or above at random: zero padding everywhere."""

    def case():
        value, mask, positions, weights = make(seed=3)
        sizes = torch.tensor(value.shape[1 : value.dim() - 2], dtype=positions.dtype)  # (T,) or (T, H, W)
        below = torch.rand(positions.shape, generator=torch.Generator().manual_seed(5)) < 0.5
        return value, mask, torch.where(below, -1.0 - positions.abs(), sizes + positions.abs()), weights

    return case


def single_clip():
    """T = 1, one group, one channel: the smallest shapes (the exports were traced on larger ones)."""
    value, mask, positions, weights = make_1d(t=1, g=1, c=1, p=2, seed=4)
    positions.view(-1)[:4] = torch.tensor([-0.5, 0.0, 0.25, 1.0], dtype=positions.dtype)
    return value, mask.fill_(True), positions, weights


CASES = {
    "1d": make_1d,
    "1d-fully-padded": fully_padded(make_1d),
    "1d-out-of-range": out_of_range(make_1d),
    "1d-single-clip": single_clip,
    "3d": make_3d,
    "3d-fully-padded": fully_padded(make_3d),
    "3d-out-of-range": out_of_range(make_3d),
}


# ----------------------------------------------------------------------------- the exported op


def op_spec(spatial: bool) -> ModelSpec:
    """The op alone as a graph, every dim dynamic but the (t, y, x) axis of 3-D positions."""
    grid, point = (("height", "width"), (3,)) if spatial else ((), ())
    return ModelSpec(
        "deform_sample",
        inputs=(
            TensorSpec("value", "float32", ("batch", "clips", *grid, "groups", "channels")),
            TensorSpec("mask", "bool", ("batch", "clips")),
            TensorSpec("positions", "float32", ("batch", "queries", "groups", "points", *point)),
            TensorSpec("weights", "float32", ("batch", "queries", "groups", "points")),
        ),
        outputs=(TensorSpec("out", "float32", ("batch", "queries", "groups", "channels")),),
    )


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """exported(spatial, form) -> path of DeformSampler's ONNX export (made once per module)."""
    root, paths = tmp_path_factory.mktemp("deform_sample"), {}

    def path(spatial: bool, form: str):
        key = (spatial, form)
        if key not in paths:
            # traced on sizes > 1, all different, so that no dim is specialised
            sizes = {"b": 2, "t": 5, "q": 6, "g": 4, "p": 8, "c": 9}
            example = make_3d(h=10, w=7, **sizes) if spatial else make_1d(**sizes)
            example = tuple(x.float() if x.is_floating_point() else x for x in example)
            paths[key] = root / f"{'3d' if spatial else '1d'}-{form}.onnx"
            export_onnx(DeformSampler(), example, op_spec(spatial), paths[key], form)
        return paths[key]

    return path


# ----------------------------------------------------------------------------- implementations


def feeds(inputs) -> dict[str, np.ndarray]:
    """float32 numpy feeds, by input name (what the exported graphs take)."""
    return {
        n: (x.float() if x.is_floating_point() else x).numpy() for n, x in zip(INPUTS, inputs, strict=True)
    }


def torch_reference(inputs, exported):
    """The torch reference in float32, through the layer (the precision the models run at)."""
    return DeformSampler()(*(x.float() if x.is_floating_point() else x for x in inputs)).numpy()


def torch_custom_op(inputs, exported):
    return torch.ops.xmr.deform_sample(*inputs).numpy()


def onnxruntime_standard(inputs, exported):
    spatial = inputs[0].dim() == 6
    path = exported(spatial, "standard")
    assert xmr_nodes(onnx.load(path)) == []
    return runner_for(path, op_spec(spatial), "standard").run(feeds(inputs))["out"]


def reference_evaluator_plugin(inputs, exported):
    spatial = inputs[0].dim() == 6
    path = exported(spatial, "plugin")
    assert [n.op_type for n in xmr_nodes(onnx.load(path))] == ["DeformSample"]
    return runner_for(path, op_spec(spatial), "plugin").run(feeds(inputs))["out"]


def numpy_op(inputs, exported):
    return DeformSample.__new__(DeformSample)._run(*(x.numpy() for x in inputs))[0]


def cuda_custom_op(inputs, exported):
    """The custom op on CUDA tensors: its CUDA kernel, the Triton kernels (the reference without triton)."""
    on_device = (x.float().cuda() if x.is_floating_point() else x.cuda() for x in inputs)
    return torch.ops.xmr.deform_sample(*on_device).cpu().numpy()


def tensorrt_standard(inputs, exported):
    return run_tensorrt(exported(inputs[0].dim() == 6, "standard"), feeds(inputs))["out"]


def triton_interpreter(inputs, exported):
    """The Triton kernels in float32, on the CPU under TRITON_INTERPRET=1 (conftest sets it without a GPU)."""
    from xmr.models.ops.deform_sample.triton import deform_sample_triton

    return deform_sample_triton(*(x.float() if x.is_floating_point() else x for x in inputs)).numpy()


IMPLEMENTATIONS = [  # (run(inputs in float64, exported) -> numpy, atol against the float64 reference)
    pytest.param(torch_reference, 1e-5, id="torch-reference"),
    pytest.param(torch_custom_op, 1e-12, id="torch-custom-op"),
    pytest.param(onnxruntime_standard, 1e-5, id="onnxruntime-standard"),
    pytest.param(reference_evaluator_plugin, 1e-5, id="onnx-reference-plugin"),
    pytest.param(numpy_op, 1e-12, id="numpy-op"),
    pytest.param(cuda_custom_op, 1e-5, id="cuda", marks=pytest.mark.gpu),
    pytest.param(tensorrt_standard, 1e-5, id="tensorrt-standard", marks=pytest.mark.tensorrt),
    pytest.param(triton_interpreter, 1e-5, id="triton-interpreter", marks=pytest.mark.triton_interpreter),
]


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("run, atol", IMPLEMENTATIONS)
def test_every_implementation_matches_the_reference(run, atol, case, exported):
    inputs = CASES[case]()
    want = deform_sample_reference(*inputs).numpy()
    got = run(inputs, exported)
    assert got.shape == want.shape
    assert np.abs(got.astype(np.float64) - want).max() <= atol


# ----------------------------------------------------------------------------- the reference itself


def naive(value, mask, positions, weights):
    """Explicit per (b, q, g, p) interpolation over the 2 (1-D) or 8 (3-D) corners, zero outside the
    grid and on padded clips."""
    spatial = value.dim() == 6
    b_, q_, g_, p_ = weights.shape
    sizes, c_ = value.shape[1 : 4 if spatial else 2], value.shape[-1]
    out = torch.zeros(b_, q_, g_, c_, dtype=value.dtype)
    for b, q, g, p in itertools.product(range(b_), range(q_), range(g_), range(p_)):
        pos = [float(x) for x in positions[b, q, g, p].reshape(-1)]
        lows = [math.floor(x) for x in pos]
        for corner in itertools.product((0, 1), repeat=len(pos)):
            idx = [lo + d for lo, d in zip(lows, corner, strict=True)]
            if not all(0 <= i < n for i, n in zip(idx, sizes, strict=True)) or not mask[b, idx[0]]:
                continue
            w = math.prod((x - lo) if d else 1 - (x - lo) for x, lo, d in zip(pos, lows, corner, strict=True))
            out[b, q, g] += weights[b, q, g, p] * w * value[(b, *idx, g)]
    return out


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_naive_loop(case):
    value, mask, positions, weights = CASES[case]()
    want = naive(value, mask, positions, weights)
    got = deform_sample(value, mask, positions, weights)
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-12)
    # padded clips are never read: changing them changes nothing
    noisy = value.clone()
    noisy[~mask] = 1e3
    assert torch.allclose(deform_sample(noisy, mask, positions, weights), want, atol=1e-12)


def test_borders_and_zero_padding_1d():
    t = 4
    value = torch.arange(1.0, t + 1, dtype=torch.float64).view(1, t, 1, 1)  # clip i holds i + 1
    mask = torch.ones(1, t, dtype=torch.bool)
    pos = torch.tensor([-1.0, -0.5, -0.3, 0.0, 1.25, t - 1, t - 1 + 0.4, t, 7.0], dtype=torch.float64)
    want = torch.tensor([0.0, 0.5, 0.7, 1.0, 2.25, 4.0, 0.6 * 4, 0.0, 0.0], dtype=torch.float64)
    got = deform_sample(
        value, mask, pos.view(1, -1, 1, 1), torch.ones(1, len(pos), 1, 1, dtype=torch.float64)
    )
    assert torch.allclose(got.view(-1), want)
    mask[0, 0] = False  # a padded first clip reads as zero
    got = deform_sample(
        value, mask, pos.view(1, -1, 1, 1), torch.ones(1, len(pos), 1, 1, dtype=torch.float64)
    )
    assert torch.allclose(got.view(-1)[:5], torch.tensor([0.0, 0.0, 0.0, 0.0, 2.25], dtype=torch.float64))


@pytest.mark.parametrize("make", [make_1d, make_3d], ids=["1d", "3d"])
def test_plugin_op_has_the_reference_gradients(make):
    value, mask, positions, weights = make()
    positions = positions + 0.01  # keep away from exact integer positions (kinks of the interpolation)
    grads = []
    for fn in (deform_sample_reference, torch.ops.xmr.deform_sample):
        inputs = [x.clone().requires_grad_(True) for x in (value, positions, weights)]
        fn(inputs[0], mask, inputs[1], inputs[2]).pow(2).sum().backward()
        grads.append([x.grad for x in inputs])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b)
    assert grads[0][1].abs().sum() > 0  # positions do receive a gradient
    inputs = [x.clone().requires_grad_(True) for x in (value, positions, weights)]
    assert torch.autograd.gradcheck(
        lambda v, p, w: torch.ops.xmr.deform_sample(v, mask, p, w), inputs, atol=1e-6
    )


# ----------------------------------------------------------------------------- graphs and schema


@pytest.mark.parametrize("spatial", [False, True], ids=["1d", "3d"])
def test_export_forms_and_schema_shape_inference(spatial, exported):
    assert xmr_nodes(onnx.load(exported(spatial, "standard"))) == []
    plugin = onnx.load(exported(spatial, "plugin"))
    assert [n.op_type for n in xmr_nodes(plugin)] == ["DeformSample"]
    assert xmr_nodes(plugin)[0].output[0] == plugin.graph.output[0].name
    declared = plugin.graph.output[0].type.tensor_type
    declared.ClearField("shape")  # so that the type and shape below come from the schema's inference
    declared.elem_type = onnx.TensorProto.UNDEFINED
    register_schemas()
    out = onnx.shape_inference.infer_shapes(plugin, strict_mode=True).graph.output[0].type.tensor_type
    assert out.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in out.shape.dim] == ["batch", "queries", "groups", "channels"]


def deform_node_model(value_shape, positions_shape) -> onnx.ModelProto:
    f = onnx.TensorProto.FLOAT
    node = onnx.helper.make_node("DeformSample", ["v", "m", "p", "w"], ["o"], domain="xmr")
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [
            onnx.helper.make_tensor_value_info("v", f, value_shape),
            onnx.helper.make_tensor_value_info("m", onnx.TensorProto.BOOL, ["B", "T"]),
            onnx.helper.make_tensor_value_info("p", f, positions_shape),
            onnx.helper.make_tensor_value_info("w", f, positions_shape[:4]),
        ],
        [onnx.helper.make_tensor_value_info("o", f, None)],
    )
    return onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", 18), onnx.helper.make_opsetid("xmr", 1)]
    )


@pytest.mark.parametrize(
    "value_shape, positions_shape",
    [(["B", "T", 2, 5], ["B", "Q", 2, 4]), (["B", "T", 3, 4, 2, 5], ["B", "Q", 2, 4, 3])],
    ids=["1d", "3d"],
)
def test_shape_inference_gives_b_q_g_c(value_shape, positions_shape):
    register_schemas()
    inferred = onnx.shape_inference.infer_shapes(deform_node_model(value_shape, positions_shape), True)
    out = inferred.graph.output[0].type.tensor_type
    assert [d.dim_param or d.dim_value for d in out.shape.dim] == ["B", "Q", 2, 5]


def test_shape_inference_rejects_mismatched_ranks():
    register_schemas()
    model = deform_node_model(["B", "T", 3, 4, 2, 5], ["B", "Q", 2, 4])
    with pytest.raises(Exception, match="DeformSample"):
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
