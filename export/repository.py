"""Write a servable Triton model repository from exported artifacts.

`model_repository/` (committed) holds the python-backend adapters (`*/1/model.py`) and the `config.pbtxt`
files rendered for the default preset. `build_repository` renders every `config.pbtxt` again from the
artifact's manifest (its I/O specs and preprocessing facts), copies the adapters and the artifacts into
place, and verifies each artifact's sha256 against the manifest first. Configs are protobuf messages from
`tritonclient`'s `model_config_pb2`, printed with protobuf's text format: no hand-written pbtxt.

Targets:
- `cpu`: every model is a python-backend model; the towers host ONNX Runtime (this is what the
  nvidia-pytriton server can run, having only the python backend).
- `gpu`: the towers are `onnxruntime_onnx` models on KIND_GPU with the TensorRT execution accelerator
  (FP16), or `tensorrt_plan` models where the artifact folder holds `*.plan` engines; the tokenizer,
  preprocess and gallery models stay python models on the CPU. Served by the official Triton container.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from tqdm.auto import tqdm

from xmr.export.iospec import ModelSpec, image_text_specs
from xmr.export.manifest import read_manifest, verify_artifacts
from xmr.models.checkpoint import atomic_dir
from xmr.models.errors import InputError

SOURCE = Path(__file__).resolve().parent.parent / "model_repository"
TARGETS = ("cpu", "gpu")
MAX_BATCH = 64
QUEUE_DELAY_US = 500  # dynamic batching: wait at most 0.5 ms to fill a batch
TOWERS = ("text_encoder", "image_encoder")


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


def _add_tensors(field, tensors, reshape: bool) -> None:
    pb2 = _pb2()
    for t in tensors:
        io = field.add(name=t.name, data_type=pb2.DataType.Value(t.triton_type), dims=t.triton_dims())
        if reshape and len(t.shape) == 1:  # one value per row: dims [1] for Triton, [] for the model
            io.reshape.SetInParent()


def model_config(
    spec: ModelSpec,
    parameters: dict[str, str] | None = None,
    *,
    backend: str = "python",
    platform: str = "",
    gpu: bool = False,
    dynamic_batching: bool = False,
):
    pb2 = _pb2()
    cfg = pb2.ModelConfig(name=spec.name, max_batch_size=MAX_BATCH)
    if platform:
        cfg.platform = platform
    else:
        cfg.backend = backend
    # An ensemble passes tensors as its steps' `dims` say; only real models see the reshaped form.
    _add_tensors(cfg.input, spec.inputs, reshape=platform != "ensemble")
    _add_tensors(cfg.output, spec.outputs, reshape=platform != "ensemble")
    if platform != "ensemble":
        kind = pb2.ModelInstanceGroup.KIND_GPU if gpu else pb2.ModelInstanceGroup.KIND_CPU
        cfg.instance_group.add(kind=kind, count=1)
    if dynamic_batching:
        cfg.dynamic_batching.max_queue_delay_microseconds = QUEUE_DELAY_US
    for key, value in (parameters or {}).items():
        cfg.parameters[key].string_value = value
    return cfg


def ensemble_config(spec: ModelSpec, steps: list[tuple[str, dict[str, str], dict[str, str]]]):
    """steps: (model, {model input: ensemble tensor}, {model output: ensemble tensor})."""
    cfg = model_config(spec, platform="ensemble")
    for model, inputs, outputs in steps:
        step = cfg.ensemble_scheduling.step.add(model_name=model, model_version=-1)
        step.input_map.update(inputs)
        step.output_map.update(outputs)
    return cfg


def render(cfg) -> str:
    from google.protobuf import text_format

    return text_format.MessageToString(cfg)


def repository_configs(
    manifest: dict, target: str = "cpu", engines: frozenset[str] = frozenset()
) -> dict[str, str]:
    """config.pbtxt text of every model, by model name, for an artifact manifest."""
    if target not in TARGETS:
        raise InputError(f"unknown target {target!r}; valid: {', '.join(TARGETS)}")
    specs = {name: ModelSpec.from_dict(d) for name, d in manifest["specs"].items()}
    pre = manifest["preprocessing"]
    params = {
        "tokenizer": {"max_tokens": str(pre["max_tokens"]), "max_bytes": str(pre["max_bytes"])},
        "gallery_topk": {"index": "flat", "max_k": "1000"},
        "preprocess": {
            "pixel_mean": json.dumps(pre["pixel_mean"]),
            "pixel_std": json.dumps(pre["pixel_std"]),
        },
    }
    configs = {}
    for name in ("tokenizer", "preprocess", "gallery_topk"):
        if name in specs:
            configs[name] = model_config(specs[name], params[name], dynamic_batching=name == "gallery_topk")
    for name in TOWERS:
        if target == "cpu":
            configs[name] = model_config(specs[name], {"threads": "1"}, dynamic_batching=True)
        elif name in engines:
            configs[name] = model_config(
                specs[name], platform="tensorrt_plan", gpu=True, dynamic_batching=True
            )
        else:
            cfg = model_config(specs[name], platform="onnxruntime_onnx", gpu=True, dynamic_batching=True)
            trt = cfg.optimization.execution_accelerators.gpu_execution_accelerator.add(name="tensorrt")
            trt.parameters["precision_mode"] = "FP16"
            configs[name] = cfg
    configs["text_search"] = ensemble_config(
        specs["text_search"],
        [
            ("tokenizer", {"text": "text"}, {"input_ids": "input_ids", "lengths": "lengths"}),
            (
                "text_encoder",
                {"input_ids": "input_ids", "lengths": "lengths"},
                {"text_embedding": "text_embedding"},
            ),
            (
                "gallery_topk",
                {"query_embedding": "text_embedding", "top_k": "top_k"},
                {"ids": "ids", "scores": "scores"},
            ),
        ],
    )
    if "image_embed" in specs:
        configs["image_embed"] = ensemble_config(
            specs["image_embed"],
            [
                ("preprocess", {"image": "image"}, {"pixel_values": "pixel_values"}),
                ("image_encoder", {"pixel_values": "pixel_values"}, {"image_embedding": "image_embedding"}),
            ],
        )
    return {name: render(cfg) for name, cfg in configs.items()}


# ----------------------------------------------------------------------------- the repository


def artifact_files(model: str, target: str, engines: frozenset[str]) -> dict[str, str]:
    """{file in the model's version folder: artifact file} for one model."""
    if model in TOWERS:
        if target == "gpu" and model in engines:
            return {"model.plan": f"{model}.plan"}
        return {"model.onnx": f"{model}.onnx"}
    return {
        "tokenizer": {"tokenizer.json": "tokenizer.json"},
        "gallery_topk": {"gallery.npy": "gallery.npy", "gallery_ids.npy": "gallery_ids.npy"},
    }.get(model, {})


def build_repository(artifacts: Path, out: Path, target: str = "cpu") -> Path:
    """Assemble `out` (replaced atomically) from `artifacts` for `target`; returns `out`."""
    artifacts = Path(artifacts)
    manifest = read_manifest(artifacts)
    verify_artifacts(artifacts, manifest)
    engines = (
        frozenset(t for t in TOWERS if (artifacts / f"{t}.plan").is_file())
        if target == "gpu"
        else frozenset()
    )
    configs = repository_configs(manifest, target, engines)
    with atomic_dir(Path(out)) as tmp:
        for name, text in tqdm(configs.items(), desc="repository", unit="model"):
            version = tmp / name / "1"
            version.mkdir(parents=True)
            (tmp / name / "config.pbtxt").write_text(text)
            if name in ("text_search", "image_embed"):
                continue  # ensembles: an empty version folder
            adapter = SOURCE / name / "1" / "model.py"
            if target == "cpu" or name not in TOWERS:
                shutil.copy2(adapter, version / "model.py")
                (version / "spec.json").write_text(json.dumps(manifest["specs"][name], indent=2))
            for dest, src in artifact_files(name, target, engines).items():
                shutil.copy2(artifacts / src, version / dest)
        (tmp / "manifest.json").write_text(json.dumps(manifest, indent=2, sort_keys=True))
    return Path(out)


def write_committed_configs(facts: dict, dest: Path = SOURCE) -> list[Path]:
    """Render the committed `model_repository/*/config.pbtxt` (for the default preset) from `facts`."""
    written = []
    for name, text in repository_configs(facts).items():
        path = Path(dest) / name / "config.pbtxt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        written.append(path)
    return written


if __name__ == "__main__":  # python -m xmr.export.repository: refresh the committed configs
    from xmr.models.image_text.rvse import RVSEConfig
    from xmr.models.tokenizer import TextLimits

    c, lim = RVSEConfig(), TextLimits()
    for p in write_committed_configs(
        serving_facts(
            c.embed_dim, c.image_size, c.region_dim, c.pixel_mean, c.pixel_std, lim.max_tokens, lim.max_bytes
        )
    ):
        print(p)
