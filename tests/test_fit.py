"""`fit`, the training loop every family shares: early stopping, schedules, history, draws, run folder."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from xmr.models.train.loop import (
    FitConfig,
    Task,
    Validation,
    fit,
    optimizer_step,
    warmup_then_cosine,
    warmup_times_cosine,
)


class Toy(Task):
    """A one-weight regression; validation returns scripted scores so the best epoch is known.

    Records every batch, every draw it makes from the loop's rng and the weight after each epoch."""

    name = "toy"

    def __init__(self, size: int = 10, scores: list[float] | None = None):
        torch.manual_seed(0)
        self.model = nn.Linear(1, 1, bias=False)
        self.size, self.scores = size, scores
        self.batches_seen, self.draws, self.weights, self.saved = [], [], [], []

    def loss(self, batch, rng, epoch):
        self.batches_seen.append(np.array(batch))
        self.draws.append(int(rng.integers(1000)))  # a per-batch draw, as the caption sampling does
        x = torch.from_numpy(np.asarray(batch, dtype=np.float32))[:, None] / self.size
        return ((self.model(x) - 3.0) ** 2).mean()

    def validate(self):
        self.weights.append(self.model.weight.item())
        if self.scores is None:
            return None
        score = self.scores[len(self.weights) - 1]
        return Validation(score=score, metrics={"score": score}, fields={"val_score": score}, line="")

    def test(self):
        return {"test": {"weight": self.model.weight.item()}}

    def save(self, out, metrics):
        self.saved.append(metrics)
        out.mkdir(parents=True)
        (out / "metrics.json").write_text(json.dumps(metrics))


def config(**kw) -> FitConfig:
    return FitConfig(**{"epochs": 4, "batch_size": 3, "lr": 0.1, "weight_decay": 0.0, **kw})


def test_early_stopping_restores_the_best_epoch_not_the_last():
    task = Toy(scores=[1.0, 5.0, 5.0, 3.0])  # epoch 2 is best; epoch 3 only ties it
    metrics = fit(task, config()).metrics
    assert len(set(task.weights)) == 4  # the weight moved every epoch, so the epochs are told apart
    assert task.model.weight.item() == task.weights[1]
    assert metrics["test"]["weight"] == task.weights[1]  # test scores the restored state
    assert metrics["val"] == {"score": 5.0, "epoch": 2}


def test_without_validation_the_last_state_is_kept():
    task = Toy(scores=None)
    metrics = fit(task, config()).metrics
    assert task.model.weight.item() == task.weights[-1]
    assert metrics["val"] == {}
    assert [list(row) for row in metrics["history"]] == [["epoch", "loss"]] * 4


def test_history_has_one_row_per_epoch_with_the_mean_step_loss():
    task = Toy(scores=[1.0, 2.0, 3.0])
    result = fit(task, config(epochs=3))
    history = result.metrics["history"]
    assert [row["epoch"] for row in history] == [1, 2, 3]
    assert [list(row) for row in history] == [["epoch", "loss", "val_score"]] * 3
    assert [row["val_score"] for row in history] == [1.0, 2.0, 3.0]
    assert len(result.losses) == 3 * 3  # 10 items, batches of 3: the partial batch is dropped
    for e, row in enumerate(history):
        assert row["loss"] == pytest.approx(np.mean(result.losses[3 * e : 3 * e + 3]))
    assert list(result.metrics) == ["test", "val", "history", "train_seconds"]


def test_batches_and_draws_follow_the_rng_in_order():
    """Each epoch draws its permutation first, then each batch draws inside the loss; nothing else draws."""
    task = Toy(size=10, scores=[0.0, 0.0])
    fit(task, config(epochs=2), rng=np.random.default_rng(7))
    replay, batches, draws = np.random.default_rng(7), [], []
    for _ in range(2):
        order = replay.permutation(10)
        for i in range(3):
            batches.append(order[3 * i : 3 * i + 3])
            draws.append(int(replay.integers(1000)))
    assert all(np.array_equal(a, b) for a, b in zip(task.batches_seen, batches, strict=True))
    assert task.draws == draws
    assert np.concatenate(task.batches_seen[:3]).tolist() != list(range(9))  # shuffled, not 0..8


def test_a_split_smaller_than_a_batch_is_one_batch():
    task = Toy(size=2)
    result = fit(task, config(epochs=1, batch_size=8))
    assert len(result.losses) == 1 and sorted(task.batches_seen[0].tolist()) == [0, 1]


def test_the_run_folder_is_written_through_the_task(tmp_path):
    task = Toy(scores=[1.0, 2.0, 0.0, 0.0])
    result = fit(task, config(), out=tmp_path / "run")
    assert task.saved == [result.metrics]
    assert json.loads((tmp_path / "run" / "metrics.json").read_text())["val"]["epoch"] == 2
    unsaved = Toy(scores=[1.0, 2.0, 0.0, 0.0])
    fit(unsaved, config())
    assert unsaved.saved == []


def test_warmup_then_cosine_values():
    assert warmup_then_cosine(0, 10, 2, 1.0) == 0.5
    assert warmup_then_cosine(1, 10, 2, 1.0) == 1.0
    assert warmup_then_cosine(2, 10, 2, 1.0) == 1.0  # the cosine starts after the warm-up
    assert warmup_then_cosine(6, 10, 2, 1.0) == pytest.approx(0.5)
    assert warmup_then_cosine(10, 10, 2, 1.0) == pytest.approx(0.0)
    # the published runs' float expression: (base * (step + 1)) / warmup, not base * ((step + 1) / warmup)
    for step in range(7):
        assert warmup_then_cosine(step, 100, 7, 0.3) == 0.3 * (step + 1) / 7


def test_warmup_times_cosine_values_match_the_lambda_lr_it_replaced():
    assert warmup_times_cosine(0, 20, 1, 1.0) == 1.0
    assert warmup_times_cosine(10, 20, 1, 1.0) == pytest.approx(0.5)  # decays from step 0, not after warm-up
    assert warmup_times_cosine(1, 20, 4, 1.0) == pytest.approx(0.5 * 0.5 * (1 + np.cos(np.pi / 20)))
    assert warmup_times_cosine(25, 20, 4, 1.0) == 0.0  # clamped past the end
    steps, warm, lr = 60, 3, 1e-2
    opt = torch.optim.AdamW([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda i: min(1.0, (i + 1) / warm) * 0.5 * (1 + np.cos(np.pi * min(i / steps, 1.0)))
    )
    for i in range(steps):
        assert warmup_times_cosine(i, steps, warm, lr) == opt.param_groups[0]["lr"]  # bit for bit
        opt.step()
        sched.step()


@pytest.fixture
def applied_lrs():
    """The learning rate each optimizer step actually ran with."""
    seen = []
    handle = register_optimizer_step_pre_hook(
        lambda opt, args, kwargs: seen.append(opt.param_groups[0]["lr"])
    )
    yield seen
    handle.remove()


def test_fit_applies_the_schedule_each_step(applied_lrs):
    result = fit(Toy(), config(epochs=2))  # 3 steps an epoch, 6 in all, one epoch of warm-up by default
    assert applied_lrs == result.lrs == [warmup_then_cosine(i, 6, 3, 0.1) for i in range(6)]
    applied_lrs.clear()
    result = fit(Toy(), config(epochs=2, warmup_steps=2, schedule="warmup_times_cosine"))
    assert applied_lrs == result.lrs == [warmup_times_cosine(i, 6, 2, 0.1) for i in range(6)]


def test_fit_clips_the_gradient_only_when_asked():
    norms = []

    def grad_norm(opt, args, kwargs):
        norms.append(
            torch.cat([p.grad.flatten() for g in opt.param_groups for p in g["params"]]).norm().item()
        )

    handle = register_optimizer_step_pre_hook(grad_norm)
    try:
        fit(Toy(), config(epochs=1, grad_clip=1e-3))
        clipped, norms[:] = list(norms), []
        fit(Toy(), config(epochs=1, grad_clip=None))
    finally:
        handle.remove()
    assert max(clipped) <= 1e-3 * 1.01
    assert min(norms) > 1e-2


def test_optimizer_step_clips_then_steps():
    w = nn.Parameter(torch.zeros(2))
    opt = torch.optim.SGD([w], lr=1.0)
    value = optimizer_step(nn.ParameterList([w]), opt, (w * torch.tensor([30.0, 40.0])).sum() + 2.0, 5.0)
    assert value == 2.0
    assert torch.allclose(w.detach(), torch.tensor([-3.0, -4.0]))  # gradient (30, 40) clipped to norm 5


def test_fit_config_of_a_family_config():
    from xmr.models.train.moments import MomentTrainConfig

    cfg = MomentTrainConfig(epochs=3, batch_size=5, lr=0.5, weight_decay=0.25, grad_clip=1.5)
    assert FitConfig.of(cfg) == FitConfig(epochs=3, batch_size=5, lr=0.5, weight_decay=0.25, grad_clip=1.5)
    assert FitConfig.of(cfg, warmup_steps=4).warmup_steps == 4


def test_unknown_schedule_fails_before_training(tmp_path: Path):
    with pytest.raises(KeyError):
        fit(Toy(), config(schedule="linear"), out=tmp_path / "run")
    assert not (tmp_path / "run").exists()
