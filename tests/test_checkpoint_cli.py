"""Run folders (safetensors + JSON, atomic) and the CLI's error handling."""

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from xmr.models.checkpoint import atomic_dir, load_run
from xmr.models.errors import InputError
from xmr.models.evaluate.image_text import embed_texts

XMR = str(Path(sys.executable).parent / "xmr")


def test_run_round_trip_gives_identical_outputs(tiny_run):
    a, tok, config = load_run(tiny_run)
    b, _, _ = load_run(tiny_run)
    texts = ["a red circle", "a small blue square above a large green triangle"]
    assert np.array_equal(embed_texts(a, tok, texts), embed_texts(b, tok, texts))
    assert config["model"] == "rvse" and config["train_config"]["n_train"] == 256
    assert {"model.safetensors", "config.json", "tokenizer.json", "metrics.json"} <= {
        p.name for p in tiny_run.iterdir()
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
