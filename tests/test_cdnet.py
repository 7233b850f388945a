"""CDNet: shapes, QSD's alignment levels against the formula and hand-made cases, CDD's query-conditioned
sampling, training beyond a random-span baseline, export in both custom-op forms."""

import math

import onnx
import pytest
import torch
import torch.nn.functional as F

from xmr.export.moment_export import export_moment_run
from xmr.models.moments.cdnet import QSD, CDNet, CDNetConfig, qsd_losses
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


# ----------------------------------------------------------------------------- QSD


def qsd_with(w_g: float, w_f: float, b: float = 0.0, d: int = 4) -> QSD:
    """A QSD whose mix `a_t = sigmoid(w_g g_t + w_f f_t + b)` has the given weights."""
    qsd = QSD(d)
    with torch.no_grad():
        qsd.mix.weight.copy_(torch.tensor([[w_g, w_f]]))
        qsd.mix.bias.fill_(b)
    return qsd


def naive_alignment(qsd: QSD, clips, clip_mask, words, word_mask, sentence) -> torch.Tensor:
    """The alignment logits, clip by clip, from the formula of the module doc:
    g_t = cos(sentence, clip_t); f_t = sum over valid words l of softmax_l(<word_l, clip_t> / sqrt(D))
    cos(word_l, clip_t); logit_t = w_g g_t + w_f f_t + b."""
    (w_g, w_f), b = qsd.mix.weight[0].tolist(), qsd.mix.bias.item()
    out = torch.zeros(clips.shape[:2])
    for i in range(clips.shape[0]):
        ws = words[i][word_mask[i]]  # the valid words only
        for t in range(clips.shape[1]):
            c = clips[i, t]
            g = F.cosine_similarity(sentence[i], c, dim=0)
            att = torch.softmax(ws @ c / math.sqrt(c.shape[0]), dim=0)
            f = (att * F.cosine_similarity(ws, c.unsqueeze(0), dim=1)).sum()
            out[i, t] = w_g * g + w_f * f + b
    return out


@torch.no_grad()
def test_qsd_alignment_matches_the_formula_and_ignores_padded_words():
    g = torch.Generator().manual_seed(0)
    qsd = qsd_with(1.5, 2.5, -0.5, d=8)
    clips, words, sentence = torch.randn(3, 6, 8, generator=g), torch.randn(3, 5, 8, generator=g), None
    word_mask = torch.arange(5)[None] < torch.tensor([[5], [3], [1]])
    clip_mask = torch.ones(3, 6, dtype=torch.bool)
    clip_mask[2, 4:] = False
    sentence = torch.randn(3, 8, generator=g)
    logit, align = qsd(clips, clip_mask, words, word_mask, sentence)
    assert torch.allclose(
        logit, naive_alignment(qsd, clips, clip_mask, words, word_mask, sentence), atol=1e-5
    )
    assert torch.allclose(align, torch.sigmoid(logit) * clip_mask, atol=1e-6)  # padded clips: level 0
    garbage = words.clone()
    garbage[~word_mask] = clips[:, :1].expand(-1, 5, -1)[~word_mask] * 10  # padded words that match clip 0
    assert torch.allclose(qsd(clips, clip_mask, garbage, word_mask, sentence)[0], logit, atol=1e-5)


@torch.no_grad()
def test_qsd_fine_grained_term_ranks_a_clip_that_matches_one_word():
    """Words e1, e2 (times k = 2), sentence their mean. Clip A = k e1 matches word 1; clip
    B = k ((e1 + e2) / 2 + e3 / sqrt 2) has the same global correlation (cos(s, A) = cos(s, B) = 1 / sqrt 2)
    but matches no word better than the other (cos 1/2 with each, so f_B = 1/2 whatever the attention);
    A's attention puts softmax(k^2 / sqrt(D)) = sigmoid(2) on word 1, with cos 1, so f_A = sigmoid(2).
    Clip C = k e4 is orthogonal to the query (g = f = 0). With w_g = w_f = 4, b = -5 (so that the sigmoid
    does not saturate): a_A > a_B > a_C = sigmoid(-5), at the values the formula gives; a QSD without the
    fine-grained term would tie A and B."""
    k, e = 2.0, torch.eye(4)
    words = k * e[:2].unsqueeze(0)  # (1, 2, 4)
    sentence = words.mean(1)  # (1, 4)
    a_clip, b_clip, c_clip = k * e[0], k * ((e[0] + e[1]) / 2 + e[2] / math.sqrt(2)), k * e[3]
    clips = torch.stack([a_clip, b_clip, c_clip]).unsqueeze(0)  # (1, 3, 4)
    qsd = qsd_with(4.0, 4.0, -5.0)
    logit, align = qsd(
        clips, torch.ones(1, 3, dtype=torch.bool), words, torch.ones(1, 2, dtype=torch.bool), sentence
    )
    f_a = 1 / (1 + math.exp(-2.0))  # softmax over [k^2 / 2, 0]
    want = torch.tensor([4 / math.sqrt(2) + 4 * f_a, 4 / math.sqrt(2) + 4 * 0.5, 0.0]) - 5.0
    assert torch.allclose(logit[0], want, atol=1e-5), (logit, want)
    assert torch.allclose(align[0], torch.sigmoid(want), atol=1e-6)
    assert align[0, 0] > align[0, 1] + 0.2 and align[0, 1] > align[0, 2] + 0.2


@torch.no_grad()
def test_qsd_global_term_ranks_the_clip_closer_to_the_sentence():
    """The same words, a sentence along e3 (QSD takes the sentence as given): clips k ((e1 + e2) / 2 +- e3 /
    sqrt 2) have the same fine-grained correlation (1/2) but global correlation +-1 / sqrt 2, so only the
    global term orders them; a QSD without it would tie them."""
    k, e = 2.0, torch.eye(4)
    words, sentence = k * e[:2].unsqueeze(0), e[2:3]
    plus, minus = (e[0] + e[1]) / 2 + e[2] / math.sqrt(2), (e[0] + e[1]) / 2 - e[2] / math.sqrt(2)
    clips = k * torch.stack([plus, minus]).unsqueeze(0)
    logit, _ = qsd_with(4.0, 4.0)(
        clips, torch.ones(1, 2, dtype=torch.bool), words, torch.ones(1, 2, dtype=torch.bool), sentence
    )
    want = torch.tensor([4 / math.sqrt(2) + 2.0, -4 / math.sqrt(2) + 2.0])
    assert torch.allclose(logit[0], want, atol=1e-5), logit


def test_qsd_in_the_model_depends_on_the_query_and_trains():
    """In the whole model: the alignment logits of one video differ between two queries, not between two
    runs of one query; the clip-level loss reaches QSD's mix and the text tower through them."""
    model = tiny_model(dropout=0.0)
    g = torch.Generator().manual_seed(3)
    clips, mask = torch.randn(1, 8, 12, generator=g).expand(2, -1, -1), torch.ones(2, 8, dtype=torch.bool)
    ids, lengths = torch.tensor([[3, 7, 9, 11], [20, 21, 25, 2]]), torch.tensor([4, 4])
    out = model(clips, mask, ids, lengths)
    assert (out["align_logit"][0] - out["align_logit"][1]).abs().max() > 1e-3
    again = model(clips[:1], mask[:1], ids[:1], lengths[:1])["align_logit"]
    assert torch.allclose(again[0], out["align_logit"][0], atol=1e-6)
    inside = torch.zeros(2, 8, dtype=torch.bool)
    inside[:, 2:5] = True
    qsd_losses(out, mask, inside, 0.1)["clip_contrast"].backward()
    assert model.qsd.mix.weight.grad.abs().sum() > 0 and model.text.tok.weight.grad.abs().sum() > 0


# ----------------------------------------------------------------------------- CDD


def capture_sampling(model: CDNet):
    """Records what CDD hands the deformable sampler: positions (B, T, G, P[, 3]) and weights (B, T, G, P)."""
    seen = {}

    def hook(_module, args):
        seen["positions"], seen["weights"] = args[2], args[3]

    return seen, model.cdd.sampler.register_forward_pre_hook(hook)


def trained_offsets(model: CDNet) -> CDNet:
    """CDD's offset layer starts at weight 0 (the P points spread around each clip for every query); give it
    the non-zero weight training gives it."""
    with torch.no_grad():
        model.cdd.offsets.weight.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(4))
    return model


@pytest.mark.parametrize("use_grid", [False, True])
def test_cdd_sampling_positions_depend_on_the_query(use_grid):
    model = trained_offsets(tiny_model(use_grid=use_grid, dropout=0.0))
    g = torch.Generator().manual_seed(5)
    clips, mask = torch.randn(1, 8, 12, generator=g).expand(3, -1, -1), torch.ones(3, 8, dtype=torch.bool)
    grid = torch.randn(1, 8, 2, 2, 12, generator=g).expand(3, -1, -1, -1, -1) if use_grid else None
    ids = torch.tensor([[3, 7, 9, 11], [20, 21, 25, 2], [3, 7, 9, 11]])  # queries 0 and 2 are the same
    seen, handle = capture_sampling(model)
    with torch.no_grad():
        model(clips, mask, ids, torch.tensor([4, 4, 4]), grid)
    handle.remove()
    pos, w = seen["positions"], seen["weights"]
    assert pos.shape[:4] == (3, 8, 4, 2) and (pos.shape[4] == 3 if use_grid else pos.ndim == 4)
    assert (pos[0] - pos[1]).abs().max() > 1e-2 and (w[0] - w[1]).abs().max() > 1e-3  # another query
    assert torch.allclose(pos[0], pos[2], atol=1e-6) and torch.allclose(w[0], w[2], atol=1e-6)  # the same one


@pytest.mark.parametrize("use_grid", [False, True])
def test_cdd_offsets_are_computed_from_the_query_features(use_grid):
    """CDD alone, the same aligned clips, two sentences: different positions; the gradient of the positions
    reaches the sentence and the offset predictor. A CDD conditioned on the clips alone fails both."""
    model = trained_offsets(tiny_model(use_grid=use_grid, dropout=0.0))
    g = torch.Generator().manual_seed(6)
    aligned, context = torch.randn(1, 8, 32, generator=g), torch.randn(1, 8, 32, generator=g)
    grid = torch.randn(1, 8, 2, 2, 32, generator=g) if use_grid else None
    mask = torch.ones(1, 8, dtype=torch.bool)
    positions = []
    for seed in (7, 8):
        sentence = torch.randn(1, 32, generator=torch.Generator().manual_seed(seed), requires_grad=True)
        seen, handle = capture_sampling(model)
        model.cdd(aligned, context, grid, mask, sentence)
        handle.remove()
        model.zero_grad()
        seen["positions"].sum().backward()
        assert sentence.grad is not None and sentence.grad.abs().sum() > 0
        assert model.cdd.offsets.weight.grad.abs().sum() > 0
        positions.append(seen["positions"].detach())
    assert (positions[0] - positions[1]).abs().max() > 1e-2


def test_cdd_offsets_start_spread_around_each_clip():
    """At init (offset weight 0) every query samples the same P points around each clip: t - 0.5, t + 0.5."""
    model = tiny_model()
    seen, handle = capture_sampling(model)
    with torch.no_grad():
        model(
            torch.randn(2, 5, 12),
            torch.ones(2, 5, dtype=torch.bool),
            torch.randint(2, 30, (2, 4)),
            torch.tensor([4, 2]),
        )
    handle.remove()
    want = torch.arange(5.0).view(1, 5, 1, 1) + torch.tensor([-0.5, 0.5])
    assert torch.allclose(seen["positions"], want.expand(2, 5, 4, 2), atol=1e-5)


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
