"""Train a text-video retrieval model (ViSERN or ProTA) on per-frame region features; write a run folder.

The video side sees cached backbone features (models/data/video.py): regions (B, F, K, D) for ViSERN,
frame tokens (B, F, D) (the mean over regions) for ProTA. An epoch visits every training video once with
one of its captions drawn at random (square batches, diagonal positives), as for the image models; the
state with the best validation rSum is kept and the test split is scored at the end.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from xmr.models.checkpoint import save_run
from xmr.models.data.video import VideoData, VideoFeatures
from xmr.models.errors import InputError
from xmr.models.evaluate.video import evaluate_video
from xmr.models.losses import make_loss
from xmr.models.tokenizer import TextLimits, encode_batch, train_tokenizer
from xmr.models.train.loop import BestState, lr_at, optimizer_step, seed_everything
from xmr.models.video.inputs import video_inputs
from xmr.models.video.prota import ProTA, ProTAConfig, ProTALoss
from xmr.models.video.visern import ViSERN, ViSERNConfig

VIDEO_MODELS = ("visern", "prota")


@dataclass
class VideoTrainConfig:
    model: str = "visern"  # visern | prota
    data: str = "moving-shapes"  # moving-shapes | video-features
    data_root: str | None = None  # folder of the public per-video feature format
    cache_dir: str = "runs/cache"  # backbone weights and extracted MovingShapes features
    n_train: int | None = None  # first n training videos (quick runs, tests)
    n_eval: int | None = None  # first n val/test videos
    epochs: int = 15
    batch_size: int = 64
    lr: float = 1e-3
    weight_decay: float = 1e-4
    loss: str = "triplet_hn"  # ViSERN's objective (ProTA has its own adaptive contrastive loss)
    warmup_epochs: int = 1  # ViSERN: all-negatives hinge first
    grad_clip: float = 2.0
    seed: int = 0
    data_overrides: dict | None = None  # MovingShapesConfig fields (tests use tiny splits)
    backbone_steps: int | None = None  # frame-backbone pre-training steps (None: BackboneConfig's default)


def build_model(name: str, data: VideoFeatures, vocab_size: int, overrides: dict | None = None):
    if name == "visern":
        return ViSERN(
            ViSERNConfig(vocab_size=vocab_size, region_dim=int(data.regions.shape[-1]), **(overrides or {}))
        )
    if name == "prota":
        return ProTA(
            ProTAConfig(
                vocab_size=vocab_size,
                frame_dim=int(data.regions.shape[-1]),
                max_frames=max(64, data.regions.shape[1]),
                **(overrides or {}),
            )
        )
    raise InputError(f"unknown video model {name!r}; valid: {', '.join(VIDEO_MODELS)}")


def train_video(cfg: VideoTrainConfig, out: Path, model_overrides: dict | None = None) -> dict:
    seed_everything(cfg.seed)
    splits = VideoData.of(asdict(cfg)).splits()
    train_split = splits["train"]
    tokenizer = train_tokenizer(train_split.flat_captions())
    model = build_model(cfg.model, train_split, tokenizer.get_vocab_size(), model_overrides)
    limits = TextLimits(max_tokens=model.cfg.max_tokens)
    if cfg.model == "prota":
        main_loss = warm_loss = ProTALoss(model.cfg.tau, model.cfg.margin, model.cfg.beta)
    else:
        main_loss = make_loss(cfg.loss)
        warm_loss = make_loss(cfg.loss, hardest=False) if cfg.loss == "triplet_hn" else main_loss
        if main_loss.needs_relevance:
            raise InputError(f"loss {cfg.loss!r} needs continuous labels, which video data does not have")
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)

    n, cpv = len(train_split), train_split.captions_per_video
    steps_per_epoch = max(1, n // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    rng = np.random.default_rng(cfg.seed)
    best, history = BestState(), []
    start = time.time()
    bar = tqdm(total=total, desc=f"train {cfg.model}", unit="step")
    for epoch in range(cfg.epochs):
        model.train()
        loss_fn = warm_loss if epoch < cfg.warmup_epochs else main_loss
        order = rng.permutation(n)
        running = 0.0
        for i in range(steps_per_epoch):
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch * steps_per_epoch + i, total, steps_per_epoch, cfg.lr)
            idx = np.sort(order[i * cfg.batch_size : (i + 1) * cfg.batch_size])
            texts = [train_split.captions[v][rng.integers(cpv)] for v in idx]
            ids, lengths = map(torch.from_numpy, encode_batch(tokenizer, texts, limits))
            video = model.encode_video(*video_inputs(model, train_split, idx))
            text = model.encode_text(ids, lengths)
            if isinstance(model, ProTA):
                loss, _ = loss_fn(model.pair_scores(text, video), text, video)  # (B texts, B videos)
            else:
                loss = loss_fn(video @ text.T)  # (B videos, B texts), diagonal positives
            running += optimizer_step(model, opt, loss, cfg.grad_clip)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{running / (i + 1):.3f}")
        val = evaluate_video(model, tokenizer, splits["val"])
        history.append({"epoch": epoch + 1, "loss": running / steps_per_epoch, "val_rsum": val["rsum"]})
        bar.write(
            f"epoch {epoch + 1}: loss {running / steps_per_epoch:.4f}  val rSum {val['rsum']:.1f}  "
            f"t2v R@1 {val['t2i_R@1']:.1f}"
        )
        best.update(model, val["rsum"], val, epoch + 1)
    bar.close()
    best_val = best.restore(model)
    test = evaluate_video(model, tokenizer, splits["test"])
    metrics = {
        "test": test,
        "val": best_val,
        "history": history,
        "train_seconds": round(time.time() - start, 1),
    }
    meta = {"train_config": asdict(cfg), "data": {"name": cfg.data, "kind": "video"}}
    save_run(out, model, tokenizer, meta, metrics, model_name=cfg.model)
    return metrics
