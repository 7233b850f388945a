"""Run folders (safetensors + JSON, atomic) and the CLI's error handling."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from xmr.models.checkpoint import atomic_dir, load_run
from xmr.models.errors import InputError
from xmr.models.evaluate.image_text import embed_images, embed_texts
from xmr.models.image_text.rvse import RVSE
from xmr.models.train.image_text import ImageTextTask, TrainConfig
from xmr.models.train.loop import FitConfig, fit, seed_everything

XMR = str(Path(sys.executable).parent / "xmr")


def test_loaded_run_reproduces_the_trained_model(tmp_path):
    """The model loaded from a run folder gives exactly the trained model's embeddings (not merely the
    same as another load of the same file), and differs from a freshly initialised one."""
    cfg = TrainConfig(n_train=64, n_eval=16, epochs=1, batch_size=32, seed=0)
    seed_everything(cfg.seed)
    task = ImageTextTask(cfg)
    fit(task, FitConfig.of(cfg), tmp_path / "run", rng=np.random.default_rng(cfg.seed))
    trained = task.model.eval()
    loaded, tok, config = load_run(tmp_path / "run")
    texts = ["a red circle", "a small blue square above a large green triangle"]
    images = task.splits["test"].images[:8]
    assert np.array_equal(embed_texts(loaded, tok, texts), embed_texts(trained, task.tokenizer, texts))
    assert np.array_equal(embed_images(loaded, images), embed_images(trained, images))
    fresh = RVSE(loaded.cfg).eval()
    assert not np.allclose(embed_images(fresh, images), embed_images(trained, images), atol=1e-3)
    assert config["model"] == "rvse" and config["train_config"]["n_train"] == 64
    assert {"model.safetensors", "config.json", "tokenizer.json", "metrics.json"} <= {
        p.name for p in (tmp_path / "run").iterdir()
    }


def test_corrupt_or_missing_run_files(tiny_run, tmp_path):
    with pytest.raises(InputError, match="is not a run folder"):
        load_run(tmp_path)
    broken = tmp_path / "broken"
    broken.mkdir()
    for name in ("config.json", "tokenizer.json"):
        (broken / name).write_bytes((tiny_run / name).read_bytes())
    (broken / "model.safetensors").write_bytes(b"garbage")
    with pytest.raises(InputError, match="not a readable safetensors file"):
        load_run(broken)


def test_atomic_dir_leaves_nothing_half_written(tmp_path):
    with pytest.raises(RuntimeError), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "partial").write_text("x")
        raise RuntimeError("crash mid-write")
    assert list(tmp_path.iterdir()) == []


def test_safetensors_holds_only_tensors(tiny_run):
    from safetensors.torch import load_file

    state = load_file(str(tiny_run / "model.safetensors"))
    assert all(isinstance(v, torch.Tensor) for v in state.values())


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["eval", "/no/such/run"], "is not a run folder"),
        (["export", "/no/such/run", "--out", "/tmp/xmr-never"], "is not a run folder"),
        (["repo", "/no/such/artifacts"], "has no manifest.json"),
        (["serve", "/no/such/repository"], "does not exist"),
        (["train", "rvse", "--loss", "nope", "--epochs", "1"], "unknown loss 'nope'"),
        (["train", "rvse", "--data", "nope"], "unknown dataset 'nope'"),
    ],
)
def test_cli_errors_are_one_clear_line(args, message):
    proc = subprocess.run([XMR, *args], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_cli_eval_prints_and_writes_recall(tiny_run):
    proc = subprocess.run([XMR, "eval", str(tiny_run)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "t2i R@1" in proc.stdout and (tiny_run / "eval_test.json").is_file()
