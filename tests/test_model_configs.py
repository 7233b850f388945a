"""Every rendered `config.pbtxt` parses as Triton's `ModelConfig` and says what the manifest says.

The repository is rendered for both targets (cpu; gpu with ONNX Runtime; gpu with TensorRT engines, here
fake `.plan` files in a copy of the artifact folder: only config rendering is tested, no engine is built),
and each config is parsed back with protobuf's text format into `tritonclient`'s `ModelConfig`, so a
field typo cannot reach a server. Platform/backend, instance kind and I/O names are checked against the
served specs (`serving.json`). The repository of every family together is parsed the same way in
test_serve_video.py.
"""

from __future__ import annotations

import json
import shutil

import pytest
from google.protobuf import text_format
from tritonclient.grpc import model_config_pb2

from xmr.export.iospec import ModelSpec, image_text_specs
from xmr.export.repository import ENSEMBLES, MAX_BATCH, MODELS, QUEUE_DELAY_US, build_repository, serves_as
from xmr.models.errors import InputError

# the ONNX towers of the tiny image-text repository
TOWERS = [name for name, served in MODELS.items() if served.onnx_on_gpu and name in image_text_specs(1, 1)]


def parse_configs(repo) -> dict[str, model_config_pb2.ModelConfig]:
    """{model: its parsed config.pbtxt} of a rendered repository (a parse error fails the test)."""
    configs = {}
    for path in sorted(repo.glob("*/config.pbtxt")):
        configs[path.parent.name] = text_format.Parse(path.read_text(), model_config_pb2.ModelConfig())
    return configs


def check_against_manifest(repo, configs) -> dict:
    """Each config's name, I/O names and types are its served spec's (`serving.json`)."""
    manifest = json.loads((repo / "serving.json").read_text())
    assert set(configs) == set(manifest["specs"])
    for name, cfg in configs.items():
        spec = ModelSpec.from_dict(manifest["specs"][name])
        assert cfg.name == name
        assert [i.name for i in cfg.input] == spec.input_names, name
        assert [o.name for o in cfg.output] == spec.output_names, name
        assert [model_config_pb2.DataType.Name(i.data_type) for i in cfg.input] == [
            t.triton_type for t in spec.inputs
        ], name
        assert [model_config_pb2.DataType.Name(o.data_type) for o in cfg.output] == [
            t.triton_type for t in spec.outputs
        ], name
        assert 0 < cfg.max_batch_size <= MAX_BATCH
    return manifest


def kinds(cfg) -> set[str]:
    return {model_config_pb2.ModelInstanceGroup.Kind.Name(g.kind) for g in cfg.instance_group}


@pytest.fixture(scope="module")
def engine_artifacts(tiny_artifacts, tmp_path_factory):
    """A copy of the tiny artifact folder with fake `<tower>.plan` files (bytes, not engines)."""
    folder = tmp_path_factory.mktemp("engines") / "tiny"
    shutil.copytree(tiny_artifacts, folder)
    for tower in TOWERS:
        (folder / MODELS[tower].engine()).write_bytes(b"not an engine: config rendering only")
    return folder


def check_forms(configs, target: str) -> None:
    """Each config takes the form the tables give its name on `target`; an ensemble's steps are its row's,
    a batched model's queue delay is QUEUE_DELAY_US."""
    for name, cfg in configs.items():
        if serves_as(name, target) == "ensemble":
            assert cfg.platform == "ensemble" and not cfg.instance_group, name
            assert [s.model_name for s in cfg.ensemble_scheduling.step] == [s.model for s in ENSEMBLES[name]]
        else:
            assert cfg.platform != "ensemble" and len(cfg.instance_group) == 1, name
            assert cfg.HasField("dynamic_batching") == MODELS[name].dynamic_batching, name
            assert cfg.dynamic_batching.max_queue_delay_microseconds == QUEUE_DELAY_US, name


def test_cpu_configs_parse_as_python_and_ensemble_models(tiny_repository):
    configs = parse_configs(tiny_repository)
    check_against_manifest(tiny_repository, configs)
    check_forms(configs, "cpu")
    for name, cfg in configs.items():
        if cfg.platform != "ensemble":
            assert cfg.backend == "python" and not cfg.platform, name
            assert kinds(cfg) == {"KIND_CPU"}, name
    # text search is one python model (no queue delay); its composing models stay served on their own
    assert configs["image_embed"].platform == "ensemble"
    text_search = configs["text_search"]
    assert text_search.backend == "python" and text_search.HasField("dynamic_batching")
    assert text_search.dynamic_batching.max_queue_delay_microseconds == 0
    assert {"tokenizer", "text_encoder", "gallery_topk"} <= set(configs)


def test_gpu_configs_parse_as_onnxruntime_towers(tiny_artifacts, tmp_path):
    repo = build_repository(tiny_artifacts, tmp_path / "gpu", "gpu")
    configs = parse_configs(repo)
    check_against_manifest(repo, configs)
    check_forms(configs, "gpu")
    assert [s.model_name for s in configs["text_search"].ensemble_scheduling.step] == [
        "tokenizer",
        "text_encoder",
        "gallery_topk",
    ]
    for tower in TOWERS:
        cfg = configs[tower]
        assert cfg.platform == "onnxruntime_onnx" and not cfg.backend
        assert kinds(cfg) == {"KIND_GPU"}
        accelerators = cfg.optimization.execution_accelerators.gpu_execution_accelerator
        assert [a.name for a in accelerators] == ["tensorrt"]
        assert accelerators[0].parameters["precision_mode"] == "FP16"
        assert (repo / tower / "1" / "model.onnx").is_file()
    for name in (set(MODELS) & set(configs)) - set(TOWERS):
        if serves_as(name, "gpu") == "model":
            assert configs[name].backend == "python" and kinds(configs[name]) == {"KIND_CPU"}, name


def test_gpu_configs_parse_as_tensorrt_plans_where_engines_exist(engine_artifacts, tmp_path):
    repo = build_repository(engine_artifacts, tmp_path / "gpu-trt", "gpu")
    configs = parse_configs(repo)
    check_against_manifest(repo, configs)
    check_forms(configs, "gpu")
    for tower in TOWERS:
        cfg = configs[tower]
        assert cfg.platform == "tensorrt_plan" and not cfg.backend
        assert kinds(cfg) == {"KIND_GPU"}
        assert not cfg.optimization.execution_accelerators.gpu_execution_accelerator
        assert cfg.max_batch_size == MAX_BATCH  # no `engines` entry: the engine is assumed built for it
        version = repo / tower / "1"
        assert sorted(p.name for p in version.iterdir()) == ["model.plan"]
        assert (version / "model.plan").read_bytes() == (
            engine_artifacts / MODELS[tower].engine()
        ).read_bytes()
    # the one-value-per-row input keeps Triton's dims [1] reshaped to the engine's (batch,) tensor
    lengths = next(i for i in configs["text_encoder"].input if i.name == "lengths")
    assert list(lengths.dims) == [1] and lengths.HasField("reshape") and not lengths.reshape.shape


def test_one_engine_only_keeps_onnxruntime_for_the_other_tower(engine_artifacts, tmp_path):
    folder = tmp_path / "one"
    shutil.copytree(engine_artifacts, folder)
    (folder / MODELS["image_encoder"].engine()).unlink()
    configs = parse_configs(build_repository(folder, tmp_path / "repo", "gpu"))
    assert configs["text_encoder"].platform == "tensorrt_plan"
    assert configs["image_encoder"].platform == "onnxruntime_onnx"


def test_engine_manifest_sets_batch_and_refuses_plugin_engines(engine_artifacts, tmp_path):
    folder = tmp_path / "manifest"
    shutil.copytree(engine_artifacts, folder)
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["engines"] = {"dims": {"batch": [1, 4, 16]}, "plugins": {"text_encoder": []}}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    configs = parse_configs(build_repository(folder, tmp_path / "repo", "gpu"))
    assert configs["text_encoder"].max_batch_size == 16
    assert configs["tokenizer"].max_batch_size == MAX_BATCH

    manifest["engines"]["plugins"]["text_encoder"] = ["xmr::RandomWalkGCN"]
    (folder / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="TensorRT Python plugins xmr::RandomWalkGCN"):
        build_repository(folder, tmp_path / "repo2", "gpu")
    assert not (tmp_path / "repo2").exists()


def test_cpu_target_ignores_engines(engine_artifacts, tmp_path):
    repo = build_repository(engine_artifacts, tmp_path / "cpu", "cpu")
    configs = parse_configs(repo)
    assert all(configs[t].backend == "python" for t in TOWERS)
    assert configs["text_search"].backend == "python" and not (repo / "text_search/1/model.plan").exists()
