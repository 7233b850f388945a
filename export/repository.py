"""Write a servable Triton model repository from exported artifacts, from the package alone.

What is served is data: `MODELS` is the table of served models (python-backend adapter, config parameters,
the artifact files of its version folder, dynamic batching) and `ENSEMBLES` the table of ensembles, each a
tuple of `Step`s (model, input map, output map). A name with a row in both tables takes, per target, the form
`FORMS` says: `text_search` is the one-hop python model `TextSearchModel` on the cpu target and the
tokenizer -> text_encoder -> gallery_topk ensemble on the gpu target (`serves_as`); `text_video_search` and
`moment_search` likewise. Serving another model
family is adding rows.
`build_repository` renders every `config.pbtxt` from these tables and the artifacts' manifests (their I/O
specs and preprocessing facts), writes each python model's `model.py` (a one-line shim importing its
adapter class from `xmr.export.adapters`) and `spec.json`, and copies the artifacts into place after
verifying each one's sha256 against its manifest. It reads nothing else, so an installed wheel can run
`xmr repo`. Configs are protobuf messages from `tritonclient`'s `model_config_pb2`, printed with protobuf's
text format: no hand-written pbtxt.

One repository may hold one artifact of each family (`FAMILIES`, by the manifest's `model`), each served
under names that say what they hold (`served_specs`, rendered from the I/O specs of `iospec.py`):
- image-text (rvse): `text_search`, `image_embed` and their models, unprefixed (the manifest lists them);
  on the cpu target `text_search` is one python model (see "Text search" below) and `tokenizer`,
  `text_encoder`, `gallery_topk` stay served beside it, callable on their own (e.g. `text_encoder` by a
  client embedding text);
- text-video (visern, prota): `text_video_search` (text -> `video_tokenizer` -> `video_text_encoder` ->
  `video_gallery_topk`, FAISS over the export's `gallery.npy`) and `video_embed` (-> `video_encoder`);
  for ProTA that is its first stage (the global video embedding), and `text_video_rerank` serves the
  paper's token-level score on top: a BLS python model (export/bls_rerank.py) that shortlists with
  `video_gallery_topk` and re-ranks with `video_pair_scorer` (the pair scorer graph, one query against a
  shortlist, so not batched: `max_batch_size: 0`) over the export's token store;
- moments (cdnet): `moment_search` (text + video id -> `moment_tokenizer`, `moment_clips` (the export's
  `clip_features.npz`) -> `moment_model` -> `moment_postprocess`: top-k [start_s, end_s, score]); on the
  cpu target it is one python model (`MomentSearchModel`), its composing models served beside it: in the
  ensemble the tokenizer and the clip store run in parallel, and Triton 2.51's ensemble scheduler
  mishandles a request whose parallel step fails while the other runs (it never releases the request,
  and now and then crashes the server), which any bad text or unknown video id triggers.
A step's input and output maps may name tensors that only some artifacts of a family have (ViSERN's
`regions`, ProTA's `frames`, CDNet's optional `grid`): a map entry is rendered only where the served
model's spec has that tensor. The repository root holds `serving.json` (every served model's spec, its
family, each artifact's folder, and the sha256 record of every artifact file copied in, which serving
verifies) and, for a one-artifact repository, that artifact's `manifest.json`. Each python model's
version folder holds `bounds.json`: the limits on its inputs derived from its artifact (`input_bounds`:
the vocabulary, the pixel range, a query's norm, text bytes, token and clip counts, the clip store's
feature range), which the model checks on every request before running it.

`model_repository/` (committed) is the repository rendered for the default preset (configs and shims, no
artifacts); `python -m xmr.export.repository` (`make configs`) re-renders it and a test fails if it drifts.

Text search: each python-backend hop of an ensemble is a shared-memory round trip to a stub process plus
a scheduler queue; Triton's statistics (`xmr.clients.stats`, batch 1, one client) put the three-hop
ensemble at 4.8 ms of server time per request against 1.3 ms for `TextSearchModel` (the same tokenizer,
ONNX Runtime tower and FAISS search in one `execute`, answering exactly as the ensemble: ids equal, scores
within 1e-5, tested through the real server). Served captions/s (shared 2-core machine), ensemble with a
0.5 ms queue delay vs the fused model with none, one instance: b1c1 244 vs 483, b1c4 650 vs 1,110, b1c16
862 vs 1,382; b8c4 2,426 vs 2,076 (at large client batches the ensemble's three stub processes overlap
work; the fused model is the choice for interactive search). On the gpu target the tower is a native GPU
model, so the ensemble stays there.

Queue delay (`QUEUE_DELAY_US`, every dynamically batched model, both targets): 0. With a delay, a request
that finds the queue short of a full batch waits it out: at 500 us the batched hops measured ~0.9 ms of
queue each at one request at a time (the unbatched tokenizer 0.09 ms), the largest single cost at low
load. With 0, Triton still batches whatever queued while an instance was busy, which is how batches form
under load; the one loaded point where 0 measured worse (batch 8, 16 clients: 0.8-0.9x) is within the
~20% run-to-run spread of the shared machine, while the low-load gain is not. Re-measure with
`python -m xmr.perf.served_overhead` (its delay variants) before raising it for a throughput deployment.

Preferred batch size of the cpu target's one-hop searches (`SEARCH_PREFERRED_BATCH`): 8. When an instance
frees, Triton's dynamic batcher gives it the largest preferred batch it can form from the queue, or,
without preferred sizes, everything queued (up to `max_batch_size`). With two instances and clients
sending 8 captions each, that put two queued requests into one 16-row run on one instance while the other
instance sat idle (1.4 requests per execution at 4 clients); with 8 preferred, two queued 8-caption
requests run on both instances, while single captions are still merged, up to 8, under load. Measured
with `python -m xmr.perf.served_overhead` (three runs): served / in-process at batch 8 with 4 clients
0.64-0.69 without it, 0.70-0.75 with it; without dynamic batching at all 0.76-0.81, but single captions at
16 clients then fell from 1.04-1.18 to 0.66-0.68, since none are merged. Requests of more than 8 captions
are still merged with what is queued behind them.

Targets:
- `cpu`: every model is a python-backend model; the towers host ONNX Runtime (this is what the
  nvidia-pytriton server can run, having only the python backend); `text_search` is `TextSearchModel`.
- `gpu`: the towers are `onnxruntime_onnx` models on KIND_GPU with the TensorRT execution accelerator
  (FP16), or `tensorrt_plan` models where the artifact folder holds `<tower>.plan` engines (what
  `xmr engine` writes, see `engine.py`): the plan copied as `model.plan`, inputs/outputs named and typed
  as the I/O spec says (an engine keeps the graph's FP32 / int64 I/O whatever its precision), its
  `max_batch_size` the engine profile's batch maximum where the manifest records one; the tokenizer,
  preprocess and gallery models stay python models on the CPU, and `text_search` is the ensemble. Served by
  the official Triton container.
  An engine holding the `xmr` Python plugins (`trt_plugins.py`) runs only in a Python process, so it is
  refused here.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from tqdm.auto import tqdm

from xmr.export.bls_rerank import DEFAULT_MODELS as BLS_CALLS
from xmr.export.bls_rerank import GALLERY_FILES
from xmr.export.iospec import ModelSpec, image_text_specs, moment_serving_specs, video_serving_specs
from xmr.export.manifest import (  # noqa: F401 (SERVING, read_serving, verify_repository: re-exported)
    SERVING,
    read_manifest,
    read_serving,
    sha256,
    verify_artifacts,
    verify_repository,
)
from xmr.export.runners import BOUNDS, Bound
from xmr.models.checkpoint import atomic_dir
from xmr.models.errors import InputError

# the committed, rendered repository of a source checkout: only `make configs` and its drift test use it
COMMITTED = Path(__file__).resolve().parent.parent / "model_repository"
TARGETS = ("cpu", "gpu")
MAX_BATCH = 64
QUEUE_DELAY_US = 0  # dynamic batching: batch what is queued, never wait to fill (see the docstring)
MOMENT_NMS_IOU = "0.7"  # moment_postprocess's and the one-hop moment_search's NMS threshold


@dataclass(frozen=True)
class Fact:
    """A config parameter read from the manifest's `preprocessing` entry (JSON text: 77, [0.5, 0.5])."""

    key: str


@dataclass(frozen=True)
class Served:
    """One served model.

    adapter: the class of `xmr.export.adapters` its `model.py` shim loads (a python-backend model).
    parameters: the config's `parameters`, literal strings or `Fact`s of the manifest.
    files: {file in its version folder: artifact file}.
    onnx_on_gpu: on the gpu target it is an `onnxruntime_onnx` model on the GPU (TensorRT accelerator), or a
      `tensorrt_plan` model where the artifacts hold the engine (its `.onnx` artifact's name, `.plan`),
      instead of a python model.
    specs: {file in its version folder: served model whose I/O spec is written there}, beside its own
      `spec.json` (the fused text search's tower spec).
    """

    adapter: str
    parameters: Mapping[str, str | Fact] = field(default_factory=dict)
    files: Mapping[str, str] = field(default_factory=dict)
    dynamic_batching: bool = False
    onnx_on_gpu: bool = False
    specs: Mapping[str, str] = field(default_factory=dict)
    instances: int = 1  # python-model instances (stub processes): dynamic batches that can run at once
    preferred_batch: tuple[int, ...] = ()  # dynamic batching's preferred_batch_size (see the docstring)
    module: str = "xmr.export.adapters"  # where `adapter` lives (its `model.py` shim imports it from there)
    calls: tuple[str, ...] = ()  # the served models it calls through BLS: served beside it or refused

    def engine(self) -> str:
        """The artifact name of this tower's TensorRT engine."""
        return self.files["model.onnx"].removesuffix(".onnx") + ".plan"


@dataclass(frozen=True)
class Step:
    """One step of an ensemble: `model` with {its input: ensemble tensor}, {its output: ensemble tensor}."""

    model: str
    inputs: Mapping[str, str]
    outputs: Mapping[str, str]


def onnx_tower(artifact: str) -> Served:
    """An exported ONNX tower: ONNX Runtime in a python model (cpu), a native GPU model (gpu)."""
    return Served(
        "OnnxModel", {"threads": "1"}, {"model.onnx": artifact}, dynamic_batching=True, onnx_on_gpu=True
    )


# Instances of the cpu target's one-hop text searches. Each hosts a one-thread ONNX Runtime session, so one
# instance keeps one core busy however many clients wait; two let two dynamic batches run at once (the
# in-process pipeline they are measured against runs concurrent callers on every core). Two is the
# development machine's core count: raise `count` in config.pbtxt on a larger CPU.
SEARCH_INSTANCES = 2
SEARCH_PREFERRED_BATCH = 8  # rows: an instance takes one 8-caption request, not two (see the docstring)


def one_hop_text_search(tower: str) -> Served:
    """The cpu target's one-hop text search (`TextSearchModel`) over a family's tokenizer, text tower
    (whose I/O spec is served model `tower`'s) and gallery, with `SEARCH_INSTANCES` instances."""
    return Served(
        "TextSearchModel",
        {
            "max_tokens": Fact("max_tokens"),
            "max_bytes": Fact("max_bytes"),
            "threads": "1",
            "index": "flat",
            "max_k": "1000",
        },
        {
            "tokenizer.json": "tokenizer.json",
            "model.onnx": "text_encoder.onnx",
            "gallery.npy": "gallery.npy",
            "gallery_ids.npy": "gallery_ids.npy",
        },
        dynamic_batching=True,
        specs={"text_encoder.spec.json": tower},
        instances=SEARCH_INSTANCES,
        preferred_batch=(SEARCH_PREFERRED_BATCH,),
    )


MODELS: dict[str, Served] = {
    "tokenizer": Served(
        "TokenizerModel",
        {"max_tokens": Fact("max_tokens"), "max_bytes": Fact("max_bytes")},
        {"tokenizer.json": "tokenizer.json"},
    ),
    "preprocess": Served(
        "PreprocessModel", {"pixel_mean": Fact("pixel_mean"), "pixel_std": Fact("pixel_std")}
    ),
    "gallery_topk": Served(
        "GalleryTopKModel",
        {"index": "flat", "max_k": "1000"},
        {"gallery.npy": "gallery.npy", "gallery_ids.npy": "gallery_ids.npy"},
        dynamic_batching=True,
    ),
    "text_encoder": onnx_tower("text_encoder.onnx"),
    "image_encoder": onnx_tower("image_encoder.onnx"),
    # text-video (ViSERN, ProTA's first stage)
    "video_tokenizer": Served(
        "TokenizerModel",
        {"max_tokens": Fact("max_tokens"), "max_bytes": Fact("max_bytes")},
        {"tokenizer.json": "tokenizer.json"},
    ),
    "video_text_encoder": onnx_tower("text_encoder.onnx"),
    "video_encoder": onnx_tower("video_encoder.onnx"),
    "video_gallery_topk": Served(
        "GalleryTopKModel",
        {"index": "flat", "max_k": "1000"},
        {"gallery.npy": "gallery.npy", "gallery_ids.npy": "gallery_ids.npy"},
        dynamic_batching=True,
    ),
    # video moments (CDNet)
    "moment_tokenizer": Served(
        "TokenizerModel",
        {"max_tokens": Fact("max_tokens"), "max_bytes": Fact("max_bytes")},
        {"tokenizer.json": "tokenizer.json"},
    ),
    "moment_clips": Served("ClipStoreModel", {}, {"clip_features.npz": "clip_features.npz"}),
    "moment_model": onnx_tower("moment_model.onnx"),
    "moment_postprocess": Served("MomentPostprocessModel", {"nms_iou": MOMENT_NMS_IOU}),
    # the cpu target's moment_search (FORMS): tokenizer + clip store + moment graph + post-processing in one
    # python model; Triton 2.51 mishandles the ensemble's parallel steps when one fails (see the docstring)
    "moment_search": Served(
        "MomentSearchModel",
        {
            "max_tokens": Fact("max_tokens"),
            "max_bytes": Fact("max_bytes"),
            "threads": "1",
            "nms_iou": MOMENT_NMS_IOU,
        },
        {
            "tokenizer.json": "tokenizer.json",
            "model.onnx": "moment_model.onnx",
            "clip_features.npz": "clip_features.npz",
        },
        dynamic_batching=True,
        specs={"moment_model.spec.json": "moment_model"},
    ),
    # the cpu target's text searches (FORMS): tokenizer + text tower + gallery top-k in one python model
    "text_search": one_hop_text_search("text_encoder"),
    "text_video_search": one_hop_text_search("video_text_encoder"),
    # ProTA: the pair scorer (one query against a shortlist: not batched) and the two-stage search that
    # calls it through BLS. Defaults from perf/figures/prota_rerank.md: a shortlist of 20 holds the true
    # video for every test query (stage-1 R@10 is 100), and ranking by pair score + 1 x the first stage's
    # cosine has the best R@1 (79.2, against 77.6 for the first stage and 71.9 for the pair score alone)
    "video_pair_scorer": Served(
        "OnnxModel",
        {"threads": "1"},
        {"model.onnx": "pair_scorer.onnx"},
        onnx_on_gpu=True,
        instances=SEARCH_INSTANCES,
    ),
    "text_video_rerank": Served(
        "TwoStageModel",
        {"shortlist": "20", "fuse": "1.0", **BLS_CALLS},
        {f"{name}.npy": f"{name}.npy" for name in GALLERY_FILES},
        module="xmr.export.bls_rerank",
        calls=tuple(BLS_CALLS.values()),
        instances=SEARCH_INSTANCES,
    ),
}


def text_search_steps(prefix: str) -> tuple[Step, ...]:
    """text -> `{prefix}tokenizer` -> `{prefix}text_encoder` -> `{prefix}gallery_topk` -> ids, scores (and
    the text embedding): the text search of a family whose models carry `prefix`."""
    return (
        Step(f"{prefix}tokenizer", {"text": "text"}, {"input_ids": "input_ids", "lengths": "lengths"}),
        Step(
            f"{prefix}text_encoder",
            {"input_ids": "input_ids", "lengths": "lengths"},
            {"text_embedding": "text_embedding"},
        ),
        Step(
            f"{prefix}gallery_topk",
            {"query_embedding": "text_embedding", "top_k": "top_k"},
            {"ids": "ids", "scores": "scores"},
        ),
    )


ENSEMBLES: dict[str, tuple[Step, ...]] = {
    "text_search": text_search_steps(""),
    "image_embed": (
        Step("preprocess", {"image": "image"}, {"pixel_values": "pixel_values"}),
        Step("image_encoder", {"pixel_values": "pixel_values"}, {"image_embedding": "image_embedding"}),
    ),
    "text_video_search": text_search_steps("video_"),
    "video_embed": (  # ViSERN takes regions (B, F, K, D), ProTA frames (B, F, D)
        Step(
            "video_encoder",
            {"regions": "regions", "frames": "frames", "frame_mask": "frame_mask"},
            {"video_embedding": "video_embedding"},
        ),
    ),
    "moment_search": (
        Step("moment_tokenizer", {"text": "text"}, {"input_ids": "input_ids", "lengths": "lengths"}),
        Step(
            "moment_clips",
            {"video_id": "video_id"},
            {"clips": "clips", "clip_mask": "clip_mask", "grid": "grid", "durations": "durations"},
        ),
        Step(
            "moment_model",
            {
                "clips": "clips",
                "clip_mask": "clip_mask",
                "input_ids": "input_ids",
                "lengths": "lengths",
                "grid": "grid",
            },
            {"spans": "spans", "logits": "logits"},
        ),
        Step(
            "moment_postprocess",
            {"spans": "spans", "logits": "logits", "durations": "durations", "top_k": "top_k"},
            {"moments": "moments", "counts": "counts"},
        ),
    ),
}

# {name: {target: "model" (its MODELS row) or "ensemble" (its ENSEMBLES row)}} for a name with both rows;
# any other name takes the form of the one table that has it, on every target
FORMS: dict[str, dict[str, str]] = {
    "text_search": {"cpu": "model", "gpu": "ensemble"},
    "moment_search": {"cpu": "model", "gpu": "ensemble"},
    "text_video_search": {"cpu": "model", "gpu": "ensemble"},
}

# the manifest's `model` -> its family; a repository holds at most one artifact of each family
FAMILIES: dict[str, str] = {"rvse": "image_text", "visern": "video", "prota": "video", "cdnet": "moments"}

SHIM = "from {module} import {adapter} as TritonPythonModel  # noqa: F401\n"


def serving_facts(
    embed_dim: int,
    image_size: int,
    region_dim: int | None,
    pixel_mean,
    pixel_std,
    max_tokens: int,
    max_bytes: int,
) -> dict:
    """The manifest's `preprocessing` and `specs` entries: everything the repository is rendered from."""
    specs = image_text_specs(embed_dim, image_size, region_dim)
    return {
        "preprocessing": {
            "image_size": image_size,
            "pixel_mean": list(pixel_mean),
            "pixel_std": list(pixel_std),
            "layout": "uint8 (B, H, W, 3) RGB",
            "max_tokens": max_tokens,
            "max_bytes": max_bytes,
            "tokenizer": "tokenizer.json",
        },
        "specs": {name: spec.to_dict() for name, spec in specs.items()},
    }


# ----------------------------------------------------------------------------- config.pbtxt


def _pb2():
    try:
        from tritonclient.grpc import model_config_pb2
    except ImportError as e:
        raise InputError("rendering config.pbtxt needs the `serve` extra (tritonclient)") from e
    return model_config_pb2


def _add_tensors(field, tensors, reshape: bool, batched: bool = True) -> None:
    pb2 = _pb2()
    for t in tensors:
        dims = t.triton_dims(batched)
        io = field.add(name=t.name, data_type=pb2.DataType.Value(t.triton_type), dims=dims)
        one_per_row = batched and reshape and len(t.shape) == 1  # dims [1] for Triton, [] for the model
        if one_per_row:
            io.reshape.SetInParent()


def model_config(
    spec: ModelSpec,
    parameters: dict[str, str] | None = None,
    *,
    backend: str = "python",
    platform: str = "",
    gpu: bool = False,
    dynamic_batching: bool = False,
    max_batch: int = MAX_BATCH,
    instances: int = 1,
    preferred_batch: Sequence[int] = (),
):
    pb2 = _pb2()
    if not spec.batched:  # the whole shape is the model's (ProTA's pair scorer): Triton does not batch it
        max_batch, dynamic_batching = 0, False
    cfg = pb2.ModelConfig(name=spec.name, max_batch_size=max_batch)
    if platform:
        cfg.platform = platform
    else:
        cfg.backend = backend
    # An ensemble passes tensors as its steps' `dims` say; only real models see the reshaped form.
    _add_tensors(cfg.input, spec.inputs, reshape=platform != "ensemble", batched=spec.batched)
    _add_tensors(cfg.output, spec.outputs, reshape=platform != "ensemble", batched=spec.batched)
    if platform != "ensemble":
        kind = pb2.ModelInstanceGroup.KIND_GPU if gpu else pb2.ModelInstanceGroup.KIND_CPU
        cfg.instance_group.add(kind=kind, count=instances)
    if dynamic_batching:  # rendered `dynamic_batching { }` when the delay is 0 (protobuf omits defaults)
        cfg.dynamic_batching.SetInParent()
        cfg.dynamic_batching.max_queue_delay_microseconds = QUEUE_DELAY_US
        cfg.dynamic_batching.preferred_batch_size.extend(preferred_batch)
    for key, value in (parameters or {}).items():
        cfg.parameters[key].string_value = value
    return cfg


def step_maps(step: Step, spec: ModelSpec) -> tuple[dict[str, str], dict[str, str]]:
    """A step's (input map, output map) cut to the tensors its model's served `spec` has (a family's
    optional tensors: ViSERN's regions or ProTA's frames, CDNet's grid)."""
    inputs = {k: v for k, v in step.inputs.items() if k in spec.input_names}
    outputs = {k: v for k, v in step.outputs.items() if k in spec.output_names}
    return inputs, outputs


def ensemble_config(spec: ModelSpec, steps: tuple[Step, ...], specs: Mapping[str, ModelSpec]):
    """The ensemble `spec` of `steps`; `specs` are the served specs of the steps' models."""
    cfg = model_config(spec, platform="ensemble")
    for s in steps:
        inputs, outputs = step_maps(s, specs[s.model])
        step = cfg.ensemble_scheduling.step.add(model_name=s.model, model_version=-1)
        step.input_map.update(inputs)
        step.output_map.update(outputs)
    return cfg


def render(cfg) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(cfg)


def parameters(served: Served, manifest: dict) -> dict[str, str]:
    """The config's `parameters` of a served model, its `Fact`s read from the manifest."""
    pre = manifest.get("preprocessing", {})
    out = {}
    for key, value in served.parameters.items():
        if isinstance(value, Fact):
            if value.key not in pre:
                raise InputError(f"the manifest's preprocessing has no {value.key!r} (parameter {key!r})")
            value = json.dumps(pre[value.key])
        out[key] = value
    return out


def serves_as(name: str, target: str) -> str:
    """ "model" (its MODELS row) or "ensemble" (its ENSEMBLES row): the form `name` takes on `target`."""
    if name in FORMS:
        return FORMS[name][target]
    return "ensemble" if name in ENSEMBLES else "model"


def python_model(name: str, target: str) -> bool:
    """Whether `name` is a python-backend model (a `model.py` shim and `spec.json`) on `target`."""
    return (
        name in MODELS
        and serves_as(name, target) == "model"
        and not (target == "gpu" and MODELS[name].onnx_on_gpu)
    )


def family(manifest: dict) -> str:
    """The artifact's family (a value of FAMILIES); a manifest without `model` is an image-text one."""
    kind = manifest.get("model", "rvse")
    if kind not in FAMILIES:
        raise InputError(f"the manifest's model {kind!r} has no serving rows; served: {', '.join(FAMILIES)}")
    return FAMILIES[kind]


def served_specs(manifest: dict) -> dict[str, ModelSpec]:
    """{served model: its I/O spec} of an artifact: the image-text manifest lists its served models; the
    other families' are rendered from their exported graphs' specs (`iospec.py`)."""
    graphs = manifest["specs"]
    kind = family(manifest)
    if kind == "image_text":
        return {name: ModelSpec.from_dict(d) for name, d in graphs.items()}
    needed = ("text_encoder", "video_encoder") if kind == "video" else ("moment_model",)
    missing = [g for g in needed if g not in graphs]
    if missing:
        raise InputError(f"the {manifest['model']} manifest has no {', '.join(missing)} graph spec")
    if kind == "video":  # ProTA's pair scorer: served with the two-stage search, if its token store is there
        scorer = graphs.get("pair_scorer")
        if scorer and "files" in manifest and "gallery_mu.npy" not in manifest["files"]:
            scorer = None  # an export made before the token store: the first stage only
        towers = (ModelSpec.from_dict(graphs[g]) for g in needed)
        return video_serving_specs(*towers, ModelSpec.from_dict(scorer) if scorer else None)
    return moment_serving_specs(ModelSpec.from_dict(graphs["moment_model"]))


def served_models(manifest: dict) -> list[str]:
    """The artifact's served models, every one checked to have a row in MODELS or ENSEMBLES and its
    artifact files listed in the manifest."""
    names = list(served_specs(manifest))
    for name in names:
        if name not in MODELS and name not in ENSEMBLES:
            raise InputError(
                f"the manifest lists model {name!r}, which no serving row describes; "
                f"served: {', '.join([*MODELS, *ENSEMBLES])}"
            )
        for step in ENSEMBLES.get(name, ()):
            if step.model not in names:
                raise InputError(f"ensemble {name!r} needs model {step.model!r}, which the manifest lacks")
        for model in MODELS[name].specs.values() if name in MODELS else ():
            if model not in names:
                raise InputError(f"model {name!r} needs the spec of {model!r}, which the manifest lacks")
        for model in MODELS[name].calls if name in MODELS else ():
            if model not in names:
                raise InputError(f"model {name!r} calls model {model!r}, which the manifest lacks")
        for src in MODELS[name].files.values() if name in MODELS else ():
            if "files" in manifest and src not in manifest["files"]:
                raise InputError(
                    f"model {name!r} serves the artifact file {src}, which the manifest does not list; "
                    "re-create the artifacts with `xmr export`"
                )
    return names


def repository_configs(
    manifest: dict, target: str = "cpu", engines: frozenset[str] = frozenset()
) -> dict[str, str]:
    """config.pbtxt text of every model, by model name, for an artifact manifest."""
    if target not in TARGETS:
        raise InputError(f"unknown target {target!r}; valid: {', '.join(TARGETS)}")
    configs = {}
    specs = served_specs(manifest)
    for name in served_models(manifest):
        spec = specs[name]
        if serves_as(name, target) == "ensemble":
            configs[name] = ensemble_config(spec, ENSEMBLES[name], specs)
            continue
        served = MODELS[name]
        batching = served.dynamic_batching
        if python_model(name, target):
            if "model.onnx" in served.files:  # it hosts ONNX Runtime
                check_stock_ops(name, manifest)
            configs[name] = model_config(
                spec,
                parameters(served, manifest),
                dynamic_batching=batching,
                instances=served.instances,
                preferred_batch=served.preferred_batch,
            )
        elif name in engines:
            configs[name] = model_config(
                spec,
                platform="tensorrt_plan",
                gpu=True,
                dynamic_batching=batching,
                max_batch=engine_max_batch(manifest),
            )
        else:
            check_stock_ops(name, manifest)
            cfg = model_config(spec, platform="onnxruntime_onnx", gpu=True, dynamic_batching=batching)
            trt = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
            trt.parameters["precision_mode"] = "FP16"
            configs[name] = cfg
    return {name: render(cfg) for name, cfg in configs.items()}


def graph_of(name: str) -> str:
    """The exported graph an ONNX tower row serves (its `.onnx` artifact's name)."""
    return MODELS[name].files["model.onnx"].removesuffix(".onnx")


def check_stock_ops(name: str, manifest: dict) -> None:
    """ONNX Runtime (the python model on the cpu target, `onnxruntime_onnx` on the gpu) runs standard ops
    only: InputError for a graph holding `xmr` plugin nodes."""
    nodes = (manifest.get("xmr_nodes") or {}).get(graph_of(name))
    if nodes:
        raise InputError(
            f"{graph_of(name)}.onnx holds the plugin nodes {', '.join(sorted(set(nodes)))}, which ONNX "
            f"Runtime cannot run (model {name!r}); serve the export made with --custom-ops standard"
        )


def engine_max_batch(manifest: dict) -> int:
    """The batch maximum of the manifest's TensorRT engines (their profile), at most MAX_BATCH."""
    batch = (manifest.get("engines") or {}).get("dims", {}).get("batch")
    return min(MAX_BATCH, int(batch[2])) if batch else MAX_BATCH


def engine_models(artifacts: Path, manifest: dict, target: str) -> frozenset[str]:
    """The towers served as `tensorrt_plan` models: on the gpu target, those whose engine is in the
    artifact folder. InputError for an engine holding the `xmr` Python plugins (no C++ runtime has them)."""
    if target != "gpu":
        return frozenset()
    names = set()
    for name in served_specs(manifest):
        served = MODELS.get(name)
        if not (served and served.onnx_on_gpu and (Path(artifacts) / served.engine()).is_file()):
            continue
        plugins = (manifest.get("engines") or {}).get("plugins", {}).get(graph_of(name))
        if plugins:
            raise InputError(
                f"{served.engine()} holds the TensorRT Python plugins {', '.join(plugins)}, which Triton's "
                "tensorrt_plan backend cannot load; serve an engine of the standard-form export"
            )
        names.add(name)
    return frozenset(names)


def repository_texts(
    manifest: dict, target: str = "cpu", engines: frozenset[str] = frozenset()
) -> dict[str, str]:
    """Every text file of the repository by its path in it: each model's `config.pbtxt`, and each python
    model's `1/model.py` shim and `1/spec.json`."""
    texts = {}
    specs = served_specs(manifest)
    for name, config in repository_configs(manifest, target, engines).items():
        texts[f"{name}/config.pbtxt"] = config
        if python_model(name, target):
            texts[f"{name}/1/model.py"] = SHIM.format(
                module=MODELS[name].module, adapter=MODELS[name].adapter
            )
            texts[f"{name}/1/spec.json"] = json.dumps(specs[name].to_dict(), indent=2)
            for file, model in MODELS[name].specs.items():
                texts[f"{name}/1/{file}"] = json.dumps(specs[model].to_dict(), indent=2)
    return texts


# ----------------------------------------------------------------------------- the repository


def artifact_files(model: str, target: str, engines: frozenset[str]) -> dict[str, str]:
    """{file in the model's version folder: artifact file} for one model."""
    if serves_as(model, target) == "ensemble":
        return {}
    served = MODELS[model]
    if target == "gpu" and model in engines:
        return {"model.plan": served.engine()}
    return dict(served.files)


@dataclass
class Source:
    """One artifact folder of a repository: its manifest, family and what it serves."""

    folder: Path
    manifest: dict
    family: str
    engines: frozenset[str]
    texts: dict[str, str]  # repository_texts

    @property
    def models(self) -> list[str]:
        return served_models(self.manifest)


def sources(artifacts: Sequence[Path], target: str) -> list[Source]:
    """Each artifact folder read, verified (sha256) and rendered; InputError when two serve one name."""
    found: list[Source] = []
    owner: dict[str, Path] = {}
    for folder in map(Path, artifacts):
        manifest = read_manifest(folder)
        verify_artifacts(folder, manifest)
        kind = family(manifest)
        for other in found:
            if other.family == kind:
                raise InputError(
                    f"{other.folder} and {folder} are both {kind} artifacts; a repository serves one "
                    "artifact of each family (build another repository for the other)"
                )
        engines = engine_models(folder, manifest, target)
        source = Source(folder, manifest, kind, engines, repository_texts(manifest, target, engines))
        for name in source.models:
            if name in owner:
                raise InputError(f"{owner[name]} and {folder} both serve a model named {name!r}")
            owner[name] = folder
        found.append(source)
    if not found:
        raise InputError("no artifact folder given; pass at least one folder written by `xmr export`")
    return found


# ----------------------------------------------------------------------------- input bounds

PIXEL_SLACK = 1e-3  # float32 rounding of (x/255 - mean)/std at the ends of the range, relative to the range
QUERY_NORM_FACTOR = 10.0  # a query's norm within 1/10..10 times the gallery's row norms (unit vectors)


def _pixel_bounds(tensor: str, pre: dict) -> list[Bound]:
    """uint8 pixels normalised as `preprocess_images` does: (x/255 - mean)/std per channel, x in 0..255."""
    if "pixel_mean" not in pre or "pixel_std" not in pre:
        return []
    ends = [(-m / s, (1 - m) / s) for m, s in zip(pre["pixel_mean"], pre["pixel_std"], strict=True)]
    lo, hi = min(min(e) for e in ends), max(max(e) for e in ends)
    slack = PIXEL_SLACK * (hi - lo)
    why = f"uint8 pixels normalised by (x/255 - mean)/std, mean {pre['pixel_mean']}, std {pre['pixel_std']}"
    return [Bound(tensor, round(lo - slack, 6), round(hi + slack, 6), why=why)]


def _feature_range(values, what: str) -> tuple[float, float, str]:
    """The range of a set of features, widened by its own width either side: a direct caller's features of
    another video may stray outside the store's, but not by orders of magnitude."""
    import numpy as np

    lo, hi = float(np.min(values)), float(np.max(values))
    width = max(hi - lo, 1e-6)
    return round(lo - width, 6), round(hi + width, 6), f"{what}: {lo:.4g}..{hi:.4g}, widened by its width"


def _row_norms(path: Path):
    """The L2 norm of each row of a (N, D) .npy, read in chunks (a gallery may be large)."""
    import numpy as np

    rows, step = np.load(path, mmap_mode="r"), 65536
    chunks = (np.asarray(rows[i : i + step], np.float64) for i in range(0, len(rows), step))
    return np.concatenate([np.linalg.norm(c, axis=1) for c in chunks])


def input_bounds(spec: ModelSpec, manifest: dict, folder: Path) -> list[Bound]:
    """The bounds of a served python model's inputs, derived from its artifact: the manifest's model
    config (vocabulary size, token and clip maxima) and preprocessing (text bytes, pixel mean and std,
    explicit `ranges`), and its data files (the gallery's norms, the clip store's features and durations).

    Rules go by tensor name, as `check_feeds` does for token ids; where no rule applies an input is
    checked for dtype and finiteness only. A manifest's `preprocessing.ranges` ({tensor: [lo, hi]}) bounds
    any float input it names (e.g. a video export recording its features' range)."""
    import numpy as np

    config, pre = manifest.get("model_config") or {}, manifest.get("preprocessing") or {}
    names = set(spec.input_names)
    out: list[Bound] = []
    for t in spec.inputs:
        if t.name in (pre.get("ranges") or {}):
            lo, hi = pre["ranges"][t.name]
            out.append(Bound(t.name, lo, hi, why="the range recorded in the manifest's preprocessing"))
        if t.dtype == "bool" and t.name.endswith("_mask"):
            what = t.name.removesuffix("_mask")
            out.append(Bound(t.name, 1, None, of="true", why=f"a row marks at least one real {what}"))
        if t.dtype == "bytes" and "max_bytes" in pre:
            out.append(Bound(t.name, None, int(pre["max_bytes"]), of="bytes"))
    if "input_ids" in names and "vocab_size" in config:
        vocab = int(config["vocab_size"])
        out.append(Bound("input_ids", 0, vocab - 1, why=f"the vocabulary has {vocab} tokens"))
    for t in spec.inputs:
        if "tokens" in t.shape and ("max_tokens" in config or "max_tokens" in pre):
            n = int(config.get("max_tokens", pre.get("max_tokens")))
            out.append(Bound(t.name, None, n, of="tokens", why="the model's max_tokens"))
        if "clips" in t.shape and "max_clips" in config:
            out.append(Bound(t.name, None, int(config["max_clips"]), of="clips", why="the model's max_clips"))
    if "pixel_values" in names:
        out += _pixel_bounds("pixel_values", pre)
    if "spans" in names:  # what `moments.postprocess` decodes: the head's sigmoid (center, width)
        out.append(Bound("spans", 0.0, 1.0, why="normalised (center, width) spans"))
    if "query_embedding" in names and (folder / "gallery.npy").is_file():
        norms = _row_norms(folder / "gallery.npy")
        lo, hi = float(norms.min()) / QUERY_NORM_FACTOR, float(norms.max()) * QUERY_NORM_FACTOR
        why = f"an embedding like the gallery's, whose rows have norms {norms.min():.4g}..{norms.max():.4g}"
        out.append(Bound("query_embedding", round(lo, 6), round(hi, 6), of="norm", why=why))
    store = folder / "clip_features.npz"
    if names & {"clips", "durations"} and store.is_file():
        with np.load(store) as f:
            if "clips" in names and "clips" in f.files:
                lo, hi, why = _feature_range(f["clips"], "the clip store's features")
                out.append(Bound("clips", lo, hi, why=why))
            if "durations" in names:
                d = f["durations"]
                why = f"the clip store's videos last {d.min():.4g}..{d.max():.4g} s"
                out.append(Bound("durations", None, float(d.max()), why=why))
    return out


# ----------------------------------------------------------------------------- the files' record


def file_record(found: list[Source], target: str) -> dict[str, dict]:
    """{path in the repository: {sha256, bytes, artifact}} of every artifact file copied into it: the
    artifact manifest's own record (which `sources` verified), or the file's hash where the manifest lists
    none (a TensorRT plan). What `verify_repository` and each served model check at load."""
    record = {}
    for s in found:
        for name in s.models:
            for dest, src in artifact_files(name, target, s.engines).items():
                facts = (s.manifest.get("files") or {}).get(src)
                if facts is None:
                    path = s.folder / src
                    facts = {"sha256": sha256(path), "bytes": path.stat().st_size}
                record[f"{name}/1/{dest}"] = {**facts, "artifact": str((s.folder / src).resolve())}
    return record


def build_repository(artifacts: Path | Sequence[Path], out: Path, target: str = "cpu") -> Path:
    """Assemble `out` (replaced atomically) from one artifact folder or several (one per family) for
    `target`; returns `out`."""
    folders = [artifacts] if isinstance(artifacts, str | Path) else list(artifacts)
    found = sources(folders, target)
    with atomic_dir(Path(out)) as tmp:
        names = [(s, name) for s in found for name in s.models]
        for source, name in tqdm(names, desc="repository", unit="model", disable=None):
            version = tmp / name / "1"
            version.mkdir(parents=True)  # an ensemble's stays empty
            for dest, src in artifact_files(name, target, source.engines).items():
                shutil.copy2(source.folder / src, version / dest)
        for source in found:
            for path, text in source.texts.items():
                (tmp / path).write_text(text)
            specs = served_specs(source.manifest)
            for name in source.models:
                if python_model(name, target):
                    bounds = input_bounds(specs[name], source.manifest, source.folder)
                    text = json.dumps([b.to_dict() for b in bounds], indent=2)
                    (tmp / name / "1" / BOUNDS).write_text(text)
        (tmp / SERVING).write_text(json.dumps(serving_index(found, target), indent=2, sort_keys=True))
        if len(found) == 1:
            (tmp / "manifest.json").write_text(json.dumps(found[0].manifest, indent=2, sort_keys=True))
    return Path(out)


def serving_index(found: list[Source], target: str) -> dict:
    """`serving.json`: the target, each family's artifact (folder, model), every served model's family
    and spec (what clients (`xmr check`) and tests read to know what a repository serves), and the record
    of the artifact files copied in (`file_record`: what `verify_repository` checks at serve)."""
    specs = {}
    families = {}
    for s in found:
        served = served_specs(s.manifest)
        for name in s.models:
            specs[name] = served[name].to_dict()
            families[name] = s.family
    return {
        "target": target,
        "files": file_record(found, target),
        "artifacts": {
            s.family: {"folder": str(s.folder.resolve()), "model": s.manifest.get("model", "rvse")}
            for s in found
        },
        "families": families,
        "specs": specs,
    }


def add_ensemble_form(repository: Path, name: str, served_name: str | None = None) -> Path:
    """Write the ENSEMBLES form of `name` into a built `repository` as `served_name` (default `name`,
    replacing the model served there): e.g. the gpu target's `text_search` ensemble in a cpu repository, to
    compare both forms on one server. Its steps must be served there. Returns the model's folder."""
    repository = Path(repository)
    if name not in ENSEMBLES:
        raise InputError(f"{name!r} has no ensemble form; ensembles: {', '.join(ENSEMBLES)}")
    specs = {n: ModelSpec.from_dict(d) for n, d in read_serving(repository)["specs"].items()}
    missing = [s.model for s in ENSEMBLES[name] if s.model not in specs]
    if missing:
        raise InputError(f"{repository} does not serve {', '.join(missing)}, the steps of {name!r}")
    served_name = served_name or name
    spec = ModelSpec.from_dict({**specs[name].to_dict(), "name": served_name})
    folder = repository / served_name
    shutil.rmtree(folder, ignore_errors=True)
    (folder / "1").mkdir(parents=True)
    (folder / "config.pbtxt").write_text(render(ensemble_config(spec, ENSEMBLES[name], specs)))
    return folder


def committed_texts(facts: dict) -> dict[str, str]:
    """The committed `model_repository/` for `facts` (the default preset's): configs and shims."""
    return {path: text for path, text in repository_texts(facts).items() if not path.endswith("spec.json")}


def write_committed(facts: dict, dest: Path = COMMITTED) -> list[Path]:
    """Render the committed repository (`config.pbtxt` and `1/model.py` of every model) into `dest`."""
    written = []
    for rel, text in committed_texts(facts).items():
        path = Path(dest) / rel
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


if __name__ == "__main__":  # python -m xmr.export.repository: re-render the committed model_repository/
    from xmr.models.image_text.rvse import RVSEConfig
    from xmr.models.tokenizer import TextLimits

    c, lim = RVSEConfig(), TextLimits()
    for p in write_committed(
        serving_facts(
            c.embed_dim, c.image_size, c.region_dim, c.pixel_mean, c.pixel_std, lim.max_tokens, lim.max_bytes
        )
    ):
        print(p)
