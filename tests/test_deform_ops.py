"""CDNet's deformable-offsets op (`ops.deform_sample`): the torch reference against a naive loop (1-D and
trilinear 3-D, zero padding, borders, padded clips), the plugin form against the standard form (values and
gradients), and both ONNX export forms (standard graph in ONNX Runtime; `xmr::DeformSample` in the
reference evaluator, on shapes other than the export example)."""

from __future__ import annotations

import itertools
import math

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from torch import nn

from xmr.export.iospec import ModelSpec, TensorSpec
from xmr.export.onnx_export import export_onnx
from xmr.models.ops.deform_sample import DeformSampler, deform_sample, deform_sample_reference
from xmr.models.ops.onnx_domain import DeformSample, reference_evaluator, register_schemas, xmr_nodes

torch.set_num_threads(1)

BORDER = [-1.5, -1.0, -0.5, -0.3, 0.0, 0.7, 1.0]  # plus T-1 + {-0.2, 0, 0.4, 1.0, 2.5}, added per T


def naive_1d(value, mask, positions, weights):
    """Explicit per (b, q, g, p) linear interpolation, zero outside [0, T-1] and on padded clips."""
    b_, q_, g_, p_ = positions.shape
    t_, c_ = value.shape[1], value.shape[-1]
    out = torch.zeros(b_, q_, g_, c_, dtype=value.dtype)
    for b, q, g, p in itertools.product(range(b_), range(q_), range(g_), range(p_)):
        pos = float(positions[b, q, g, p])
        t0 = math.floor(pos)
        for t, w in ((t0, 1 - (pos - t0)), (t0 + 1, pos - t0)):
            if 0 <= t < t_ and mask[b, t]:
                out[b, q, g] += weights[b, q, g, p] * w * value[b, t, g]
    return out


def naive_3d(value, mask, positions, weights):
    b_, q_, g_, p_, _ = positions.shape
    sizes, c_ = value.shape[1:4], value.shape[-1]
    out = torch.zeros(b_, q_, g_, c_, dtype=value.dtype)
    for b, q, g, p in itertools.product(range(b_), range(q_), range(g_), range(p_)):
        pos = [float(x) for x in positions[b, q, g, p]]
        lows = [math.floor(x) for x in pos]
        for corner in itertools.product((0, 1), repeat=3):
            idx = [lo + d for lo, d in zip(lows, corner, strict=True)]
            if not all(0 <= i < n for i, n in zip(idx, sizes, strict=True)) or not mask[b, idx[0]]:
                continue
            w = math.prod((x - lo) if d else 1 - (x - lo) for x, lo, d in zip(pos, lows, corner, strict=True))
            out[b, q, g] += weights[b, q, g, p] * w * value[b, idx[0], idx[1], idx[2], g]
    return out


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


@pytest.mark.parametrize("make, naive", [(make_1d, naive_1d), (make_3d, naive_3d)], ids=["1d", "3d"])
def test_deform_sample_matches_naive_loop(make, naive):
    value, mask, positions, weights = make()
    want = naive(value, mask, positions, weights)
    for form in ("standard", "plugin"):
        got = deform_sample(value, mask, positions, weights, form=form)
        assert got.shape == want.shape
        assert torch.allclose(got, want, atol=1e-12), form
    # padded clips are never read: changing them changes nothing
    noisy = value.clone()
    noisy[~mask] = 1e3
    assert torch.allclose(deform_sample(noisy, mask, positions, weights), want, atol=1e-12)
    # the numpy reference of the ONNX node agrees too
    got_np = DeformSample.__new__(DeformSample)._run(
        value.numpy(), mask.numpy(), positions.numpy(), weights.numpy()
    )[0]
    assert np.allclose(got_np, want.numpy(), atol=1e-12)


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


class TinyCDD(nn.Module):
    """Offsets and weights from the queries, then the op: a minimal CDD-shaped user of deform_sample."""

    def __init__(self, dim=8, groups=2, points=3, spatial=False):
        super().__init__()
        self.groups, self.points, self.spatial = groups, points, spatial
        n_axes = 3 if spatial else 1
        self.offsets = nn.Linear(dim, groups * points * n_axes)
        self.attn = nn.Linear(dim, groups * points)
        self.centre = nn.Linear(dim, 1)  # reference clip of each query, in [0, 1] of the video
        self.sampler = DeformSampler()

    def forward(self, context, clip_mask, queries):
        b, t = context.shape[:2]
        q = queries.shape[1]
        g, p = self.groups, self.points
        value = context.reshape(*context.shape[:-1], g, -1)  # (B, T[, H, W], G, C)
        ref = torch.sigmoid(self.centre(queries)).view(b, q, 1, 1) * (t - 1)
        offsets = self.offsets(queries).view(b, q, g, p, 3 if self.spatial else 1) * 2.0
        if self.spatial:
            h, w = context.shape[2], context.shape[3]
            centre = torch.stack(
                [
                    ref.expand(b, q, g, p),
                    ref.new_full((b, q, g, p), (h - 1) / 2),
                    ref.new_full((b, q, g, p), (w - 1) / 2),
                ],
                dim=-1,
            )
            positions = centre + offsets
        else:
            positions = ref + offsets[..., 0]
        weights = torch.softmax(self.attn(queries).view(b, q, g, p), dim=-1)
        return self.sampler(value, clip_mask, positions, weights).flatten(2)


def spec_for(spatial: bool, dim: int) -> ModelSpec:
    context = ("batch", "clips", 3, 4, dim) if spatial else ("batch", "clips", dim)
    return ModelSpec(
        "cdd",
        inputs=(
            TensorSpec("context", "float32", context),
            TensorSpec("clip_mask", "bool", ("batch", "clips")),
            TensorSpec("queries", "float32", ("batch", "queries", dim)),
        ),
        outputs=(TensorSpec("sampled", "float32", ("batch", "queries", dim)),),
    )


def example_inputs(spatial, dim, b, t, q, seed):
    gen = torch.Generator().manual_seed(seed)
    shape = (b, t, 3, 4, dim) if spatial else (b, t, dim)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[-1, t // 2 :] = False
    return torch.randn(*shape, generator=gen), mask, torch.randn(b, q, dim, generator=gen)


@pytest.mark.parametrize("spatial", [False, True], ids=["1d", "3d"])
def test_export_forms(spatial, tmp_path):
    torch.manual_seed(0)
    dim = 8
    module = TinyCDD(dim, spatial=spatial).eval()
    spec = spec_for(spatial, dim)
    example = example_inputs(spatial, dim, b=2, t=5, q=3, seed=0)
    paths = {form: tmp_path / f"{form}.onnx" for form in ("standard", "plugin")}
    for form, path in paths.items():
        export_onnx(module, example, spec, path, form)
    assert module.sampler.op_form == "standard"  # export_onnx restores the form

    context, mask, queries = example_inputs(spatial, dim, b=3, t=7, q=4, seed=1)  # not the export shapes
    with torch.no_grad():
        want = module(context, mask, queries).numpy()
    feeds = {"context": context.numpy(), "clip_mask": mask.numpy(), "queries": queries.numpy()}

    standard = onnx.load(paths["standard"])
    assert xmr_nodes(standard) == []
    got = ort.InferenceSession(str(paths["standard"]), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-5

    plugin = onnx.load(paths["plugin"])
    assert [n.op_type for n in xmr_nodes(plugin)] == ["DeformSample"]
    got = reference_evaluator(plugin).run(None, feeds)[0]
    assert got.shape == want.shape and np.abs(got - want).max() < 1e-5

    register_schemas()
    inferred = onnx.shape_inference.infer_shapes(plugin, strict_mode=True)
    node = xmr_nodes(inferred)[0]
    out = {v.name: v for v in inferred.graph.value_info}[node.output[0]].type.tensor_type
    assert out.elem_type == onnx.TensorProto.FLOAT
    dims = [d.dim_param or d.dim_value for d in out.shape.dim]
    assert len(dims) == 4 and dims[2:] == [2, dim // 2]  # (B, Q, G, C) with G, C known


def test_shape_inference_rejects_mismatched_ranks():
    register_schemas()
    f = onnx.TensorProto.FLOAT
    node = onnx.helper.make_node("DeformSample", ["v", "m", "p", "w"], ["o"], domain="xmr")
    graph = onnx.helper.make_graph(
        [node],
        "g",
        [
            onnx.helper.make_tensor_value_info("v", f, ["B", "T", 3, 4, 2, 5]),
            onnx.helper.make_tensor_value_info("m", onnx.TensorProto.BOOL, ["B", "T"]),
            onnx.helper.make_tensor_value_info("p", f, ["B", "Q", 2, 4]),
            onnx.helper.make_tensor_value_info("w", f, ["B", "Q", 2, 4]),
        ],
        [onnx.helper.make_tensor_value_info("o", f, None)],
    )
    model = onnx.helper.make_model(
        graph, opset_imports=[onnx.helper.make_opsetid("", 18), onnx.helper.make_opsetid("xmr", 1)]
    )
    with pytest.raises(Exception, match="DeformSample"):
        onnx.shape_inference.infer_shapes(model, strict_mode=True)
