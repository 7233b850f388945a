"""Train CDNet on MovingShapes moment queries; evaluate with the moment metrics; write a run folder.

Each training item is one (video, moment query) pair; the target is the query's [start, end] window as a
normalised (center, width) span. Clip t covers [t / fps, (t + 1) / fps); it is "inside" a window when its
centre is. The state with the best validation R1@0.5 + mIoU is kept; the test split is scored at the end,
next to a random-span baseline with the same number of predictions per query.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from xmr.models.checkpoint import save_run
from xmr.models.data.video import VideoData
from xmr.models.evaluate.moments import evaluate_moments, random_baseline
from xmr.models.moments.cdnet import CDNet, CDNetConfig, qsd_losses
from xmr.models.moments.items import batch_inputs, moment_items, targets_of
from xmr.models.moments.loss import MomentLoss
from xmr.models.tokenizer import TextLimits, train_tokenizer
from xmr.models.train.loop import BestState, lr_at, optimizer_step, seed_everything


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

    def video_data(self) -> VideoData:
        """The data fields of this config."""
        return VideoData.of(asdict(self))


def train_moment(cfg: MomentTrainConfig, out: Path) -> dict:
    seed_everything(cfg.seed)
    splits = cfg.video_data().splits()
    train_split = splits["train"]
    items = moment_items(train_split)
    tokenizer = train_tokenizer(items.texts + train_split.flat_captions())
    f, k, d = train_split.regions.shape[1:]
    model = CDNet(
        CDNetConfig(
            vocab_size=tokenizer.get_vocab_size(),
            clip_dim=d,
            use_grid=cfg.use_grid,
            grid=tuple(train_split.grid),
            max_clips=max(128, f),
        )
    )
    limits = TextLimits(max_tokens=model.cfg.max_tokens)
    criterion = MomentLoss()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(items.texts)
    steps_per_epoch = max(1, n // cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    rng = np.random.default_rng(cfg.seed)
    best, history = BestState(), []
    start = time.time()
    bar = tqdm(total=total, desc="train cdnet", unit="step")
    for epoch in range(cfg.epochs):
        model.train()
        order = rng.permutation(n)
        running = 0.0
        for i in range(steps_per_epoch):
            for group in opt.param_groups:
                group["lr"] = lr_at(epoch * steps_per_epoch + i, total, steps_per_epoch, cfg.lr)
            idx = order[i * cfg.batch_size : (i + 1) * cfg.batch_size]
            clips, mask, ids, lengths, grid = batch_inputs(model, train_split, items, idx, tokenizer, limits)
            outputs = model(clips, mask, ids, lengths, grid)
            targets, inside = targets_of(items, idx, f, train_split.fps)
            loss, _ = criterion({**outputs, "clip_mask": mask}, targets)
            contrast = qsd_losses(outputs, mask, inside & mask, model.cfg.tau)
            loss = loss + cfg.contrast_weight * (contrast["video_contrast"] + contrast["clip_contrast"])
            running += optimizer_step(model, opt, loss, cfg.grad_clip)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{running / (i + 1):.3f}")
        val = evaluate_moments(model, tokenizer, splits["val"])
        score = val["R1@0.5"] + val["mIoU"]
        history.append({"epoch": epoch + 1, "loss": running / steps_per_epoch, **val})
        bar.write(
            f"epoch {epoch + 1}: loss {running / steps_per_epoch:.4f}  val R1@0.5 {val['R1@0.5']:.1f}  "
            f"R1@0.7 {val['R1@0.7']:.1f}  mIoU {val['mIoU']:.1f}"
        )
        best.update(model, score, val, epoch + 1)
    bar.close()
    best_val = best.restore(model)
    test = evaluate_moments(model, tokenizer, splits["test"])
    baseline = random_baseline(splits["test"], n_per_query=model.cfg.num_queries, seed=cfg.seed)
    metrics = {
        "test": test,
        "random_baseline": baseline,
        "val": best_val,
        "history": history,
        "train_seconds": round(time.time() - start, 1),
    }
    meta = {"train_config": asdict(cfg), "data": {"name": cfg.data, "kind": "moments"}}
    save_run(out, model, tokenizer, meta, metrics, model_name="cdnet")
    return metrics
