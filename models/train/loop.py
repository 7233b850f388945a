"""The training loop every model family shares: `fit(task, config)`.

A family (RVSE++, ViSERN / ProTA, CDNet, the frame-backbone pre-training) describes itself as a `Task`:
its model, how an epoch's batches are drawn, the loss of one batch, validation, test metrics and saving.
`fit` owns the rest (AdamW, the learning-rate schedule, gradient clipping, the progress bar, early
stopping, the history, timing), so the families differ only where their training really differs.

Training must stay reproducible to the bit: every random draw happens in the order the batches ask for
it (the permutation at the start of an epoch, then whatever a batch's loss draws), and the schedules are
written with the exact float expressions the published runs used.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


# ----------------------------------------------------------------------------- learning-rate schedules


def warmup_then_cosine(step: int, total: int, warmup: int, base: float) -> float:
    """Linear warm-up over `warmup` steps, then cosine decay to 0 at `total` (the retrieval models)."""
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + np.cos(np.pi * progress))


def warmup_times_cosine(step: int, total: int, warmup: int, base: float) -> float:
    """Warm-up ramp times a cosine over all `total` steps (the frame backbone): the decay starts at step 0.

    Written as ``base * factor`` because that is how the `LambdaLR` it replaces computed it: the same
    expression keeps the pre-trained weights identical to the bit."""
    return base * (min(1.0, (step + 1) / warmup) * 0.5 * (1 + np.cos(np.pi * min(step / total, 1.0))))


SCHEDULES: dict[str, Callable[[int, int, int, float], float]] = {
    "warmup_then_cosine": warmup_then_cosine,
    "warmup_times_cosine": warmup_times_cosine,
}


# ----------------------------------------------------------------------------- the pieces fit uses


class BestState:
    """The model state with the best validation score so far (early-stopping selection, kept in memory)."""

    def __init__(self):
        self.score, self.metrics, self.state = float("-inf"), {}, None

    def update(self, model: torch.nn.Module, score: float, metrics: dict, epoch: int) -> None:
        if score > self.score:
            self.score, self.metrics = score, {**metrics, "epoch": epoch}
            self.state = {k: v.detach().clone() for k, v in model.state_dict().items()}

    def restore(self, model: torch.nn.Module) -> dict:
        """Load the best state into `model`; returns its validation metrics."""
        model.load_state_dict(self.state)
        return self.metrics


def optimizer_step(
    model: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float | None
) -> float:
    """Backward, clip the gradient norm (unless `grad_clip` is None), step; returns the loss value."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    if grad_clip is not None:
        torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss.item()


@dataclass
class FitConfig:
    """What `fit` needs of a family's own config; each family builds one (see `FitConfig.of`)."""

    epochs: int
    batch_size: int
    lr: float  # AdamW's base learning rate, scaled per step by `schedule`
    weight_decay: float
    grad_clip: float | None = None  # max gradient norm; None: no clipping
    warmup_steps: int | None = None  # None: one epoch of warm-up
    schedule: str = "warmup_then_cosine"  # a key of SCHEDULES

    @classmethod
    def of(cls, cfg: Any, **overrides) -> FitConfig:
        """The fields a family config shares with this one (same names), then `overrides`."""
        names = ("epochs", "batch_size", "lr", "weight_decay", "grad_clip")
        return cls(**{name: getattr(cfg, name) for name in names}, **overrides)


@dataclass
class Validation:
    """One epoch's validation: the early-stopping `score`, the `metrics` kept with the best state, the
    `fields` added to that epoch's history row and the `line` written after the epoch's loss."""

    score: float
    metrics: dict
    fields: dict
    line: str


class Task:
    """A model family's side of training; subclasses set `model`, `name` and `size`, and define `loss`.

    The defaults suit a data set of `size` items visited once an epoch in shuffled order, with no
    validation, no test metrics and nothing saved."""

    model: torch.nn.Module
    name: str = "train"  # the progress bar's label
    size: int = 0  # training items the default batches are drawn from

    def steps_per_epoch(self, batch_size: int) -> int:
        """Drop the last partial batch (hardest-negative losses need full ones), but take at least one."""
        return max(1, self.size // batch_size)

    def batches(self, rng: np.random.Generator, batch_size: int) -> Iterator[Any]:
        """One epoch: slices of a fresh permutation of the item indices."""
        order = rng.permutation(self.size)
        for i in range(self.steps_per_epoch(batch_size)):
            yield order[i * batch_size : (i + 1) * batch_size]

    def loss(self, batch: Any, rng: np.random.Generator, epoch: int) -> torch.Tensor:
        """The training loss of one batch; `epoch` counts from 0 (for warm-up objectives)."""
        raise NotImplementedError

    def validate(self) -> Validation | None:
        return None

    def test(self) -> dict:
        """Metrics of the restored best state, placed first in the run's metrics."""
        return {}

    def save(self, out: Path, metrics: dict) -> None:
        """Write the run folder."""


@dataclass
class FitResult:
    metrics: dict  # the task's test metrics, then "val" (best epoch's), "history", "train_seconds"
    losses: list[float] = field(default_factory=list)  # every step's loss
    lrs: list[float] = field(default_factory=list)  # every step's learning rate
    seconds: float = 0.0  # training, validation and test


# ----------------------------------------------------------------------------- the loop


def fit(
    task: Task, config: FitConfig, out: Path | None = None, rng: np.random.Generator | None = None
) -> FitResult:
    """Train `task.model` for `config.epochs`, keep the best-on-validation state, score and save it.

    `rng` is the generator batches draw from; pass it when the caller draws from it before or after
    (None: a generator seeded with 0). Without validation the last state is kept. `out`: the run folder,
    written by `task.save` (None: nothing is written)."""
    rng = np.random.default_rng(0) if rng is None else rng
    model = task.model
    opt = torch.optim.AdamW(model.parameters(), lr=config.lr, weight_decay=config.weight_decay)
    schedule = SCHEDULES[config.schedule]
    steps_per_epoch = task.steps_per_epoch(config.batch_size)
    total = steps_per_epoch * config.epochs
    warmup = steps_per_epoch if config.warmup_steps is None else config.warmup_steps
    best, history, result = BestState(), [], FitResult(metrics={})
    start = time.time()
    bar = tqdm(total=total, desc=task.name, unit="step", disable=None)
    for epoch in range(config.epochs):
        model.train()
        running = 0.0
        for i, batch in enumerate(task.batches(rng, config.batch_size)):
            lr = schedule(epoch * steps_per_epoch + i, total, warmup, config.lr)
            for group in opt.param_groups:
                group["lr"] = lr
            loss = optimizer_step(model, opt, task.loss(batch, rng, epoch), config.grad_clip)
            running += loss
            result.losses.append(loss)
            result.lrs.append(lr)
            bar.update(1)
            bar.set_postfix(epoch=epoch + 1, loss=f"{running / (i + 1):.3f}")
        row = {"epoch": epoch + 1, "loss": running / steps_per_epoch}
        val = task.validate()
        if val is not None:
            row |= val.fields
            tqdm.write(f"epoch {epoch + 1}: loss {row['loss']:.4f}  {val.line}")
            best.update(model, val.score, val.metrics, epoch + 1)
        history.append(row)
    bar.close()
    best_val = best.restore(model) if best.state is not None else {}
    metrics = {**task.test(), "val": best_val, "history": history}
    result.seconds = time.time() - start
    result.metrics = metrics | {"train_seconds": round(result.seconds, 1)}
    if out is not None:
        task.save(out, result.metrics)
    return result
