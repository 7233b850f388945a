"""ProTA: probabilistic token aggregation for text-video retrieval.

Paper: "ProTA: Probabilistic Token Aggregation for Text-Video Retrieval" (only its abstract was available).
What follows the abstract's words:
- Dual partial-related aggregation: token representations are disentangled into a low-dimension space
  and a high-dimension space, and re-aggregated in each with the same partial-related aggregation
  `l(t_i -> v) = sum_j s_ij softmax_j(lam s_ij)`, and v -> t symmetrically.
- Token-based probabilistic alignment: every token is a diagonal Gaussian N(mu, sigma^2); tokens are compared
  with the closed-form 2-Wasserstein distance `||mu_a - mu_b||^2 + ||sigma_a - sigma_b||^2` (no sampling, so
  inference is deterministic).
- An adaptive contrastive loss, plus `beta * KL(N(mu, sigma) || N(0, I))` keeping the token distributions
  compact.

Reconstructed (no method section was available), with the defaults chosen here (all in `ProTAConfig`):
- Towers: frame features -> linear + learned positions -> `temporal_layers` masked Transformer blocks ->
  Gaussian heads (mu, sigma = softplus + 1e-4); text -> RVSE's `TextTower.tokens` -> the tower's own
  projection as the mu head, a second linear as the sigma head.
- The two spaces. Low: the token means mu themselves (D = embed_dim), compared by cosine. High: a second,
  learned space of its own, `high_dim` = 4 D by default: each modality has a lift `HighHead`
  (`text_high`, `video_high`) taking every token's mu to `z = normalize(GELU(W mu + b))` in R^{4D}; the
  similarity there is a multi-kernel Gaussian Gram matrix on the distances between lifted tokens,
  `K_ij = mean_s exp(-||z_ti - z_vj||^2 / (2 s^2))`, widths s = (0.5, 1, 2) (unit vectors, so the
  distances lie in [0, 2] whatever the dimension). What disentangles the two: separate parameters and a
  separate space. The lift reads the whole mean (its norm too, which the cosine discards) through a
  non-linearity, so the high score of a token pair is not a function of its low cosine (two pairs with
  the same cosine score differently: tests/test_prota.py), and the loss shapes it through its own weights.
  The two lifts start equal (a random GELU feature map, under which lifted cosines roughly follow the low
  ones) and drift apart in training. The lift reads mu, not the towers' hidden states, so the served
  towers' outputs, the stored gallery (mu, sigma) and the pair scorer's inputs are what they were: the
  pair scorer applies the lifts itself: per shortlist of K videos of M frames a (K M, D) x (D, 4D)
  product, the larger part of its arithmetic (perf/figures/prota_rerank.md has the times). Runs saved
  before the lift (their config has no `high_dim`) load with `high_dim = 0` and keep the score they were
  trained with: the Gram of the low-dimension cosine. Measured on MovingShapes (3 epochs, one seed each,
  perf/figures/prota_rerank.md): exhaustive pair-score t2v R@1 71.9 with the lift against 70.9 with the
  Gram of the low cosine, first stage 77.6 against 75.9: no loss, a gain within seed noise; the pair
  scorer costs several times more per video.
- Aggregation: masked mean over the valid tokens of one side of the per-token scores, both directions
  averaged; lam = 10. The Gram is averaged over its widths.
- The Gaussians are compared on the unit sphere's scale: mean mu / ||mu||, std sigma / sqrt(D). The prior
  N(0, I) of the KL term then has total variance 1, the same scale as a unit mean, and the W2 term stays
  comparable to the cosine terms for any D. Token-level probabilistic similarity is -W2^2, aggregated like
  the low-dimension path.
- Score = w_low * low + w_high * high + w_prob * prob with weights (1, 0.5, 0.25): per unit of cosine each
  term then moves the score by a similar amount (-W2^2 of unit means is 2 cos - 2; the Gram's slope in
  the cosine of its own space is <= 1.75).
- Adaptive margin: for a positive pair, m = margin * (mean sigma of the text tokens + mean sigma of the
  frames) / 2, subtracted from the positive's score before a symmetric InfoNCE (tau = 0.05). Uncertain
  pairs must win by more; the gradient reaches sigma, which, with the KL term pulling sigma towards 1, is
  what makes the distributions "compact". KL per token is summed over dims, averaged over the valid tokens
  of each modality, and the two modalities averaged (so 64 frames do not outweigh 12 words).

Reconstructed too, beyond the abstract: the global embeddings and their loss term. They serve ProTA at
scale as a two-stage retriever (models/video/two_stage.py: a FAISS first stage over global video
embeddings, then the pair scorer re-ranks its shortlist); the abstract says nothing of how the global
embedding is formed or trained, so both choices below are ours:
- Global embedding of either side = L2-normalise(linear(masked mean of mu)), one linear per modality
  (`text_global`, `video_global`), initialised to the identity (so at init it is the normalised mean of
  mu, the embedding this model had before the term existed; runs saved without these weights load with
  the identity).
- Loss += `w_global * InfoNCE(text_emb @ video_emb.T, tau_global)` (symmetric, the same diagonal positives),
  defaults w_global = 1, tau_global = 0.05. Why: the token-level objective only shapes the mean of mu
  through the aggregated token score, which is not the cosine of the means (lam = 10 is nearly a max over
  tokens), so without a term of its own the global embedding ranks poorly and the first stage's shortlist
  misses the positive (tests/test_prota.py: global R@1 37.5% without the term, 100% with it, on 32 toy
  pairs after 40 steps). The projection lets the global space specialise without bending the token space;
  the gradient of the term also reaches the mu heads, a mild multi-task pull. `w_global = 0` trains the
  token objective alone (the projections then get no gradient and stay the identity).

Like CLIP, the model exposes `encode_text` / `encode_video`; serving exports the two towers and a small pair
scorer that re-ranks a first-stage shortlist with the token-level score.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from xmr.models.image_text.rvse import Block, TextTower
from xmr.models.layers import masked_mean
from xmr.models.losses import InfoNCE
from xmr.models.losses.mining import default_pos_mask

NEG = -1e4  # finite "minus infinity" for masked logits: a fully masked row gives zeros, never NaN


@dataclass
class ProTAConfig:
    vocab_size: int = 0  # set from the tokenizer at training time
    frame_dim: int = 0  # size of the precomputed per-frame features, set from the data
    embed_dim: int = 128  # D: token Gaussians and global embeddings live here
    # text tower
    word_dim: int = 128
    text_layers: int = 2
    text_heads: int = 4
    max_tokens: int = 32  # positions the text tower knows; the tokenizer truncates to this
    # video tower
    temporal_layers: int = 1  # one block is enough to give frames their context
    temporal_heads: int = 4
    max_frames: int = 64  # positions the temporal Transformer knows; data sampling caps M at this
    dropout: float = 0.1
    # scoring
    lam: float = 10.0  # aggregation sharpness: 0 = plain mean over tokens, large = max
    kernel_sigmas: tuple[float, ...] = (0.5, 1.0, 2.0)  # Gram widths on unit vectors (distances in [0, 2])
    # the high-dimension space: a learned lift of every token's mu to `high_dim` dims (None: 4 * embed_dim);
    # 0 = no lift, the Gram of the low-dimension cosine (runs saved before the lift existed load this way)
    high_dim: int | None = None
    w_low: float = 1.0  # cosine aggregation
    w_high: float = 0.5  # Gram aggregation (steeper in cosine near 1, so a smaller weight)
    w_prob: float = 0.25  # -W2^2 aggregation (twice the cosine's slope, so a quarter)
    # loss
    tau: float = 0.05  # InfoNCE temperature
    margin: float = 0.1  # adaptive margin scale: margin * mean sigma of the positive pair
    beta: float = 1e-3  # KL weight: a gentle pull towards N(0, I), not a VAE
    w_global: float = 1.0  # weight of the global-embedding InfoNCE (first-stage retrieval); 0 = off
    tau_global: float = 0.05  # its temperature

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def high_features(self) -> int:
        """The size of the high-dimension space; 0 when there is none (the legacy Gram of the low cosine)."""
        return 4 * self.embed_dim if self.high_dim is None else self.high_dim

    @classmethod
    def from_dict(cls, d: dict) -> ProTAConfig:
        d = dict(d)
        if "kernel_sigmas" in d:
            d["kernel_sigmas"] = tuple(d["kernel_sigmas"])
        d.setdefault("high_dim", 0)  # a run saved before the high-dimension lift: score it as it was trained
        return cls(**d)


class TextTokens(NamedTuple):
    embedding: torch.Tensor | None  # (B, D) unit vectors for first-stage retrieval
    mu: torch.Tensor  # (B, N, D)
    sigma: torch.Tensor  # (B, N, D), > 0
    mask: torch.Tensor  # (B, N) bool, True = a real token


class VideoTokens(NamedTuple):
    embedding: torch.Tensor | None  # (B, D)
    mu: torch.Tensor  # (B, M, D)
    sigma: torch.Tensor  # (B, M, D)
    mask: torch.Tensor  # (B, M) bool, True = a real frame


# ----------------------------------------------------------------------------- token-level similarities
# Text tokens (Bt, N, D) against video tokens (Bv, M, D) -> (Bt, Bv, N, M), every text against every video.


def token_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a_i . b_j for (Bt, N, D) x (Bv, M, D) -> (Bt, Bv, N, M) by broadcast MatMul (TensorRT: no Einsum)."""
    return a.unsqueeze(1) @ b.unsqueeze(0).transpose(-1, -2)


def pairwise_sq_dist(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """||a_i - b_j||^2 for (Bt, N, D) x (Bv, M, D) -> (Bt, Bv, N, M), by expansion (no (.., D) blow-up)."""
    a2 = (a * a).sum(-1)[:, None, :, None]  # (Bt, 1, N, 1)
    b2 = (b * b).sum(-1)[None, :, None, :]  # (1, Bv, 1, M)
    return (a2 + b2 - 2.0 * token_dot(a, b)).clamp_min(0.0)


def wasserstein2(
    mu_a: torch.Tensor, sigma_a: torch.Tensor, mu_b: torch.Tensor, sigma_b: torch.Tensor
) -> torch.Tensor:
    """Squared 2-Wasserstein distance between diagonal Gaussians, every token pair -> (Bt, Bv, N, M)."""
    return pairwise_sq_dist(mu_a, mu_b) + pairwise_sq_dist(sigma_a, sigma_b)


def to_sphere(mu: torch.Tensor, sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian on the unit sphere's scale: unit mean, std / sqrt(D)."""
    return F.normalize(mu, dim=-1), sigma / math.sqrt(mu.shape[-1])


def gaussian_gram(cos: torch.Tensor, kernel_sigmas: tuple[float, ...]) -> torch.Tensor:
    """Multi-kernel Gram of unit vectors from their cosine: mean_s exp(-||t - v||^2 / (2 s^2))."""
    d2 = (2.0 - 2.0 * cos).clamp_min(0.0)  # ||t - v||^2 of unit vectors
    return torch.stack([torch.exp(-d2 / (2.0 * s * s)) for s in kernel_sigmas]).mean(0)


def aggregate_rows(sim: torch.Tensor, row_valid: torch.Tensor, col_valid: torch.Tensor, lam: float):
    """One direction of partial-related aggregation: per row token, sum_j s_ij softmax_j(lam s_ij) over
    the valid columns; then the mean over the valid rows. sim (..., R, C), row_valid (..., R),
    col_valid (..., C) broadcastable -> (...)."""
    cols = col_valid.unsqueeze(-2)  # (..., 1, C)
    w = torch.softmax((lam * sim).masked_fill(~cols, NEG), dim=-1) * cols.to(sim.dtype)
    per_row = (sim * w).sum(-1)  # (..., R)
    return masked_mean(per_row, row_valid, dim=-1)


def partial_aggregate(sim: torch.Tensor, text_valid: torch.Tensor, video_valid: torch.Tensor, lam: float):
    """Both directions, averaged: sim (Bt, Bv, N, M), text_valid (Bt, N), video_valid (Bv, M) -> (Bt, Bv)."""
    tv, vv = text_valid[:, None, :], video_valid[None, :, :]  # (Bt, 1, N), (1, Bv, M)
    t2v = aggregate_rows(sim, tv, vv, lam)
    v2t = aggregate_rows(sim.transpose(-1, -2), vv, tv, lam)
    return 0.5 * (t2v + v2t)


def score_terms(
    text: TextTokens,
    video: VideoTokens,
    lam: float,
    kernel_sigmas: tuple[float, ...],
    text_high: torch.Tensor | None = None,
    video_high: torch.Tensor | None = None,
):
    """The three (Bt, Bv) scores: low (cosine), high (Gram), prob (-W2^2), each aggregated over tokens.
    `text_high` (Bt, N, H) / `video_high` (Bv, M, H): the tokens' unit vectors in the high-dimension space
    (`HighHead`), where the Gram is computed; without them (legacy runs) the Gram reads the low cosine."""
    t_mu, t_sigma = to_sphere(text.mu, text.sigma)
    v_mu, v_sigma = to_sphere(video.mu, video.sigma)
    cos = token_dot(t_mu, v_mu)  # (Bt, Bv, N, M)
    high_cos = cos if text_high is None or video_high is None else token_dot(text_high, video_high)
    prob = -wasserstein2(t_mu, t_sigma, v_mu, v_sigma)
    return {
        "low": partial_aggregate(cos, text.mask, video.mask, lam),
        "high": partial_aggregate(gaussian_gram(high_cos, kernel_sigmas), text.mask, video.mask, lam),
        "prob": partial_aggregate(prob, text.mask, video.mask, lam),
    }


# ----------------------------------------------------------------------------- towers


class GaussianHead(nn.Module):
    """Token states -> (mu, sigma); sigma starts near 1, the prior's."""

    def __init__(self, d_in: int, d_out: int, mu: nn.Linear | None = None):
        super().__init__()
        self.mu = mu if mu is not None else nn.Linear(d_in, d_out)
        self.sigma = nn.Linear(d_in, d_out)
        nn.init.constant_(self.sigma.bias, math.log(math.e - 1.0))  # softplus^-1(1)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.mu(x), F.softplus(self.sigma(x)) + 1e-4


class HighHead(nn.Module):
    """Token means mu (..., D) -> unit vectors (..., H) of the high-dimension space:
    `normalize(GELU(W mu + b))`, H = 4 D by default. One per modality; the pair scorer applies it (the
    towers' outputs stay mu and sigma, so the served gallery is unchanged)."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.lift = nn.Linear(d_in, d_out)

    def forward(self, mu: torch.Tensor) -> torch.Tensor:
        return F.normalize(F.gelu(self.lift(mu)), dim=-1)


class VideoTower(nn.Module):
    """Frame features (B, M, F) + mask -> temporal Transformer -> frame states (B, M, C)."""

    def __init__(self, cfg: ProTAConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.frame_dim, cfg.embed_dim)
        self.pos = nn.Embedding(cfg.max_frames, cfg.embed_dim)
        self.blocks = nn.ModuleList(
            Block(cfg.embed_dim, cfg.temporal_heads, cfg.dropout) for _ in range(cfg.temporal_layers)
        )
        self.ln = nn.LayerNorm(cfg.embed_dim)

    def forward(self, frames: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        positions = torch.arange(frames.shape[1], device=frames.device)
        x = self.proj(frames) + self.pos(positions).unsqueeze(0)  # (B, M, C)
        padding = ~mask & mask.any(dim=1, keepdim=True)  # a video with no valid frame attends to all: no NaN
        for block in self.blocks:
            x = block(x, padding)
        return self.ln(x)


# ----------------------------------------------------------------------------- the model


def identity_linear(d: int) -> nn.Linear:
    layer = nn.Linear(d, d)
    with torch.no_grad():
        layer.weight.copy_(torch.eye(d))
        layer.bias.zero_()
    return layer


class ProTA(nn.Module):
    def __init__(self, cfg: ProTAConfig):
        super().__init__()
        if cfg.vocab_size <= 0 or cfg.frame_dim <= 0:
            raise ValueError(
                f"ProTAConfig.vocab_size ({cfg.vocab_size}) and frame_dim ({cfg.frame_dim}) must be set "
                "from the tokenizer and the data"
            )
        self.cfg = cfg
        self.text = TextTower.of(cfg)
        self.text_head = GaussianHead(cfg.word_dim, cfg.embed_dim, mu=self.text.proj)  # reuse: no dead params
        self.video = VideoTower(cfg)
        self.video_head = GaussianHead(cfg.embed_dim, cfg.embed_dim)
        self.text_global = identity_linear(cfg.embed_dim)  # global (first-stage) projections
        self.video_global = identity_linear(cfg.embed_dim)
        if cfg.high_features > 0:  # the high-dimension space: its own lift per modality, the same at init
            self.text_high = HighHead(cfg.embed_dim, cfg.high_features)
            self.video_high = HighHead(cfg.embed_dim, cfg.high_features)
            self.video_high.load_state_dict(self.text_high.state_dict())
        else:
            self.text_high = self.video_high = None

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        """Runs saved before the global projections existed load with them at the identity."""
        for name in ("text_global", "video_global"):
            if f"{prefix}{name}.weight" not in state_dict and f"{prefix}{name}.bias" not in state_dict:
                state_dict[f"{prefix}{name}.weight"] = torch.eye(self.cfg.embed_dim)
                state_dict[f"{prefix}{name}.bias"] = torch.zeros(self.cfg.embed_dim)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    def encode_text(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> TextTokens:
        """(B, N) int64 ids right-padded with 0, (B,) int64 lengths -> token Gaussians + global embedding."""
        states, valid = self.text.tokens(input_ids, lengths)  # (B, N, C), (B, N)
        mu, sigma = self.text_head(states)  # (B, N, D) each
        embedding = F.normalize(self.text_global(masked_mean(mu, valid.unsqueeze(-1), 1)), dim=-1)
        return TextTokens(embedding, mu, sigma, valid)

    def encode_video(self, frames: torch.Tensor, mask: torch.Tensor) -> VideoTokens:
        """(B, M, F) float32 frame features, (B, M) bool mask (True = real frame) -> the same for frames."""
        mu, sigma = self.video_head(self.video(frames, mask))  # (B, M, D) each
        embedding = F.normalize(self.video_global(masked_mean(mu, mask.unsqueeze(-1), 1)), dim=-1)
        return VideoTokens(embedding, mu, sigma, mask)

    def pair_scores(self, text: TextTokens, video: VideoTokens) -> torch.Tensor:
        """(Bt, Bv) token-level score of every text against every video; higher = closer."""
        cfg = self.cfg
        highs = (None, None)  # legacy runs (high_dim = 0): the Gram of the low cosine
        if self.text_high is not None:
            highs = (self.text_high(text.mu), self.video_high(video.mu))  # (Bt, N, H), (Bv, M, H)
        terms = score_terms(text, video, cfg.lam, cfg.kernel_sigmas, *highs)
        return cfg.w_low * terms["low"] + cfg.w_high * terms["high"] + cfg.w_prob * terms["prob"]

    # The exported parts are `encode_text`, `encode_video` and `rerank`; their tensor names, dtypes and
    # dynamic dims are in export/iospec.py (video_text_encoder_spec(tokens=True), prota_video_encoder_spec,
    # prota_pair_scorer_spec).
    def rerank(self, text_mu, text_sigma, lengths, video_mu, video_sigma, frame_mask) -> torch.Tensor:
        """The served pair scorer: one query's token Gaussians (1, N, D) x2 with its length (1,) against a
        shortlist of K videos' (K, M, D) x2 with their frame mask (K, M) -> scores (K,). The high-dimension
        lifts of both sides are computed here, from the means."""
        text_valid = torch.arange(text_mu.shape[1], device=text_mu.device).unsqueeze(0) < lengths.unsqueeze(1)
        text = TextTokens(None, text_mu, text_sigma, text_valid)
        video = VideoTokens(None, video_mu, video_sigma, frame_mask)
        return self.pair_scores(text, video).squeeze(0)  # (1, K) -> (K,)

    def forward(self, frames, mask, input_ids, lengths) -> torch.Tensor:
        """(B_txt, B_vid) scores."""
        return self.pair_scores(self.encode_text(input_ids, lengths), self.encode_video(frames, mask))


# ----------------------------------------------------------------------------- loss


def kl_to_standard(mu: torch.Tensor, sigma: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    """KL(N(mu, sigma^2) || N(0, I)) per token, summed over dims, averaged over valid tokens."""
    kl = 0.5 * (sigma * sigma + mu * mu - 1.0 - 2.0 * torch.log(sigma)).sum(-1)  # (B, T)
    return masked_mean(kl, valid, dim=-1).mean()


class ProTALoss(nn.Module):
    """Symmetric InfoNCE with an uncertainty-adaptive margin on the positives, + beta * KL, + w_global *
    symmetric InfoNCE of the global embeddings (the first stage's similarity)."""

    def __init__(
        self,
        tau: float = 0.05,
        margin: float = 0.1,
        beta: float = 1e-3,
        w_global: float = 1.0,
        tau_global: float = 0.05,
    ):
        super().__init__()
        self.nce, self.global_nce = InfoNCE(tau), InfoNCE(tau_global)
        self.margin, self.beta, self.w_global = margin, beta, w_global

    @classmethod
    def of(cls, cfg: ProTAConfig) -> ProTALoss:
        return cls(cfg.tau, cfg.margin, cfg.beta, cfg.w_global, cfg.tau_global)

    def forward(
        self,
        scores: torch.Tensor,
        text: TextTokens,
        video: VideoTokens,
        pos_mask: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        pos = default_pos_mask(scores, pos_mask)
        t_unc = masked_mean(text.sigma.mean(-1), text.mask, dim=-1)  # (Bt,)
        v_unc = masked_mean(video.sigma.mean(-1), video.mask, dim=-1)  # (Bv,)
        margins = self.margin * 0.5 * (t_unc[:, None] + v_unc[None, :]) * pos.to(scores.dtype)  # (Bt, Bv)
        nce = self.nce(scores - margins, pos)
        kl = 0.5 * (
            kl_to_standard(text.mu, text.sigma, text.mask) + kl_to_standard(video.mu, video.sigma, video.mask)
        )
        loss = nce + self.beta * kl
        parts = {"nce": nce.detach(), "kl": kl.detach(), "margin": margins.sum().detach() / pos.sum()}
        if self.w_global > 0:
            if text.embedding is None or video.embedding is None:
                raise ValueError("w_global > 0 needs the global embeddings of both sides")
            glob = self.global_nce(text.embedding @ video.embedding.T, pos)  # (Bt, Bv), like scores
            loss = loss + self.w_global * glob
            parts["global"] = glob.detach()
        return loss, parts
