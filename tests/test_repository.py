"""One I/O spec feeds the ONNX graphs, the config.pbtxt files and the clients: check they agree."""

import importlib
import json
import shutil

import numpy as np
import onnx
import pytest

from xmr.clients.triton_client import IMAGE_EMBED, TEXT_SEARCH
from xmr.export import adapters
from xmr.export.iospec import image_text_specs
from xmr.export.manifest import read_manifest
from xmr.export.repository import (
    COMMITTED,
    ENSEMBLES,
    FORMS,
    MODELS,
    TARGETS,
    build_repository,
    committed_texts,
    parameters,
    python_model,
    repository_configs,
    serves_as,
    serving_facts,
    step_maps,
)
from xmr.models.errors import InputError
from xmr.models.image_text.rvse import RVSEConfig
from xmr.models.tokenizer import TextLimits


def default_facts():
    c, lim = RVSEConfig(), TextLimits()
    return serving_facts(
        c.embed_dim, c.image_size, c.region_dim, c.pixel_mean, c.pixel_std, lim.max_tokens, lim.max_bytes
    )


def test_committed_repository_is_rendered_from_the_tables():
    rendered = committed_texts(default_facts())
    committed = {
        str(p.relative_to(COMMITTED)): p.read_text()
        for pattern in ("*/config.pbtxt", "*/1/model.py")
        for p in COMMITTED.glob(pattern)
    }
    assert committed == rendered, "model_repository/ is stale: run `make configs`"
    assert rendered["text_encoder/1/model.py"] == rendered["image_encoder/1/model.py"]
    assert "image_embed/1/model.py" not in rendered  # an ensemble has no model.py
    # the cpu target's text_search is the one-hop python model, its composing models served beside it
    assert rendered["text_search/1/model.py"].startswith("from xmr.export.adapters import TextSearchModel")
    assert 'backend: "python"' in rendered["text_search/config.pbtxt"]
    assert {"tokenizer", "text_encoder", "gallery_topk"} <= {path.split("/")[0] for path in rendered}


def family_variants() -> dict[str, dict]:
    """The served specs of every family variant: image-text (pixels, regions), ViSERN, ProTA, CDNet with
    and without the grid."""
    from xmr.export.iospec import (
        moment_serving_specs,
        prota_pair_scorer_spec,
        prota_video_encoder_spec,
        video_serving_specs,
        video_text_encoder_spec,
        visern_video_encoder_spec,
    )
    from xmr.export.moment_export import moment_model_spec
    from xmr.models.moments.cdnet import CDNet, CDNetConfig

    def cdnet(grid: bool):
        cfg = CDNetConfig(vocab_size=30, clip_dim=12, d_model=32, heads=4, groups=4, points=2, word_dim=16)
        return moment_model_spec(CDNet(CDNetConfig(**{**cfg.to_dict(), "use_grid": grid})), (2, 2))

    return {
        "pixels": image_text_specs(256, 64),
        "regions": image_text_specs(256, 64, region_dim=32),
        "visern": video_serving_specs(video_text_encoder_spec(16), visern_video_encoder_spec(16, 16, 96)),
        "prota": video_serving_specs(
            video_text_encoder_spec(16, tokens=True),
            prota_video_encoder_spec(16, 96),
            prota_pair_scorer_spec(16),
        ),
        "cdnet": moment_serving_specs(cdnet(False)),
        "cdnet-grid": moment_serving_specs(cdnet(True)),
    }


def test_serving_tables_agree_with_the_specs_and_adapters():
    for name, served in MODELS.items():  # the class its shim imports
        adapter = getattr(importlib.import_module(served.module), served.adapter)
        assert issubclass(adapter, adapters.PythonModel) and adapter is not adapters.PythonModel, name
    used: dict[tuple[str, int], set] = {}  # (ensemble, step) -> the map entries some variant renders
    variants = family_variants()
    for variant, specs in variants.items():
        assert set(specs) <= set(MODELS) | set(ENSEMBLES), variant
        for name in set(specs) & set(ENSEMBLES):
            available = set(specs[name].input_names)
            for i, step in enumerate(ENSEMBLES[name]):
                where = f"{variant}/{name}: {step.model}"
                assert step.model in specs, f"{where} is not served"
                inputs, outputs = step_maps(step, specs[step.model])
                assert set(inputs) == set(specs[step.model].input_names), f"{where} inputs"
                assert set(inputs.values()) <= available, f"{where} reads a tensor not made yet"
                available |= set(outputs.values())
                used.setdefault((name, i), set()).update(inputs.items(), outputs.items())
            assert set(specs[name].output_names) <= available, f"{variant}/{name}: an output no step makes"
    # a name in both tables says per target which form it takes; the two forms serve one spec
    assert set(FORMS) == set(MODELS) & set(ENSEMBLES)
    for name, forms in FORMS.items():
        assert set(forms) == set(TARGETS) and set(forms.values()) <= {"model", "ensemble"}, name
    assert [serves_as("text_search", t) for t in TARGETS] == ["model", "ensemble"]
    assert serves_as("image_embed", "cpu") == "ensemble" and serves_as("tokenizer", "gpu") == "model"
    for name, served in MODELS.items():  # its extra spec files and BLS calls name models of its family
        for m in (*served.specs.values(), *served.calls):
            assert any(name in v and m in v for v in variants.values()), (name, m)
    for name, steps in ENSEMBLES.items():  # no map entry that no variant has (a typo)
        for i, step in enumerate(steps):
            assert used[(name, i)] == set(step.inputs.items()) | set(step.outputs.items()), (name, step.model)
    # the served names of the families never clash
    families = [set(variants["pixels"]), set(variants["visern"]), set(variants["cdnet"])]
    assert sum(map(len, families)) == len(set().union(*families))


def test_manifest_models_without_a_serving_row_are_refused():
    facts = default_facts()
    facts["specs"]["audio_encoder"] = facts["specs"]["image_encoder"] | {"name": "audio_encoder"}
    with pytest.raises(InputError, match="model 'audio_encoder', which no serving row describes"):
        repository_configs(facts)
    facts = default_facts()
    del facts["specs"]["preprocess"]
    with pytest.raises(InputError, match="ensemble 'image_embed' needs model 'preprocess'"):
        repository_configs(facts)


def test_cpu_repository_is_complete(tiny_repository):
    manifest = json.loads((tiny_repository / "manifest.json").read_text())
    for name in manifest["specs"]:
        assert (tiny_repository / name / "config.pbtxt").is_file() and (tiny_repository / name / "1").is_dir()
        if python_model(name, "cpu"):
            version = tiny_repository / name / "1"
            shim = (version / "model.py").read_text()
            adapter = MODELS[name].adapter
            assert shim.startswith(f"from xmr.export.adapters import {adapter} as TritonPythonModel")
            assert json.loads((version / "spec.json").read_text()) == manifest["specs"][name]
            assert all((version / f).is_file() for f in MODELS[name].files)
            for file, model in MODELS[name].specs.items():
                assert json.loads((version / file).read_text()) == manifest["specs"][model]
        else:
            assert not any((tiny_repository / name / "1").iterdir()), name  # an ensemble
    assert python_model("text_search", "cpu") and (tiny_repository / "text_search/1/model.onnx").is_file()


def test_one_hop_text_searches_run_two_instances_and_every_other_python_model_one(tiny_repository):
    from google.protobuf import text_format
    from tritonclient.grpc import model_config_pb2

    assert MODELS["text_search"].instances == MODELS["text_video_search"].instances == 2
    for config in tiny_repository.glob("*/config.pbtxt"):
        cfg = text_format.Parse(config.read_text(), model_config_pb2.ModelConfig())
        if cfg.platform != "ensemble":
            want = 2 if cfg.name == "text_search" else 1
            assert [g.count for g in cfg.instance_group] == [want], cfg.name
            # two queued 8-caption requests go to both instances, not into one 16-row run
            preferred = [8] if cfg.name == "text_search" else []
            assert list(cfg.dynamic_batching.preferred_batch_size) == preferred, cfg.name


def test_one_hop_text_search_answers_as_its_three_models(tiny_repository):
    """In process: TextSearchModel on its version folder = tokenizer -> text_encoder -> gallery_topk, each
    adapter on its own version folder, on a batch of mixed lengths with a bad request in it."""
    from xmr.export.iospec import ModelSpec

    manifest = json.loads((tiny_repository / "manifest.json").read_text())

    def loaded(cls, name):
        model = cls()
        model.spec = ModelSpec.from_dict(manifest["specs"][name])
        model.load(tiny_repository / name / "1", parameters(MODELS[name], manifest))
        return model

    fused = loaded(adapters.TextSearchModel, "text_search")
    tokenizer = loaded(adapters.TokenizerModel, "tokenizer")
    encoder = loaded(adapters.OnnxModel, "text_encoder")
    gallery = loaded(adapters.GalleryTopKModel, "gallery_topk")
    texts = ["a red circle", "a big blue square above a small green triangle", "", "red"]
    inputs = [
        {"text": np.array([[t.encode()]], dtype=object), "top_k": np.array([k], np.int64)}
        for t, k in zip(texts, [5, 3, 5, 0], strict=True)
    ]
    got = fused.run(inputs)
    assert isinstance(got[2], ValueError) and "text 0 is empty" in str(got[2])
    assert isinstance(got[3], ValueError) and "top_k is 0" in str(got[3])
    for i in (0, 1):
        (tokens,) = tokenizer.run([inputs[i]])
        (embedded,) = encoder.run([tokens])
        (found,) = gallery.run([{"query_embedding": embedded["text_embedding"], "top_k": inputs[i]["top_k"]}])
        assert np.array_equal(got[i]["ids"], found["ids"])
        np.testing.assert_allclose(got[i]["scores"], found["scores"], atol=1e-5)
        np.testing.assert_allclose(got[i]["text_embedding"], embedded["text_embedding"], atol=1e-5)


def test_onnx_graphs_use_the_spec_names_and_dynamic_dims(tiny_artifacts):
    specs = image_text_specs(256, 64)
    for tower in ("text_encoder", "image_encoder"):
        graph = onnx.load(tiny_artifacts / f"{tower}.onnx").graph
        spec = specs[tower]
        assert [i.name for i in graph.input] == spec.input_names
        assert [o.name for o in graph.output] == spec.output_names
        for value, t in zip(graph.input, spec.inputs, strict=True):
            dims = value.type.tensor_type.shape.dim
            assert [d.dim_param or d.dim_value for d in dims] == list(t.shape)
        assert not any(n.name.startswith("input.") for n in graph.input)


def test_clients_use_the_ensemble_specs():
    specs = image_text_specs(256, 64)
    assert TEXT_SEARCH.input_names == specs["text_search"].input_names
    assert TEXT_SEARCH.output_names == specs["text_search"].output_names
    assert [t.dtype for t in TEXT_SEARCH.inputs] == [t.dtype for t in specs["text_search"].inputs]
    assert IMAGE_EMBED.input_names == specs["image_embed"].input_names


def test_gpu_target_uses_onnxruntime_with_tensorrt(tiny_artifacts, tmp_path):
    configs = repository_configs(read_manifest(tiny_artifacts), "gpu")
    assert 'platform: "onnxruntime_onnx"' in configs["text_encoder"]
    assert 'name: "tensorrt"' in configs["text_encoder"] and "KIND_GPU" in configs["image_encoder"]
    assert 'backend: "python"' in configs["tokenizer"]
    assert 'platform: "ensemble"' in configs["text_search"]  # the tower runs natively on the GPU there
    repo = build_repository(tiny_artifacts, tmp_path / "gpu", "gpu")
    assert (repo / "text_encoder/1/model.onnx").is_file() and not (repo / "text_encoder/1/model.py").exists()
    assert not any((repo / "text_search/1").iterdir())
    with pytest.raises(InputError, match="unknown target 'tpu'; valid: cpu, gpu"):
        repository_configs(read_manifest(tiny_artifacts), "tpu")


def test_corrupted_or_missing_artifacts_are_refused(tiny_artifacts, tmp_path):
    broken = tmp_path / "broken"
    shutil.copytree(tiny_artifacts, broken)
    with open(broken / "text_encoder.onnx", "r+b") as f:
        f.seek(100)
        f.write(b"\x00\x01\x02")
    with pytest.raises(InputError, match="text_encoder.onnx is corrupted"):
        build_repository(broken, tmp_path / "repo", "cpu")
    assert not (tmp_path / "repo").exists()  # nothing half-written
    (broken / "gallery.npy").unlink()
    with pytest.raises(InputError, match="gallery.npy is missing"):
        build_repository(broken, tmp_path / "repo", "cpu")
    with pytest.raises(InputError, match="has no manifest.json"):
        build_repository(tmp_path, tmp_path / "repo", "cpu")


def test_manifest_records_files_versions_and_preprocessing(tiny_artifacts):
    manifest = json.loads((tiny_artifacts / "manifest.json").read_text())
    assert set(manifest["files"]) == {
        "text_encoder.onnx",
        "image_encoder.onnx",
        "tokenizer.json",
        "gallery.npy",
        "gallery_ids.npy",
    }
    assert all(len(f["sha256"]) == 64 for f in manifest["files"].values())
    assert {"torch", "onnx", "onnxruntime"} <= set(manifest["versions"])
    assert manifest["preprocessing"]["pixel_mean"] == list(RVSEConfig().pixel_mean)
