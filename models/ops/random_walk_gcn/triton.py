"""`random_walk_gcn` as an OpenAI-Triton kernel: affinity, normalisation and aggregation fused per graph.

What the kernel computes is exactly the reference's contract (`reference.py`): the random-walk graph
reasoning of ViSERN ("Exploiting Visual Semantic Reasoning for Video-Text Retrieval"; the op itself is
reconstructed from its abstract, see `reference.py`): for each graph n with K regions,

    S = phi psi^T / sqrt(C);   A~ = exp(S) (softmax) or ReLU(S) + eps (relu), on the valid columns;
    P = A~ / row sums;         out = (P g) on the valid rows, 0 on padded rows

from phi, psi, g (N, K, C) and the region mask (N, K) (True = a real region).

Tiling and parallelisation, in the style of flash attention but with every key of a graph in one tile:
one program per (graph n, block of BLOCK_M query rows). A graph's K regions are padded to BLOCK_K, the
next power of two >= 16 (K = 36 -> 64), with masked loads (padding rows are never read). Pass 1 walks the
C channels in BLOCK_C chunks, accumulating S = phi psi^T in a (BLOCK_M, BLOCK_K) float32 tile with
`tl.dot` on tensor cores: float16 / bfloat16 operands as they are, float32 operands as "tf32x3" (three
TF32 products that recover float32's precision, so float32 results match the reference to rounding;
plain TF32 would not, and "ieee" float32 FMAs spill registers at this tile size). The masked row softmax
(max-subtracted, in float32; exp2 with log2(e) folded into the scale) or the ReLU normalisation is then
done on that tile in registers: the whole row is in the tile, so the online (running-max) rescaling of
flash attention, the same computation split over key blocks, is not needed. Pass 2 walks C again:
out[:, chunk] = P @ g[:, chunk] (P cast to the input dtype for the tensor-core dot, accumulated in
float32), stored in the input dtype. S never leaves the chip: the kernel reads phi, psi, g once (for
K <= BLOCK_M) and writes out once, where the reference's (N, K, K) scores and transition matrix make
round trips through memory.

Masks: padded columns get weight 0 (softmax: -inf before the max; relu: multiplied by 0); a row of a
graph with no valid region at all (the reference's "uniform" row) is a padded row, so its output is 0, the
same as the reference's. Nothing overflows in float16: scores are float32 in the kernel.

Implemented: the forward, both affinities, float32 / float16 / bfloat16 inputs (float32 accumulation,
output in the input dtype), K up to MAX_REGIONS (= 256; the custom op's CUDA kernel sends larger K, and
float64, to the reference), any N and C. Not implemented: the backward (the custom op's autograd
recomputes the reference), the transition matrix P as an output.

Under the CPU interpreter (TRITON_INTERPRET=1), `tl.dot` on bfloat16 operands gives wrong values (triton
3.9), so there the bfloat16 operands are upcast to float32 before the dots (`UPCAST`); compiled kernels
keep bfloat16 tensor-core dots.
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from xmr.models.errors import InputError
from xmr.models.ops.random_walk_gcn.reference import AFFINITIES

DTYPES = (torch.float32, torch.float16, torch.bfloat16)
MAX_REGIONS = 256  # a graph's K regions are one tile of the kernel
FP32_DOT = "tf32x3"  # input_precision of the float32 dots ("ieee": exact FMAs, slower; not "tf32")
LOG2E = 1.4426950408889634


@triton.jit
def _random_walk_gcn_kernel(
    phi_ptr,  # (N, K, C) contiguous
    psi_ptr,  # (N, K, C) contiguous
    g_ptr,  # (N, K, C) contiguous
    mask_ptr,  # (N, K) uint8 (the bool mask's bytes)
    out_ptr,  # (N, K, C) contiguous
    K,
    C,
    scale,  # 1 / sqrt(C), times log2(e) for the softmax (exp2)
    eps,
    SOFTMAX: tl.constexpr,  # True: exp affinity (row softmax); False: ReLU(S) + eps
    UPCAST: tl.constexpr,  # float32 dots (the interpreter's bfloat16 workaround)
    FP32_DOT: tl.constexpr,  # float32 inputs: the dots' input_precision ("ieee" or "tf32x3"); else ""
    BLOCK_M: tl.constexpr,
    BLOCK_K: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    n = tl.program_id(0).to(tl.int64)
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)  # query regions of this program
    cols = tl.arange(0, BLOCK_K)  # every region of the graph
    chan = tl.arange(0, BLOCK_C)
    row_in, col_in = rows < K, cols < K
    row_ok = row_in & (tl.load(mask_ptr + n * K + rows, mask=row_in, other=0) != 0)
    col_ok = col_in & (tl.load(mask_ptr + n * K + cols, mask=col_in, other=0) != 0)
    base = n * K * C  # int64 scalar: the graph's first element; offsets within a graph are int32
    phi_ptr, psi_ptr, g_ptr, out_ptr = phi_ptr + base, psi_ptr + base, g_ptr + base, out_ptr + base
    row_off = rows[:, None] * C  # (BLOCK_M, 1)
    col_off = cols[:, None] * C  # (BLOCK_K, 1)

    # pass 1: S = phi psi^T, over C in chunks
    scores = tl.zeros((BLOCK_M, BLOCK_K), dtype=tl.float32)
    for c0 in range(0, C, BLOCK_C):
        c_ok = (c0 + chan) < C
        a = tl.load(phi_ptr + row_off + (c0 + chan)[None, :], mask=row_in[:, None] & c_ok[None, :], other=0.0)
        b = tl.load(psi_ptr + col_off + (c0 + chan)[None, :], mask=col_in[:, None] & c_ok[None, :], other=0.0)
        if UPCAST:
            a, b = a.to(tl.float32), b.to(tl.float32)
        if FP32_DOT != "":
            scores += tl.dot(a, tl.trans(b), input_precision=FP32_DOT)
        else:
            scores += tl.dot(a, tl.trans(b))
    scores = scores * scale

    # the transition matrix P, row-stochastic over the valid columns, in float32
    if SOFTMAX:
        scores = tl.where(col_ok[None, :], scores, float("-inf"))
        row_max = tl.max(scores, axis=1)
        row_max = tl.where(row_max == float("-inf"), 0.0, row_max)  # no valid column: all weights 0
        weights = tl.exp2(scores - row_max[:, None])
        total = tl.sum(weights, axis=1)
        p = weights / tl.where(total > 0.0, total, 1.0)[:, None]
    else:
        weights = tl.where(col_ok[None, :], tl.maximum(scores, 0.0) + eps, 0.0)
        total = tl.sum(weights, axis=1)
        p = weights / tl.maximum(total, eps)[:, None]
    p = tl.where(row_ok[:, None], p, 0.0)  # padded rows produce 0
    if UPCAST:
        p_dot = p
    else:
        p_dot = p.to(g_ptr.dtype.element_ty)

    # pass 2: out = P g, over C in chunks
    for c0 in range(0, C, BLOCK_C):
        c_ok = (c0 + chan) < C
        v = tl.load(g_ptr + col_off + (c0 + chan)[None, :], mask=col_in[:, None] & c_ok[None, :], other=0.0)
        if UPCAST:
            v = v.to(tl.float32)
        if FP32_DOT != "":
            out = tl.dot(p_dot, v, input_precision=FP32_DOT)
        else:
            out = tl.dot(p_dot, v)
        tl.store(
            out_ptr + row_off + (c0 + chan)[None, :],
            out.to(out_ptr.dtype.element_ty),
            mask=row_in[:, None] & c_ok[None, :],
        )


def _check_inputs(phi, psi, g, mask, affinity) -> None:
    if affinity not in AFFINITIES:
        raise InputError(f"affinity={affinity!r}; expected one of {AFFINITIES}")
    for name, x in (("phi", phi), ("psi", psi), ("g", g)):
        if x.dim() != 3 or x.shape != g.shape:
            raise InputError(f"{name} must be (N, K, C) like g {tuple(g.shape)}; got {tuple(x.shape)}")
        if x.dtype != g.dtype or x.dtype not in DTYPES:
            raise InputError(
                f"{name} has dtype {x.dtype}; the triton kernel takes phi, psi, g of one dtype among "
                "float32, float16, bfloat16"
            )
    if mask.shape != g.shape[:2] or mask.dtype != torch.bool:
        raise InputError(
            f"mask must be (N, K) {tuple(g.shape[:2])} bool; got {tuple(mask.shape)} {mask.dtype}"
        )
    if g.shape[1] > MAX_REGIONS:
        raise InputError(f"the triton kernel takes K <= {MAX_REGIONS} regions per graph; got K={g.shape[1]}")
    devices = {x.device for x in (phi, psi, g, mask)}
    if len(devices) != 1:
        raise InputError(f"phi, psi, g and mask must be on one device; got {sorted(map(str, devices))}")
    if g.device.type != "cuda" and not _interpreting():
        raise InputError(
            f"g is on {g.device}; the triton kernel takes CUDA tensors (CPU ones under TRITON_INTERPRET=1)"
        )


def block_sizes(regions: int, channels: int) -> tuple[int, int, int]:
    """(BLOCK_M, BLOCK_K, BLOCK_C): all K regions as keys (a power of two >= 16), up to 64 query rows and
    64 channels per step (tl.dot needs every dimension >= 16)."""
    block_k = max(16, triton.next_power_of_2(regions))
    block_m = min(block_k, 64)
    block_c = min(max(16, triton.next_power_of_2(channels)), 64)
    return block_m, block_k, block_c


def _interpreting() -> bool:
    """Whether the kernel was defined for the CPU interpreter (TRITON_INTERPRET=1 when it was decorated)."""
    return not isinstance(_random_walk_gcn_kernel, triton.runtime.JITFunction)


def random_walk_gcn_triton(
    phi: torch.Tensor,
    psi: torch.Tensor,
    g: torch.Tensor,
    mask: torch.Tensor,
    affinity: str = "softmax",
    eps: float = 1e-6,
) -> torch.Tensor:
    """The op's forward with the Triton kernel: (N, K, C) x3 + (N, K) bool -> (N, K, C) in g's dtype.

    Same inputs, output and semantics as the reference. CUDA tensors (or CPU tensors under
    TRITON_INTERPRET=1).
    """
    _check_inputs(phi, psi, g, mask, affinity)
    n, k, c = g.shape
    out = torch.empty_like(g, memory_format=torch.contiguous_format)
    if out.numel() == 0:
        return out
    block_m, block_k, block_c = block_sizes(k, c)
    softmax = affinity == "softmax"
    scale = (LOG2E if softmax else 1.0) / math.sqrt(c)
    grid = (n, triton.cdiv(k, block_m))
    _random_walk_gcn_kernel[grid](
        phi.contiguous(),
        psi.contiguous(),
        g.contiguous(),
        mask.contiguous().view(torch.uint8),
        out,
        k,
        c,
        scale,
        eps,
        SOFTMAX=softmax,
        UPCAST=g.dtype == torch.bfloat16 and _interpreting(),
        FP32_DOT=FP32_DOT if g.dtype == torch.float32 else "",
        BLOCK_M=block_m,
        BLOCK_K=block_k,
        BLOCK_C=block_c,
        num_warps=4 if block_k <= 64 and g.dtype != torch.float32 else 8,  # no register spills on sm_90
        num_stages=2,
    )
    return out
