"""RVSE++: residual visual-semantic embedding for image-text matching.

Paper: the RVSE++ paper (only its abstract was available): "residual visual semantic embedding" trained with
selectively hard negatives (SelHN). What follows the paper's words: an image tower that projects region
features and adds a *residual* branch to the projected features before pooling, a text tower, a joint
L2-normalised space scored by cosine similarity.

Reconstructed (no method section was available), with the defaults chosen here:
- Regions come from a small CNN backbone (CoordConv input, three stride-2 stages: 64x64 pixels -> an 8x8
  grid = 64 regions of `backbone_channels[-1]` dims), or directly from precomputed region features
  (`region_dim` set, the VSE family's public format).
- Residual embedding: `v = W x; v = v + MLP(LayerNorm(v))` (the MLP's last layer starts at zero, so training
  starts from the plain linear embedding).
- Pooling: GPO-style generalised pooling (Chen et al., VSE-infinity): per dimension, sort the R values in
  descending order and take a weighted sum whose weights are a softmax over scores generated from the
  positional encoding of the sorted index. GPO generates the scores with a bi-GRU; we use a 2-layer MLP, which
  is enough for a score per index and exports to plain ONNX ops. `pooling="meanmax"` is the simpler option.
- Text tower: word embedding + learned positions -> a small pre-norm Transformer with a key-padding mask ->
  masked mean pooling -> linear -> L2 norm. Our specification allows a bi-GRU or a small Transformer; the
  Transformer with a mask makes each caption's embedding independent of how much padding its batch carries,
  which the served model relies on (the dynamic batcher pads requests together).
- Text tower choice (`text_tower`): "gru" (the default, every run before this option) is the tower above,
  trained from scratch - the name is the VSE family's (VSE++ / SCAN train a GRU there); ours is the
  masked Transformer just described. "minilm" is a pretrained sentence encoder, all-MiniLM-L6-v2, frozen,
  with a trained projection (see minilm.py); both take (input_ids, lengths).

Like CLIP, the model exposes `encode_image` and `encode_text`; each tower is exported and served on its
own, and similarity / top-k live outside the networks.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from xmr.models.errors import InputError


@dataclass
class RVSEConfig:
    vocab_size: int = 0  # set from the tokenizer at training time
    embed_dim: int = 256  # joint space size; small world, small space
    # image tower
    image_size: int = 64  # Shapes renders 64x64
    backbone_channels: tuple[int, ...] = (32, 64, 128)  # 3 stride-2 stages: 8x8 grid of regions
    region_dim: int | None = None  # set for precomputed region features: the backbone is skipped
    pooling: str = "gpo"  # "gpo" | "meanmax"
    # text tower: "gru" reads all of these; "minilm" only max_tokens and the text_tower / text_encoder* fields
    word_dim: int = 128
    text_layers: int = 2
    text_heads: int = 4
    max_tokens: int = 32  # positions the text tower knows; the tokenizer truncates to this
    dropout: float = 0.1
    text_tower: str = "gru"  # "gru": TextTower, trained from scratch | "minilm": minilm.MiniLMTextTower
    text_encoder: dict | None = None  # "minilm": the frozen encoder's BertConfig fields (from its package)
    text_encoder_sha256: str | None = None  # "minilm": sha256 of the weights file the encoder was copied from
    # preprocessing facts that travel with the exported model (see preprocess.py)
    pixel_mean: tuple[float, float, float] = field(default=(0.1, 0.1, 0.1))
    pixel_std: tuple[float, float, float] = field(default=(0.25, 0.25, 0.25))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> RVSEConfig:
        d = dict(d)
        for k in ("backbone_channels", "pixel_mean", "pixel_std"):
            if k in d and d[k] is not None:
                d[k] = tuple(d[k])
        return cls(**d)


# ----------------------------------------------------------------------------- image tower


class Backbone(nn.Module):
    """Small CNN: (B, 3, H, W) -> region features (B, R, C) on an (H/8) x (W/8) grid."""

    def __init__(self, channels: tuple[int, ...]):
        super().__init__()
        layers, c_in = [], 3 + 2  # RGB + 2 coordinate channels (CoordConv): regions know where they are
        for c in channels:
            layers += [nn.Conv2d(c_in, c, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c), nn.ReLU()]
            c_in = c
        layers += [nn.Conv2d(c_in, c_in, 3, padding=1, bias=False), nn.BatchNorm2d(c_in), nn.ReLU()]
        self.net = nn.Sequential(*layers)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        b, _, h, w = pixels.shape
        ys = torch.linspace(-1.0, 1.0, h, dtype=pixels.dtype, device=pixels.device)
        xs = torch.linspace(-1.0, 1.0, w, dtype=pixels.dtype, device=pixels.device)
        coords = torch.stack(torch.meshgrid(ys, xs, indexing="ij"))  # (2, H, W)
        x = torch.cat([pixels, coords.unsqueeze(0).expand(b, -1, -1, -1)], dim=1)
        grid = self.net(x)  # (B, C, H/8, W/8)
        return grid.flatten(2).transpose(1, 2)  # (B, R, C)


class ResidualEmbedding(nn.Module):
    """v = W x; v = v + MLP(LN(v)): the residual branch added to the projected region features."""

    def __init__(self, d_in: int, d_out: int):
        super().__init__()
        self.proj = nn.Linear(d_in, d_out)
        self.norm = nn.LayerNorm(d_out)
        self.mlp = nn.Sequential(nn.Linear(d_out, d_out), nn.GELU(), nn.Linear(d_out, d_out))
        nn.init.zeros_(self.mlp[-1].weight)
        nn.init.zeros_(self.mlp[-1].bias)

    def forward(self, regions: torch.Tensor) -> torch.Tensor:
        v = self.proj(regions)  # (B, R, D)
        return v + self.mlp(self.norm(v))


def sinusoid(positions: torch.Tensor, dim: int) -> torch.Tensor:
    """Sinusoidal encoding of (N,) positions -> (N, dim)."""
    freqs = torch.exp(
        torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) * (-math.log(1e4) / dim)
    )
    angles = positions.float().unsqueeze(1) * freqs.unsqueeze(0)
    return torch.cat([torch.sin(angles), torch.cos(angles)], dim=1)


class GPOPooling(nn.Module):
    """Generalised pooling: per-dimension sorted values weighted by a softmax over index scores."""

    def __init__(self, pe_dim: int = 32, hidden: int = 32):
        super().__init__()
        self.pe_dim = pe_dim
        self.score = nn.Sequential(nn.Linear(pe_dim, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r = x.shape[1]
        sorted_x = torch.sort(x, dim=1, descending=True).values  # (B, R, D)
        pe = sinusoid(torch.arange(r, device=x.device), self.pe_dim)  # (R, pe)
        weights = torch.softmax(self.score(pe).squeeze(-1) / 0.1, dim=0)  # (R,)
        return (sorted_x * weights.view(1, r, 1)).sum(dim=1)  # (B, D)


class MeanMaxPooling(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=1) + x.amax(dim=1)


class ImageTower(nn.Module):
    def __init__(self, cfg: RVSEConfig):
        super().__init__()
        self.backbone = None if cfg.region_dim else Backbone(cfg.backbone_channels)
        d_regions = cfg.region_dim or cfg.backbone_channels[-1]
        self.embed = ResidualEmbedding(d_regions, cfg.embed_dim)
        self.pool = GPOPooling() if cfg.pooling == "gpo" else MeanMaxPooling()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        regions = x if self.backbone is None else self.backbone(x)  # (B, R, Dr)
        return F.normalize(self.pool(self.embed(regions)), dim=-1)  # (B, D)


# ----------------------------------------------------------------------------- text tower


class SelfAttention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor) -> torch.Tensor:
        b, t, c = x.shape
        q, k, v = (
            self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        )  # (B, h, T, c/h)
        att = (q @ k.transpose(-2, -1)) / math.sqrt(c // self.heads)  # (B, h, T, T)
        att = att.masked_fill(key_padding.view(b, 1, 1, t), float("-inf"))
        y = torch.softmax(att, dim=-1) @ v  # (B, h, T, c/h)
        return self.out(y.transpose(1, 2).reshape(b, t, c))


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, dropout: float):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = SelfAttention(dim, heads)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, key_padding: torch.Tensor) -> torch.Tensor:
        x = x + self.drop(self.attn(self.ln1(x), key_padding))
        return x + self.drop(self.mlp(self.ln2(x)))


class TextTower(nn.Module):
    """Words -> masked Transformer -> masked mean -> linear -> L2 norm; shared by the video models."""

    def __init__(
        self,
        vocab_size: int,
        dim: int,
        heads: int,
        layers: int,
        max_tokens: int,
        dropout: float,
        out_dim: int,
    ):
        super().__init__()
        self.tok = nn.Embedding(vocab_size, dim, padding_idx=0)
        self.pos = nn.Embedding(max_tokens, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, dropout) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.proj = nn.Linear(dim, out_dim)

    @classmethod
    def of(cls, cfg) -> TextTower:
        """The tower of a model config with the text fields vocab_size, word_dim, text_heads, text_layers,
        max_tokens, dropout and embed_dim (RVSEConfig, ProTAConfig)."""
        return cls(
            cfg.vocab_size,
            cfg.word_dim,
            cfg.text_heads,
            cfg.text_layers,
            cfg.max_tokens,
            cfg.dropout,
            cfg.embed_dim,
        )

    def tokens(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Contextual token states (B, T, C) and the valid-token mask (B, T)."""
        t = input_ids.shape[1]
        positions = torch.arange(t, device=input_ids.device)
        valid = positions.unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
        x = self.tok(input_ids) + self.pos(positions).unsqueeze(0)  # (B, T, C)
        for block in self.blocks:
            x = block(x, ~valid)
        return self.ln(x), valid

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        x, valid = self.tokens(input_ids, lengths)
        w = valid.unsqueeze(-1).to(x.dtype)
        pooled = (x * w).sum(dim=1) / w.sum(dim=1).clamp_min(1.0)  # masked mean (B, C)
        return F.normalize(self.proj(pooled), dim=-1)  # (B, D)


# ----------------------------------------------------------------------------- the model

TEXT_TOWERS = ("gru", "minilm")


class RVSE(nn.Module):
    def __init__(self, cfg: RVSEConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("RVSEConfig.vocab_size must be set from the tokenizer (got 0)")
        if cfg.text_tower not in TEXT_TOWERS:
            raise InputError(f"unknown text tower {cfg.text_tower!r}; valid: {', '.join(TEXT_TOWERS)}")
        self.cfg = cfg
        self.image = ImageTower(cfg)
        if cfg.text_tower == "gru":
            self.text = TextTower.of(cfg)
        else:  # imported here: transformers is an optional extra, the default tower does not need it
            from xmr.models.image_text.minilm import MiniLMTextTower

            self.text = MiniLMTextTower.of(cfg)

    def encode_image(self, x: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) normalised pixels, or (B, R, Dr) region features -> (B, D) unit vectors."""
        return self.image(x)

    def encode_text(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T) int64 token ids right-padded with 0, (B,) int64 lengths -> (B, D) unit vectors."""
        return self.text(input_ids, lengths)

    def forward(self, x, input_ids, lengths) -> torch.Tensor:
        """Cosine similarity (B_img, B_txt)."""
        return self.encode_image(x) @ self.encode_text(input_ids, lengths).T
