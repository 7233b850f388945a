"""Train a text-video retrieval model (ViSERN or ProTA) on per-frame region features; write a run folder.

The video side sees cached backbone features (models/data/video.py): regions (B, F, K, D) for ViSERN,
frame tokens (B, F, D) (the mean over regions) for ProTA. An epoch visits every training video once with
one of its captions drawn at random (square batches, diagonal positives), as for the image models; the
state with the best validation rSum is kept and the test split is scored at the end.

Every ViSERN objective is trained the same way, as for the image models (models/train/image_text.py): the
learning rate warms up linearly over the first epoch, then decays (`fit`'s schedule), and the first
`warmup_epochs` epochs train `warmup_loss` whatever `loss` is. Before, Triplet-HN alone started with an
epoch of its all-negatives variant (Triplet-SH) and every other loss started with itself: a warm-up
objective specific to one loss. Now the warm-up objective is one setting for all losses. Its default
stays "triplet_sh" (one epoch), because the hardest-negative hinge from the first step collapses ViSERN
on MovingShapes (measured with the learning-rate ramp alone: after the first epoch the loss sits at 0.48,
about 2 x the margin, the value when every positive scores like its hardest negative, and val t2v R@1 is
0.3%, chance); `warmup_loss=None` trains `loss` from the first step. ProTA trains its own adaptive
contrastive loss throughout (it scores token sets, not a similarity matrix of embeddings, so no `LOSSES`
objective can stand in for it): `warmup_loss` does not apply to it.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from xmr.models.checkpoint import save_run
from xmr.models.data.video import VideoData, VideoFeatures
from xmr.models.errors import InputError
from xmr.models.evaluate.video import evaluate_video
from xmr.models.losses import make_loss
from xmr.models.tokenizer import TextLimits, encode_batch, train_tokenizer
from xmr.models.train.image_text import make_warmup_loss
from xmr.models.train.loop import FitConfig, Task, Validation, fit, seed_everything
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
    # ViSERN: objective of the first `warmup_epochs` epochs whatever `loss` is, the same for every loss:
    # "triplet_sh" (VSE's all-negatives hinge; Triplet-HN collapses without it), a LOSSES key, or None (the
    # main loss from the first step). ProTA ignores it (its own loss throughout).
    warmup_loss: str | None = "triplet_sh"
    warmup_epochs: int = 1
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


class VideoTask(Task):
    """ViSERN or ProTA on cached region features: each training video with one random caption."""

    def __init__(self, cfg: VideoTrainConfig, model_overrides: dict | None = None):
        self.cfg, self.name = cfg, f"train {cfg.model}"
        self.splits = VideoData.of(asdict(cfg)).splits()
        train_split = self.splits["train"]
        self.tokenizer = train_tokenizer(train_split.flat_captions())
        self.model = build_model(cfg.model, train_split, self.tokenizer.get_vocab_size(), model_overrides)
        self.limits = TextLimits(max_tokens=self.model.cfg.max_tokens)
        if cfg.model == "prota":
            self.main_loss = self.warm_loss = ProTALoss.of(self.model.cfg)  # w_global: the first stage
        else:
            self.main_loss = make_loss(cfg.loss)
            self.warm_loss = make_warmup_loss(cfg.warmup_loss) or self.main_loss
            for name, loss_fn in ((cfg.loss, self.main_loss), (cfg.warmup_loss, self.warm_loss)):
                if loss_fn.needs_relevance:
                    raise InputError(f"loss {name!r} needs continuous labels, which video data does not have")
        self.size = len(train_split)

    def loss(self, batch: np.ndarray, rng: np.random.Generator, epoch: int) -> torch.Tensor:
        split, idx = self.splits["train"], np.sort(batch)
        texts = [split.captions[v][rng.integers(split.captions_per_video)] for v in idx]
        ids, lengths = map(torch.from_numpy, encode_batch(self.tokenizer, texts, self.limits))
        video = self.model.encode_video(*video_inputs(self.model, split, idx))
        text = self.model.encode_text(ids, lengths)
        loss_fn = self.warm_loss if epoch < self.cfg.warmup_epochs else self.main_loss
        if isinstance(self.model, ProTA):
            return loss_fn(self.model.pair_scores(text, video), text, video)[0]  # (B texts, B videos)
        return loss_fn(video @ text.T)  # (B videos, B texts), diagonal positives

    def validate(self) -> Validation:
        val = evaluate_video(self.model, self.tokenizer, self.splits["val"])
        return Validation(
            score=val["rsum"],
            metrics=val,
            fields={"val_rsum": val["rsum"]},
            line=f"val rSum {val['rsum']:.1f}  t2v R@1 {val['t2i_R@1']:.1f}",
        )

    def test(self) -> dict:
        return {"test": evaluate_video(self.model, self.tokenizer, self.splits["test"])}

    def save(self, out: Path, metrics: dict) -> None:
        meta = {"train_config": asdict(self.cfg), "data": {"name": self.cfg.data, "kind": "video"}}
        save_run(out, self.model, self.tokenizer, meta, metrics, model_name=self.cfg.model)


def train_video(cfg: VideoTrainConfig, out: Path, model_overrides: dict | None = None) -> dict:
    """Train, keep the best-on-val state, evaluate on test, write the run folder; returns its metrics."""
    make_warmup_loss(cfg.warmup_loss)  # an unknown name fails before the data loads
    seed_everything(cfg.seed)
    task = VideoTask(cfg, model_overrides)
    return fit(task, FitConfig.of(cfg), out, rng=np.random.default_rng(cfg.seed)).metrics
