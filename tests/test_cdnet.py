"""CDNet: shapes, QSD streams, training beyond a random-span baseline, export in both custom-op forms."""

import onnx
import pytest
import torch

from xmr.export.moment_export import export_moment_run
from xmr.models.moments.cdnet import CDNet, CDNetConfig, qsd_losses
from xmr.models.ops.onnx_domain import register_schemas, xmr_nodes
from xmr.models.train.moments import MomentTrainConfig, train_moment

TINY_DATA = {"n_train": 64, "n_val": 16, "n_test": 16}


def tiny_model(**kw) -> CDNet:
    torch.manual_seed(0)
    cfg = CDNetConfig(
        vocab_size=30, clip_dim=12, d_model=32, heads=4, groups=4, points=2, word_dim=16, grid=(2, 2), **kw
    )
    return CDNet(cfg).eval()


@pytest.mark.parametrize("use_grid", [False, True])
def test_outputs_and_padding(use_grid):
    model = tiny_model(use_grid=use_grid)
    clips = torch.randn(2, 9, 12)
    mask = torch.ones(2, 9, dtype=torch.bool)
    mask[1, 6:] = False
    ids, lengths = torch.randint(2, 30, (2, 5)), torch.tensor([5, 3])
    grid = torch.randn(2, 9, 2, 2, 12) if use_grid else None
    with torch.no_grad():
        out = model(clips, mask, ids, lengths, grid)
        cut = model(
            clips[1:, :6], mask[1:, :6], ids[1:, :3], lengths[1:], None if grid is None else grid[1:, :6]
        )
    assert out["spans"].shape == (2, 10, 2) and ((out["spans"] >= 0) & (out["spans"] <= 1)).all()
    assert out["logits"].shape == (2, 10) and out["saliency"].shape == (2, 9)
    # padded clips and padded words change nothing
    assert torch.allclose(out["spans"][1], cut["spans"][0], atol=1e-5)
    assert torch.allclose(out["saliency"][1, :6], cut["saliency"][0], atol=1e-5)


def test_qsd_losses_prefer_aligned_clips():
    model = tiny_model()
    clips, mask = torch.randn(3, 8, 12), torch.ones(3, 8, dtype=torch.bool)
    inside = torch.zeros(3, 8, dtype=torch.bool)
    inside[:, 2:5] = True
    out = model(clips, mask, torch.randint(2, 30, (3, 4)), torch.tensor([4, 4, 4]))
    good = dict(out, align_logit=torch.where(inside, 5.0, -5.0))
    bad = dict(out, align_logit=torch.where(inside, -5.0, 5.0))
    assert (
        qsd_losses(good, mask, inside, 0.1)["clip_contrast"]
        < qsd_losses(bad, mask, inside, 0.1)["clip_contrast"]
    )
    losses = qsd_losses(out, mask, inside, 0.1)
    assert all(torch.isfinite(v) for v in losses.values())


@pytest.fixture(scope="module")
def cdnet_runs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cdnet")
    runs = {}
    for grid in (False, True):
        cfg = MomentTrainConfig(
            epochs=2,
            batch_size=16,
            cache_dir=str(root / "cache"),
            data_overrides=TINY_DATA,
            backbone_steps=40,
            use_grid=grid,
        )
        runs[grid] = (train_moment(cfg, root / f"grid{grid}"), root / f"grid{grid}")
    return runs


@pytest.mark.slow
def test_cdnet_beats_a_random_span_baseline(cdnet_runs):
    for metrics, _ in cdnet_runs.values():
        test, random = metrics["test"], metrics["random_baseline"]
        assert test["R1@0.5"] > random["R1@0.5"] + 10, (test, random)
        assert test["mIoU"] > random["mIoU"] + 10, (test, random)


@pytest.mark.slow
@pytest.mark.parametrize("grid", [False, True])
def test_cdnet_export_forms(cdnet_runs, grid, tmp_path):
    _, run = cdnet_runs[grid]
    register_schemas()
    for form in ("standard", "plugin"):
        manifest = export_moment_run(run, tmp_path / form, form, parity_queries=8)
        graph = onnx.load(tmp_path / form / "moment_model.onnx")
        n_custom = len(xmr_nodes(graph))
        assert (n_custom == 1) if form == "plugin" else (n_custom == 0), form
        parity = manifest["parity"]
        assert all(p["max_abs_err"] < 1e-4 for p in parity["moment_model"].values()), parity
        assert parity["moments"]["pytorch"] == pytest.approx(parity["moments"]["onnx"], abs=1e-3)  # percent
    inferred = onnx.shape_inference.infer_shapes(
        onnx.load(tmp_path / "plugin" / "moment_model.onnx"), strict_mode=True
    )
    assert any(n.op_type == "DeformSample" and n.domain == "xmr" for n in inferred.graph.node)


@pytest.mark.slow
def test_optimize_cdnet_with_the_deform_sample_node(cdnet_runs, tmp_path):
    """FP16 and INT8 of the trilinear CDNet in plugin form: the xmr::DeformSample node stays FP32 and the
    moment metrics are recorded beside the FP32 graph's."""
    from xmr.export.optimize import OptimizeConfig, optimize

    _, run = cdnet_runs[True]
    export_moment_run(run, tmp_path / "plugin", "plugin", parity_queries=8)
    register_schemas()
    for precision in ("fp16", "int8"):
        cfg = OptimizeConfig(precision, max_recall_drop=100)
        manifest = optimize(tmp_path / "plugin", tmp_path / precision, cfg)
        graph = onnx.load(tmp_path / precision / "moment_model.onnx")
        (node,) = xmr_nodes(graph)
        inferred = onnx.shape_inference.infer_shapes(graph)
        types = {v.name: v.type.tensor_type.elem_type for v in inferred.graph.value_info}
        assert all(types.get(x, onnx.TensorProto.FLOAT) == onnx.TensorProto.FLOAT for x in node.input if x)
        report = manifest["optimization"]
        assert set(report["metrics"]) == {"pytorch", "onnx_fp32", precision}
        assert report["gate"]["metrics"] == ["R1@0.5"]
        spans = report["parity_vs_pytorch"]["moment_model"]["spans"]
        assert spans["min_cosine"] > 0.98, (precision, spans)
