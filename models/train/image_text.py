"""Train RVSE++ on an image-caption split and write a run folder (see checkpoint.py).

An epoch visits every training image once, each paired with one of its captions drawn at random, so the
batch similarity matrix is square with positives on the diagonal. The model state with the best rSum on
the validation split is kept; the test split is scored once at the end.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from xmr.models.checkpoint import save_run
from xmr.models.data import load_split
from xmr.models.data.base import RetrievalSplit
from xmr.models.errors import InputError
from xmr.models.evaluate.image_text import evaluate
from xmr.models.image_text.inputs import image_inputs
from xmr.models.image_text.relevance import CaptionRelevance
from xmr.models.image_text.rvse import RVSE, RVSEConfig
from xmr.models.losses import LOSSES, make_loss
from xmr.models.tokenizer import TextLimits, encode_batch, train_tokenizer
from xmr.models.train.loop import BestState, lr_at, optimizer_step, seed_everything


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
    loss: str = "triplet_hn"  # a key of models.losses.LOSSES
    warmup_epochs: int = (
        1  # triplet_hn only: all-negatives hinge first, hardest negatives from scratch collapse
    )
    relevance: str = "lexical"  # continuous labels for kendall / bcls / listwise: lexical | minilm
    relevance_cache: str | None = None  # folder caching sentence embeddings (minilm)
    grad_clip: float = 2.0
    seed: int = 0
    threads: int | None = None  # torch intra-op threads; None leaves torch's default


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
        splits[role] = subset(split, n) if n else split
    return splits


def subset(split: RetrievalSplit, n: int) -> RetrievalSplit:
    return RetrievalSplit(split.name, split.split, split.images[:n], split.captions[:n], split.kind)


def make_model_config(split: RetrievalSplit, vocab_size: int, overrides: dict | None = None) -> RVSEConfig:
    cfg = RVSEConfig(vocab_size=vocab_size, **(overrides or {}))
    if split.kind == "regions":
        cfg.region_dim = int(split.images.shape[-1])
    else:
        cfg.image_size = int(split.images.shape[1])
    return cfg


def train(cfg: TrainConfig, out: Path, model_overrides: dict | None = None) -> dict:
    """Train, keep the best-on-val state, evaluate on test, write the run folder; returns its metrics."""
    if cfg.loss not in LOSSES:
        raise InputError(f"unknown loss {cfg.loss!r}; valid: {', '.join(sorted(LOSSES))}")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    seed_everything(cfg.seed)
    splits = load_splits(cfg)
    train_split = splits["train"]
    tokenizer = train_tokenizer(train_split.flat_captions())
    model = RVSE(make_model_config(train_split, tokenizer.get_vocab_size(), model_overrides))
    limits = TextLimits(max_tokens=model.cfg.max_tokens)
    main_loss = make_loss(cfg.loss)
    warm_loss = make_loss(cfg.loss, hardest=False) if cfg.loss == "triplet_hn" else main_loss
    labels = None  # continuous labels, for the losses that learn from them
    if main_loss.needs_relevance:
        labels = CaptionRelevance(train_split.captions, cfg.relevance, cfg.relevance_cache)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    n = len(train_split.images)
    steps_per_epoch = max(
        1, n // cfg.batch_size
    )  # drop the last partial batch: hardest negatives need it full
    total = steps_per_epoch * cfg.epochs
    rng = np.random.default_rng(cfg.seed)
    best = BestState()
    history = []
    start = time.time()
    bar = tqdm(total=total, desc="train", unit="step")
    for epoch in range(cfg.epochs):
        model.train()
        loss_fn = warm_loss if epoch < cfg.warmup_epochs else main_loss
        order = rng.permutation(n)
        running = 0.0
        for i in range(steps_per_epoch):
            step = epoch * steps_per_epoch + i
            for group in opt.param_groups:
                group["lr"] = lr_at(step, total, steps_per_epoch, cfg.lr)
            idx = np.sort(order[i * cfg.batch_size : (i + 1) * cfg.batch_size])  # images of the batch
            cpi = train_split.captions_per_image
            caption_idx = idx * cpi + rng.integers(cpi, size=len(idx))  # one random caption each (flat index)
            texts = [train_split.captions[c // cpi][c % cpi] for c in caption_idx]
            ids, lengths = encode_batch(tokenizer, texts, limits)
            images = image_inputs(train_split.images[idx], model.cfg)
            sim = model(
                images, torch.from_numpy(ids), torch.from_numpy(lengths)
            )  # (B, B), diagonal positives
            if labels is None:
                loss = loss_fn(sim)
            else:
                loss = loss_fn(sim, torch.from_numpy(labels.block(idx, caption_idx)))
            running += optimizer_step(model, opt, loss, cfg.grad_clip)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{running / (i + 1):.3f}")
        val = evaluate(model, tokenizer, splits["val"])
        history.append(
            {
                "epoch": epoch + 1,
                "loss": running / steps_per_epoch,
                "val_rsum": val["rsum"],
                "val_t2i_R@1": val["t2i_R@1"],
            }
        )
        bar.write(
            f"epoch {epoch + 1}: loss {running / steps_per_epoch:.4f}  val rSum {val['rsum']:.1f}  "
            f"t2i R@1 {val['t2i_R@1']:.1f}"
        )
        best.update(model, val["rsum"], val, epoch + 1)
    bar.close()
    best_val = best.restore(model)
    test = evaluate(model, tokenizer, splits["test"])
    metrics = {
        "test": test,
        "val": best_val,
        "history": history,
        "train_seconds": round(time.time() - start, 1),
    }
    meta = {"train_config": asdict(cfg), "data": {"name": cfg.data, "kind": train_split.kind}}
    save_run(out, model, tokenizer, meta, metrics)
    return metrics
