"""One I/O spec feeds the ONNX graphs, the config.pbtxt files and the clients: check they agree."""

import json
import shutil

import onnx
import pytest

from xmr.clients.triton_client import IMAGE_EMBED, TEXT_SEARCH
from xmr.export.iospec import image_text_specs
from xmr.export.manifest import read_manifest
from xmr.export.repository import SOURCE, build_repository, repository_configs, serving_facts
from xmr.models.errors import InputError
from xmr.models.image_text.rvse import RVSEConfig
from xmr.models.tokenizer import TextLimits


def default_facts():
    c, lim = RVSEConfig(), TextLimits()
    return serving_facts(
        c.embed_dim, c.image_size, c.region_dim, c.pixel_mean, c.pixel_std, lim.max_tokens, lim.max_bytes
    )


def test_committed_configs_are_rendered_from_the_spec():
    rendered = repository_configs(default_facts())
    committed = {p.parent.name: p.read_text() for p in SOURCE.glob("*/config.pbtxt")}
    assert committed == rendered, "model_repository/ is stale: run `make configs`"
    for name in rendered:
        if name not in ("text_search", "image_embed"):
            assert (SOURCE / name / "1" / "model.py").is_file()


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
    repo = build_repository(tiny_artifacts, tmp_path / "gpu", "gpu")
    assert (repo / "text_encoder/1/model.onnx").is_file() and not (repo / "text_encoder/1/model.py").exists()
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
