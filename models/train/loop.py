"""The training loop every model family shares."""

from __future__ import annotations

import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


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
    model: torch.nn.Module, opt: torch.optim.Optimizer, loss: torch.Tensor, grad_clip: float
) -> float:
    """Backward, clip the gradient norm, step; returns the loss value."""
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    opt.step()
    return loss.item()


def lr_at(step: int, total: int, warmup: int, base: float) -> float:
    if step < warmup:
        return base * (step + 1) / warmup
    progress = (step - warmup) / max(1, total - warmup)
    return base * 0.5 * (1.0 + np.cos(np.pi * progress))
