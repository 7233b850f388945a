"""A run folder: weights (safetensors), config (JSON), tokenizer (tokenizer.json), metrics (JSON).

No pickle anywhere: safetensors holds only tensors and JSON holds the rest, so loading a run executes no
code. A run is written to a temporary sibling folder and renamed into place, so a crash never leaves a
half-written run behind.
"""

from __future__ import annotations

import json
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

from safetensors.torch import load_file, save_file
from tokenizers import Tokenizer

from xmr.models.errors import InputError
from xmr.models.image_text.rvse import RVSE, RVSEConfig
from xmr.models.moments.cdnet import CDNet, CDNetConfig
from xmr.models.tokenizer import load_tokenizer, save_tokenizer
from xmr.models.video.prota import ProTA, ProTAConfig
from xmr.models.video.visern import ViSERN, ViSERNConfig

WEIGHTS, CONFIG, TOKENIZER, METRICS = "model.safetensors", "config.json", "tokenizer.json", "metrics.json"
# model name in config.json -> (model class, its config dataclass)
MODELS = {
    "rvse": (RVSE, RVSEConfig),
    "visern": (ViSERN, ViSERNConfig),
    "prota": (ProTA, ProTAConfig),
    "cdnet": (CDNet, CDNetConfig),
}


@contextmanager
def atomic_dir(dest: Path):
    """Yield a temporary folder next to `dest`; on success it replaces `dest`, on error it is removed."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
    tmp.chmod(0o755)  # mkdtemp makes it 0700; a server running as another user must read it
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if dest.exists():
        shutil.rmtree(dest)
    tmp.rename(dest)


def write_json(path: Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=2, sort_keys=True) + "\n")


def save_run(
    out: Path, model, tokenizer: Tokenizer, meta: dict, metrics: dict, model_name: str = "rvse"
) -> Path:
    """Write a run folder; `meta` holds the training/data settings, stored next to the model config."""
    with atomic_dir(Path(out)) as tmp:
        # tied weights (one tensor under two names) are stored once each: safetensors refuses shared storage
        state = {k: v.detach().clone().contiguous().cpu() for k, v in model.state_dict().items()}
        save_file(state, str(tmp / WEIGHTS))
        write_json(tmp / CONFIG, {"model": model_name, "model_config": model.cfg.to_dict(), **meta})
        save_tokenizer(tokenizer, tmp / TOKENIZER)
        write_json(tmp / METRICS, metrics)
    return Path(out)


def read_run_config(run: Path) -> dict:
    path = Path(run) / CONFIG
    if not path.is_file():
        raise InputError(f"{run} is not a run folder: {path} is missing (train one with `xmr train`)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise InputError(f"{path} is not valid JSON: {e}") from e


def load_run(run: Path) -> tuple[RVSE | ViSERN | ProTA | CDNet, Tokenizer, dict]:
    """(model in eval mode, tokenizer, the run's config dict)."""
    run = Path(run)
    config = read_run_config(run)
    weights = run / WEIGHTS
    if not weights.is_file():
        raise InputError(f"run {run} has no weights: {weights} is missing")
    name = config.get("model", "rvse")
    if name not in MODELS:
        raise InputError(f"{run}/config.json names model {name!r}; valid: {', '.join(MODELS)}")
    model_cls, config_cls = MODELS[name]
    model = model_cls(config_cls.from_dict(config["model_config"]))
    try:
        state = load_file(str(weights))
    except Exception as e:  # safetensors raises its own error types on truncated/corrupt files
        raise InputError(f"{weights} is not a readable safetensors file: {e}") from e
    model.load_state_dict(state)
    return model.eval(), load_tokenizer(run / TOKENIZER), config
