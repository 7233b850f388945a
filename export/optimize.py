"""`xmr optimize`: FP16 and INT8 versions of an exported artifact, with recall gates.

`optimize(artifact, out, OptimizeConfig(precision=...))` writes `out` as a complete artifact folder (the
same files as `artifact`, every graph replaced by its optimised version under the same name, so `xmr repo`
and `xmr serve` take it as they are) and returns its manifest. The precisions, each from a maintained
converter:
- `fp16`: ONNX Runtime's float16 converter (`onnxruntime.transformers.float16`), FP32 inputs and outputs
  kept, for GPU targets (TensorRT, CUDA). Parity is still measured on the CPU, in ONNX Runtime.
- `int8`: the form for ONNX Runtime on a CPU (`xmr.export.ort_int8`): the graph's attention, residual +
  LayerNorm and bias + GELU fused into ONNX Runtime's contrib ops by onnxscript's ONNX Runtime rewriter,
  then every MatMul with a constant weight as an integer product with per-channel INT8 weights and its
  input quantized per token at run time (`activations="per-token"`; each token's scale is its own, so an
  item's result does not depend on its batch-mates) and the weights rounded to their INT8 grid by GPTQ on
  the calibration inputs (`rounding`; "nearest" rounds each weight alone, and is what `outliers` and
  per-tensor activations get). `activations="per-tensor"` uses ONNX Runtime's dynamic quantization
  (`quantize_dynamic`) instead: one scale per input over the whole batch. Plugin-form graphs (run by
  ONNX's reference evaluator) are not fused and get the standard-op form of the products.
- `int8-qdq`: ONNX Runtime's static quantization in the explicit QuantizeLinear/DequantizeLinear form
  (`quantize_static`, QDQ, symmetric INT8 weights per channel and activations per tensor, the form
  TensorRT builds INT8 engines from), calibrated on `calibration` training items (`method`: minmax,
  entropy or percentile). Calibration inputs of different lengths are zero-padded to one shape: every
  dynamic axis after the batch axis of our graphs is masked by another input (token lengths, frame and clip
  masks), so padding changes no real activation.

Which nodes stay in FP32 is measured, not hand-picked. The whole model is converted first; when its dev
split metrics (`ArtifactTask.gate`: R@1 of each direction, or R1@0.5 for moments) drop by more than
`max_recall_drop` points against the FP32 graphs, each candidate node (the nodes the converter would
change) is converted alone and scored by the error it causes in its graph's outputs on dev inputs
(1 - mean cosine against FP32); the most harmful nodes are then kept in FP32, the fewest that bring the dev
drop within the gate (a binary search over the ranking, each step scored on the dev split). The test split
has the last word: R@1 moves in steps of one query, so a configuration that passes on the dev split can
still fail the gate on the test split, and then nothing is written.

The `xmr` custom-op nodes of plugin-form graphs stay FP32 in every precision: their schemas take float32,
they are gathers and small matmuls over a handful of sampled points (memory-bound: INT8 would save nothing
and lose the sub-voxel positions), and the TensorRT plugins choose their own FP16 path.

The new manifest records, in `optimization`: the precision and converter settings, the nodes kept in
FP32, the dev search's steps, each graph's batch dependence (`batch_dependence`: how far an item's outputs
move between running in a batch of dev items and running alone; per-tensor dynamic INT8 scales
activations by the range of the whole batch, so its results depend on the batch-mates, FP32's, per-token
INT8's and static Q/DQ's do not), the fusions made (`fusions`), and
on the test split the optimised graphs' max abs error and min cosine
against PyTorch and their task metrics beside the FP32 ONNX graphs' and PyTorch's. `optimize` raises
`RecallGateError`, naming the gate and the drop, when the test R@1 drop exceeds the gate; the folder is
then not written. Every intermediate file goes to a temporary folder, never the working directory.
"""

from __future__ import annotations

import contextlib
import logging
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx
from tqdm.auto import tqdm

from xmr.export.iospec import ModelSpec
from xmr.export.manifest import Manifest, file_facts, read_manifest, verify_artifacts, versions
from xmr.export.ort_int8 import fuse_for_ort, int8_matmuls, outlier_channels, per_token_int8
from xmr.export.parity import BackendParity
from xmr.export.runners import Feeds, runner_for
from xmr.export.scoring import ArtifactTask, Run, run_of
from xmr.models.checkpoint import atomic_dir
from xmr.models.errors import InputError
from xmr.models.ops.onnx_domain import register_schemas

PRECISIONS = ("fp16", "int8", "int8-qdq")
CALIBRATION_METHODS = ("minmax", "entropy", "percentile")
ACTIVATION_SCALES = ("per-token", "per-tensor")  # int8: see xmr.export.ort_int8
ROUNDINGS = ("nearest", "gptq")  # int8 per-token weights
# the op types each precision converts (candidates for the search); everything else stays as exported
INT8_OPS = {"int8": ("MatMul", "Gemm"), "int8-qdq": ("MatMul", "Gemm", "Conv")}
XMR_OPS = ("DeformSample", "RandomWalkGCN")
SMOOTH_ALPHAS = (None, 0.5, 0.65, 0.8, 0.9)  # "auto": the one whose converted graph errs least on dev
CALIBRATION_BATCHES = 32  # at most this many recorded batches per graph calibrate it (bounded memory)
PLUGIN_ITEMS = 32  # plugin-form graphs run in the (slow) reference evaluator: score this many items
BATCH_ROWS = 16  # dev items whose outputs alone and batched measure each graph's batch dependence


class RecallGateError(Exception):
    """The optimised graphs lose more recall on the test split than the gate allows; `report` is what the
    manifest's `optimization` entry would have been."""

    def __init__(self, message: str, report: dict):
        super().__init__(message)
        self.report = report


@dataclass
class OptimizeConfig:
    precision: str  # a key of PRECISIONS
    calibration: int = 256  # training items (images, videos) whose inputs calibrate: Q/DQ, SmoothQuant, GPTQ
    method: str = "minmax"  # int8-qdq calibration: minmax | entropy | percentile
    max_recall_drop: float = 0.5  # points of the gate metrics (R@1), against the FP32 graphs
    dev_items: int = 500  # val items (images, videos) the node search scores on
    threads: int = 0  # ONNX Runtime threads (0: one per core)
    smooth: str = "auto"  # int8 forms: SmoothQuant alpha, "auto" (chosen on dev inputs) or "off"
    activations: str = "per-token"  # int8: input scales per token (ours) or per tensor (quantize_dynamic)
    outliers: int = 0  # int8 per-token: channels of each input with the largest calibrated range kept FP32
    rounding: str | None = None  # int8 per-token weights: nearest or GPTQ (None: GPTQ where it applies)

    def __post_init__(self) -> None:
        if self.rounding is None:
            self.rounding = "gptq" if self.precision == "int8" and self.gptq_applies() else "nearest"

    def gptq_applies(self) -> bool:
        """GPTQ rounds the per-token form's own weights over every input channel: per-token inputs, no
        outlier channels."""
        return self.activations == "per-token" and not self.outliers

    def check(self) -> None:
        if self.precision not in PRECISIONS:
            raise InputError(f"--precision {self.precision!r}; valid: {', '.join(PRECISIONS)}")
        if self.method not in CALIBRATION_METHODS:
            raise InputError(f"--method {self.method!r}; valid: {', '.join(CALIBRATION_METHODS)}")
        if self.calibration < 1:
            raise InputError(f"--calibration {self.calibration}: expected at least 1 training item")
        if self.max_recall_drop < 0:
            raise InputError(f"--max-recall-drop {self.max_recall_drop}: expected a drop >= 0 points")
        if self.activations not in ACTIVATION_SCALES:
            raise InputError(f"--activations {self.activations!r}; valid: {', '.join(ACTIVATION_SCALES)}")
        if self.outliers < 0 or (self.outliers and self.activations != "per-token"):
            raise InputError(
                f"--outliers {self.outliers}: expected a channel count >= 0, with --activations per-token"
            )
        if self.rounding not in ROUNDINGS or (self.rounding == "gptq" and not self.gptq_applies()):
            raise InputError(
                f"--rounding {self.rounding!r}: expected nearest or gptq (gptq with --activations per-token "
                "and no --outliers)"
            )
        if self.smooth not in ("auto", "off"):
            try:
                alpha = float(self.smooth)
            except ValueError:
                alpha = -1.0
            if not 0.0 <= alpha <= 1.0:
                raise InputError(f"--smooth {self.smooth!r}: expected auto, off or an alpha in [0, 1]")

    def needs_calibration(self) -> bool:
        """Whether some step calibrates on training inputs: Q/DQ ranges, SmoothQuant, outlier channels or
        GPTQ."""
        return (
            self.precision == "int8-qdq" or self.alphas() != [None] or bool(self.outliers)
            or self.rounding == "gptq"
        )  # fmt: skip

    def alphas(self) -> list[float | None]:
        """The SmoothQuant strengths to try (None: no smoothing); one value means no choice to make."""
        if self.precision == "fp16" or self.smooth == "off":
            return [None]
        return list(SMOOTH_ALPHAS) if self.smooth == "auto" else [float(self.smooth)]


@contextlib.contextmanager
def quiet_converters() -> Iterator[None]:
    """ONNX Runtime's converters log through the root logger (advice about pre-processing, which we do,
    and per-node notes); nothing there a user can act on."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)
    try:
        yield
    finally:
        root.setLevel(level)


# ----------------------------------------------------------------------------- inputs


class Recorder:
    """A `Run` that passes through to `run` and keeps the first `limit` feeds of each graph."""

    def __init__(self, run: Run, limit: int):
        self.inner, self.limit, self.feeds = run, limit, {}

    def __call__(self, graph: str, feeds: Feeds) -> Feeds:
        kept = self.feeds.setdefault(graph, [])
        if len(kept) < self.limit:
            kept.append(feeds)
        return self.inner(graph, feeds)


def pad_to_common_shape(feeds: list[Feeds], spec: ModelSpec) -> list[Feeds]:
    """Zero-pad every dynamic axis after the first to its largest size over `feeds` (one shape per input),
    so calibrators that stack batches accept inputs of different lengths."""
    out = [dict(f) for f in feeds]
    for t in spec.inputs:
        axes = [i for i, d in enumerate(t.shape) if isinstance(d, str) and i > 0]
        if not axes:
            continue
        target = np.max([f[t.name].shape for f in feeds], axis=0)
        for f in out:
            x = f[t.name]
            pad = [(0, int(target[i]) - x.shape[i]) if i in axes else (0, 0) for i in range(x.ndim)]
            f[t.name] = np.pad(x, pad)
    return out


class CalibrationReader:
    """ONNX Runtime's `CalibrationDataReader` protocol over a list of feeds."""

    def __init__(self, feeds: list[Feeds]):
        self.feeds, self.i = feeds, 0

    def get_next(self) -> Feeds | None:
        if self.i >= len(self.feeds):
            return None
        self.i += 1
        return self.feeds[self.i - 1]

    def rewind(self) -> None:
        self.i = 0

    def __len__(self) -> int:
        return len(self.feeds)


# ----------------------------------------------------------------------------- one graph


class GraphConverter:
    """Makes the `precision` version of one graph, any set of its candidate nodes kept in FP32.

    `prepared` is the exported graph after ONNX Runtime's quantization pre-processing (shape inference, no
    ORT-specific fusions, so a Q/DQ graph stays portable to TensorRT), in `work`, a temporary folder.
    `use_smoothing(alpha)` makes the INT8 forms start from its SmoothQuant rewrite (`xmr.export.smoothquant`,
    activation ranges from the calibration inputs) instead.
    """

    def __init__(self, source: Path, spec: ModelSpec, precision: str, work: Path, calibration: list[Feeds],
                 method: str, activations: str = "per-token", portable: bool = False,
                 outliers: int = 0, rounding: str = "nearest"):  # fmt: skip
        self.spec, self.precision, self.work, self.method = spec, precision, work, method
        self.activations, self.portable, self.outliers = activations, portable, outliers
        self.rounding = rounding
        self.outlier_cache: dict[Path, dict[str, np.ndarray]] = {}
        self.rounded_cache: dict[Path, dict[str, np.ndarray]] = {}
        self.prepared = work / f"{spec.name}.prepared.onnx"
        if precision == "fp16":
            shutil.copy2(source, self.prepared)
        else:
            from onnxruntime.quantization import quant_pre_process

            with quiet_converters():
                quant_pre_process(source, self.prepared, skip_optimization=True, skip_symbolic_shape=True)
        self.calibration = calibration
        self.base, self.alpha, self.absmax = self.prepared, None, None
        self.fusion_counts: dict[Path, dict[str, int]] = {}  # per fused graph: the fusions onnxscript made
        if precision == "int8":  # the MatMuls the CPU form converts, named as in its fused graph
            self.candidates = [n.name for n in int8_matmuls(onnx.load(self.fused()))]
            return
        graph = onnx.load(self.prepared).graph
        ops = INT8_OPS.get(precision)
        self.candidates = [
            n.name
            for n in graph.node
            if n.domain != "xmr" and (n.op_type in ops if ops else n.op_type not in FP16_KEEP)
        ]

    @property
    def cache(self) -> Path:  # int8-qdq: the ranges of each base graph, computed once, then reused
        base = "plain" if self.alpha is None else self.alpha
        return self.work / f"{self.spec.name}.{base}.calibration.json"

    def use_smoothing(self, alpha: float | None) -> None:
        """Start every later conversion from the SmoothQuant rewrite of strength `alpha` (None: none)."""
        from xmr.export.smoothquant import activation_absmax, smooth, smoothable

        self.alpha, self.base = alpha, self.prepared
        if alpha is None:
            return
        model = onnx.load(self.prepared)
        if self.absmax is None:
            names = [g.activation for g in smoothable(model)]
            batches = pad_to_common_shape(self.calibration_feeds(), self.spec)
            self.absmax = activation_absmax(self.prepared, names, batches)
        self.base = self.work / f"{self.spec.name}.smooth{alpha}.onnx"
        if not self.base.is_file():
            onnx.save(smooth(model, self.absmax, alpha), self.base)

    def fused(self) -> Path:
        """The int8 form's starting graph: the base graph with ONNX Runtime's transformer fusions
        (`xmr.export.ort_int8.fuse_for_ort`), or the base graph itself for a portable (plugin-form) graph,
        which must stay runnable by ONNX's reference evaluator."""
        if self.portable:
            return self.base
        path = self.work / f"{self.spec.name}.{'plain' if self.alpha is None else self.alpha}.fused.onnx"
        if not path.is_file():
            self.fusion_counts[path] = fuse_for_ort(self.base, path)
        return path

    def calibration_feeds(self) -> list[Feeds]:
        """The recorded calibration inputs; InputError when there are none."""
        if not self.calibration:
            raise InputError(f"no calibration inputs were recorded for {self.spec.name}")
        return self.calibration

    def per_graph(self, cache: dict[Path, dict], compute) -> dict:
        """`compute(graph path, calibration feeds)` for the int8 form's current starting graph, once."""
        source = self.fused()
        if source not in cache:
            cache[source] = compute(source, self.calibration_feeds())
        return cache[source]

    def outlier_channels(self, model: onnx.ModelProto) -> dict[str, np.ndarray]:
        """The `outliers` channels of each INT8 product's input with the largest max |x| over the
        calibration inputs, in the current starting graph `model`."""
        from xmr.export.smoothquant import activation_absmax

        def compute(source: Path, feeds: list[Feeds]) -> dict[str, np.ndarray]:
            names = sorted({n.input[0] for n in int8_matmuls(model)})
            return outlier_channels(activation_absmax(source, names, feeds), self.outliers)

        return self.per_graph(self.outlier_cache, compute)

    def gptq_weights(self, model: onnx.ModelProto) -> dict[str, np.ndarray]:
        """Every converted MatMul's weight rounded by GPTQ on the calibration inputs of the current
        starting graph `model` (`xmr.export.ort_int8.gptq_round`)."""
        from onnx import numpy_helper

        from xmr.export.ort_int8 import gptq_round, input_hessians

        def compute(source: Path, feeds: list[Feeds]) -> dict[str, np.ndarray]:
            nodes = [n for n in int8_matmuls(model) if n.op_type == "MatMul"]
            hessians = input_hessians(source, nodes, feeds)
            inits = {i.name: i for i in model.graph.initializer}
            return {
                n.name: gptq_round(numpy_helper.to_array(inits[n.input[1]]), hessians[n.name])
                for n in tqdm(nodes, desc=f"GPTQ {self.spec.name}", leave=False, disable=None)
            }

        return self.per_graph(self.rounded_cache, compute)

    @property
    def fusions(self) -> dict[str, int]:
        """The fusions made in the int8 form's current starting graph (none for other precisions)."""
        if self.precision != "int8" or self.portable:
            return {}
        return self.fusion_counts.get(self.fused(), {})

    def convert(self, path: Path, keep: set[str] = frozenset(), only: set[str] | None = None) -> Path:
        """Write the converted graph to `path`: every candidate except `keep`, or only the nodes `only`."""
        keep = set(self.candidates) - set(only) if only is not None else set(keep)
        with quiet_converters():
            if self.precision == "fp16":
                self._fp16(path, keep)
            elif self.precision == "int8":
                self._int8(path, keep)
            else:
                self._int8_qdq(path, keep)
        return path

    def _fp16(self, path: Path, keep: set[str]) -> None:
        from onnxruntime.transformers.float16 import DEFAULT_OP_BLOCK_LIST, convert_float_to_float16

        model = convert_float_to_float16(
            onnx.load(self.prepared),
            keep_io_types=True,
            op_block_list=[*DEFAULT_OP_BLOCK_LIST, *XMR_OPS],
            node_block_list=sorted(keep),
        )
        onnx.save(tidied(model), path)

    def _int8(self, path: Path, keep: set[str]) -> None:
        if self.activations == "per-token":
            model = onnx.load(self.fused())
            outliers = self.outlier_channels(model) if self.outliers else None
            rounded = self.gptq_weights(model) if self.rounding == "gptq" else None
            onnx.save(per_token_int8(model, keep, not self.portable, outliers, rounded), path)
            return
        from onnxruntime.quantization import QuantType, quantize_dynamic

        quantize_dynamic(
            self.fused(),
            path,
            op_types_to_quantize=list(INT8_OPS["int8"]),
            per_channel=True,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=sorted(keep),
        )

    def _int8_qdq(self, path: Path, keep: set[str]) -> None:
        from onnxruntime.quantization import QuantFormat, QuantType, quantize_static

        self._calibrate()
        quantize_static(
            self.base,
            path,
            None,  # the ranges come from the calibration cache
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=list(INT8_OPS["int8-qdq"]),
            per_channel=True,
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            nodes_to_exclude=sorted(keep),
            calibrate_method=self._method(),
            calibration_cache_path=self.cache,
            # TensorRT takes symmetric INT8 only (zero points 0)
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )

    def _method(self):
        from onnxruntime.quantization import CalibrationMethod

        return {
            "minmax": CalibrationMethod.MinMax,
            "entropy": CalibrationMethod.Entropy,
            "percentile": CalibrationMethod.Percentile,
        }[self.method]

    def _calibrate(self) -> None:
        """Compute the activation ranges once, batch by batch (the calibrator holds one batch of activations
        at a time, not the whole calibration set), into ONNX Runtime's calibration cache."""
        if self.cache.is_file():
            return
        from onnxruntime.quantization import create_calibrator, save_tensors_data

        batches = pad_to_common_shape(self.calibration_feeds(), self.spec)
        with tempfile.TemporaryDirectory(dir=self.work) as tmp:
            calibrator = create_calibrator(
                self.base,
                list(INT8_OPS["int8-qdq"]),
                augmented_model_path=str(Path(tmp) / "augmented.onnx"),
                calibrate_method=self._method(),
                extra_options={"symmetric": True},
            )
            for batch in tqdm(batches, desc=f"calibrate {self.spec.name}", leave=False, disable=None):
                calibrator.collect_data(CalibrationReader([batch]))
            save_tensors_data(calibrator.compute_data(), self.cache)


def tidied(model: onnx.ModelProto) -> onnx.ModelProto:
    """The FP16 converter appends the casts of kept-FP32 inputs after their consumers and leaves stale
    float16 types in `value_info`; ONNX Runtime does not mind, the reference evaluator (plugin-form graphs)
    and the ONNX checker do. The types are dropped (shape inference recomputes them) and onnx-ir sorts."""
    import onnx_ir

    del model.graph.value_info[:]
    graph = onnx_ir.from_proto(model)
    graph.graph.sort()
    return onnx_ir.to_proto(graph)


# ops the FP16 search never offers: shape and index arithmetic, which carries no float data
FP16_KEEP = ("Shape", "Gather", "Range", "Cast", "Reshape", "Unsqueeze", "Squeeze", "Concat", "Slice",
             "Expand", "Less", "Not", "Where", "Equal", "Greater", "ConstantOfShape", "Constant")  # fmt: skip


# ----------------------------------------------------------------------------- the artifact


def output_error(want: Feeds, got: Feeds) -> float:
    """1 - the smallest mean row cosine over the outputs: how far `got` is from `want`."""
    worst = 0.0
    for name, w in want.items():
        a, b = w.reshape(len(w), -1).astype(np.float64), got[name].reshape(len(w), -1).astype(np.float64)
        cos = (a * b).sum(1) / np.maximum(np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1), 1e-12)
        worst = max(worst, 1.0 - float(cos.mean()))
    return worst


def batch_dependence(run, spec: ModelSpec, feeds: Feeds, rows: int = BATCH_ROWS) -> float:
    """Largest |difference| between the outputs of the first `rows` items of `feeds` run as one batch and
    run one by one: 0 (or float rounding) for a graph that is a function of each item alone. Dynamic INT8
    is not: it scales each activation by the range of the whole batch, so an item's result depends on its
    batch-mates (NaN for a graph whose inputs have no batch axis)."""
    if not spec.batched:
        return float("nan")
    n = min(rows, *(len(v) for v in feeds.values()))
    first = {k: v[:n] for k, v in feeds.items()}
    together = run(first)
    worst = 0.0
    for i in range(n):
        alone = run({k: v[i : i + 1] for k, v in first.items()})
        for name, value in alone.items():
            if np.issubdtype(value.dtype, np.floating):
                worst = max(worst, float(np.abs(value[0] - together[name][i]).max(initial=0.0)))
    return worst


def gate_drop(task: ArtifactTask, reference: dict, candidate: dict) -> float:
    """The largest drop (points) of the gate metrics from `reference` to `candidate`."""
    return max(reference[m] - candidate[m] for m in task.gate)


class Optimizer:
    """The graphs of one artifact converted together; see the module docstring for the search."""

    def __init__(self, artifact: Path, manifest: dict, task: ArtifactTask, cfg: OptimizeConfig, work: Path):
        self.artifact, self.task, self.cfg, self.work = artifact, task, cfg, work
        self.form = manifest.get("custom_ops", "standard")
        self.items = PLUGIN_ITEMS if self.form == "plugin" else None
        self.fp32 = run_of(self.runners({g: artifact / f"{g}.onnx" for g in task.specs}))
        calibration = {}
        if cfg.needs_calibration():
            recorder = Recorder(self.fp32, limit=CALIBRATION_BATCHES)
            task.score(recorder, task.split("train", cfg.calibration))
            calibration = recorder.feeds
        self.converters = {
            g: GraphConverter(
                artifact / f"{g}.onnx",
                spec,
                cfg.precision,
                work,
                calibration.get(g, []),
                cfg.method,
                cfg.activations,
                portable=self.form == "plugin",
                outliers=cfg.outliers,
                rounding=cfg.rounding,
            )
            for g, spec in tqdm(task.specs.items(), desc="prepare", leave=False, disable=None)
        }
        self.dev = task.split("val", min(cfg.dev_items, self.items or cfg.dev_items))
        recorder = Recorder(self.fp32, limit=1)  # each graph's first dev batch: the per-node errors' inputs
        self.dev_fp32 = task.score(recorder, self.dev)
        self.dev_feeds = {g: feeds[0] for g, feeds in recorder.feeds.items()}
        self.dev_outputs = {g: self.fp32(g, feeds) for g, feeds in self.dev_feeds.items()}
        self.steps: list[dict] = []
        self.smoothing = {g: self.choose_smoothing(g) for g in self.converters}

    def choose_smoothing(self, graph: str) -> dict:
        """Set `graph`'s SmoothQuant strength: of `cfg.alphas()`, the one whose fully converted graph has the
        smallest output error on the dev inputs. Returns the choice and every tried alpha's error."""
        converter, alphas = self.converters[graph], self.cfg.alphas()
        if len(alphas) == 1:
            converter.use_smoothing(alphas[0])
            return {"alpha": alphas[0]}
        folder = self.work / "smooth"
        folder.mkdir(exist_ok=True)
        errors = {}
        for alpha in tqdm(alphas, desc=f"smoothing {graph}", leave=False, disable=None):
            converter.use_smoothing(alpha)
            runner = self.runners({graph: converter.convert(folder / f"{graph}.onnx")})[graph]
            errors[alpha] = output_error(self.dev_outputs[graph], runner.run(self.dev_feeds[graph]))
        best = min(errors, key=errors.get)
        converter.use_smoothing(best)
        return {"alpha": best, "dev_error": {str(a): e for a, e in errors.items()}}

    def runners(self, paths: dict[str, Path]):
        return {g: runner_for(p, self.task.specs[g], self.form, self.cfg.threads) for g, p in paths.items()}

    def build(self, keep: set[tuple[str, str]], tag: str) -> dict[str, Path]:
        """Every graph converted with the (graph, node) pairs of `keep` in FP32; their paths."""
        folder = self.work / tag
        folder.mkdir(exist_ok=True)
        return {
            g: c.convert(folder / f"{g}.onnx", {n for gg, n in keep if gg == g})
            for g, c in self.converters.items()
        }

    def dev_score(self, keep: set[tuple[str, str]], tag: str) -> tuple[dict, dict[str, Path]]:
        paths = self.build(keep, tag)
        metrics = self.task.score(run_of(self.runners(paths)), self.dev)
        drop = gate_drop(self.task, self.dev_fp32, metrics)
        self.steps.append({"step": tag, "kept_fp32": len(keep), "dev_gate_drop": round(drop, 3)})
        return metrics, paths

    def passes(self, metrics: dict) -> bool:
        return gate_drop(self.task, self.dev_fp32, metrics) <= self.cfg.max_recall_drop

    def sensitivity(self) -> list[tuple[float, str, str]]:
        """(error of the graph's outputs with only this node converted, graph, node), most harmful first."""
        ranking = []
        pairs = [(g, n) for g, c in self.converters.items() for n in c.candidates]
        folder = self.work / "one"
        folder.mkdir(exist_ok=True)
        for g, node in tqdm(pairs, desc="per-node error", unit="node", leave=False, disable=None):
            path = self.converters[g].convert(folder / f"{g}.onnx", only={node})
            runner = self.runners({g: path})[g]
            ranking.append((output_error(self.dev_outputs[g], runner.run(self.dev_feeds[g])), g, node))
        return sorted(ranking, key=lambda r: -r[0])

    def search(self) -> tuple[set[tuple[str, str]], dict[str, Path], list[tuple[float, str, str]]]:
        """The nodes kept in FP32 and the converted graphs' paths (see the module docstring)."""
        metrics, paths = self.dev_score(set(), "all")
        if self.passes(metrics):
            return set(), paths, []
        ranking = self.sensitivity()
        lo, hi, best = 1, len(ranking), None  # the smallest k whose top-k kept in FP32 passes
        while lo <= hi:
            k = (lo + hi) // 2
            keep = {(g, n) for _, g, n in ranking[:k]}
            metrics, paths = self.dev_score(keep, f"keep{k}")
            if self.passes(metrics):
                best, hi = (keep, paths), k - 1
            else:
                lo = k + 1
        if best is None:  # nothing converted passes either: keep everything, the gate decides on test
            keep = {(g, n) for _, g, n in ranking}
            return keep, self.build(keep, "none"), ranking
        return best[0], best[1], ranking


def optimize(artifact: Path, out: Path, cfg: OptimizeConfig) -> dict:
    """Write the `cfg.precision` version of `artifact` to `out`; returns its manifest.

    Raises `RecallGateError` (nothing written) when the test split's gate metrics drop by more than
    `cfg.max_recall_drop` points against the FP32 graphs.
    """
    cfg.check()
    artifact = Path(artifact)
    manifest = read_manifest(artifact)
    verify_artifacts(artifact, manifest)
    if "optimization" in manifest:
        raise InputError(
            f"{artifact} is already optimised ({manifest['optimization']['precision']}); "
            "optimise the FP32 export instead"
        )
    if "engines" in manifest:
        raise InputError(f"{artifact} holds TensorRT engines; optimise the FP32 export instead")
    task = ArtifactTask.of(manifest)
    steps = tqdm(total=4, desc=f"optimize {cfg.precision}", unit="step", disable=None)
    with tempfile.TemporaryDirectory(prefix="xmr-optimize-") as work:
        opt = Optimizer(artifact, manifest, task, cfg, Path(work))
        steps.update()
        keep, paths, ranking = opt.search()
        register_schemas()  # the checker must know the xmr domain's ops
        for path in paths.values():
            onnx.checker.check_model(str(path), full_check=True)
        steps.update()
        test = task.split("test", opt.items)
        optimised = opt.runners(paths)
        torch_runners = task.torch_runners()
        backends = BackendParity(torch_runners, optimised)
        metrics = {
            "pytorch": task.score(run_of(torch_runners), test),
            "onnx_fp32": task.score(opt.fp32, test),
            cfg.precision: task.score(lambda g, feeds: backends.run(g, feeds)[1], test),
        }
        steps.update()
        drop = gate_drop(task, metrics["onnx_fp32"], metrics[cfg.precision])
        dependence = {
            g: {
                "onnx_fp32": batch_dependence(lambda f, g=g: opt.fp32(g, f), task.specs[g], feeds),
                cfg.precision: batch_dependence(optimised[g].run, task.specs[g], feeds),
            }
            for g, feeds in opt.dev_feeds.items()
        }
        report = {
            "precision": cfg.precision,
            "settings": asdict(cfg),
            "converter": converter_name(cfg),
            "smoothing": opt.smoothing,
            "fusions": {g: c.fusions for g, c in opt.converters.items() if c.fusions},
            "source": str(artifact),
            "kept_fp32": {g: sorted(n for gg, n in keep if gg == g) for g in task.specs},
            "candidates": {g: len(c.candidates) for g, c in opt.converters.items()},
            "most_harmful": [
                {"graph": g, "node": n, "dev_error": e} for e, g, n in ranking[: max(10, len(keep))]
            ],
            "search": opt.steps,
            "gate": {"metrics": list(task.gate), "max_drop": cfg.max_recall_drop, "test_drop": drop},
            "split": f"{test.name}/{test.split}",
            "n_items": len(test),
            "parity_vs_pytorch": backends.stats.stats,
            "batch_dependence": dependence,
            "metrics": metrics,
        }
        if drop > cfg.max_recall_drop:
            raise RecallGateError(
                f"{cfg.precision} graphs lose {drop:.2f} points of {'/'.join(task.gate)} on the test split "
                f"against the FP32 graphs; the gate (--max-recall-drop) is {cfg.max_recall_drop:g}",
                report,
            )
        with atomic_dir(Path(out)) as tmp:
            for name in manifest["files"]:
                graph = name.removesuffix(".onnx")
                source = paths[graph] if graph in paths else artifact / name
                shutil.copy2(source, tmp / name)
            if task.family == "image_text":  # the served gallery comes from the served image tower
                from xmr.export.scoring import embed_images

                gallery = embed_images(
                    run_of(optimised), task.specs["image_encoder"], test.images, task.model
                )
                np.save(tmp / "gallery.npy", gallery.astype(np.float32))
            elif task.family == "video" and "gallery.npy" in manifest["files"]:  # likewise, the video tower
                from xmr.export.scoring import embed_videos

                _, split = manifest["gallery"]["split"].split("/")
                videos = task.split(split, manifest["gallery"]["size"])
                gallery = embed_videos(run_of(optimised), task.model, task.specs["video_encoder"], videos)
                np.save(tmp / "gallery.npy", gallery.astype(np.float32))
            new = Manifest.from_dict(manifest)
            new.files = file_facts(tmp, list(manifest["files"]))
            new.versions = versions()
            new.optimization = report
            new.write(tmp)
        steps.update()
    steps.close()
    return new.to_dict()


def converter_name(cfg: OptimizeConfig) -> str:
    """What made the graphs, as the manifest records it."""
    if cfg.precision == "fp16":
        return "onnxruntime.transformers.float16.convert_float_to_float16 (keep_io_types)"
    if cfg.precision == "int8-qdq":
        return (
            "onnxruntime.quantization.quantize_static (QDQ, symmetric QInt8, per-channel weights, "
            "MatMul/Gemm/Conv)"
        )
    fusions = "onnxscript.rewriter.ort_fusions on standard-form graphs (attention, SkipLayerNorm, BiasGelu), "
    if cfg.activations == "per-token":
        outliers = f", {cfg.outliers} outlier channels per input in FP32" if cfg.outliers else ""
        gptq = ", GPTQ-rounded weights" if cfg.rounding == "gptq" else ""
        inputs = f"per-token UINT8 inputs{outliers}{gptq}"
        return fusions + f"xmr.export.ort_int8.per_token_int8 (per-channel INT8 weights, {inputs})"
    return fusions + "onnxruntime.quantization.quantize_dynamic (per-channel QInt8 weights, MatMul/Gemm)"
