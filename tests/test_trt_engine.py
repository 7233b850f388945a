"""The TensorRT path: `trt_engine.py` (Polygraphy loaders), `trt_plugins.py` (the `xmr` ops as TensorRT
Python plugins) and `engine.py` (`build_engines`, behind `xmr engine`).

Without TensorRT (this is most machines) the tests check what needs none: the one-line errors, and that
nothing is created; the optimisation-profile computation (a pure function of the I/O spec and dim
ranges); the quantization checks of int8 builds; the plugin module importing with its registration
skipped, its tables against the ops' ONNX schemas, and the `plugin_namespace` rewrite the ONNX parser
reads; the generated parity inputs. The tests marked `tensorrt` (skipped with the reason by conftest where
TensorRT or a GPU is missing) build and run real engines: FP16 and INT8 (from a Q/DQ graph) against ONNX
Runtime, plugin-form graphs against their standard form, the runner registered in `runners.BACKENDS`.
Nothing here mocks TensorRT.
"""

from __future__ import annotations

import importlib.util
import json
import shutil

import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper
from torch import nn

from xmr.export import trt_plugins
from xmr.export.engine import TIMING_CACHE, build_engines, example_feeds
from xmr.export.iospec import (
    ModelSpec,
    TensorSpec,
    prota_pair_scorer_spec,
    text_encoder_spec,
    visern_video_encoder_spec,
)
from xmr.export.manifest import file_facts, read_manifest, verify_artifacts
from xmr.export.onnx_export import export_onnx
from xmr.export.parity import ParityStats
from xmr.export.runners import BACKENDS, runner_for
from xmr.export.trt_engine import (
    DEFAULT_DIMS,
    NOT_INSTALLED,
    DimRange,
    build_engine,
    check_quantization,
    dim_ranges,
    has_plugin_nodes,
    profile_shapes,
    run_tensorrt,
)
from xmr.models.errors import InputError
from xmr.models.ops.deform_sample import DeformSampler
from xmr.models.ops.onnx_domain import op_parts
from xmr.models.ops.random_walk_gcn import random_walk_gcn

HAS_TENSORRT = importlib.util.find_spec("tensorrt") is not None
no_tensorrt = pytest.mark.skipif(HAS_TENSORRT, reason="checks the machine without TensorRT")


# ----------------------------------------------------------------------------- small graphs


def matmul_graph(path, dims=("batch", 16)) -> ModelSpec:
    """x (batch, 16) @ W (16, 8) -> y: the smallest float graph to quantize."""
    w = helper.make_tensor(
        "W", TensorProto.FLOAT, (16, 8), np.random.default_rng(0).standard_normal(128).astype(np.float32)
    )
    graph = helper.make_graph(
        [helper.make_node("MatMul", ["x", "W"], ["y"])],
        "matmul",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, list(dims))],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [dims[0], 8])],
        [w],
    )
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)]), str(path))
    return ModelSpec(
        "matmul", (TensorSpec("x", "float32", dims),), (TensorSpec("y", "float32", ("batch", 8)),)
    )


class RandomWalkGCNOp(nn.Module):
    """The op alone, softmax affinity, as a module to export in either form."""

    def __init__(self):
        super().__init__()
        self.op_form = "standard"  # set by export_onnx (use_op_form)

    def forward(self, phi, psi, g, mask):
        return random_walk_gcn(phi, psi, g, mask, "softmax", 1e-6, form=self.op_form)


GCN_SPEC = ModelSpec(
    "random_walk_gcn",
    inputs=(
        *(TensorSpec(n, "float32", ("frames", "regions", 8)) for n in ("phi", "psi", "g")),
        TensorSpec("mask", "bool", ("frames", "regions")),
    ),
    outputs=(TensorSpec("out", "float32", ("frames", "regions", 8)),),
)
DEFORM_SPEC = ModelSpec(
    "deform_sample",
    inputs=(
        TensorSpec("value", "float32", ("batch", "clips", 2, 5)),
        TensorSpec("mask", "bool", ("batch", "clips")),
        TensorSpec("positions", "float32", ("batch", "queries", 2, 4)),
        TensorSpec("weights", "float32", ("batch", "queries", 2, 4)),
    ),
    outputs=(TensorSpec("out", "float32", ("batch", "queries", 2, 5)),),
)


def gcn_feeds(n=3, k=5, seed=0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    feeds = {name: rng.standard_normal((n, k, 8)).astype(np.float32) for name in ("phi", "psi", "g")}
    mask = np.ones((n, k), bool)
    mask[0, 3:] = False
    return feeds | {"mask": mask}


def deform_feeds(b=3, t=6, q=7, seed=0) -> dict[str, np.ndarray]:
    """1-D layout, groups 2, points 4, channels 5; batch, clips, queries all other sizes (not specialised)."""
    rng = np.random.default_rng(seed)
    mask = np.ones((b, t), bool)
    mask[-1, t - 2 :] = False
    weights = rng.random((b, q, 2, 4)).astype(np.float32)
    return {
        "value": rng.standard_normal((b, t, 2, 5)).astype(np.float32),
        "mask": mask,
        "positions": (rng.random((b, q, 2, 4)) * (t + 2) - 1).astype(np.float32),
        "weights": weights / weights.sum(-1, keepdims=True),
    }


@pytest.fixture(scope="module")
def op_graphs(tmp_path_factory):
    """{(op, form): path} of each `xmr` op exported alone, in both custom-op forms."""
    root, paths = tmp_path_factory.mktemp("op_graphs"), {}
    for op, module, spec, feeds in (
        ("gcn", RandomWalkGCNOp(), GCN_SPEC, gcn_feeds()),
        ("deform", DeformSampler(), DEFORM_SPEC, deform_feeds()),
    ):
        example = tuple(torch.from_numpy(feeds[name]) for name in spec.input_names)
        for form in ("standard", "plugin"):
            paths[op, form] = root / f"{op}-{form}.onnx"
            export_onnx(module, example, spec, paths[op, form], form)
    return paths


def qdq_copy(artifacts, dest):
    """A copy of an artifact folder whose graphs are Q/DQ-quantized (int8, symmetric, MatMul/Gemm only,
    ONNX Runtime's quantize_static on generated inputs): the form `xmr optimize --precision int8-qdq`
    gives TensorRT, made here without that command."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    shutil.copytree(artifacts, dest)
    manifest = read_manifest(dest)
    vocab = int(manifest["model_config"].get("vocab_size") or 2)

    class Reader(CalibrationDataReader):
        def __init__(self, spec):
            rng = np.random.default_rng(0)
            sizes = {"batch": 4, "tokens": manifest["preprocessing"]["max_tokens"]}
            self.feeds = iter([example_feeds(spec, sizes, rng, vocab) for _ in range(4)])

        def get_next(self):
            return next(self.feeds, None)

    graphs = [n for n in manifest["specs"] if f"{n}.onnx" in manifest["files"]]
    for name in graphs:
        path = dest / f"{name}.onnx"
        quantize_static(
            str(path),
            str(path),
            Reader(ModelSpec.from_dict(manifest["specs"][name])),
            quant_format=QuantFormat.QDQ,
            op_types_to_quantize=["MatMul", "Gemm"],
            activation_type=QuantType.QInt8,
            weight_type=QuantType.QInt8,
            extra_options={"ActivationSymmetric": True, "WeightSymmetric": True},
        )
    manifest["files"] |= file_facts(dest, [f"{n}.onnx" for n in graphs])
    manifest["optimization"] = {"precision": "int8-qdq"}
    (dest / "manifest.json").write_text(json.dumps(manifest, indent=2))
    return dest


# ----------------------------------------------------------------------------- without TensorRT


@no_tensorrt
def test_build_engines_without_tensorrt_is_one_line_and_creates_nothing(tiny_artifacts, tmp_path):
    out = tmp_path / "engines"
    with pytest.raises(InputError) as e:
        build_engines(tiny_artifacts, "fp16", out)
    assert str(e.value) == NOT_INSTALLED and "\n" not in str(e.value)
    assert "pip install tensorrt" in str(e.value) and "`xmr engine` needs it" in str(e.value)
    assert not out.exists() and list(tmp_path.iterdir()) == []


@no_tensorrt
def test_runner_and_run_tensorrt_without_tensorrt_say_so(tiny_artifacts, tmp_path):
    spec = ModelSpec.from_dict(read_manifest(tiny_artifacts)["specs"]["text_encoder"])
    with pytest.raises(InputError, match="TensorRT is not installed"):
        BACKENDS["tensorrt"](tiny_artifacts / "text_encoder.onnx", spec, 0)
    spec = matmul_graph(tmp_path / "m.onnx")
    with pytest.raises(InputError, match="TensorRT is not installed"):
        run_tensorrt(tmp_path / "m.onnx", {"x": np.zeros((2, 16), np.float32)})


def test_bad_precision_is_refused_before_anything_else(tiny_artifacts, tmp_path):
    with pytest.raises(InputError, match="--precision 'int4'; valid: fp32, fp16, int8"):
        build_engines(tiny_artifacts, "int4", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_profile_shapes_from_the_spec_dims():
    shapes = profile_shapes(text_encoder_spec(16), dim_ranges({"preprocessing": {"max_tokens": 20}}))
    assert shapes == {
        "input_ids": ((1, 1), (8, 20), (64, 20)),
        "lengths": ((1,), (8,), (64,)),
    }
    # fixed dims stay, every named dim takes its range: ViSERN's video tower
    shapes = profile_shapes(visern_video_encoder_spec(16, regions=5, region_dim=7))
    assert shapes["regions"] == ((1, 1, 5, 7), (8, 16, 5, 7), (64, 64, 5, 7))
    assert shapes["frame_mask"] == ((1, 1), (8, 16), (64, 64))
    # ProTA's pair scorer: one query (fixed 1), a shortlist of videos
    shapes = profile_shapes(prota_pair_scorer_spec(16), DEFAULT_DIMS)
    assert shapes["lengths"] == ((1,), (1,), (1,))
    assert shapes["video_mu"] == ((1, 1, 16), (100, 16, 16), (1000, 64, 16))


def test_dim_ranges_read_the_manifest_and_overrides():
    dims = dim_ranges(
        {"preprocessing": {"max_tokens": 40}, "model_config": {"max_frames": 8, "max_clips": 200}},
        {"batch": (2, 4, 32)},
    )
    assert dims["tokens"] == DimRange(1, 40, 40)
    assert dims["frames"] == DimRange(1, 8, 8)  # opt capped at the model's maximum
    assert dims["clips"] == DimRange(1, 75, 200)
    assert dims["batch"] == DimRange(2, 4, 32)
    assert dim_ranges({})["tokens"] == DEFAULT_DIMS["tokens"]
    with pytest.raises(InputError, match=r"dim 'batch' range \(4, 2, 8\); expected 1 <= min <= opt <= max"):
        dim_ranges({}, {"batch": (4, 2, 8)})


def test_a_dim_without_a_range_is_named():
    spec = ModelSpec("odd", (TensorSpec("x", "float32", ("batch", "widgets")),), ())
    with pytest.raises(InputError, match="input 'x' of odd has dynamic dim 'widgets', which has no engine"):
        profile_shapes(spec)


def test_int8_on_a_graph_without_qdq_names_the_fix(tmp_path):
    spec = matmul_graph(tmp_path / "float.onnx")
    fix = r"run `xmr optimize --precision int8-qdq` first"
    with pytest.raises(InputError, match=r"float.onnx has no QuantizeLinear/DequantizeLinear nodes.*" + fix):
        check_quantization(tmp_path / "float.onnx", "int8")
    # build_engine checks the graph before it needs TensorRT: the same error on any machine
    with pytest.raises(InputError, match=fix):
        build_engine(tmp_path / "float.onnx", spec, "int8")
    assert check_quantization(tmp_path / "float.onnx", "fp16") is False


def test_qdq_and_integer_op_graphs(tmp_path):
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_dynamic, quantize_static

    spec = matmul_graph(tmp_path / "float.onnx")
    feeds = [{"x": np.random.default_rng(i).standard_normal((4, 16)).astype(np.float32)} for i in range(3)]

    class Reader:
        def __init__(self):
            self.it = iter(feeds)

        def get_next(self):
            return next(self.it, None)

    quantize_static(
        str(tmp_path / "float.onnx"), str(tmp_path / "qdq.onnx"), Reader(), quant_format=QuantFormat.QDQ
    )
    assert check_quantization(tmp_path / "qdq.onnx", "int8") is True
    with pytest.raises(InputError, match="qdq.onnx is Q/DQ-quantized; build it with precision 'int8'"):
        check_quantization(tmp_path / "qdq.onnx", "fp16")
    quantize_dynamic(str(tmp_path / "float.onnx"), str(tmp_path / "int.onnx"), weight_type=QuantType.QInt8)
    with pytest.raises(InputError, match=r"int.onnx holds ONNX Runtime integer ops \(.*MatMulInteger"):
        check_quantization(tmp_path / "int.onnx", "int8")
    with pytest.raises(InputError, match="precision 'bf16'; valid: fp32, fp16, int8"):
        check_quantization(tmp_path / "float.onnx", "bf16")
    assert runner_for(tmp_path / "qdq.onnx", spec).run(feeds[0])["y"].shape == (4, 8)


@pytest.mark.skipif(
    importlib.util.find_spec("tensorrt.plugin") is not None if HAS_TENSORRT else False,
    reason="checks the machine without tensorrt.plugin",
)
def test_plugin_module_imports_without_tensorrt_and_skips_registration():
    assert trt_plugins.REGISTERED is False and trt_plugins.register() is False
    assert "tensorrt.plugin cannot be imported" in trt_plugins.SKIPPED


def test_plugin_tables_match_the_onnx_schemas():
    types = {"STRING": str, "FLOAT": float, "INT": int}
    schemas = {part.OP_TYPE: part.schema() for part in op_parts("onnx_op")}
    assert set(trt_plugins.PLUGINS) == set(schemas)
    for op, (inputs, attributes) in trt_plugins.PLUGINS.items():
        schema = schemas[op]
        assert inputs == tuple(p.name for p in schema.inputs), op
        assert attributes == {name: types[a.type.name] for name, a in schema.attributes.items()}, op
        assert trt_plugins.plugin_id(op) == f"xmr::{op}"


def test_plugin_namespaces_are_written_on_a_copy(op_graphs):
    model = onnx.load(op_graphs["gcn", "plugin"])
    assert has_plugin_nodes(op_graphs["gcn", "plugin"]) == ["RandomWalkGCN"]
    assert has_plugin_nodes(op_graphs["gcn", "standard"]) == []
    tagged = trt_plugins.with_plugin_namespaces(model)
    node = next(n for n in tagged.graph.node if n.domain == "xmr")
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert attrs["plugin_namespace"] == b"xmr" and attrs["affinity"] == b"softmax"
    assert not any(a.name == "plugin_namespace" for n in model.graph.node for a in n.attribute)
    again = trt_plugins.with_plugin_namespaces(tagged)  # idempotent
    assert sum(a.name == "plugin_namespace" for n in again.graph.node for a in n.attribute) == 1


def test_example_feeds_are_valid_inputs(tiny_artifacts):
    manifest = read_manifest(tiny_artifacts)
    spec = ModelSpec.from_dict(manifest["specs"]["text_encoder"])
    feeds = example_feeds(spec, {"batch": 5, "tokens": 7}, np.random.default_rng(0), vocab_size=30)
    ids, lengths = feeds["input_ids"], feeds["lengths"]
    assert ids.shape == (5, 7) and ids.dtype == np.int64 and lengths.shape == (5,)
    assert ((lengths >= 1) & (lengths <= 7)).all() and (ids < 30).all()
    for row, n in zip(ids, lengths, strict=True):
        assert (row[:n] > 0).all() and (row[n:] == 0).all()
    # the ONNX graph takes them as they are
    out = runner_for(tiny_artifacts / "text_encoder.onnx", spec).run(feeds)
    assert np.isfinite(out["text_embedding"]).all()
    masks = example_feeds(GCN_SPEC, {"frames": 4, "regions": 6}, np.random.default_rng(1))["mask"]
    assert masks.dtype == bool and masks[:, 0].all()


def test_qdq_copy_is_an_int8_qdq_artifact(tiny_artifacts, tmp_path):
    """The Q/DQ artifact the int8 engine test builds from: verified files, Q/DQ graphs, close to float."""
    folder = qdq_copy(tiny_artifacts, tmp_path / "qdq")
    manifest = read_manifest(folder)
    verify_artifacts(folder, manifest)
    spec = ModelSpec.from_dict(manifest["specs"]["text_encoder"])
    assert check_quantization(folder / "text_encoder.onnx", "int8")
    feeds = example_feeds(spec, {"batch": 4, "tokens": 8}, np.random.default_rng(3), 20)
    stats = ParityStats()
    stats.add(
        "t",
        runner_for(tiny_artifacts / "text_encoder.onnx", spec).run(feeds),
        runner_for(folder / "text_encoder.onnx", spec).run(feeds),
    )
    assert stats.stats["t"]["text_embedding"]["min_cosine"] > 0.9


# ----------------------------------------------------------------------------- with TensorRT and a GPU


def assert_parity(entry: dict, min_cosine: float) -> None:
    for graph, outputs in entry["parity"].items():
        for name, p in outputs.items():
            if isinstance(p, dict):
                assert p["min_cosine"] > min_cosine, (graph, name, p)


@pytest.mark.tensorrt
def test_fp16_engines_of_an_artifact(tiny_artifacts, tmp_path):
    from xmr.export.repository import build_repository, repository_configs

    out = tmp_path / "fp16"
    manifest = build_engines(tiny_artifacts, "fp16", out)
    verify_artifacts(out, manifest)  # the plans are listed with their sha256
    entry = manifest["engines"]
    assert entry["precision"] == "fp16" and entry["tensorrt"]
    assert entry["files"]["text_encoder"] == {"onnx": "text_encoder.onnx", "plan": "text_encoder.plan"}
    assert entry["profiles"]["text_encoder"]["input_ids"]["max"] == [
        64,
        manifest["preprocessing"]["max_tokens"],
    ]
    assert entry["plugins"] == {"text_encoder": [], "image_encoder": []}
    assert (out / TIMING_CACHE).is_file() and (out / "text_encoder.onnx").is_file()
    assert_parity(entry, 0.99)
    # the runner of a plan, registered in runners.BACKENDS, against ONNX Runtime at the profile's edges
    spec = ModelSpec.from_dict(manifest["specs"]["text_encoder"])
    runner = BACKENDS["tensorrt"](out / "text_encoder.plan", spec, 0)
    for sizes in (
        {"batch": 1, "tokens": 1},
        {"batch": 64, "tokens": manifest["preprocessing"]["max_tokens"]},
    ):
        feeds = example_feeds(spec, sizes, np.random.default_rng(0), 20)
        want = runner_for(out / "text_encoder.onnx", spec).run(feeds)["text_embedding"]
        np.testing.assert_allclose(runner.run(feeds)["text_embedding"], want, atol=2e-2)
    runner.close()
    # a second build into the same folder reuses the timing cache
    build_engines(tiny_artifacts, "fp16", out, parity=False)
    assert (out / TIMING_CACHE).is_file()
    configs = repository_configs(read_manifest(out), "gpu", frozenset({"text_encoder", "image_encoder"}))
    assert 'platform: "tensorrt_plan"' in configs["text_encoder"]
    repo = build_repository(out, tmp_path / "repo", "gpu")
    assert (repo / "image_encoder/1/model.plan").read_bytes() == (out / "image_encoder.plan").read_bytes()


@pytest.mark.tensorrt
def test_fp32_engine_matches_onnxruntime(tiny_artifacts):
    spec = ModelSpec.from_dict(read_manifest(tiny_artifacts)["specs"]["image_encoder"])
    runner = BACKENDS["tensorrt"](tiny_artifacts / "image_encoder.onnx", spec, 0)  # an FP32 build
    feeds = example_feeds(spec, {"batch": 3}, np.random.default_rng(0))
    want = runner_for(tiny_artifacts / "image_encoder.onnx", spec).run(feeds)["image_embedding"]
    np.testing.assert_allclose(runner.run(feeds)["image_embedding"], want, atol=1e-4)
    runner.close()


@pytest.mark.tensorrt
def test_int8_engines_of_a_qdq_artifact(tiny_artifacts, tmp_path):
    folder = qdq_copy(tiny_artifacts, tmp_path / "qdq")
    with pytest.raises(InputError, match="is Q/DQ-quantized; build it with precision 'int8'"):
        build_engines(folder, "fp16", tmp_path / "wrong")
    assert not (tmp_path / "wrong").exists()
    manifest = build_engines(folder, "int8", tmp_path / "int8")
    assert manifest["engines"]["precision"] == "int8" and manifest["optimization"]["precision"] == "int8-qdq"
    assert_parity(manifest["engines"], 0.9)  # against the Q/DQ graph in ONNX Runtime


@pytest.mark.tensorrt
@pytest.mark.parametrize("op, feeds", [("gcn", gcn_feeds), ("deform", deform_feeds)])
def test_plugin_engines_match_the_standard_form(op, feeds, op_graphs):
    pytest.importorskip("tensorrt.plugin", reason="needs TensorRT >= 10.6 (Python plugins)")
    module = {"gcn": "random_walk_gcn", "deform": "deform_sample"}[op]
    pytest.importorskip(f"xmr.models.ops.{module}.triton", reason="needs the op's OpenAI-Triton kernel")
    assert trt_plugins.register() and trt_plugins.REGISTERED
    inputs = feeds(seed=1)
    standard = run_tensorrt(op_graphs[op, "standard"], inputs)["out"]
    plugin = run_tensorrt(op_graphs[op, "plugin"], inputs)["out"]
    np.testing.assert_allclose(plugin, standard, atol=1e-4)
