"""ViSERN: Visual Semantic Enhanced Reasoning Network for text-video retrieval.

Paper: "Exploiting Visual Semantic Reasoning for Video-Text Retrieval" (only its abstract was available):
frame regions are the vertices of a fully connected semantic correlation graph; random-walk rule-based graph
convolutions reason over it; region features are aggregated into frame features, which are encoded into a
video embedding compared with a text embedding.

What follows the abstract (and our design specification): per-frame fully connected region graphs; random-walk
GCN layers `V <- W_r(P g(V)) + V` with `P = D^-1 A~`, `A = phi(V) psi(V)^T` (`xmr.models.ops.random_walk_gcn`,
the custom op), 4 layers (VSRN's depth); regions -> frame by mean; a triplet ranking loss.

Reconstructed, with the defaults chosen (all in `ViSERNConfig`):
- `A~ = exp(A)` (a softmax over the valid regions of the frame); `affinity="relu"` gives `ReLU(A) + eps`.
- Frames -> video and words -> sentence use the same multi-level encoder (Dual Encoding, Dong et al.):
  level 1 the masked mean of the inputs, level 2 the masked mean of contextual states, level 3 1-D
  convolutions (kernels 2, 3, 4) over those states with masked max-pooling; the three are concatenated,
  projected and L2-normalised. Dual Encoding's level 2 is a bi-GRU; here it is a masked self-attention
  layer, because torch.export decomposes `aten.gru` into a loop that fixes the sequence length, and the
  exported towers must keep dynamic frame and token counts. With the key-padding mask an embedding does
  not depend on how much padding its batch carries (the served batcher pads requests together).
- Loss: Triplet-HN (VSE++), the RVSE++ default of this project, with one warm-up epoch of Triplet-SH.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import nn

from xmr.models.image_text.rvse import Block
from xmr.models.layers import masked_mean
from xmr.models.ops.random_walk_gcn import RandomWalkGCNLayer


@dataclass
class ViSERNConfig:
    vocab_size: int = 0  # set from the tokenizer
    region_dim: int = 96  # set from the data: D of (B, F, K, D) region features
    embed_dim: int = 256  # joint space
    gcn_dim: int = 128  # region features inside the graph
    gcn_layers: int = 4  # VSRN's depth
    affinity: str = "softmax"  # A~ = exp(A); "relu": ReLU(A) + eps
    context_layers: int = 1  # masked self-attention layers (level 2, in place of Dual Encoding's bi-GRU)
    heads: int = 4
    conv_channels: int = 128  # per kernel size, level 3 of the multi-level encoder
    conv_kernels: tuple[int, ...] = (2, 3, 4)
    word_dim: int = 128
    max_tokens: int = 32
    dropout: float = 0.1

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> ViSERNConfig:
        d = dict(d)
        d["conv_kernels"] = tuple(d.get("conv_kernels", cls.conv_kernels))
        return cls(**d)


class MultiLevelEncoder(nn.Module):
    """Dual Encoding's three levels over a masked sequence -> one L2-normalised embedding."""

    def __init__(self, dim: int, cfg: ViSERNConfig):
        super().__init__()
        self.context = nn.ModuleList(Block(dim, cfg.heads, cfg.dropout) for _ in range(cfg.context_layers))
        self.convs = nn.ModuleList(
            nn.Conv1d(dim, cfg.conv_channels, k, padding=k - 1) for k in cfg.conv_kernels
        )
        levels = 2 * dim + cfg.conv_channels * len(cfg.conv_kernels)
        self.drop = nn.Dropout(cfg.dropout)
        self.proj = nn.Linear(levels, cfg.embed_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        level1 = masked_mean(x, mask)  # (B, dim)
        states = x
        for block in self.context:
            states = block(states, ~mask)  # (B, T, dim), padding masked out of attention
        level2 = masked_mean(states, mask)
        t = x.shape[1]
        pooled = []
        for conv in self.convs:  # padding k-1 then keep the first T outputs: output t sees steps t-k+1..t
            y = torch.relu(conv(states.transpose(1, 2)))[:, :, :t]  # (B, C, T)
            pooled.append(y.masked_fill(~mask.unsqueeze(1), -1e4).amax(dim=2))
        z = torch.cat([level1, level2, *pooled], dim=1)
        return F.normalize(self.proj(self.drop(z)), dim=-1)


class VideoTower(nn.Module):
    """Regions (B, F, K, Dr) -> GCN per frame -> frames (B, F, C) -> multi-level -> (B, D)."""

    def __init__(self, cfg: ViSERNConfig):
        super().__init__()
        self.proj = nn.Linear(cfg.region_dim, cfg.gcn_dim)
        self.gcn = nn.ModuleList(RandomWalkGCNLayer(cfg.gcn_dim, cfg.affinity) for _ in range(cfg.gcn_layers))
        self.encoder = MultiLevelEncoder(cfg.gcn_dim, cfg)

    def forward(self, regions: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        b, f, k, _ = regions.shape
        v = self.proj(regions).reshape(b * f, k, -1)  # (B*F, K, C): one graph per frame
        region_mask = frame_mask.reshape(b * f, 1).expand(b * f, k)  # regions of padded frames are padding
        for layer in self.gcn:
            v = layer(v, region_mask)
        frames = v.mean(dim=1).reshape(b, f, -1)  # (B, F, C)
        return self.encoder(frames, frame_mask)


class TextTower(nn.Module):
    def __init__(self, cfg: ViSERNConfig):
        super().__init__()
        self.embed = nn.Embedding(cfg.vocab_size, cfg.word_dim, padding_idx=0)
        self.encoder = MultiLevelEncoder(cfg.word_dim, cfg)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        mask = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0) < lengths.unsqueeze(1)
        return self.encoder(self.embed(input_ids), mask)


class ViSERN(nn.Module):
    def __init__(self, cfg: ViSERNConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ViSERNConfig.vocab_size must be set from the tokenizer (got 0)")
        self.cfg = cfg
        self.video = VideoTower(cfg)
        self.text = TextTower(cfg)

    def encode_video(self, regions: torch.Tensor, frame_mask: torch.Tensor) -> torch.Tensor:
        """(B, F, K, Dr) region features, (B, F) bool valid frames -> (B, D) unit vectors."""
        return self.video(regions, frame_mask)

    def encode_text(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 token ids right-padded with 0, (B,) int64 lengths -> (B, D) unit vectors."""
        return self.text(input_ids, lengths)

    def forward(self, regions, frame_mask, input_ids, lengths) -> torch.Tensor:
        """Cosine similarity (B_video, B_text)."""
        return self.encode_video(regions, frame_mask) @ self.encode_text(input_ids, lengths).T
