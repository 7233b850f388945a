"""`xmr engine ARTIFACT --precision fp16|int8 --out DIR`: TensorRT engines of an artifact's graphs.

`build_engines(artifact, precision, out)`:
1. checks the request before touching `out`: the precision, TensorRT importable with a CUDA device (one
   `InputError` line otherwise), the artifact's manifest and every file's sha256 (`verify_artifacts`), and
   that no graph is in ONNX Runtime's integer-op form (TensorRT cannot parse it);
2. writes `out` (replaced atomically) as a complete artifact folder: copies of the artifact's files (the
   `.onnx` graphs stay beside their engines, as the reference and for the ONNX Runtime fallback), one
   `<graph>.plan` per graph (`trt_engine.build_engine`: a profile from the graph's I/O spec and the
   manifest's facts, the tactic timing cache `TIMING_CACHE` loaded from the previous `out` and saved in
   the new one);
3. measures, on a few generated inputs (`example_feeds`), each engine's outputs against the artifact's
   ONNX graph (ONNX Runtime; the reference evaluator for plugin-form graphs): max abs error and min cosine;
4. writes the manifest: the artifact's, its `files` extended with the plans, plus an `engines` entry:
   precision, TensorRT and Polygraphy versions, the GPU, the dim ranges and per-graph profiles, the
   plugins each engine holds, the per-graph file names, and the parity figures.

`xmr repo --target gpu` on `out` then serves each tower as a `tensorrt_plan` model (`repository.py`).
"""

from __future__ import annotations

import importlib.metadata
import shutil
from pathlib import Path

import numpy as np

from xmr.export.iospec import ModelSpec
from xmr.export.manifest import MANIFEST, Manifest, file_facts, read_manifest, verify_artifacts
from xmr.export.parity import ParityStats
from xmr.export.runners import runner_for
from xmr.export.trt_engine import (
    PRECISIONS,
    DimRange,
    build_engine,
    check_quantization,
    dim_ranges,
    has_plugin_nodes,
    profile_shapes,
    require_tensorrt,
)
from xmr.models.checkpoint import atomic_dir
from xmr.models.errors import InputError

TIMING_CACHE = "tensorrt_timing.cache"
# the few inputs parity runs on: every dim at its profile's opt size, but for these
PARITY_DRAWS = ({"batch": 1}, {"batch": 3}, {})


def engine_graphs(manifest: dict) -> list[str]:
    """The manifest's exported graphs: the specs whose `<name>.onnx` is one of its files."""
    return [name for name in manifest["specs"] if f"{name}.onnx" in manifest["files"]]


def example_feeds(
    spec: ModelSpec, sizes: dict[str, int], rng: np.random.Generator, vocab_size: int = 2
) -> dict[str, np.ndarray]:
    """Plausible inputs for `spec` at `sizes` (dim -> size): normal floats, token ids below `vocab_size`
    padded with 0 after each row's length, lengths in [1, tokens], masks valid on a leading run (>= 1)."""
    feeds: dict[str, np.ndarray] = {}
    tokens = sizes.get("tokens", 1)
    for t in spec.inputs:
        shape = t.example_shape(sizes)
        if t.dtype == "bool":
            valid = rng.integers(1, shape[-1] + 1, size=shape[:-1])[..., None]
            feeds[t.name] = np.arange(shape[-1]) < valid
        elif t.name == "lengths":
            feeds[t.name] = rng.integers(1, tokens + 1, size=shape).astype(t.numpy_dtype)
        elif np.issubdtype(t.numpy_dtype, np.integer):
            feeds[t.name] = rng.integers(1, max(vocab_size, 2), size=shape).astype(t.numpy_dtype)
        else:
            feeds[t.name] = rng.standard_normal(shape).astype(t.numpy_dtype)
    if "input_ids" in feeds and "lengths" in feeds:  # (B, T) ids, (B,) lengths: 0 (padding) past each length
        ids = feeds["input_ids"]
        ids[np.arange(ids.shape[1]) >= feeds["lengths"].reshape(-1, 1)] = 0
    return feeds


def engine_parity(
    graph: Path, plan: Path, spec: ModelSpec, custom_ops: str, dims: dict[str, DimRange], vocab_size: int
) -> dict:
    """Max abs error and min cosine of every output of the engine at `plan` against the ONNX graph."""
    from xmr.export.trt_engine import TensorRTRunner

    reference = runner_for(graph, spec, custom_ops, threads=0)
    engine = TensorRTRunner(plan, spec)
    stats, rng = ParityStats(), np.random.default_rng(0)
    try:
        for draw in PARITY_DRAWS:
            feeds = example_feeds(spec, {d: r.opt for d, r in dims.items()} | draw, rng, vocab_size)
            stats.add(spec.name, reference.run(feeds), engine.run(feeds))
    finally:
        engine.close()
    return {**stats.stats.get(spec.name, {}), "reference": reference.backend, "inputs": len(PARITY_DRAWS)}


def versions() -> dict[str, str]:
    """TensorRT's and Polygraphy's versions, and the GPU the engines were built for."""
    import tensorrt as trt

    out = {"tensorrt": trt.__version__, "polygraphy": importlib.metadata.version("polygraphy")}
    try:
        import torch

        if torch.cuda.is_available():
            out["gpu"] = torch.cuda.get_device_name()
    except Exception:  # the GPU's name is a nicety of the manifest
        pass
    return out


def build_engines(
    artifact: Path,
    precision: str,
    out: Path,
    dims: dict[str, DimRange] | None = None,
    parity: bool = True,
) -> dict:
    """Build `<graph>.plan` for every graph of `artifact` into the artifact folder `out`; returns the new
    manifest. `dims` overrides dim ranges (dim -> DimRange(min, opt, max)); `parity=False` skips step 3."""
    artifact, out = Path(artifact), Path(out)
    if precision not in PRECISIONS:
        raise InputError(f"--precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    require_tensorrt()
    manifest = read_manifest(artifact)
    verify_artifacts(artifact, manifest)
    optimized = (manifest.get("optimization") or {}).get("precision")
    if optimized == "int8":
        raise InputError(
            f"{artifact} holds ONNX Runtime integer-op graphs (`xmr optimize --precision int8`), which "
            "TensorRT cannot parse; build engines from `xmr optimize --precision int8-qdq` output"
        )
    graphs = engine_graphs(manifest)
    if not graphs:
        raise InputError(f"{artifact}/{MANIFEST} lists no <graph>.onnx file to build an engine of")
    for name in graphs:
        check_quantization(artifact / f"{name}.onnx", precision)
    ranges = dim_ranges(manifest, dims)
    specs = {name: ModelSpec.from_dict(manifest["specs"][name]) for name in graphs}
    previous_cache = out / TIMING_CACHE

    with atomic_dir(out) as tmp:
        for name in manifest["files"]:
            shutil.copy2(artifact / name, tmp / name)
        if previous_cache.is_file():
            shutil.copy2(previous_cache, tmp / TIMING_CACHE)
        for name in graphs:
            build_engine(
                tmp / f"{name}.onnx", specs[name], precision, ranges, tmp / TIMING_CACHE, tmp / f"{name}.plan"
            )
        plugins = {name: [f"xmr::{op}" for op in has_plugin_nodes(tmp / f"{name}.onnx")] for name in graphs}
        entry = {
            "precision": precision,
            **versions(),
            "dims": {d: list(r) for d, r in ranges.items()},
            "profiles": {
                name: {
                    i: {"min": list(lo), "opt": list(opt), "max": list(hi)}
                    for i, (lo, opt, hi) in profile_shapes(specs[name], ranges).items()
                }
                for name in graphs
            },
            "plugins": plugins,
            "files": {name: {"onnx": f"{name}.onnx", "plan": f"{name}.plan"} for name in graphs},
            "timing_cache": TIMING_CACHE,
        }
        if parity:
            vocab = int(manifest.get("model_config", {}).get("vocab_size") or 2)
            custom_ops = manifest.get("custom_ops") or "standard"
            entry["parity"] = {
                name: engine_parity(
                    tmp / f"{name}.onnx", tmp / f"{name}.plan", specs[name], custom_ops, ranges, vocab
                )
                for name in graphs
            }
        result = Manifest.from_dict(manifest)
        result.files = manifest["files"] | file_facts(tmp, [f"{name}.plan" for name in graphs])
        result.engines = entry
        result.write(tmp)
    return result.to_dict()
