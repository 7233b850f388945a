"""CDNet: cross-modal Context Denoising Network for video moment retrieval.

Paper: the CDNet paper (cross-modal Context Denoising Network, QSD + CDD); only its abstract was available.
What follows the abstract:
- QSD, query-guided semantic disentanglement: an alignment level per clip from a global (sentence vs clip)
  and a fine-grained (words vs clip, softmax over words) correlation; it splits the video into an aligned
  stream and a context stream; dual-level contrastive losses.
- CDD, context-aware dynamic denoisement: query-conditioned offsets and weights per clip, G groups x P
  points (8 x 4), sampling the context stream at fractional positions: 1-D over time, or trilinear over
  (t, y, x) when a spatial grid per clip is given (`xmr.models.ops.deform_sample`, the custom op).
- A DETR-style moment head (Moment-DETR): learnable moment queries, Hungarian matching, span L1 + gIoU +
  class losses (10 / 1 / 4) and a saliency hinge (`xmr.models.moments.loss`).

Reconstructed, with the defaults chosen (all in `CDNetConfig`):
- Alignment level `a_t = sigmoid(w_g g_t + w_f f_t + b)` with `g_t = cos(sentence, clip_t)` and
  `f_t = sum_l softmax_l(<word_l, clip_t> / sqrt(D)) cos(word_l, clip_t)`; aligned = a * clip,
  context = (1 - a) * clip.
- Dual-level contrastive losses: video level, InfoNCE between each sentence and the alignment-weighted
  mean of its video's clips against the other videos of the batch (tau 0.1); clip level, per query, an
  InfoNCE of each clip inside the target span against the clips outside it, on the alignment logits.
- CDD: offsets (in clips, and in grid cells for (y, x)) and weights (softmax over P within a group) come
  from a linear layer on [aligned clip ; sentence]; the sampled context is projected and added to the
  aligned clip: `x_t = aligned_t + W_o deform_sample(W_v context, t + offsets, weights)`.
- Encoder: 2 Transformer layers over [enhanced clips ; words] with a padding mask; decoder: 2 layers of
  self-attention + cross-attention from 10 moment queries to the encoder's clips; heads: span (center,
  width) in [0, 1] via sigmoid, a foreground logit, a per-clip saliency score.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xmr.models.image_text.rvse import Block, TextTower
from xmr.models.layers import masked_mean
from xmr.models.ops.deform_sample import DeformSampler


@dataclass
class CDNetConfig:
    vocab_size: int = 0  # set from the tokenizer
    clip_dim: int = 96  # set from the data: D of the clip features
    d_model: int = 128
    heads: int = 4
    encoder_layers: int = 2
    decoder_layers: int = 2
    num_queries: int = 10  # moment queries (Moment-DETR uses 10)
    groups: int = 8  # CDD: G groups x P points (the paper's 8 x 4)
    points: int = 4
    use_grid: bool = False  # sample (t, y, x) over a spatial grid per clip instead of t alone
    grid: tuple[int, int] = (4, 4)  # (h, w) of that grid (the frame backbone's 4 x 4)
    max_offset: float = 4.0  # CDD offsets in clips, bounded by tanh
    word_dim: int = 128
    text_layers: int = 2
    max_tokens: int = 32
    max_clips: int = 128
    dropout: float = 0.1
    tau: float = 0.1  # temperature of the dual-level contrastive losses

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> CDNetConfig:
        d = dict(d)
        d["grid"] = tuple(d.get("grid", cls.grid))
        return cls(**d)


class QSD(nn.Module):
    """Query-guided semantic disentanglement: alignment level per clip, aligned and context streams."""

    def __init__(self, d: int):
        super().__init__()
        self.mix = nn.Linear(2, 1)  # a_t = sigmoid(w_g g_t + w_f f_t + b)
        nn.init.constant_(self.mix.weight, 4.0)

    def forward(self, clips, clip_mask, words, word_mask, sentence):
        c, w, s = F.normalize(clips, dim=-1), F.normalize(words, dim=-1), F.normalize(sentence, dim=-1)
        global_corr = (c * s.unsqueeze(1)).sum(-1)  # (B, T)
        logits = clips @ words.transpose(1, 2) / math.sqrt(clips.shape[-1])  # (B, T, L)
        attn = torch.softmax(logits.masked_fill(~word_mask.unsqueeze(1), -1e4), dim=-1)
        fine_corr = (attn * (c @ w.transpose(1, 2))).sum(-1)  # (B, T)
        align_logit = self.mix(torch.stack([global_corr, fine_corr], dim=-1)).squeeze(-1)  # (B, T)
        align = torch.sigmoid(align_logit) * clip_mask.to(clips.dtype)
        return align_logit, align


class CDD(nn.Module):
    """Context-aware dynamic denoisement: query-conditioned deformable sampling of the context stream."""

    def __init__(self, cfg: CDNetConfig):
        super().__init__()
        d, g, p = cfg.d_model, cfg.groups, cfg.points
        self.cfg = cfg
        self.value = nn.Linear(d, d)
        coords = 3 if cfg.use_grid else 1
        self.offsets = nn.Linear(2 * d, g * p * coords)
        self.weights = nn.Linear(2 * d, g * p)
        self.out = nn.Linear(d, d)
        nn.init.zeros_(self.offsets.weight)
        with torch.no_grad():  # start with the P points spread around the clip: -1.5, -0.5, 0.5, 1.5 ...
            spread = torch.linspace(-(p - 1) / 2, (p - 1) / 2, p)
            bias = torch.zeros(g, p, coords)
            bias[..., 0] = torch.atanh(spread / cfg.max_offset).unsqueeze(0)
            self.offsets.bias.copy_(bias.reshape(-1))
        self.sampler = DeformSampler()  # its op_form "plugin" exports one xmr::DeformSample node

    def forward(self, aligned, context, context_grid, clip_mask, sentence):
        b, t, d = aligned.shape
        g, p = self.cfg.groups, self.cfg.points
        cond = torch.cat([aligned, sentence.unsqueeze(1).expand(b, t, d)], dim=-1)  # (B, T, 2D)
        weights = torch.softmax(self.weights(cond).reshape(b, t, g, p), dim=-1)  # (B, T, G, P)
        centres = torch.arange(t, device=aligned.device, dtype=aligned.dtype).view(1, t, 1, 1)
        if context_grid is None:
            offsets = self.cfg.max_offset * torch.tanh(self.offsets(cond).reshape(b, t, g, p))
            value = self.value(context).reshape(b, t, g, d // g)  # (B, T, G, C)
            positions = centres + offsets  # (B, T, G, P) in clips
        else:
            h, w = self.cfg.grid
            offsets = torch.tanh(self.offsets(cond).reshape(b, t, g, p, 3))
            value = self.value(context_grid).reshape(b, t, h, w, g, d // g)  # (B, T, H, W, G, C)
            centre = torch.stack(
                [
                    centres.expand(b, t, g, p),
                    torch.full_like(offsets[..., 1], (h - 1) / 2),
                    torch.full_like(offsets[..., 2], (w - 1) / 2),
                ],
                dim=-1,
            )
            scale = torch.tensor(
                [self.cfg.max_offset, h / 2, w / 2], dtype=aligned.dtype, device=aligned.device
            )
            positions = centre + offsets * scale  # (B, T, G, P, 3) in (clips, cells, cells)
        sampled = self.sampler(value, clip_mask, positions, weights)  # (B, T, G, C)
        return aligned + self.out(sampled.reshape(b, t, d))


class CrossAttention(nn.Module):
    def __init__(self, d: int, heads: int):
        super().__init__()
        self.heads = heads
        self.q, self.kv, self.out = nn.Linear(d, d), nn.Linear(d, 2 * d), nn.Linear(d, d)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_padding: torch.Tensor) -> torch.Tensor:
        b, n, d = x.shape
        hd = d // self.heads
        q = self.q(x).view(b, n, self.heads, hd).transpose(1, 2)  # (B, h, N, hd)
        k, v = self.kv(memory).view(b, -1, 2, self.heads, hd).permute(2, 0, 3, 1, 4)  # (B, h, T, hd)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(hd)
        att = att.masked_fill(memory_padding.view(b, 1, 1, -1), -1e4)
        return self.out((torch.softmax(att, dim=-1) @ v).transpose(1, 2).reshape(b, n, d))


class DecoderLayer(nn.Module):
    def __init__(self, d: int, heads: int, dropout: float):
        super().__init__()
        self.self_attn = Block(d, heads, dropout)
        self.ln = nn.LayerNorm(d)
        self.cross = CrossAttention(d, heads)

    def forward(self, x, memory, memory_padding):
        x = self.self_attn(x, torch.zeros(x.shape[:2], dtype=torch.bool, device=x.device))
        return x + self.cross(self.ln(x), memory, memory_padding)


class CDNet(nn.Module):
    def __init__(self, cfg: CDNetConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("CDNetConfig.vocab_size must be set from the tokenizer (got 0)")
        self.cfg = cfg
        d = cfg.d_model
        self.text = TextTower(
            cfg.vocab_size, cfg.word_dim, cfg.heads, cfg.text_layers, cfg.max_tokens, cfg.dropout, d
        )
        self.word_proj = nn.Linear(cfg.word_dim, d)
        self.clip_proj = nn.Sequential(nn.LayerNorm(cfg.clip_dim), nn.Linear(cfg.clip_dim, d))
        self.clip_pos = nn.Embedding(cfg.max_clips, d)
        self.qsd = QSD(d)
        self.cdd = CDD(cfg)
        self.encoder = nn.ModuleList(Block(d, cfg.heads, cfg.dropout) for _ in range(cfg.encoder_layers))
        self.queries = nn.Embedding(cfg.num_queries, d)
        self.decoder = nn.ModuleList(
            DecoderLayer(d, cfg.heads, cfg.dropout) for _ in range(cfg.decoder_layers)
        )
        self.span_head = nn.Sequential(nn.Linear(d, d), nn.ReLU(), nn.Linear(d, 2))
        self.class_head = nn.Linear(d, 1)
        self.saliency_head = nn.Linear(d, 1)

    def forward(
        self,
        clips: torch.Tensor,
        clip_mask: torch.Tensor,
        input_ids: torch.Tensor,
        lengths: torch.Tensor,
        grid: torch.Tensor | None = None,
    ) -> dict[str, torch.Tensor]:
        """clips (B, T, Dv), clip_mask (B, T) bool, query ids (B, L) + lengths (B,), optional grid
        (B, T, H, W, Dv) -> spans (B, Q, 2) normalised (center, width), logits (B, Q), saliency (B, T),
        align_logit (B, T), and the pooled sentence / aligned video for the contrastive losses."""
        b, t, _ = clips.shape
        states, word_mask = self.text.tokens(input_ids, lengths)  # (B, L, Cw)
        words = self.word_proj(states)  # (B, L, D)
        sentence = masked_mean(words, word_mask)  # (B, D)
        x = self.clip_proj(clips) + self.clip_pos(torch.arange(t, device=clips.device)).unsqueeze(
            0
        )  # (B, T, D)
        align_logit, align = self.qsd(x, clip_mask, words, word_mask, sentence)
        aligned, context = x * align.unsqueeze(-1), x * (1 - align).unsqueeze(-1)
        context_grid = None
        if self.cfg.use_grid:
            if grid is None:
                raise ValueError("CDNetConfig.use_grid is set: pass the (B, T, H, W, Dv) grid features")
            context_grid = self.clip_proj(grid) * (1 - align).view(b, t, 1, 1, 1)
        x = self.cdd(aligned, context, context_grid, clip_mask, sentence)
        memory = torch.cat([x, words], dim=1)  # (B, T + L, D)
        padding = torch.cat([~clip_mask, ~word_mask], dim=1)
        for block in self.encoder:
            memory = block(memory, padding)
        q = self.queries.weight.unsqueeze(0).expand(b, -1, -1)  # (B, Q, D)
        for layer in self.decoder:
            q = layer(q, memory, padding)
        return {
            "spans": torch.sigmoid(self.span_head(q)),  # (B, Q, 2) (center, width) in [0, 1]
            "logits": self.class_head(q).squeeze(-1),  # (B, Q)
            "saliency": self.saliency_head(memory[:, :t]).squeeze(-1),  # (B, T)
            "align_logit": align_logit,
            "sentence": F.normalize(sentence, dim=-1),
            "aligned_video": F.normalize(masked_mean(x, clip_mask, weights=align), dim=-1),
        }


def qsd_losses(
    out: dict, clip_mask: torch.Tensor, inside: torch.Tensor, tau: float
) -> dict[str, torch.Tensor]:
    """Dual-level contrastive losses. `inside` (B, T) marks the clips of each query's target span."""
    sim = out["sentence"] @ out["aligned_video"].T / tau  # (B sentences, B videos)
    target = torch.arange(sim.shape[0], device=sim.device)
    video_level = 0.5 * (F.cross_entropy(sim, target) + F.cross_entropy(sim.T, target))
    logits = out["align_logit"].masked_fill(~clip_mask, -1e4) / tau  # (B, T)
    negatives = torch.logsumexp(logits.masked_fill(inside, -1e4), dim=1, keepdim=True)  # (B, 1)
    per_clip = -(logits - torch.logaddexp(logits, negatives))  # -log softmax of each positive vs negatives
    clip_level = (per_clip * inside).sum() / inside.sum().clamp_min(1)
    return {"video_contrast": video_level, "clip_contrast": clip_level}
