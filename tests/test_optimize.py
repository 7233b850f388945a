"""`xmr optimize` on the image-text towers: FP16 / INT8 / INT8 Q/DQ artifacts, their parity and gates.

The text-video and moment families are optimised in tests/test_video_models.py and tests/test_cdnet.py,
next to the runs they train.
"""

import json
import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper
from typer.testing import CliRunner

from xmr.clients.cli import app
from xmr.export.iospec import ModelSpec
from xmr.export.manifest import read_manifest, verify_artifacts
from xmr.export.optimize import (
    OptimizeConfig,
    RecallGateError,
    batch_dependence,
    output_error,
    pad_to_common_shape,
)
from xmr.export.optimize import optimize as run_optimize
from xmr.export.runners import OnnxRunner
from xmr.export.scoring import embed_images, run_of
from xmr.models.errors import InputError

pytestmark = pytest.mark.slow


def op_types(path) -> set[str]:
    return {n.op_type for n in onnx.load(path).graph.node}


@pytest.fixture(scope="module")
def optimised(tiny_artifacts, tmp_path_factory):
    """Each precision of the tiny artifact (and int8 with ONNX Runtime's per-tensor dynamic quantization,
    with 2 outlier channels per input, and with weights rounded to nearest instead of by GPTQ), written from
    an empty working directory that must stay empty."""
    root = tmp_path_factory.mktemp("optimised")
    cwd = tmp_path_factory.mktemp("cwd")
    before = os.getcwd()
    os.chdir(cwd)
    try:
        configs = {
            "fp16": OptimizeConfig("fp16", dev_items=64),
            "int8": OptimizeConfig("int8", calibration=32, dev_items=64),
            # the other int8 forms without the SmoothQuant sweep (the "int8" entry covers it): cheaper
            "int8-per-tensor": OptimizeConfig("int8", activations="per-tensor", smooth="off", dev_items=64),
            "int8-outliers": OptimizeConfig("int8", calibration=32, outliers=2, smooth="off", dev_items=64),
            "int8-nearest": OptimizeConfig(
                "int8", calibration=32, rounding="nearest", smooth="off", dev_items=64
            ),
            "int8-qdq": OptimizeConfig("int8-qdq", calibration=32, method="percentile", dev_items=64),
        }
        out = {name: run_optimize(tiny_artifacts, root / name, cfg) for name, cfg in configs.items()}
    finally:
        os.chdir(before)
    assert list(cwd.iterdir()) == []  # no temporary model or data file left where the command ran
    return root, out


def test_every_precision_writes_a_complete_verified_artifact(optimised, tiny_artifacts):
    root, manifests = optimised
    source = read_manifest(tiny_artifacts)
    for name, manifest in manifests.items():
        folder = root / name
        verify_artifacts(folder, read_manifest(folder))
        assert set(manifest["files"]) == set(source["files"])
        report = manifest["optimization"]
        precision = report["precision"]
        assert name.startswith(precision)
        assert set(report["metrics"]) == {"pytorch", "onnx_fp32", precision}
        assert report["metrics"]["pytorch"]["rsum"] == pytest.approx(report["metrics"]["onnx_fp32"]["rsum"])
        assert report["gate"]["test_drop"] <= report["gate"]["max_drop"]
        for graph, outputs in report["parity_vs_pytorch"].items():
            for name, p in outputs.items():
                assert p["min_cosine"] > 0.99, (precision, graph, name, p)
        # the graphs keep the exported FP32 inputs and outputs: the served configs stay valid
        for graph in ("text_encoder", "image_encoder"):
            model = onnx.load(folder / f"{graph}.onnx")
            types = {v.type.tensor_type.elem_type for v in [*model.graph.input, *model.graph.output]}
            assert onnx.TensorProto.FLOAT16 not in types, (precision, graph)


def test_the_graphs_are_converted(optimised):
    root, manifests = optimised
    text = onnx.load(root / "fp16" / "text_encoder.onnx")
    assert any(i.data_type == onnx.TensorProto.FLOAT16 for i in text.graph.initializer)
    # int8: per-token INT8 products in ONNX Runtime's integer kernel, every candidate not kept converted
    text = onnx.load(root / "int8" / "text_encoder.onnx")
    products = [n for n in text.graph.node if n.op_type == "MatMulIntegerToFloat"]
    report = manifests["int8"]["optimization"]
    kept = len(report["kept_fp32"]["text_encoder"])
    assert len(products) + kept == report["candidates"]["text_encoder"] and products
    assert "DynamicQuantizeLinear" not in {n.op_type for n in text.graph.node}
    assert {"DynamicQuantizeLinear", "MatMulInteger"} <= op_types(
        root / "int8-per-tensor" / "text_encoder.onnx"
    )
    assert "per_token_int8" in manifests["int8"]["optimization"]["converter"]
    assert "quantize_dynamic" in manifests["int8-per-tensor"]["optimization"]["converter"]
    # GPTQ rounds the default form's weights; outliers, per-tensor and --rounding nearest round to nearest
    assert "GPTQ-rounded weights" in manifests["int8"]["optimization"]["converter"]
    for name in ("int8-nearest", "int8-outliers", "int8-per-tensor"):
        assert "GPTQ" not in manifests[name]["optimization"]["converter"], name
        assert manifests[name]["optimization"]["settings"]["rounding"] == "nearest", name
    # --outliers 2: each converted product has an FP32 product of 2 channels beside it
    assert "2 outlier channels" in manifests["int8-outliers"]["optimization"]["converter"]
    text = onnx.load(root / "int8-outliers" / "text_encoder.onnx")
    inits = {i.name: i.dims for i in text.graph.initializer}
    fp32_parts = [
        n for n in text.graph.node if n.op_type == "MatMul" and n.input[1].endswith("/pt_w_outliers")
    ]
    integer = [n for n in text.graph.node if n.op_type == "MatMulIntegerToFloat"]
    assert len(fp32_parts) == len(integer) > 0 and all(inits[n.input[1]][0] == 2 for n in fp32_parts)
    qdq = onnx.load(root / "int8-qdq" / "image_encoder.onnx")
    assert {"QuantizeLinear", "DequantizeLinear"} <= {n.op_type for n in qdq.graph.node}
    # symmetric INT8, the only form TensorRT takes: every zero point is 0
    inits = {i.name: i for i in qdq.graph.initializer}
    zero_points = [n.input[2] for n in qdq.graph.node if n.op_type == "QuantizeLinear" and len(n.input) > 2]
    assert zero_points and all(not numpy_helper.to_array(inits[z]).any() for z in zero_points)


def test_the_gallery_comes_from_the_optimised_image_tower(optimised):
    from xmr.export.scoring import ArtifactTask

    root, manifests = optimised
    manifest = manifests["int8"]
    task = ArtifactTask.of(manifest)
    spec = task.specs["image_encoder"]
    runner = OnnxRunner(root / "int8" / "image_encoder.onnx", spec)
    want = embed_images(run_of({"image_encoder": runner}), spec, task.split("test").images, task.model)
    assert np.array_equal(np.load(root / "int8" / "gallery.npy"), want)


def test_the_manifest_records_the_search(optimised):
    _, manifests = optimised
    report = manifests["int8"]["optimization"]
    assert report["search"][0] == {
        "step": "all",
        "kept_fp32": 0,
        "dev_gate_drop": report["search"][0]["dev_gate_drop"],
    }
    assert report["candidates"]["text_encoder"] > 0
    # SmoothQuant's alpha was chosen per graph by measurement: the least dev error of the tried values
    for choice in report["smoothing"].values():
        errors = choice["dev_error"]
        assert set(errors) == {"None", "0.5", "0.65", "0.8", "0.9"}
        assert errors[str(choice["alpha"])] == min(errors.values())
    assert manifests["fp16"]["optimization"]["smoothing"]["text_encoder"] == {"alpha": None}
    assert json.dumps(report)  # plain JSON


def test_the_manifest_records_each_graphs_batch_dependence(optimised):
    """An item's outputs batched vs alone: FP32, per-token INT8 and static Q/DQ are functions of each item;
    per-tensor dynamic INT8's per-batch activation scales make the text tower's answer depend on its
    batch-mates."""
    _, manifests = optimised
    for manifest in manifests.values():
        precision = manifest["optimization"]["precision"]
        dependence = manifest["optimization"]["batch_dependence"]
        assert set(dependence) == {"text_encoder", "image_encoder"}
        assert all(d["onnx_fp32"] < 1e-5 for d in dependence.values())
        assert all(precision in d for d in dependence.values())
    assert manifests["int8-per-tensor"]["optimization"]["batch_dependence"]["text_encoder"]["int8"] > 1e-4
    assert all(d["int8"] < 1e-5 for d in manifests["int8"]["optimization"]["batch_dependence"].values())
    assert all(
        d["int8-qdq"] < 1e-4 for d in manifests["int8-qdq"]["optimization"]["batch_dependence"].values()
    )


def test_batch_dependence_tells_a_per_item_function_from_a_per_batch_one():
    spec = ModelSpec.from_dict({
        "name": "g",
        "inputs": [{"name": "x", "dtype": "float32", "shape": ["batch", 3]}],
        "outputs": [{"name": "y", "dtype": "float32", "shape": ["batch", 3]}],
    })  # fmt: skip
    feeds = {"x": np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32)}
    per_item = lambda f: {"y": f["x"] / np.abs(f["x"]).max(axis=1, keepdims=True)}  # noqa: E731
    per_batch = lambda f: {"y": f["x"] / np.abs(f["x"]).max()}  # noqa: E731
    assert batch_dependence(per_item, spec, feeds) == 0.0
    assert batch_dependence(per_batch, spec, feeds) > 0.1


def test_a_zero_gate_searches_for_nodes_to_keep_and_names_the_drop(tiny_artifacts, tmp_path):
    """With no drop allowed the dev search must run; the test split then passes or fails the gate, and a
    failure names the gate and the drop and writes nothing."""
    cfg = OptimizeConfig("int8", max_recall_drop=0.0, dev_items=64)
    try:
        manifest = run_optimize(tiny_artifacts, tmp_path / "o", cfg)
    except RecallGateError as e:
        assert "the gate (--max-recall-drop) is 0" in str(e) and "points of i2t_R@1/t2i_R@1" in str(e)
        assert e.report["gate"]["test_drop"] > 0
        assert not (tmp_path / "o").exists()
        report = e.report
    else:
        report = manifest["optimization"]
        assert report["gate"]["test_drop"] <= 0
    search, kept = report["search"], sum(len(n) for n in report["kept_fp32"].values())
    assert search[0]["step"] == "all" and search[0]["kept_fp32"] == 0  # the whole model first
    if search[0]["dev_gate_drop"] > 0:  # the whole model failed on dev: nodes ranked, the fewest kept
        assert report["most_harmful"] and all(r["dev_error"] >= 0 for r in report["most_harmful"])
        chosen = [s for s in search if s["kept_fp32"] == kept and s["step"].startswith("keep")]
        everything = sum(report["candidates"].values())
        assert kept == everything or (chosen and chosen[0]["dev_gate_drop"] <= 0)


def test_optimising_an_optimised_artifact_is_refused(optimised, tmp_path):
    root, _ = optimised
    with pytest.raises(InputError, match="already optimised"):
        run_optimize(root / "int8", tmp_path / "again", OptimizeConfig("fp16"))


def test_bad_settings_name_the_option():
    for cfg, option in (
        (OptimizeConfig("int4"), "--precision"),
        (OptimizeConfig("int8-qdq", method="mse"), "--method"),
        (OptimizeConfig("int8", calibration=0), "--calibration"),
        (OptimizeConfig("int8", smooth="1.5"), "--smooth"),
        (OptimizeConfig("int8", smooth="strong"), "--smooth"),
        (OptimizeConfig("int8", activations="per-channel"), "--activations"),
        (OptimizeConfig("int8", outliers=-1), "--outliers"),
        (OptimizeConfig("int8", activations="per-tensor", outliers=4), "--outliers"),
        (OptimizeConfig("int8", rounding="stochastic"), "--rounding"),
        (OptimizeConfig("int8", activations="per-tensor", rounding="gptq"), "--rounding"),
    ):
        with pytest.raises(InputError, match=option):
            cfg.check()


def test_weights_are_gptq_rounded_by_default_where_the_form_allows_it():
    assert OptimizeConfig("int8").rounding == "gptq"
    assert OptimizeConfig("int8", rounding="nearest").rounding == "nearest"
    # outlier channels and per-tensor scales quantize other weights than GPTQ rounds: nearest, no error
    for cfg in (OptimizeConfig("int8", outliers=4), OptimizeConfig("int8", activations="per-tensor")):
        cfg.check()
        assert cfg.rounding == "nearest"
    assert OptimizeConfig("int8-qdq").rounding == OptimizeConfig("fp16").rounding == "nearest"
    assert OptimizeConfig("int8").needs_calibration() and not OptimizeConfig("fp16").needs_calibration()


def test_calibration_inputs_of_different_lengths_are_padded_to_one_shape():
    spec = ModelSpec.from_dict(
        {
            "name": "text_encoder",
            "inputs": [
                {"name": "input_ids", "dtype": "int64", "shape": ["batch", "tokens"]},
                {"name": "lengths", "dtype": "int64", "shape": ["batch"]},
            ],
            "outputs": [{"name": "e", "dtype": "float32", "shape": ["batch", 4]}],
        }
    )
    feeds = [
        {"input_ids": np.ones((2, 3), np.int64), "lengths": np.array([3, 2])},
        {"input_ids": np.ones((1, 5), np.int64), "lengths": np.array([5])},
    ]
    padded = pad_to_common_shape(feeds, spec)
    assert [f["input_ids"].shape for f in padded] == [(2, 5), (1, 5)]  # batch sizes untouched
    assert padded[0]["input_ids"][:, 3:].sum() == 0 and padded[0]["lengths"].tolist() == [3, 2]


def test_output_error_is_one_minus_the_worst_mean_cosine():
    a = {"x": np.array([[1.0, 0.0], [0.0, 1.0]])}
    assert output_error(a, a) == pytest.approx(0.0)
    assert output_error(a, {"x": np.array([[0.0, 1.0], [0.0, 1.0]])}) == pytest.approx(0.5)


def test_cli_optimize_prints_the_tables_and_rejects_bad_input(optimised, tiny_artifacts, tmp_path):
    root, _ = optimised
    runner = CliRunner()
    result = runner.invoke(app, ["optimize", str(tiny_artifacts), "--precision", "int4", "--out", "x"])
    assert result.exit_code == 2 and "int4" in result.output
    for option, value in (("--activations", "per-channel"), ("--outliers", "-1")):
        args = ["optimize", str(tiny_artifacts), "--precision", "int8", option, value, "--out", "x"]
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and option in result.output, result.output
    result = runner.invoke(
        app, ["optimize", str(root / "int8"), "--precision", "fp16", "--out", str(tmp_path / "x")]
    )
    assert isinstance(result.exception, InputError) and "already optimised" in str(result.exception)


@pytest.mark.server
@pytest.mark.parametrize("precision", ["int8", "int8-qdq"])
def test_an_optimised_artifact_serves_through_the_same_repository(optimised, precision, tmp_path):
    """`xmr repo` + the real tritonserver on an INT8 artifact: the served text embeddings are the INT8
    graph's, and the served top-k is the brute-force top-k of its gallery."""
    from xmr.clients.served import search_fresh_server
    from xmr.export.scoring import ArtifactTask

    root, manifests = optimised
    folder = root / precision
    task = ArtifactTask.of(manifests[precision])
    texts = task.split("test").flat_captions()[:40]
    runner = OnnxRunner(folder / "text_encoder.onnx", task.specs["text_encoder"])
    error, agree = search_fresh_server(
        folder, tmp_path / "repository", texts, embed_texts_with(runner, task, texts)
    )
    assert error < 1e-4 and agree.all()


def embed_texts_with(runner, task, texts):
    from xmr.export.scoring import embed_texts
    from xmr.models.tokenizer import TextLimits

    return embed_texts(
        run_of({"text_encoder": runner}),
        task.tokenizer,
        texts,
        TextLimits(max_tokens=task.model.cfg.max_tokens),
    )
