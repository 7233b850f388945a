"""Export a CDNet run to one ONNX graph in either custom-op form, with parity vs PyTorch on moment metrics.

`export_moment_run(run, out, custom_ops)` writes `moment_model.onnx` (clips, clip_mask, input_ids, lengths
[, grid] -> spans, logits, saliency), `clip_features.npz` (the clip feature store of the served
`moment_search`: the test split's `clips` (N, T, D), `clip_mask` (N, T), `durations` (N,) seconds, `grid`
(N, T, h, w, D) for a grid-sampling model, and `ids` (N,) = row index in the split: the video ids clients
ask for), `tokenizer.json` and `manifest.json`: I/O spec, sha256, versions, the
`xmr` nodes, and parity on the test split's moment queries: max abs error / min cosine of each output and
R1@IoU 0.5/0.7, mAP@0.5/0.75/avg, mIoU of the ONNX outputs (through the same `postprocess` the server
uses) beside PyTorch's. The standard form runs in ONNX Runtime; the plugin form, whose
`xmr::DeformSample` nodes no stock runtime has, in the ONNX reference evaluator with our numpy op.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from xmr.export.iospec import ModelSpec, TensorSpec, text_encoder_spec
from xmr.export.manifest import file_facts
from xmr.export.onnx_export import Tower, export_onnx, graphs_manifest
from xmr.export.parity import BackendParity
from xmr.export.runners import TorchRunner, runner_for
from xmr.export.scoring import moment_feeds
from xmr.export.video_export import CUSTOM_OPS
from xmr.models.checkpoint import TOKENIZER, atomic_dir, load_run
from xmr.models.data.video import VideoData
from xmr.models.errors import InputError
from xmr.models.evaluate.moment_metrics import moment_metrics
from xmr.models.moments.cdnet import CDNet
from xmr.models.moments.items import batch_inputs, moment_items
from xmr.models.moments.postprocess import postprocess
from xmr.models.tokenizer import TextLimits


def moment_model_spec(model: CDNet, grid_hw: tuple[int, int]) -> ModelSpec:
    cfg = model.cfg
    inputs = [
        TensorSpec("clips", "float32", ("batch", "clips", cfg.clip_dim)),
        TensorSpec("clip_mask", "bool", ("batch", "clips")),
        *text_encoder_spec(cfg.d_model).inputs,
    ]
    if cfg.use_grid:
        inputs.append(TensorSpec("grid", "float32", ("batch", "clips", *grid_hw, cfg.clip_dim)))
    return ModelSpec(
        "moment_model",
        tuple(inputs),
        (
            TensorSpec("spans", "float32", ("batch", cfg.num_queries, 2)),
            TensorSpec("logits", "float32", ("batch", cfg.num_queries)),
            TensorSpec("saliency", "float32", ("batch", "clips")),
        ),
    )


def clip_store(model: CDNet, split, duration: float) -> dict[str, np.ndarray]:
    """The arrays of `clip_features.npz`: what `batch_inputs` feeds CDNet for each video of `split`, by id
    (row index), and each video's duration in seconds (the one `moment_items` scales spans by)."""
    store = {
        "ids": np.arange(len(split), dtype=np.int64),
        "clips": np.ascontiguousarray(split.frames, dtype=np.float32),
        "clip_mask": np.ascontiguousarray(split.mask, dtype=bool),
        "durations": np.full(len(split), duration, dtype=np.float32),
    }
    if model.cfg.use_grid:
        store["grid"] = np.ascontiguousarray(split.grid_features(), dtype=np.float32)
    return store


def export_moment_run(
    run: Path, out: Path, custom_ops: str = "standard", parity_queries: int | None = None
) -> dict:
    """Export `run`; parity on the test split's queries (the first `parity_queries` of them if set; default
    all for the standard form, 32 for the reference-evaluated plugin form)."""
    if custom_ops not in CUSTOM_OPS:
        raise InputError(f"--custom-ops {custom_ops!r}; valid: {', '.join(CUSTOM_OPS)}")
    model, tokenizer, config = load_run(Path(run))
    if not isinstance(model, CDNet):
        raise InputError(f"{run} holds a {config['model']!r} model; moment export takes cdnet")
    test = VideoData.of(config["train_config"]).splits()["test"]
    items = moment_items(test)
    n = parity_queries or (len(items.texts) if custom_ops == "standard" else min(32, len(items.texts)))
    limits = TextLimits(max_tokens=model.cfg.max_tokens)
    spec = moment_model_spec(model, test.grid)
    module = Tower(model, "forward", tuple(spec.output_names))  # CDNet's output dict -> the spec's outputs
    steps = tqdm(total=3, desc=f"export cdnet ({custom_ops})", unit="step", disable=None)
    with atomic_dir(Path(out)) as tmp:
        example = [
            t for t in batch_inputs(model, test, items, np.arange(2), tokenizer, limits) if t is not None
        ]
        export_onnx(module, tuple(example), spec, tmp / "moment_model.onnx", custom_ops)
        shutil.copy2(Path(run) / TOKENIZER, tmp / "tokenizer.json")
        np.savez(tmp / "clip_features.npz", **clip_store(model, test, items.duration))
        steps.update()

        # threads=0: ONNX Runtime's default, every core
        runner = runner_for(tmp / "moment_model.onnx", spec, custom_ops, threads=0)
        backends = BackendParity({"moment_model": TorchRunner(module, spec)}, {"moment_model": runner})
        feeds, truth = moment_feeds(model, tokenizer, spec, test, n)
        torch_pred, onnx_pred = [], []
        for named, durations in feeds:
            want, got = backends.run("moment_model", named)  # PyTorch and the graph, once each
            torch_pred += postprocess(want["spans"], want["logits"], durations)
            onnx_pred += postprocess(got["spans"], got["logits"], durations)
        steps.update()
        parity = {
            **backends.stats.stats,
            "moments": {
                "pytorch": moment_metrics(torch_pred, truth),
                "onnx": moment_metrics(onnx_pred, truth),
            },
            "runtime": runner.backend,
            "split": f"{test.name}/{test.split}",
            "n_queries": n,
        }
        preprocessing = {
            "clips": "backbone frame features (B, T, D), see models/data/video.py",
            "duration_s": items.duration,
            "max_tokens": limits.max_tokens,
            "max_bytes": limits.max_bytes,
            "postprocess": "xmr.models.moments.postprocess",
            "clip_store": "clip_features.npz: ids = row index in the test split",
        }
        specs = {"moment_model": spec}
        manifest = graphs_manifest(tmp, run, "cdnet", model, specs, custom_ops, preprocessing, parity)
        manifest.files |= file_facts(tmp, ["clip_features.npz"])
        manifest.write(tmp)
        steps.update()
    steps.close()
    return manifest.to_dict()
