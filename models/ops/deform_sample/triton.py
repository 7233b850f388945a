"""`deform_sample` as OpenAI-Triton kernels: the forward of both layouts, fused (no gathered tensor).

What the kernels compute is exactly the reference's contract (`reference.py`; CDNet's deformable-offsets
sampling): for each (b, q, g)

    out[b, q, g, :] = sum_p weights[b, q, g, p] * sample(value[b, ..., g, :], positions[b, q, g, p])

with linear (1-D, value (B, T, G, C)) or trilinear (value (B, T, H, W, G, C), positions (t, y, x))
interpolation between cell centres (align_corners=True), and zero padding: a corner outside the grid, or on
a padded clip (mask False), contributes nothing. Positions are free floats (out-of-range ones read zeros; a
fully padded video reads zeros everywhere).

Tiling and parallelisation: one program per (batch b, block of BLOCK_Q queries, group g, block of BLOCK_C
channels). The program loads the BLOCK_Q positions and weights of each of the P points (P is a
compile-time constant, the loop over points and over the 2 / 8 corners is unrolled), computes the corner
indices and hat weights in float32, reads the mask of each corner's clip, and gathers the corner rows
value[b, t(, y, x), g, c-block] with masked loads (a masked-out corner is never read), accumulating
weight x hat x value into a (BLOCK_Q, BLOCK_C) float32 tile, written once in the input dtype. The reference
instead materialises the (B, Q, G, P x corners, C) gathered tensor and a batched matmul; the kernel moves
only the corner rows it needs and the output.

Implemented: the forward, both layouts, float32 / float16 / bfloat16 `value` (positions and weights any of
those float dtypes; all arithmetic in float32, output in value's dtype), any B, T, H, W, Q, G, P, C.
Not implemented: the backward (the custom op's CUDA backward recomputes the torch reference, see
`torch_op.py`), float64 (the custom op's CUDA kernel sends float64 to the reference).

Positions are clamped to [-2, size + 1] before the float -> int conversion of their floor: every corner of
a clamped position is outside the grid, as it was before clamping, so the result is unchanged and huge
positions cannot overflow the integer index.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from xmr.models.errors import InputError
from xmr.models.ops.deform_sample.reference import _check_shapes

DTYPES = (torch.float32, torch.float16, torch.bfloat16)  # what the kernels take (value; positions, weights)
MAX_BLOCK_C = 128  # channels per program; more channels are more programs


@triton.jit
def _corner_1d(acc, value_ptr, mask_ptr, b, t_idx, g, c, c_ok, q_ok, weight, T, G, C):
    """Add weight x value[b, t_idx, g, c] to acc, where t_idx is inside [0, T) and on a valid clip."""
    inside = q_ok & (t_idx >= 0) & (t_idx < T)
    clip = b * T + t_idx  # int64: row of (B*T)
    valid = inside & (tl.load(mask_ptr + clip, mask=inside, other=0) != 0)
    rows = clip * G + g  # row of the (B*T*G, C) value
    v = tl.load(value_ptr + rows[:, None] * C + c[None, :], mask=valid[:, None] & c_ok[None, :], other=0.0)
    return acc + tl.where(valid, weight, 0.0)[:, None] * v.to(tl.float32)


@triton.jit
def _deform_sample_1d_kernel(
    value_ptr,  # (B, T, G, C) contiguous
    mask_ptr,  # (B, T) uint8 (the bool mask's bytes)
    pos_ptr,  # (B, Q, G, P) contiguous
    w_ptr,  # (B, Q, G, P) contiguous
    out_ptr,  # (B, Q, G, C) contiguous
    T,
    Q,
    G,
    C,
    P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    n_q_blocks = tl.cdiv(Q, BLOCK_Q)
    b = (tl.program_id(0) // n_q_blocks).to(tl.int64)
    q = (tl.program_id(0) % n_q_blocks) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    g = tl.program_id(1)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    q_ok, c_ok = q < Q, c < C
    point = ((b * Q + q) * G + g) * P  # offset of point 0 of each query, (BLOCK_Q,)
    acc = tl.zeros((BLOCK_Q, BLOCK_C), dtype=tl.float32)
    for p in tl.static_range(P):
        pos = tl.load(pos_ptr + point + p, mask=q_ok, other=0.0).to(tl.float32)
        weight = tl.load(w_ptr + point + p, mask=q_ok, other=0.0).to(tl.float32)
        pos = tl.minimum(tl.maximum(pos, -2.0), T + 1.0)  # same result, no int overflow
        low = tl.floor(pos)
        frac = pos - low
        t0 = low.to(tl.int32)
        acc = _corner_1d(acc, value_ptr, mask_ptr, b, t0, g, c, c_ok, q_ok, weight * (1.0 - frac), T, G, C)
        acc = _corner_1d(acc, value_ptr, mask_ptr, b, t0 + 1, g, c, c_ok, q_ok, weight * frac, T, G, C)
    out = ((b * Q + q) * G + g) * C
    tl.store(
        out_ptr + out[:, None] + c[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=q_ok[:, None] & c_ok[None, :],
    )


@triton.jit
def _deform_sample_3d_kernel(
    value_ptr,  # (B, T, H, W, G, C) contiguous
    mask_ptr,  # (B, T) uint8
    pos_ptr,  # (B, Q, G, P, 3) contiguous, (t, y, x)
    w_ptr,  # (B, Q, G, P) contiguous
    out_ptr,  # (B, Q, G, C) contiguous
    T,
    H,
    W,
    Q,
    G,
    C,
    P: tl.constexpr,
    BLOCK_Q: tl.constexpr,
    BLOCK_C: tl.constexpr,
):
    n_q_blocks = tl.cdiv(Q, BLOCK_Q)
    b = (tl.program_id(0) // n_q_blocks).to(tl.int64)
    q = (tl.program_id(0) % n_q_blocks) * BLOCK_Q + tl.arange(0, BLOCK_Q)
    g = tl.program_id(1)
    c = tl.program_id(2) * BLOCK_C + tl.arange(0, BLOCK_C)
    q_ok, c_ok = q < Q, c < C
    point = ((b * Q + q) * G + g) * P
    acc = tl.zeros((BLOCK_Q, BLOCK_C), dtype=tl.float32)
    for p in tl.static_range(P):
        weight = tl.load(w_ptr + point + p, mask=q_ok, other=0.0).to(tl.float32)
        pt = tl.load(pos_ptr + (point + p) * 3, mask=q_ok, other=0.0).to(tl.float32)
        py = tl.load(pos_ptr + (point + p) * 3 + 1, mask=q_ok, other=0.0).to(tl.float32)
        px = tl.load(pos_ptr + (point + p) * 3 + 2, mask=q_ok, other=0.0).to(tl.float32)
        pt = tl.minimum(tl.maximum(pt, -2.0), T + 1.0)
        py = tl.minimum(tl.maximum(py, -2.0), H + 1.0)
        px = tl.minimum(tl.maximum(px, -2.0), W + 1.0)
        lt, ly, lx = tl.floor(pt), tl.floor(py), tl.floor(px)
        ft, fy, fx = pt - lt, py - ly, px - lx
        t0, y0, x0 = lt.to(tl.int32), ly.to(tl.int32), lx.to(tl.int32)
        for dt in tl.static_range(2):
            ti = t0 + dt
            wt = weight * (ft if dt == 1 else 1.0 - ft)
            t_in = q_ok & (ti >= 0) & (ti < T)
            clip = b * T + ti
            t_ok = t_in & (tl.load(mask_ptr + clip, mask=t_in, other=0) != 0)  # one mask read per clip
            for dy in tl.static_range(2):
                yi = y0 + dy
                wty = wt * (fy if dy == 1 else 1.0 - fy)
                ty_ok = t_ok & (yi >= 0) & (yi < H)
                for dx in tl.static_range(2):
                    xi = x0 + dx
                    corner_w = wty * (fx if dx == 1 else 1.0 - fx)
                    valid = ty_ok & (xi >= 0) & (xi < W)
                    rows = ((clip * H + yi) * W + xi) * G + g  # row of the (B*T*H*W*G, C) value
                    v = tl.load(
                        value_ptr + rows[:, None] * C + c[None, :],
                        mask=valid[:, None] & c_ok[None, :],
                        other=0.0,
                    )
                    acc += tl.where(valid, corner_w, 0.0)[:, None] * v.to(tl.float32)
    out = ((b * Q + q) * G + g) * C
    tl.store(
        out_ptr + out[:, None] + c[None, :],
        acc.to(out_ptr.dtype.element_ty),
        mask=q_ok[:, None] & c_ok[None, :],
    )


def _interpreting() -> bool:
    """Whether the kernels were defined for the CPU interpreter (TRITON_INTERPRET=1 when decorated)."""
    return not isinstance(_deform_sample_1d_kernel, triton.runtime.JITFunction)


def _check_inputs(value, mask, positions, weights) -> None:
    _check_shapes(value, mask, positions, weights)
    for name, x in (("value", value), ("positions", positions), ("weights", weights)):
        if x.dtype not in DTYPES:
            raise InputError(
                f"{name} has dtype {x.dtype}; the triton kernel takes float32, float16 or bfloat16"
            )
    devices = {x.device for x in (value, mask, positions, weights)}
    if len(devices) != 1:
        raise InputError(
            f"value, mask, positions and weights must be on one device; got {sorted(map(str, devices))}"
        )
    if mask.shape != value.shape[:2] or positions.shape[0] != value.shape[0]:
        raise InputError(
            f"mask {tuple(mask.shape)} and positions' batch {positions.shape[0]} must match value's (B, T) "
            f"{tuple(value.shape[:2])}"
        )
    if value.device.type != "cuda" and not _interpreting():
        raise InputError(
            f"value is on {value.device}; the triton kernels take CUDA tensors (CPU ones: TRITON_INTERPRET=1)"
        )
    if weights.shape[2] != value.shape[-2]:
        raise InputError(f"positions / weights have {weights.shape[2]} groups; value has {value.shape[-2]}")


def block_sizes(queries: int, channels: int) -> tuple[int, int]:
    """(BLOCK_Q, BLOCK_C): up to 32 queries x 128 channels per program (powers of two, at least 16)."""
    block_c = min(max(triton.next_power_of_2(channels), 16), MAX_BLOCK_C)
    block_q = min(max(triton.next_power_of_2(queries), 16), 32)
    return block_q, block_c


def deform_sample_triton(
    value: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The op's forward with the Triton kernels: same inputs, output and semantics as the reference.

    value (B, T, G, C) or (B, T, H, W, G, C), mask (B, T) bool, positions (B, Q, G, P[, 3]), weights
    (B, Q, G, P) -> (B, Q, G, C) in value's dtype. CUDA tensors (or CPU tensors under TRITON_INTERPRET=1).
    """
    _check_inputs(value, mask, positions, weights)
    spatial = value.dim() == 6
    b, t = value.shape[:2]
    q, g, p = weights.shape[1:]
    c = value.shape[-1]
    out = torch.empty((b, q, g, c), dtype=value.dtype, device=value.device)
    if out.numel() == 0:
        return out
    if p == 0 or t == 0:
        return out.zero_()
    value, positions, weights = value.contiguous(), positions.contiguous(), weights.contiguous()
    mask_bytes = mask.contiguous().view(torch.uint8)
    block_q, block_c = block_sizes(q, c)
    grid = (b * triton.cdiv(q, block_q), g, triton.cdiv(c, block_c))
    common = {"P": p, "BLOCK_Q": block_q, "BLOCK_C": block_c, "num_warps": 4}
    if spatial:
        h, w = value.shape[2:4]
        _deform_sample_3d_kernel[grid](value, mask_bytes, positions, weights, out, t, h, w, q, g, c, **common)
    else:
        _deform_sample_1d_kernel[grid](value, mask_bytes, positions, weights, out, t, q, g, c, **common)
    return out
