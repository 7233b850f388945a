"""`deform_sample` in plain torch: the op's definition (shape checks and the reference computation).

CDNet's deformable-offsets sampling (CDD). Each query q of each group g reads the context at P fractional
positions (query-conditioned offsets, added to a reference point by the caller) and mixes the samples with
its attention weights (already softmax-normalised by the caller over the P points, or over (L, P) for
multi-level):

    out[b, q, g] = sum_p  weights[b, q, g, p] * sample(value[b, ..., g, :], positions[b, q, g, p])

`sample` is linear interpolation between clip centres (clip t sits at position t, so 0 = the first clip's
centre, T-1 = the last's: grid_sample's align_corners=True) with "zeros" padding: a corner outside
[0, T-1], or on a padded clip (mask False), contributes nothing. So position -0.5 reads half of clip 0,
T-1+0.4 reads 0.6 of the last clip, -1 or T read nothing. Equivalently, sample(v, p) = sum_t v[t] *
max(0, 1 - |p - t|) over the valid clips (the form the numpy op in `numpy_ref.py` uses).

Two layouts, told apart by the rank of `value`:
- 1-D over time: value (B, T, G, C), positions (B, Q, G, P) in clip units;
- spatio-temporal grid: value (B, T, H, W, G, C), positions (B, Q, G, P, 3) as (t, y, x) in cell units,
  trilinear interpolation (the product of the three 1-D hat weights), zero padding per axis;
with mask (B, T) bool (valid clips; a padded clip is zero at every (y, x)), weights (B, Q, G, P), and
out (B, Q, G, C). Positions are free floats: any out-of-range value is fine (it just reads zeros).

The reference gathers on the flattened value with a fixed loop over the 2 / 8 corners (no loop over B, T,
Q), so torch.onnx decomposes it into standard ONNX ops with dynamic B, T, Q (the "standard" export form).
"""

from __future__ import annotations

import itertools

import torch


def _check_shapes(value: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, weights: torch.Tensor):
    if value.dim() == 4:
        want_pos = 4
    elif value.dim() == 6:
        want_pos = 5
    else:
        raise ValueError(f"value must be (B, T, G, C) or (B, T, H, W, G, C); got {tuple(value.shape)}")
    if positions.dim() != want_pos or (want_pos == 5 and positions.shape[-1] != 3):
        raise ValueError(f"positions {tuple(positions.shape)} do not fit value {tuple(value.shape)}")
    if weights.shape != positions.shape[:4]:
        raise ValueError(
            f"weights {tuple(weights.shape)} must be positions' (B, Q, G, P) {positions.shape[:4]}"
        )
    if mask.dim() != 2 or mask.dtype != torch.bool:
        raise ValueError(f"mask must be (B, T) bool; got {tuple(mask.shape)} {mask.dtype}")


def deform_sample_reference(
    value: torch.Tensor, mask: torch.Tensor, positions: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """The op in plain torch (see the module docstring): -> (B, Q, G, C)."""
    _check_shapes(value, mask, positions, weights)
    spatial = value.dim() == 6
    b, t = value.shape[0], value.shape[1]
    h, w = (value.shape[2], value.shape[3]) if spatial else (1, 1)
    g, c = value.shape[-2], value.shape[-1]
    axes = positions.unbind(-1) if spatial else (positions,)  # (t[, y, x]), each (B, Q, G, P)
    sizes = (t, h, w) if spatial else (t,)
    lows, fracs = [], []
    for pos in axes:
        low = pos.floor()
        lows.append(low.long())
        fracs.append(pos - low)
    batch = torch.arange(b, device=value.device).view(-1, 1, 1, 1)
    group = torch.arange(g, device=value.device).view(1, 1, -1, 1)
    flat_mask = mask.reshape(-1)
    indices, corner_weights = [], []
    for corner in itertools.product((0, 1), repeat=len(axes)):  # 2 or 8 corners
        inside, weight, coords = None, weights, []
        for low, frac, size, step in zip(lows, fracs, sizes, corner, strict=True):
            i = low + step
            ok = (i >= 0) & (i < size)
            inside = ok if inside is None else inside & ok
            weight = weight * (frac if step else 1 - frac)
            coords.append(i)
        coords = [torch.where(inside, i, 0) for i in coords]  # any in-range index; its weight is 0
        clip = batch * t + coords[0]  # row of (B*T)
        valid = inside & flat_mask[clip]
        cell = clip
        if spatial:
            cell = (clip * h + coords[1]) * w + coords[2]  # row of (B*T*H*W)
        indices.append(cell * g + group)  # row of (B*T[*H*W]*G, C)
        corner_weights.append(torch.where(valid, weight, torch.zeros_like(weight)))
    index = torch.cat(indices, dim=-1)  # (B, Q, G, corners*P)
    mix = torch.cat(corner_weights, dim=-1).to(value.dtype)
    sampled = value.reshape(-1, c)[index]  # (B, Q, G, corners*P, C)
    return (mix.unsqueeze(-2) @ sampled).squeeze(-2)
