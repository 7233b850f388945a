"""Train CDNet on MovingShapes moment queries; evaluate with the moment metrics; write a run folder.

Each training item is one (video, moment query) pair; the target is the query's [start, end] window as a
normalised (center, width) span. Clip t covers [t / fps, (t + 1) / fps); it is "inside" a window when its
centre is. The state with the best validation R1@0.5 + mIoU is kept; the test split is scored at the end,
next to a random-span baseline with the same number of predictions per query.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from xmr.models.checkpoint import save_run
from xmr.models.data.video import VideoData
from xmr.models.evaluate.moments import evaluate_moments, random_baseline
from xmr.models.moments.cdnet import CDNet, CDNetConfig, qsd_losses
from xmr.models.moments.items import batch_inputs, moment_items, targets_of
from xmr.models.moments.loss import MomentLoss
from xmr.models.tokenizer import TextLimits, train_tokenizer
from xmr.models.train.loop import FitConfig, Task, Validation, fit, seed_everything


@dataclass
class MomentTrainConfig:
    data: str = "moving-shapes"
    cache_dir: str = "runs/cache"
    n_train: int | None = None  # first n training videos (each brings its moment queries)
    n_eval: int | None = None
    epochs: int = 20
    batch_size: int = 32
    lr: float = 5e-4
    weight_decay: float = 1e-4
    grad_clip: float = 1.0
    use_grid: bool = False  # trilinear CDD sampling over the 4 x 4 grid of each clip
    contrast_weight: float = 1.0  # QSD's dual-level contrastive losses
    seed: int = 0
    data_overrides: dict | None = None
    backbone_steps: int | None = None


class MomentTask(Task):
    """CDNet on (video, moment query) pairs: span losses plus QSD's dual-level contrastive losses."""

    name = "train cdnet"

    def __init__(self, cfg: MomentTrainConfig):
        self.cfg = cfg
        self.splits = VideoData.of(asdict(cfg)).splits()
        train_split = self.splits["train"]
        self.items = moment_items(train_split)
        self.tokenizer = train_tokenizer(self.items.texts + train_split.flat_captions())
        f, k, d = train_split.regions.shape[1:]
        self.model = CDNet(
            CDNetConfig(
                vocab_size=self.tokenizer.get_vocab_size(),
                clip_dim=d,
                use_grid=cfg.use_grid,
                grid=tuple(train_split.grid),
                max_clips=max(128, f),
            )
        )
        self.limits = TextLimits(max_tokens=self.model.cfg.max_tokens)
        self.criterion = MomentLoss()
        self.size = len(self.items.texts)

    def loss(self, batch: np.ndarray, rng: np.random.Generator, epoch: int) -> torch.Tensor:
        split, items = self.splits["train"], self.items
        clips, mask, ids, lengths, grid = batch_inputs(
            self.model, split, items, batch, self.tokenizer, self.limits
        )
        outputs = self.model(clips, mask, ids, lengths, grid)
        targets, inside = targets_of(items, batch, split.regions.shape[1], split.fps)
        loss, _ = self.criterion({**outputs, "clip_mask": mask}, targets)
        contrast = qsd_losses(outputs, mask, inside & mask, self.model.cfg.tau)
        return loss + self.cfg.contrast_weight * (contrast["video_contrast"] + contrast["clip_contrast"])

    def validate(self) -> Validation:
        """Early-stopping score R1@0.5 + mIoU; the history row carries every validation metric."""
        val = evaluate_moments(self.model, self.tokenizer, self.splits["val"])
        return Validation(
            score=val["R1@0.5"] + val["mIoU"],
            metrics=val,
            fields=val,
            line=f"val R1@0.5 {val['R1@0.5']:.1f}  R1@0.7 {val['R1@0.7']:.1f}  mIoU {val['mIoU']:.1f}",
        )

    def test(self) -> dict:
        """Test metrics next to a random-span baseline with as many predictions per query."""
        test = evaluate_moments(self.model, self.tokenizer, self.splits["test"])
        n = self.model.cfg.num_queries
        return {
            "test": test,
            "random_baseline": random_baseline(self.splits["test"], n_per_query=n, seed=self.cfg.seed),
        }

    def save(self, out: Path, metrics: dict) -> None:
        meta = {"train_config": asdict(self.cfg), "data": {"name": self.cfg.data, "kind": "moments"}}
        save_run(out, self.model, self.tokenizer, meta, metrics, model_name="cdnet")


def train_moment(cfg: MomentTrainConfig, out: Path) -> dict:
    """Train, keep the best-on-val state, evaluate on test, write the run folder; returns its metrics."""
    seed_everything(cfg.seed)
    task = MomentTask(cfg)
    return fit(task, FitConfig.of(cfg), out, rng=np.random.default_rng(cfg.seed)).metrics
