"""Train RVSE++ on an image-caption split and write a run folder (see checkpoint.py).

RVSE++ is RVSE trained with SelHN (selectively hard negatives), so `loss="selhn"` is the default; any
key of `models.losses.LOSSES` can replace it. The losses that learn from continuous labels get the labels
their paper uses (`loss.label_kind`), computed from MiniLM sentence embeddings by default
(`relevance="minilm"`; `"lexical"` selects TF-IDF). Every loss is trained the same way: the learning
rate warms up over the first epoch for all of them, and no loss gets a different objective for its
first epochs unless `warmup_loss` asks for one (then every loss gets the same one).

An epoch visits every training image once, each paired with one of its captions drawn at random, so the
batch similarity matrix is square with positives on the diagonal. The model state with the best rSum on
the validation split is kept; the test split is scored once at the end.

With ``text_tower="minilm"`` the text encoder is all-MiniLM-L6-v2, frozen (models/image_text/minilm.py):
its 384-d sentence vectors of every train and val caption are computed once before the first epoch (in
memory; on disk too with ``text_cache``), so an epoch trains only the image tower and the text
projection, and validation projects the cached val vectors. The test split is scored by the whole
tower (BERT included) on token ids, as the exported graph will be.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from xmr.models.checkpoint import save_run
from xmr.models.data import load_split
from xmr.models.data.base import RetrievalSplit
from xmr.models.errors import InputError
from xmr.models.evaluate.image_text import embed_images, evaluate
from xmr.models.evaluate.retrieval import retrieval_metrics
from xmr.models.image_text.inputs import image_inputs
from xmr.models.image_text.relevance import CaptionRelevance
from xmr.models.image_text.rvse import RVSE, TEXT_TOWERS, RVSEConfig
from xmr.models.losses import LOSSES, TripletHN, make_loss
from xmr.models.tokenizer import TextLimits, encode_batch, train_tokenizer
from xmr.models.train.loop import FitConfig, Task, Validation, fit, seed_everything


@dataclass
class TrainConfig:
    data: str = "shapes"
    data_root: str | None = None  # folder of the precomputed-features format
    n_train: int | None = None  # use only the first n training images (quick runs, tests)
    n_eval: int | None = None  # use only the first n val/test images
    epochs: int = 12
    batch_size: int = 128
    lr: float = 2e-3  # AdamW, cosine decay to 0 after one warm-up epoch of linear ramp
    weight_decay: float = 1e-4
    loss: str = "selhn"  # a key of models.losses.LOSSES; SelHN makes RVSE into RVSE++
    # objective of the first `warmup_epochs` epochs, whatever `loss` is: None (the main loss from the start),
    # "triplet_sh" (VSE's all-negatives hinge) or a key of LOSSES. The same for every loss, so comparisons
    # stay fair (a Triplet-SH start is what SelHN automates, so giving it to Triplet-HN alone favours it).
    warmup_loss: str | None = None
    warmup_epochs: int = 1
    relevance: str = "minilm"  # continuous labels for kendall / bcls / listwise: minilm | lexical
    relevance_cache: str | None = None  # folder caching sentence embeddings (minilm)
    grad_clip: float = 2.0
    seed: int = 0
    threads: int | None = None  # torch intra-op threads; None leaves torch's default
    text_tower: str = "gru"  # "gru": trained from scratch | "minilm": frozen all-MiniLM-L6-v2 + projection
    text_cache: str | None = None  # folder caching the frozen MiniLM's caption vectors (minilm)


# (train, validation, test) file names per dataset: the VSE precomputed folders call validation "dev"
SPLIT_NAMES = {"shapes": ("train", "val", "test"), "precomputed": ("train", "dev", "test")}


def load_splits(cfg: TrainConfig) -> dict[str, RetrievalSplit]:
    """{"train", "val", "test"} splits, each cut to n_train / n_eval items when those are set."""
    names = SPLIT_NAMES.get(cfg.data, SPLIT_NAMES["shapes"])
    splits = {}
    for role, name, n in zip(
        ("train", "val", "test"), names, (cfg.n_train, cfg.n_eval, cfg.n_eval), strict=True
    ):
        split = load_split(cfg.data, name, root=cfg.data_root)
        splits[role] = split.subset(n) if n else split
    return splits


def make_model_config(split: RetrievalSplit, vocab_size: int, overrides: dict | None = None) -> RVSEConfig:
    cfg = RVSEConfig(vocab_size=vocab_size, **(overrides or {}))
    if split.kind == "regions":
        cfg.region_dim = int(split.images.shape[-1])
    else:
        cfg.image_size = int(split.images.shape[1])
    return cfg


class ImageTextTask(Task):
    """RVSE++ on an image-caption split: each training image with one random caption, square batches."""

    def __init__(self, cfg: TrainConfig, model_overrides: dict | None = None):
        self.cfg = cfg
        self.splits = load_splits(cfg)
        train_split = self.splits["train"]
        self.sentences: dict[str, torch.Tensor] | None = None  # minilm: cached caption vectors per split
        if cfg.text_tower == "minilm":
            self._init_minilm(train_split, model_overrides)
        else:
            self.tokenizer = train_tokenizer(train_split.flat_captions())
            self.model = RVSE(
                make_model_config(train_split, self.tokenizer.get_vocab_size(), model_overrides)
            )
            self.limits = TextLimits(max_tokens=self.model.cfg.max_tokens)
        self.main_loss = make_loss(cfg.loss)
        self.warm_loss = make_warmup_loss(cfg.warmup_loss) or self.main_loss
        self.labels = {}  # label kind -> continuous labels, for the losses that learn from them
        for loss_fn in (self.main_loss, self.warm_loss):
            kind = getattr(loss_fn, "label_kind", None) if loss_fn.needs_relevance else None
            if kind and kind not in self.labels:
                self.labels[kind] = CaptionRelevance(
                    train_split.captions, cfg.relevance, cfg.relevance_cache, kind=kind
                )
        self.size = len(train_split.images)

    def _init_minilm(self, train_split: RetrievalSplit, model_overrides: dict | None) -> None:
        """The MiniLM tokenizer, a model with the package's encoder weights, the cached caption vectors."""
        from xmr.models.image_text import minilm

        self.tokenizer = minilm.minilm_tokenizer()
        overrides = {**minilm.model_overrides(), **(model_overrides or {})}
        self.model = RVSE(make_model_config(train_split, self.tokenizer.get_vocab_size(), overrides))
        self.model.text.load_pretrained(self.model.cfg.text_encoder_sha256)
        self.limits = TextLimits(max_tokens=self.model.cfg.max_tokens)
        self.sentences = {
            role: torch.from_numpy(
                minilm.caption_sentences(
                    self.model.text,
                    self.tokenizer,
                    self.splits[role].flat_captions(),
                    self.limits,
                    self.cfg.text_cache,
                    self.model.cfg.text_encoder_sha256,
                )
            )
            for role in ("train", "val")
        }

    def loss(self, batch: np.ndarray, rng: np.random.Generator, epoch: int) -> torch.Tensor:
        split, idx = self.splits["train"], np.sort(batch)  # images of the batch
        cpi = split.captions_per_image
        caption_idx = idx * cpi + rng.integers(cpi, size=len(idx))  # one random caption each (flat index)
        images = image_inputs(split.images[idx], self.model.cfg)
        if self.sentences is None:
            texts = [split.captions[c // cpi][c % cpi] for c in caption_idx]
            ids, lengths = encode_batch(self.tokenizer, texts, self.limits)
            # (B, B) similarities, diagonal positives
            sim = self.model(images, torch.from_numpy(ids), torch.from_numpy(lengths))
        else:  # frozen MiniLM: only the projection of the cached caption vectors trains on the text side
            text = self.model.text.project(self.sentences["train"][torch.from_numpy(caption_idx)])
            sim = self.model.encode_image(images) @ text.T
        loss_fn = self.warm_loss if epoch < self.cfg.warmup_epochs else self.main_loss
        if not loss_fn.needs_relevance:
            return loss_fn(sim)
        return loss_fn(sim, torch.from_numpy(self.labels[loss_fn.label_kind].block(idx, caption_idx)))

    def validate(self) -> Validation:
        if self.sentences is None:
            val = evaluate(self.model, self.tokenizer, self.splits["val"])
        else:
            val = evaluate_cached(self.model, self.splits["val"], self.sentences["val"])
        return Validation(
            score=val["rsum"],
            metrics=val,
            fields={"val_rsum": val["rsum"], "val_t2i_R@1": val["t2i_R@1"]},
            line=f"val rSum {val['rsum']:.1f}  t2i R@1 {val['t2i_R@1']:.1f}",
        )

    def test(self) -> dict:
        return {"test": evaluate(self.model, self.tokenizer, self.splits["test"])}

    def save(self, out: Path, metrics: dict) -> None:
        meta = {
            "train_config": asdict(self.cfg),
            "data": {"name": self.cfg.data, "kind": self.splits["train"].kind},
        }
        save_run(out, self.model, self.tokenizer, meta, metrics)


def make_warmup_loss(name: str | None) -> torch.nn.Module | None:
    """The warm-up objective: None, "triplet_sh" (Triplet-HN's all-negatives variant) or a LOSSES key."""
    if name is None:
        return None
    if name == "triplet_sh":
        return TripletHN(hardest=False)
    if name not in LOSSES:
        raise InputError(f"unknown warm-up loss {name!r}; valid: triplet_sh, {', '.join(sorted(LOSSES))}")
    return make_loss(name)


@torch.no_grad()
def evaluate_cached(model: RVSE, split: RetrievalSplit, sentences: torch.Tensor) -> dict[str, float]:
    """``evaluate`` for a frozen MiniLM tower from the split's cached (N_captions, 384) sentence vectors:
    the same numbers up to float32 rounding, without running BERT again."""
    img = embed_images(model, split.images)
    txt = model.text.project(sentences).numpy()
    return retrieval_metrics(img @ txt.T, split.caption_image_index())


def train(cfg: TrainConfig, out: Path, model_overrides: dict | None = None) -> dict:
    """Train, keep the best-on-val state, evaluate on test, write the run folder; returns its metrics."""
    if cfg.loss not in LOSSES:
        raise InputError(f"unknown loss {cfg.loss!r}; valid: {', '.join(sorted(LOSSES))}")
    make_warmup_loss(cfg.warmup_loss)  # an unknown name fails before the data loads
    if cfg.text_tower not in TEXT_TOWERS:
        raise InputError(f"unknown text tower {cfg.text_tower!r}; valid: {', '.join(TEXT_TOWERS)}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    task = ImageTextTask(cfg, model_overrides)
    return fit(task, FitConfig.of(cfg), out, rng=np.random.default_rng(cfg.seed)).metrics
