"""ViSERN's graph-reasoning op (`xmr.models.ops.random_walk_gcn`).

`test_every_implementation_matches_the_reference` runs each implementation of the op (one parameter each:
a new implementation is one more entry of IMPLEMENTATIONS) on the shared CASES (padded regions, a frame
with one real region, a fully padded frame, large scores), with both affinities, against the torch reference
in float64. The other tests check what is not value parity: the reference against a naive loop, the
transition matrix, the plugin form's gradients, the two export forms' graphs, the schema's shape
inference, and a clean process exit once the `xmr` schemas are registered.
"""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest
import torch
from torch import nn

from xmr.export.iospec import ModelSpec, TensorSpec
from xmr.export.onnx_export import export_onnx
from xmr.export.runners import runner_for
from xmr.export.trt_engine import run_tensorrt
from xmr.models.ops.onnx_domain import register_schemas, xmr_nodes
from xmr.models.ops.random_walk_gcn import (
    AFFINITIES,
    random_walk_gcn,
    random_walk_gcn_reference,
    transition_matrix,
)
from xmr.models.ops.random_walk_gcn.numpy_ref import RandomWalkGCN
from xmr.models.ops.random_walk_gcn.reference import random_walk_gcn_sdpa

torch.set_num_threads(1)

INPUTS = ("phi", "psi", "g", "mask")
EPS = 1e-6


# ----------------------------------------------------------------------------- cases


def random_graph(seed=0, n=3, k=6, c=8, scale=1.0):
    gen = torch.Generator().manual_seed(seed)
    phi, psi, g = (torch.randn(n, k, c, generator=gen, dtype=torch.float64) * scale for _ in range(3))
    mask = torch.ones(n, k, dtype=torch.bool)
    mask[0, 4:] = False  # padded regions
    mask[2, 1:] = False  # one real region only
    return phi, psi, g, mask


def fully_padded():
    """A frame with no real region (a padded frame): its rows are zero, whatever the affinity."""
    phi, psi, g, mask = random_graph(seed=1, n=4)
    mask[1] = False
    return phi, psi, g, mask


def no_padding():
    phi, psi, g, mask = random_graph(seed=2, n=3, k=5, c=3)
    return phi, psi, g, mask.fill_(True)


CASES = {
    "padded": random_graph,
    "fully-padded-frame": fully_padded,
    "no-padding": no_padding,
    "large-scores": lambda: random_graph(seed=3, scale=4.0),  # softmax saturates, relu zeroes most
}


# ----------------------------------------------------------------------------- the exported op


class RandomWalkGCNOp(nn.Module):
    """The op alone (no projections), with a fixed affinity, as a module to export."""

    def __init__(self, affinity: str):
        super().__init__()
        self.affinity = affinity
        self.op_form = "standard"  # set by use_op_form (export_onnx)

    def forward(self, phi, psi, g, mask):
        return random_walk_gcn(phi, psi, g, mask, self.affinity, EPS, form=self.op_form)


SPEC = ModelSpec(
    "random_walk_gcn",
    inputs=(
        *(TensorSpec(name, "float32", ("frames", "regions", "channels")) for name in INPUTS[:3]),
        TensorSpec("mask", "bool", ("frames", "regions")),
    ),
    outputs=(TensorSpec("out", "float32", ("frames", "regions", "channels")),),
)


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """exported(affinity, form, channels) -> path of the op's ONNX export (made once per module).

    The standard form fixes the channel count C: the reference's scale 1 / sqrt(C) specialises it at export
    (the models' C is their fixed width); frames N and regions K stay dynamic.
    """
    root, paths = tmp_path_factory.mktemp("random_walk_gcn"), {}

    def path(affinity: str, form: str, channels: int):
        key = (affinity, form, channels)
        if key not in paths:
            example = random_graph(n=3, k=5, c=channels)  # N, K > 1 and different: neither is specialised
            example = tuple(x.float() if x.is_floating_point() else x for x in example)
            paths[key] = root / f"{affinity}-{form}-{channels}.onnx"
            export_onnx(RandomWalkGCNOp(affinity), example, SPEC, paths[key], form)
        return paths[key]

    return path


# ----------------------------------------------------------------------------- implementations


def feeds(inputs) -> dict[str, np.ndarray]:
    """float32 numpy feeds, by input name (what the exported graphs take)."""
    return {
        name: (x.float() if x.is_floating_point() else x).numpy()
        for name, x in zip(INPUTS, inputs, strict=True)
    }


def torch_reference(inputs, affinity, exported):
    """The torch reference in float32, through the layer's dispatch (the precision the models run at)."""
    return RandomWalkGCNOp(affinity)(*(x.float() if x.is_floating_point() else x for x in inputs)).numpy()


def torch_custom_op(inputs, affinity, exported):
    return torch.ops.xmr.random_walk_gcn(*inputs, affinity, EPS).numpy()


def onnxruntime_standard(inputs, affinity, exported):
    path = exported(affinity, "standard", inputs[0].shape[-1])
    assert xmr_nodes(onnx.load(path)) == []
    return runner_for(path, SPEC, "standard").run(feeds(inputs))["out"]


def reference_evaluator_plugin(inputs, affinity, exported):
    path = exported(affinity, "plugin", inputs[0].shape[-1])
    assert [n.op_type for n in xmr_nodes(onnx.load(path))] == ["RandomWalkGCN"]
    return runner_for(path, SPEC, "plugin").run(feeds(inputs))["out"]


def numpy_op(inputs, affinity, exported):
    return RandomWalkGCN.__new__(RandomWalkGCN)._run(*(x.numpy() for x in inputs), affinity, EPS)[0]


def cuda_custom_op(inputs, affinity, exported):
    """The custom op on CUDA tensors: its CUDA kernel, the Triton kernel (or the reference without triton)."""
    on_device = (x.float().cuda() if x.is_floating_point() else x.cuda() for x in inputs)
    return torch.ops.xmr.random_walk_gcn(*on_device, affinity, EPS).cpu().numpy()


def tensorrt_standard(inputs, affinity, exported):
    return run_tensorrt(exported(affinity, "standard", inputs[0].shape[-1]), feeds(inputs))["out"]


def triton_interpreter(inputs, affinity, exported):
    """The Triton kernel in float32, on the CPU under TRITON_INTERPRET=1 (conftest sets it without a GPU)."""
    from xmr.models.ops.random_walk_gcn.triton import random_walk_gcn_triton

    as_float = (x.float() if x.is_floating_point() else x for x in inputs)
    return random_walk_gcn_triton(*as_float, affinity, EPS).numpy()


IMPLEMENTATIONS = [  # (run(inputs in float64, affinity, exported) -> numpy, atol against the reference)
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
@pytest.mark.parametrize("affinity", AFFINITIES)
@pytest.mark.parametrize("run, atol", IMPLEMENTATIONS)
def test_every_implementation_matches_the_reference(run, atol, affinity, case, exported):
    inputs = CASES[case]()
    want = random_walk_gcn_reference(*inputs, affinity, EPS).numpy()
    got = run(inputs, affinity, exported)
    assert got.shape == want.shape
    assert np.abs(got.astype(np.float64) - want).max() <= atol


# ----------------------------------------------------------------------------- the reference itself


def naive_random_walk(phi, psi, g, mask, affinity="softmax", eps=EPS):
    """Frame by frame, region by region, over the valid regions only."""
    out = torch.zeros_like(g)
    for n in range(g.shape[0]):
        valid = [k for k in range(g.shape[1]) if mask[n, k]]
        for i in valid:
            scores = torch.stack([phi[n, i] @ psi[n, j] / phi.shape[-1] ** 0.5 for j in valid])
            w = torch.exp(scores) if affinity == "softmax" else torch.relu(scores) + eps
            p = w / w.sum()
            out[n, i] = sum(p[a] * g[n, j] for a, j in enumerate(valid))
    return out


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("affinity", AFFINITIES)
def test_reference_matches_naive_loop_with_padding(affinity, case):
    phi, psi, g, mask = CASES[case]()
    want = naive_random_walk(phi, psi, g, mask, affinity)
    got = random_walk_gcn(phi, psi, g, mask, affinity)
    assert torch.allclose(got, want, atol=1e-10)
    assert (got[~mask] == 0).all()  # padded regions produce nothing


def test_transition_matrix_is_row_stochastic_over_valid_regions():
    phi, psi, _, mask = random_graph(1)
    for affinity in AFFINITIES:
        p = transition_matrix(phi, psi, mask, affinity)
        assert torch.allclose(p.sum(-1), torch.ones_like(p[..., 0]))
        assert (p >= 0).all() and (p[0, :, 4:] == 0).all()


@pytest.mark.parametrize("affinity", AFFINITIES)
def test_plugin_op_has_the_reference_gradients(affinity):
    phi, psi, g, mask = random_graph(2)
    grads = []
    for fn in (random_walk_gcn_reference, torch.ops.xmr.random_walk_gcn):
        inputs = [t.clone().requires_grad_(True) for t in (phi, psi, g)]
        fn(*inputs, mask, affinity, EPS).pow(2).sum().backward()
        grads.append([t.grad for t in inputs])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b)


HALF_TOLERANCE = {torch.float16: 2e-3, torch.bfloat16: 2e-2}  # x the output's scale; a few ulps of each


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("affinity", AFFINITIES)
@pytest.mark.parametrize("dtype", HALF_TOLERANCE, ids=["float16", "bfloat16"])
def test_reference_and_custom_op_run_in_half_precision(dtype, affinity, case):
    """No "cannot be converted to type c10::Half without overflow" (the old -1e9 fill), no inf / NaN, and
    the float32 result of the same (rounded) inputs within the dtype's precision."""
    phi, psi, g, mask = (x.to(dtype) if x.is_floating_point() else x for x in CASES[case]())
    want = random_walk_gcn_reference(phi.float(), psi.float(), g.float(), mask, affinity, EPS)
    for fn in (random_walk_gcn_reference, torch.ops.xmr.random_walk_gcn):
        got = fn(phi, psi, g, mask, affinity, EPS)
        assert got.dtype == dtype and torch.isfinite(got).all()
        assert (got[~mask] == 0).all()
        scale = max(1.0, want.abs().max().item())
        assert (got.float() - want).abs().max().item() <= HALF_TOLERANCE[dtype] * scale
    p = transition_matrix(phi, psi, mask, affinity)
    assert torch.isfinite(p).all()


@pytest.mark.parametrize("case", CASES)
def test_softmax_affinity_is_masked_scaled_dot_product_attention(case):
    """softmax(phi psi^T / sqrt(C), valid columns) g is SDPA with the column mask, on every valid row."""
    phi, psi, g, mask = (x.float() if x.is_floating_point() else x for x in CASES[case]())
    want = random_walk_gcn_reference(phi, psi, g, mask, "softmax", EPS)
    sdpa = torch.nn.functional.scaled_dot_product_attention(phi, psi, g, attn_mask=mask.unsqueeze(1))
    assert torch.allclose(sdpa[mask], want[mask], atol=1e-5)
    assert torch.allclose(random_walk_gcn_sdpa(phi, psi, g, mask), want, atol=1e-5)  # padded rows too
    assert torch.allclose(torch.ops.xmr.random_walk_gcn(phi, psi, g, mask, "softmax", EPS), want, atol=1e-5)


# ----------------------------------------------------------------------------- graphs and schema


@pytest.mark.parametrize("affinity", AFFINITIES)
def test_export_forms_and_schema_shape_inference(affinity, exported):
    assert xmr_nodes(onnx.load(exported(affinity, "standard", 8))) == []
    plugin = onnx.load(exported(affinity, "plugin", 8))
    (node,) = xmr_nodes(plugin)
    attributes = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    assert node.op_type == "RandomWalkGCN" and attributes["affinity"] == affinity.encode()
    assert attributes["eps"] == np.float32(EPS)  # an ONNX float attribute is a float32
    assert node.output[0] == plugin.graph.output[0].name
    declared = plugin.graph.output[0].type.tensor_type
    declared.ClearField("shape")  # so that the type and shape below come from the schema's inference
    declared.elem_type = onnx.TensorProto.UNDEFINED
    register_schemas()
    out = onnx.shape_inference.infer_shapes(plugin, strict_mode=True).graph.output[0].type.tensor_type
    assert out.elem_type == onnx.TensorProto.FLOAT
    assert [d.dim_param or d.dim_value for d in out.shape.dim] == ["frames", "regions", "channels"]


def test_registering_the_xmr_schemas_leaves_a_clean_exit():
    """onnx keeps the schemas' Python shape-inference functions; the process must still exit with 0."""
    code = "from xmr.models.ops.onnx_domain import register_schemas; register_schemas()"
    assert subprocess.run([sys.executable, "-c", code], timeout=120).returncode == 0
