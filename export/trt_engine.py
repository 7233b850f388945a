"""Build and run TensorRT engines of exported ONNX graphs, through Polygraphy's TensorRT loaders.

The flow of `build_engine(onnx_path, spec, precision)`:
1. `check_quantization`: an int8 build needs an explicitly quantized graph (QuantizeLinear /
   DequantizeLinear pairs, what `xmr optimize --precision int8-qdq` writes); a Q/DQ graph builds only as
   int8; ONNX Runtime's integer ops (`xmr optimize --precision int8`) cannot be parsed at all.
2. `profile_shapes(spec, dims)`: one optimisation profile, min/opt/max of every input, from the I/O spec's
   named dynamic dims and their ranges (`DimRange`; `dim_ranges` reads them from an artifact's manifest).
3. Polygraphy: `NetworkFromOnnxPath` (or `NetworkFromOnnxBytes` for a graph with `xmr` plugin nodes, given
   `plugin_namespace` attributes, see `trt_plugins.py`), `CreateConfig` (precision flags, the profile, a
   timing cache loaded from `timing_cache` when it exists), `EngineFromNetwork` (saving the timing cache
   back), `SaveEngine` to `plan` when given.

Precision: "fp32" builds with TF32 off (results comparable with PyTorch's float32); "fp16" lets TensorRT
pick FP16 kernels (TF32 for what stays FP32); "int8" builds the Q/DQ graph in explicit-quantization mode,
with FP16 allowed for the layers the graph leaves unquantized. The engine's inputs and outputs keep the
graph's types (FP32 embeddings, int64 ids, bool masks) whatever the precision, so the I/O spec holds for
every engine.

`TensorRTRunner` runs a `.plan` (or builds an FP32 engine of a `.onnx`) with Polygraphy's `TrtRunner`
behind the `Runner` interface of `runners.py` (backend "tensorrt"). `run_tensorrt(onnx_path, feeds)` is
the one-call form the ops' parity tests use: an FP32 engine fixed at the shapes of `feeds`, run once.

Nothing here imports `tensorrt` at module level: this file imports anywhere, and every entry point that
needs TensorRT raises one clear `InputError` line (`require_tensorrt`) where it is missing or has no GPU.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import NamedTuple

import numpy as np

from xmr.export.iospec import ModelSpec
from xmr.export.repository import MAX_BATCH
from xmr.export.runners import check_feeds
from xmr.models.errors import InputError

PRECISIONS = ("fp32", "fp16", "int8")
NOT_INSTALLED = (
    "TensorRT is not installed (pip install tensorrt on a machine with an NVIDIA GPU and driver); "
    "`xmr engine` needs it"
)
NO_GPU = (
    "TensorRT is installed but finds no usable CUDA device (an NVIDIA GPU with its driver); "
    "`xmr engine` builds engines on the GPU that will run them"
)
QDQ_OPS = {"QuantizeLinear", "DequantizeLinear"}
# ONNX Runtime's integer-op quantization (`xmr optimize --precision int8`), which TensorRT cannot parse
ORT_INTEGER_OPS = {
    "DynamicQuantizeLinear",
    "MatMulInteger",
    "ConvInteger",
    "QLinearMatMul",
    "QLinearConv",
    "QLinearAdd",
    "QLinearMul",
    "QGemm",
    "QAttention",
    "DynamicQuantizeMatMul",
}


class DimRange(NamedTuple):
    """The range an engine serves for one named dynamic dim: TensorRT optimises for `opt`."""

    min: int
    opt: int
    max: int


# Ranges of the specs' named dynamic dims (`iospec.py`). `dim_ranges` replaces the model-dependent maxima
# with the artifact's own facts; the defaults here are the presets'.
DEFAULT_DIMS: dict[str, DimRange] = {
    # rows of a request batch: Triton's max_batch_size; opt 8, a typical dynamic batch under load
    "batch": DimRange(1, 8, MAX_BATCH),
    # text tokens: the tokenizer pads a batch to its longest text and truncates at max_tokens
    # (TextLimits' default 32; `dim_ranges` reads the manifest's preprocessing.max_tokens)
    "tokens": DimRange(1, 32, 32),
    # precomputed image regions (bottom-up features: 36 per image, 10 to 100 in the adaptive variant)
    "regions": DimRange(1, 36, 100),
    # video frames: ProTA knows max_frames (default 64) positions; the presets sample 16 to 64 frames
    "frames": DimRange(1, 16, 64),
    # CDNet clips: its learned clip positions (max_clips, default 128); 75 clips = a 150 s QVHighlights video
    "clips": DimRange(1, 75, 128),
    # ProTA's pair scorer re-ranks a shortlist of the gallery; up to gallery_topk's max_k (1000)
    "shortlist": DimRange(1, 100, 1000),
}


def dim_ranges(manifest: Mapping, overrides: Mapping[str, DimRange] | None = None) -> dict[str, DimRange]:
    """`DEFAULT_DIMS` with the artifact's own maxima: tokens up to `preprocessing.max_tokens` (opt there
    too: most batches pad to it), frames / clips up to `model_config.max_frames` / `max_clips` where the
    model has them; then `overrides` (dim -> DimRange)."""
    dims = dict(DEFAULT_DIMS)
    pre, cfg = manifest.get("preprocessing", {}), manifest.get("model_config", {})
    max_tokens = pre.get("max_tokens", cfg.get("max_tokens"))
    if max_tokens:
        dims["tokens"] = DimRange(1, int(max_tokens), int(max_tokens))
    for dim, key in (("frames", "max_frames"), ("clips", "max_clips")):
        if cfg.get(key):
            top = int(cfg[key])
            dims[dim] = DimRange(1, min(dims[dim].opt, top), top)
    for dim, r in (overrides or {}).items():
        r = DimRange(*r)
        if not 1 <= r.min <= r.opt <= r.max:
            raise InputError(f"dim {dim!r} range {tuple(r)}; expected 1 <= min <= opt <= max")
        dims[dim] = r
    return dims


def profile_shapes(
    spec: ModelSpec, dims: Mapping[str, DimRange] = DEFAULT_DIMS
) -> dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]:
    """{input: (min shape, opt shape, max shape)} of one optimisation profile for `spec`: fixed dims as they
    are, each named dim from `dims`. A pure function: the engine manifest records its result."""
    shapes = {}
    for t in spec.inputs:
        unknown = [d for d in t.shape if isinstance(d, str) and d not in dims]
        if unknown:
            raise InputError(
                f"input {t.name!r} of {spec.name} has dynamic dim {unknown[0]!r}, which has no engine range; "
                f"known: {', '.join(dims)}"
            )
        shapes[t.name] = tuple(
            tuple(d if isinstance(d, int) else dims[d][i] for d in t.shape) for i in range(3)
        )
    return shapes


def check_quantization(onnx_path: str | Path, precision: str) -> bool:
    """Whether the graph is Q/DQ-quantized; InputError where `precision` does not fit the graph."""
    import onnx

    if precision not in PRECISIONS:
        raise InputError(f"precision {precision!r}; valid: {', '.join(PRECISIONS)}")
    graph = onnx.load(str(onnx_path), load_external_data=False).graph
    ops = {n.op_type for n in graph.node}
    integer = sorted(ops & ORT_INTEGER_OPS)
    if integer:
        raise InputError(
            f"{onnx_path} holds ONNX Runtime integer ops ({', '.join(integer)}), which TensorRT cannot "
            "parse; build TensorRT engines from the `xmr optimize --precision int8-qdq` graph"
        )
    qdq = QDQ_OPS <= ops
    if precision == "int8" and not qdq:
        raise InputError(
            f"{onnx_path} has no QuantizeLinear/DequantizeLinear nodes; a TensorRT int8 engine is built "
            "from an explicitly quantized graph: run `xmr optimize --precision int8-qdq` first"
        )
    if precision != "int8" and qdq:
        raise InputError(f"{onnx_path} is Q/DQ-quantized; build it with precision 'int8', not {precision!r}")
    return qdq


def require_tensorrt():
    """The `tensorrt` module, or one InputError line: not installed, or no CUDA device to build on."""
    try:
        import tensorrt as trt
    except ImportError:
        raise InputError(NOT_INSTALLED) from None
    try:  # a builder needs a CUDA device; without one TensorRT logs an error and returns nothing
        builder = trt.Builder(trt.Logger(trt.Logger.INTERNAL_ERROR))
    except Exception:  # pybind raises TypeError for the null builder
        builder = None
    if builder is None:
        raise InputError(NO_GPU)
    return trt


def has_plugin_nodes(onnx_path: str | Path) -> list[str]:
    """The `xmr` op types in the graph at `onnx_path` (its TensorRT plugins)."""
    import onnx

    from xmr.models.ops.onnx_domain import xmr_nodes

    return sorted({n.op_type for n in xmr_nodes(onnx.load(str(onnx_path), load_external_data=False))})


def _network(onnx_path: Path):
    """Polygraphy's network loader for the graph: from the file, or from bytes with plugin namespaces."""
    from polygraphy.backend.trt import NetworkFromOnnxBytes, NetworkFromOnnxPath

    plugins = has_plugin_nodes(onnx_path)
    if not plugins:
        return NetworkFromOnnxPath(str(onnx_path))
    import onnx

    from xmr.export import trt_plugins

    if not trt_plugins.register():
        raise InputError(f"{onnx_path} holds xmr::{', xmr::'.join(plugins)} nodes; {trt_plugins.SKIPPED}")
    model = trt_plugins.with_plugin_namespaces(onnx.load(str(onnx_path)))
    return NetworkFromOnnxBytes(model.SerializeToString())


def engine_from_onnx(
    onnx_path: str | Path,
    shapes: Mapping[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]],
    precision: str = "fp32",
    timing_cache: str | Path | None = None,
    plan: str | Path | None = None,
):
    """A deserialized TensorRT engine (`trt.ICudaEngine`) of the graph at `onnx_path` with one profile
    {input: (min, opt, max)}; saved to `plan` when given. See the module docstring for the steps."""
    from polygraphy.backend.trt import CreateConfig, EngineFromNetwork, Profile, SaveEngine
    from polygraphy.exception import PolygraphyException

    onnx_path = Path(onnx_path)
    if not onnx_path.is_file():
        raise InputError(f"ONNX model {onnx_path} does not exist")
    check_quantization(onnx_path, precision)
    require_tensorrt()
    profile = Profile()
    for name, (lo, opt, hi) in shapes.items():
        profile.add(name, min=lo, opt=opt, max=hi)
    cache = str(timing_cache) if timing_cache else None
    config = CreateConfig(
        tf32=precision != "fp32",  # fp32: full float32 matmuls; fp16/int8: TF32 for the leftover FP32 layers
        fp16=precision in ("fp16", "int8"),
        int8=precision == "int8",
        profiles=[profile],
        load_timing_cache=cache if cache and Path(cache).is_file() else None,
    )
    loader = EngineFromNetwork(_network(onnx_path), config, save_timing_cache=cache)
    if plan:
        loader = SaveEngine(loader, str(plan))
    try:
        return loader()
    except PolygraphyException as e:  # parser or builder errors, already logged in full by Polygraphy
        raise RuntimeError(f"TensorRT could not build a {precision} engine of {onnx_path}: {e}") from e


def build_engine(
    onnx_path: str | Path,
    spec: ModelSpec,
    precision: str = "fp16",
    dims: Mapping[str, DimRange] = DEFAULT_DIMS,
    timing_cache: str | Path | None = None,
    plan: str | Path | None = None,
):
    """The engine of one exported graph for serving: its profile from `spec`'s dynamic dims and `dims`
    (`dim_ranges(manifest)` for an artifact's graph), `precision` fp32 | fp16 | int8, the tactic timing
    cache loaded from and saved to `timing_cache`, the serialized plan written to `plan`."""
    return engine_from_onnx(onnx_path, profile_shapes(spec, dims), precision, timing_cache, plan)


class TensorRTRunner:
    """A TensorRT engine behind the `Runner` interface: `run(feeds) -> outputs` by name.

    `path` is a serialized engine (`.plan`, e.g. from `xmr engine`) or an ONNX graph, built here as an
    FP32 engine over `dims`. The engine stays on the GPU until `close()`.
    """

    backend = "tensorrt"

    def __init__(self, path: str | Path, spec: ModelSpec, dims: Mapping[str, DimRange] = DEFAULT_DIMS):
        path = Path(path)
        if not path.is_file():
            raise InputError(f"TensorRT engine or ONNX model {path} does not exist")
        require_tensorrt()
        from polygraphy.backend.common import BytesFromPath
        from polygraphy.backend.trt import EngineFromBytes, TrtRunner

        from xmr.export import trt_plugins

        trt_plugins.register()  # an engine with xmr plugins deserializes only where they are registered
        if path.suffix == ".onnx":
            engine = build_engine(path, spec, "fp32", dims)
        else:
            engine = EngineFromBytes(BytesFromPath(str(path)))()
        self.spec, self.path = spec, path
        self.runner = TrtRunner(engine, name=spec.name)
        self.runner.activate()
        names = [self.runner.engine.get_tensor_name(i) for i in range(self.runner.engine.num_io_tensors)]
        missing = [n for n in [*spec.input_names, *spec.output_names] if n not in names]
        if missing:
            self.close()
            raise InputError(f"engine {path} has no tensor {missing[0]!r} of the I/O spec; it has {names}")

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        out = self.runner.infer(check_feeds(self.spec, feeds))
        return {name: np.array(out[name]) for name in self.spec.output_names}

    def close(self) -> None:
        if self.runner.is_active:
            self.runner.deactivate()

    def __del__(self):
        runner = getattr(self, "runner", None)
        if runner is not None and runner.is_active:
            runner.deactivate()


def run_tensorrt(onnx_path: str | Path, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Build an FP32 engine fixed at the shapes of `feeds`, run it once, and return every output by name."""
    from polygraphy.backend.trt import TrtRunner

    shapes = {name: (a.shape, a.shape, a.shape) for name, a in feeds.items()}
    with TrtRunner(engine_from_onnx(onnx_path, shapes, "fp32")) as runner:
        return {name: np.array(out) for name, out in runner.infer(feeds).items()}
