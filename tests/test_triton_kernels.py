"""The custom ops' Triton kernels (`xmr.models.ops.*.triton`) against the float64 torch reference.

Every kernel test runs on two devices: "interpreter" (CPU tensors under TRITON_INTERPRET=1, which conftest
sets where there is no GPU; skipped where there is one) and "cuda" (`gpu` marker: the compiled kernels,
and the custom ops dispatching to them in eager mode and under torch.compile). Inputs are random shapes
(a few seeds) with padding masks, positions outside the grid, fully padded videos / frames, in float32,
float16 and bfloat16; the reference runs in float64 on the same (rounded) inputs, and the tolerance is a
few units in the last place of the dtype, relative to the output's scale. Shapes stay small: the
interpreter runs each program in Python. Without a GPU the kernels are also compiled for one (sm_90
cubins), and the benchmark script's no-GPU exit and its bytes arithmetic are tested here too.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch

pytest.importorskip("triton", reason="needs the triton package (pip install triton)")

from xmr.models.errors import InputError  # noqa: E402
from xmr.models.ops.deform_sample import deform_sample_reference  # noqa: E402
from xmr.models.ops.deform_sample import torch_op as deform_op
from xmr.models.ops.deform_sample.triton import deform_sample_triton  # noqa: E402
from xmr.models.ops.random_walk_gcn import random_walk_gcn_reference  # noqa: E402
from xmr.models.ops.random_walk_gcn import torch_op as gcn_op
from xmr.models.ops.random_walk_gcn.triton import random_walk_gcn_triton  # noqa: E402
from xmr.perf import kernels as bench  # noqa: E402

DEVICES = [
    pytest.param("cpu", id="interpreter", marks=pytest.mark.triton_interpreter),
    pytest.param("cuda", id="cuda", marks=pytest.mark.gpu),
]
DTYPES = {  # dtype -> tolerance, times max(1, the output's largest magnitude)
    torch.float32: 1e-5,
    torch.float16: 3e-3,
    torch.bfloat16: 3e-2,
}
DTYPE_IDS = ["float32", "float16", "bfloat16"]


def assert_close(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype) -> None:
    assert got.shape == want.shape and got.dtype == dtype
    scale = max(1.0, want.abs().max().item())
    error = (got.cpu().double() - want).abs().max().item() if got.numel() else 0.0
    assert error <= DTYPES[dtype] * scale, f"max error {error:.3g} > {DTYPES[dtype] * scale:.3g} ({dtype})"


def rounded(tensors, dtype, device):
    """(inputs in dtype on device, the same values in float64 on the CPU for the reference)."""
    low = [x.to(dtype) if x.is_floating_point() else x for x in tensors]
    exact = [x.double() if x.is_floating_point() else x for x in low]
    return [x.to(device) for x in low], exact


# ----------------------------------------------------------------------------- deform_sample


def deform_case(seed: int, spatial: bool):
    """Random shapes, about 10% padded clips, positions from 2 cells below to 2 above the grid."""
    gen = torch.Generator().manual_seed(seed)

    def size(high: int) -> int:
        return int(torch.randint(1, high, (), generator=gen))

    b, t, q, g, p, c = size(3), size(7), size(20), size(3), size(5), size(40)
    grid = (size(5), size(5)) if spatial else ()
    value = torch.randn(b, t, *grid, g, c, generator=gen, dtype=torch.float64)
    mask = torch.rand(b, t, generator=gen) > 0.1
    sizes = torch.tensor([t, *grid], dtype=torch.float64)  # (T[, H, W]), broadcast over the last axis
    point = (3,) if spatial else ()
    positions = torch.rand(b, q, g, p, *point, generator=gen, dtype=torch.float64) * (sizes + 4) - 2
    borders = torch.tensor([-1.0, -0.5, 0.0, t - 1.0, t - 0.5, float(t)], dtype=torch.float64)
    n = min(len(borders), positions.numel())
    positions.view(-1)[:n] = borders[:n]  # exact borders and half a cell outside
    weights = torch.softmax(torch.randn(b, q, g, p, generator=gen, dtype=torch.float64), dim=-1)
    return value, mask, positions, weights


def deform_special(kind: str, spatial: bool):
    value, mask, positions, weights = deform_case(10, spatial)
    if kind == "fully-padded":  # every video padded: every query reads zeros
        mask[:] = False
    elif kind == "far-out-of-range":  # far beyond the grid (and huge: no integer overflow)
        big = torch.where(torch.rand(positions.shape) < 0.5, -1e6, 1e6).to(positions.dtype)
        positions = positions + big
    elif kind == "single-valid-clip":
        mask[:] = False
        mask[:, 0] = True
    return value, mask, positions, weights


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("spatial", [False, True], ids=["1d", "trilinear"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_deform_sample_kernel_matches_reference(seed, spatial, dtype, device):
    inputs, exact = rounded(deform_case(seed, spatial), dtype, device)
    assert_close(deform_sample_triton(*inputs), deform_sample_reference(*exact), dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("kind", ["fully-padded", "far-out-of-range", "single-valid-clip"])
@pytest.mark.parametrize("spatial", [False, True], ids=["1d", "trilinear"])
def test_deform_sample_kernel_padding_and_out_of_range(spatial, kind, device):
    inputs, exact = rounded(deform_special(kind, spatial), torch.float32, device)
    got = deform_sample_triton(*inputs)
    assert_close(got, deform_sample_reference(*exact), torch.float32)
    if kind != "single-valid-clip":
        assert (got == 0).all()


# ----------------------------------------------------------------------------- random_walk_gcn


def gcn_case(seed: int, k: int | None = None):
    """Random N, K, C (C not a multiple of 16), ~20% padded regions, a fully padded frame, a frame with one
    real region."""
    gen = torch.Generator().manual_seed(seed)
    n = int(torch.randint(3, 6, (), generator=gen))
    k = k or int(torch.randint(1, 40, (), generator=gen))
    c = int(torch.randint(1, 70, (), generator=gen))
    phi, psi, g = (torch.randn(n, k, c, generator=gen, dtype=torch.float64) for _ in range(3))
    mask = torch.rand(n, k, generator=gen) > 0.2
    mask[0] = False
    mask[1] = False
    mask[1, 0] = True
    return phi, psi, g, mask


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("affinity", ["softmax", "relu"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_random_walk_gcn_kernel_matches_reference(seed, affinity, dtype, device):
    inputs, exact = rounded(gcn_case(seed), dtype, device)
    want = random_walk_gcn_reference(*exact, affinity)
    got = random_walk_gcn_triton(*inputs, affinity)
    assert_close(got, want, dtype)
    assert (got[~inputs[3]] == 0).all()  # padded regions, and every row of the fully padded frame


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("affinity", ["softmax", "relu"])
def test_random_walk_gcn_kernel_more_regions_than_one_row_block(affinity, device):
    """K = 70: keys padded to 128, query rows in two programs of 64."""
    inputs, exact = rounded(gcn_case(3, k=70), torch.float32, device)
    assert_close(
        random_walk_gcn_triton(*inputs, affinity), random_walk_gcn_reference(*exact, affinity), torch.float32
    )


@pytest.mark.parametrize("device", DEVICES)
def test_random_walk_gcn_kernel_large_scores_do_not_overflow_in_half(device):
    """Scores of several hundred: float32 inside the kernel, so float16 neither overflows nor NaNs."""
    phi, psi, g, mask = gcn_case(4)
    inputs, exact = rounded((phi * 8, psi * 8, g, mask), torch.float16, device)
    got = random_walk_gcn_triton(*inputs, "softmax")
    assert torch.isfinite(got).all()
    assert_close(got, random_walk_gcn_reference(*exact, "softmax"), torch.float16)


# ----------------------------------------------------------------------------- compiled for a GPU, with none

COMPILE_FOR_HOPPER = """
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from xmr.models.ops.deform_sample import triton as deform
from xmr.models.ops.random_walk_gcn import triton as gcn


def build(kernel, dtype, constexprs, **options):
    names = kernel.arg_names
    pointers = {n: "*u8" if n == "mask_ptr" else f"*{dtype}" for n in names if n.endswith("_ptr")}
    scalars = {"scale": "fp32", "eps": "fp32"}
    signature = {n: "constexpr" if n in constexprs else pointers.get(n) or scalars.get(n, "i32")
                 for n in names}
    # what a launch specialises: 16-byte aligned pointers, C divisible by 16
    attrs = {(i,): [["tt.divisibility", 16]] for i, n in enumerate(names) if n in pointers or n == "C"}
    source = ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs)
    assert triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options).asm["cubin"]


blocks = {"P": 4, "BLOCK_Q": 32, "BLOCK_C": 32}
build(deform._deform_sample_1d_kernel, "fp32", blocks, num_warps=4)
build(deform._deform_sample_3d_kernel, "bf16", blocks, num_warps=4)
tiles = {"UPCAST": False, "BLOCK_M": 64, "BLOCK_C": 64}
half = {"SOFTMAX": True, "FP32_DOT": "", "BLOCK_K": 64, **tiles}
build(gcn._random_walk_gcn_kernel, "fp16", half, num_warps=4)
single = {"SOFTMAX": False, "FP32_DOT": gcn.FP32_DOT, "BLOCK_K": 128, **tiles}
build(gcn._random_walk_gcn_kernel, "fp32", single, num_warps=8)
print("compiled")
"""


def test_kernels_compile_for_a_hopper_gpu():
    """The interpreter does not lower the kernels; this compiles them to sm_90 cubins (triton ships ptxas),
    so a typing or layout error that only the GPU compiler sees fails here too, with no GPU. In a fresh
    process: TRITON_INTERPRET must be unset when the kernels are defined."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run(
        [sys.executable, "-c", COMPILE_FOR_HOPPER], env=env, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0 and "compiled" in run.stdout, run.stderr[-3000:]


# ----------------------------------------------------------------------------- errors and the CUDA kernels


def test_kernels_reject_what_they_do_not_implement():
    value, mask, positions, weights = deform_case(0, False)
    with pytest.raises(InputError, match="value has dtype torch.float64"):
        deform_sample_triton(value, mask, positions.float(), weights.float())
    with pytest.raises(ValueError, match="mask must be"):
        deform_sample_triton(value.float(), mask.int(), positions.float(), weights.float())
    phi, psi, g, mask = (x.float() if x.is_floating_point() else x for x in gcn_case(0))
    with pytest.raises(InputError, match="affinity='cosine'"):
        random_walk_gcn_triton(phi, psi, g, mask, "cosine")
    with pytest.raises(InputError, match="psi has dtype torch.float16"):
        random_walk_gcn_triton(phi, psi.half(), g, mask)
    with pytest.raises(InputError, match="K <= 256"):
        big = torch.zeros(1, 257, 16)
        random_walk_gcn_triton(big, big, big, torch.ones(1, 257, dtype=torch.bool))


@pytest.mark.triton_interpreter
def test_cuda_kernels_use_triton_and_fall_back_to_the_reference():
    """The functions registered as the custom ops' CUDA kernels, called on CPU tensors (the interpreter):
    float32 goes to the Triton kernels, float64 (not implemented there) to the reference."""
    for dtype in (torch.float32, torch.float64):
        inputs, exact = rounded(deform_case(5, True), dtype, "cpu")
        got = deform_op.cuda_kernel(*inputs)
        assert got.dtype == dtype
        assert torch.allclose(got.double(), deform_sample_reference(*exact), atol=1e-5)
        inputs, exact = rounded(gcn_case(5), dtype, "cpu")
        got = gcn_op.cuda_kernel(*inputs, "softmax", 1e-6)
        assert got.dtype == dtype
        assert torch.allclose(got.double(), random_walk_gcn_reference(*exact), atol=1e-5)


@pytest.mark.gpu
@pytest.mark.parametrize("compiled", [False, True], ids=["eager", "torch.compile"])
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
def test_custom_ops_on_cuda_dispatch_to_the_kernels(dtype, compiled):
    """torch.ops.xmr.* on CUDA tensors run the Triton kernels, eagerly and inside a compiled graph."""

    def deform(*x):
        return torch.ops.xmr.deform_sample(*x)

    def gcn(*x):
        return torch.ops.xmr.random_walk_gcn(*x, "softmax", 1e-6)

    if compiled:
        deform, gcn = torch.compile(deform, fullgraph=True), torch.compile(gcn, fullgraph=True)
    for spatial in (False, True):
        inputs, exact = rounded(deform_case(6, spatial), dtype, "cuda")
        assert_close(deform(*inputs), deform_sample_reference(*exact), dtype)
        assert_close(deform(*inputs), deform_sample_triton(*inputs).cpu().double(), dtype)
    inputs, exact = rounded(gcn_case(6), dtype, "cuda")
    assert_close(gcn(*inputs), random_walk_gcn_reference(*exact), dtype)


@pytest.mark.gpu
def test_deform_sample_backward_on_cuda_is_the_references():
    value, mask, positions, weights = (x.cuda() for x in deform_case(7, True))
    grads = []
    for fn in (deform_sample_reference, torch.ops.xmr.deform_sample):
        inputs = [x.float().requires_grad_(True) for x in (value, positions + 0.01, weights)]
        fn(inputs[0], mask, inputs[1], inputs[2]).pow(2).sum().backward()
        grads.append([x.grad for x in inputs])
    for a, b in zip(*grads, strict=True):
        assert torch.allclose(a, b, atol=1e-5)


# ----------------------------------------------------------------------------- the benchmark script


def test_benchmark_without_cuda_exits_with_one_clear_line(tmp_path, monkeypatch):
    """`python -m xmr.perf.kernels` where torch sees no GPU: SystemExit(message) is exit status 1 with that
    one line on stderr, and nothing written."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(SystemExit) as exit_:
        bench.main(["--out", str(tmp_path / "figures")])
    assert exit_.value.code == "no CUDA device: the kernel benchmark needs a GPU"
    assert not (tmp_path / "figures").exists()


def test_benchmark_bytes_moved():
    meta = {"device": "meta"}
    # 1-D: value read whole (fewer elements than the corner rows), mask, positions, weights, out
    value, mask = torch.empty(2, 5, 3, 8, **meta), torch.empty(2, 5, dtype=torch.bool, **meta)
    positions = weights = torch.empty(2, 4, 3, 6, **meta)
    want = 4 * (2 * 5 * 3 * 8) + 2 * 5 + 2 * 4 * (2 * 4 * 3 * 6) + 4 * (2 * 4 * 3 * 8)
    assert bench.deform_sample_bytes(value, mask, positions, weights) == want
    # trilinear on a large grid: value counts only the rows at the 8 corners of each point
    value = torch.empty(2, 5, 50, 50, 3, 8, dtype=torch.float16, **meta)
    positions, weights = torch.empty(2, 4, 3, 6, 3, **meta), torch.empty(2, 4, 3, 6, **meta)
    corner_rows = 2 * 4 * 3 * 6 * 8
    want = 2 * corner_rows * 8 + 2 * 5 + 4 * (2 * 4 * 3 * 6 * 3) + 4 * (2 * 4 * 3 * 6) + 2 * (2 * 4 * 3 * 8)
    assert bench.deform_sample_bytes(value, mask, positions, weights) == want
    # the GCN: phi, psi, g (N, K, C) and the (N, K) bool mask in, out (N, K, C)
    x = torch.empty(4096, 36, 1024, dtype=torch.float16, **meta)
    want = 4 * 4096 * 36 * 1024 * 2 + 4096 * 36
    assert bench.random_walk_gcn_bytes(x, x, x, torch.empty(4096, 36, dtype=torch.bool, **meta)) == want
    assert bench.peak_bandwidth_gbs("NVIDIA H200") == 4800.0
    assert bench.peak_bandwidth_gbs("NVIDIA H100 80GB HBM3") == 3350.0
    assert bench.peak_bandwidth_gbs("NVIDIA A100-SXM4-80GB") == 2039.0
    assert bench.peak_bandwidth_gbs("NVIDIA L40S") == 864.0
    assert bench.peak_bandwidth_gbs("Some Future GPU") is None
