"""ProTA: token-level scores against naive loops written from the formulas, the high-dimension space (its own
learned lift, not a function of the low cosine), masking, the loss, and ONNX parity of the exported parts."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from xmr.export.iospec import prota_pair_scorer_spec, prota_video_encoder_spec, video_text_encoder_spec
from xmr.export.onnx_export import Tower, export_onnx
from xmr.models.video.prota import (
    ProTA,
    ProTAConfig,
    ProTALoss,
    TextTokens,
    VideoTokens,
    partial_aggregate,
    score_terms,
    wasserstein2,
)

VOCAB, FRAME_DIM = 50, 12


def tiny_cfg(**kw) -> ProTAConfig:
    base = dict(
        vocab_size=VOCAB, frame_dim=FRAME_DIM, embed_dim=16, word_dim=16, max_tokens=16, max_frames=16
    )
    return ProTAConfig(**{**base, **kw})


def tiny_model(**kw) -> ProTA:
    torch.manual_seed(0)
    return ProTA(tiny_cfg(**kw)).eval()


def random_text(g: torch.Generator, b: int, n: int) -> tuple[torch.Tensor, torch.Tensor]:
    lengths = torch.randint(1, n + 1, (b,), generator=g)
    ids = torch.randint(1, VOCAB, (b, n), generator=g)
    ids = ids * (torch.arange(n)[None] < lengths[:, None])
    return ids, lengths


def random_video(g: torch.Generator, b: int, m: int) -> tuple[torch.Tensor, torch.Tensor]:
    counts = torch.randint(1, m + 1, (b,), generator=g)
    mask = torch.arange(m)[None] < counts[:, None]
    return torch.randn(b, m, FRAME_DIM, generator=g) * mask[..., None], mask


def test_shapes():
    model, g = tiny_model(), torch.Generator().manual_seed(1)
    t = model.encode_text(*random_text(g, 3, 7))
    v = model.encode_video(*random_video(g, 5, 9))
    assert (
        t.embedding.shape == (3, 16) and t.mu.shape == t.sigma.shape == (3, 7, 16) and t.mask.shape == (3, 7)
    )
    assert (
        v.embedding.shape == (5, 16) and v.mu.shape == v.sigma.shape == (5, 9, 16) and v.mask.shape == (5, 9)
    )
    assert torch.allclose(t.embedding.norm(dim=-1), torch.ones(3))
    assert (t.sigma > 0).all() and (v.sigma > 0).all()
    assert model.pair_scores(t, v).shape == (3, 5)
    frames, mask = random_video(g, 2, 4)
    mask[1] = False  # a video with no valid frame: finite scores, no NaN
    assert torch.isfinite(model.pair_scores(t, model.encode_video(frames, mask))).all()


def test_wasserstein_direct_symmetric_zero():
    g = torch.Generator().manual_seed(2)
    mu_a, mu_b = torch.randn(2, 3, 4, generator=g), torch.randn(3, 5, 4, generator=g)
    sa, sb = torch.rand(2, 3, 4, generator=g) + 0.1, torch.rand(3, 5, 4, generator=g) + 0.1
    w = wasserstein2(mu_a, sa, mu_b, sb)
    assert w.shape == (2, 3, 3, 5)
    for a in range(2):
        for b in range(3):
            for i in range(3):
                for j in range(5):
                    want = ((mu_a[a, i] - mu_b[b, j]) ** 2).sum() + ((sa[a, i] - sb[b, j]) ** 2).sum()
                    assert torch.allclose(w[a, b, i, j], want, atol=1e-5)
    assert torch.allclose(wasserstein2(mu_b, sb, mu_a, sa), w.permute(1, 0, 3, 2), atol=1e-5)
    same = wasserstein2(mu_a, sa, mu_a, sa)
    assert same[0, 0].diagonal().abs().max() < 1e-5 and same[1, 1].diagonal().abs().max() < 1e-5


def naive_low(t_mu, t_valid, v_mu, v_valid, lam):
    out = torch.zeros(t_mu.shape[0], v_mu.shape[0])
    for a in range(t_mu.shape[0]):
        for b in range(v_mu.shape[0]):
            t = F.normalize(t_mu[a][t_valid[a]], dim=-1)  # (n, D) valid tokens only
            v = F.normalize(v_mu[b][v_valid[b]], dim=-1)
            s = t @ v.T
            t2v = (s * torch.softmax(lam * s, dim=1)).sum(1).mean()
            v2t = (s.T * torch.softmax(lam * s.T, dim=1)).sum(1).mean()
            out[a, b] = 0.5 * (t2v + v2t)
    return out


def test_low_dim_aggregation_matches_naive_loop_and_ignores_padding():
    model, g = tiny_model(), torch.Generator().manual_seed(3)
    t = model.encode_text(*random_text(g, 4, 6))
    v = model.encode_video(*random_video(g, 3, 8))
    cos = torch.einsum("and,bmd->abnm", F.normalize(t.mu, dim=-1), F.normalize(v.mu, dim=-1))
    got = partial_aggregate(cos, t.mask, v.mask, 10.0)
    assert torch.allclose(got, naive_low(t.mu, t.mask, v.mu, v.mask, 10.0), atol=1e-5)


def naive_aggregate(s: torch.Tensor, lam: float) -> torch.Tensor:
    """Partial-related aggregation of one (n, m) matrix of valid tokens, both directions averaged:
    l(t_i -> v) = sum_j s_ij softmax_j(lam s_ij), mean over i; the same with the roles swapped."""
    t2v = torch.stack([(row * torch.softmax(lam * row, 0)).sum() for row in s]).mean()
    v2t = torch.stack([(col * torch.softmax(lam * col, 0)).sum() for col in s.T]).mean()
    return 0.5 * (t2v + v2t)


def naive_scores(model: ProTA, t, v) -> dict[str, torch.Tensor]:
    """The three terms and the score, token pair by token pair, from the formulas of the module doc:
    - low: the cosine of the means;
    - high: mean_s exp(-||z_t - z_v||^2 / (2 s^2)), z = normalize(GELU(W mu + b)) with each modality's own
      lift (W, b), on distances in that space (not cosines);
    - prob: -(||mu_a - mu_b||^2 + ||sigma_a - sigma_b||^2) of the unit-mean, sigma / sqrt(D) Gaussians."""
    cfg, d = model.cfg, t.mu.shape[-1]
    wt, bt = model.text_high.lift.weight, model.text_high.lift.bias
    wv, bv = model.video_high.lift.weight, model.video_high.lift.bias
    out = {k: torch.zeros(t.mu.shape[0], v.mu.shape[0]) for k in ("low", "high", "prob", "score")}
    for a in range(t.mu.shape[0]):
        for b in range(v.mu.shape[0]):
            tm, vm = t.mu[a][t.mask[a]], v.mu[b][v.mask[b]]  # valid tokens only
            ts, vs = t.sigma[a][t.mask[a]] / d**0.5, v.sigma[b][v.mask[b]] / d**0.5
            tu, vu = tm / tm.norm(dim=-1, keepdim=True), vm / vm.norm(dim=-1, keepdim=True)
            zt = [F.gelu(wt @ x + bt) for x in tm]
            zv = [F.gelu(wv @ y + bv) for y in vm]
            zt, zv = [z / z.norm() for z in zt], [z / z.norm() for z in zv]
            low = torch.tensor([[float(x @ y) for y in vu] for x in tu])
            gram = torch.tensor(
                [
                    [
                        sum(np.exp(-float(((x - y) ** 2).sum()) / (2 * s * s)) for s in cfg.kernel_sigmas)
                        / len(cfg.kernel_sigmas)
                        for y in zv
                    ]
                    for x in zt
                ]
            )
            prob = torch.tensor(
                [
                    [
                        -float(((tu[i] - vu[j]) ** 2).sum() + ((ts[i] - vs[j]) ** 2).sum())
                        for j in range(len(vu))
                    ]
                    for i in range(len(tu))
                ]
            )
            terms = {
                k: naive_aggregate(m, cfg.lam) for k, m in (("low", low), ("high", gram), ("prob", prob))
            }
            for k, x in terms.items():
                out[k][a, b] = x
            out["score"][a, b] = (
                cfg.w_low * terms["low"] + cfg.w_high * terms["high"] + cfg.w_prob * terms["prob"]
            )
    return out


@torch.no_grad()
def test_scores_match_the_formulas_token_pair_by_token_pair():
    model, g = tiny_model(), torch.Generator().manual_seed(11)
    t = model.encode_text(*random_text(g, 3, 5))
    v = model.encode_video(*random_video(g, 4, 6))
    want = naive_scores(model, t, v)
    highs = (model.text_high(t.mu), model.video_high(v.mu))
    got = score_terms(t, v, model.cfg.lam, model.cfg.kernel_sigmas, *highs)
    for k in ("low", "high", "prob"):
        assert torch.allclose(got[k], want[k], atol=1e-5), k
    assert torch.allclose(model.pair_scores(t, v), want["score"], atol=1e-5)


def one_token(mu: torch.Tensor, kind):
    """A text or video of one token with mean `mu` (k, D) -> k items; sigma 1 everywhere."""
    return kind(
        None, mu.unsqueeze(1), torch.ones_like(mu).unsqueeze(1), torch.ones(len(mu), 1, dtype=torch.bool)
    )


@torch.no_grad()
def test_high_space_is_not_a_function_of_the_low_cosine():
    """Two videos whose only token has the same cosine with the text's only token (b2 is b1 rotated about
    a), all sigmas 1: equal low and prob terms, but different high terms, so different pair scores. The
    high space is a learned lift of its own, so the Gram there is not a monotone transform of the low
    cosine; in a legacy run (high_dim = 0, the Gram of the low cosine) the two videos tie."""
    d, g = 16, torch.Generator().manual_seed(12)
    a, r1, r2 = torch.randn(3, d, generator=g)
    a = F.normalize(a, dim=0)
    e1 = F.normalize(r1 - (r1 @ a) * a, dim=0)  # Gram-Schmidt: e1, e2 orthonormal, both orthogonal to a
    e2 = F.normalize(r2 - (r2 @ a) * a - (r2 @ e1) * e1, dim=0)
    b1, b2 = 0.6 * a + 0.8 * e1, 0.6 * a + 0.8 * e2  # unit vectors, cos(a, b1) = cos(a, b2) = 0.6
    text, video = one_token(a[None], TextTokens), one_token(torch.stack([b1, b2]), VideoTokens)
    model = tiny_model()
    cfg = model.cfg
    highs = (model.text_high(text.mu), model.video_high(video.mu))
    terms = score_terms(text, video, cfg.lam, cfg.kernel_sigmas, *highs)
    assert torch.allclose(terms["low"][0], torch.tensor([0.6, 0.6]), atol=1e-5)
    assert torch.allclose(terms["prob"][0, 0], terms["prob"][0, 1], atol=1e-5)
    assert (terms["high"][0, 0] - terms["high"][0, 1]).abs() > 1e-3, terms["high"]
    scores = model.pair_scores(text, video)[0]
    assert (scores[0] - scores[1]).abs() > 1e-3 * cfg.w_high, scores
    legacy = score_terms(text, video, cfg.lam, cfg.kernel_sigmas)  # no lift: the Gram of the low cosine
    assert torch.allclose(legacy["high"][0, 0], legacy["high"][0, 1], atol=1e-6)


def test_high_space_has_its_own_parameters_and_learns():
    """The lifts are separate parameters (4 D wide by default, one per modality, equal at init), and the
    loss reaches both: through the high term only (w_high = 0: no gradient)."""
    g = torch.Generator().manual_seed(14)
    ids, lengths = random_text(g, 6, 5)
    frames, mask = random_video(g, 6, 7)
    for w_high in (0.5, 0.0):
        model = tiny_model(dropout=0.0, w_high=w_high).train()
        assert model.text_high.lift.weight.shape == (64, 16)  # high_dim None: 4 * embed_dim
        assert torch.equal(model.text_high.lift.weight, model.video_high.lift.weight)
        assert model.text_high.lift.weight.data_ptr() != model.video_high.lift.weight.data_ptr()
        t, v = model.encode_text(ids, lengths), model.encode_video(frames, mask)
        ProTALoss.of(model.cfg)(model.pair_scores(t, v), t, v)[0].backward()
        for head in (model.text_high, model.video_high):
            grad = head.lift.weight.grad
            assert (grad is not None and grad.abs().sum() > 0) if w_high else (grad is None or not grad.any())
    assert tiny_model(high_dim=40).video_high.lift.out_features == 40


@torch.no_grad()
def test_runs_saved_before_the_high_space_load_and_score_as_trained():
    """A run's config without `high_dim` predates the lift: it loads (no high heads, strict state dict) and
    its high term is the Gram of the low cosine, the score it was trained with."""
    cfg = tiny_cfg().to_dict()
    del cfg["high_dim"]
    legacy_cfg = ProTAConfig.from_dict(cfg)
    assert legacy_cfg.high_dim == 0 and legacy_cfg.high_features == 0
    assert ProTAConfig.from_dict(tiny_cfg().to_dict()).high_features == 64  # new runs keep their lift
    torch.manual_seed(0)
    legacy = ProTA(legacy_cfg).eval()
    assert legacy.text_high is None and not any("_high." in k for k in legacy.state_dict())
    legacy.load_state_dict({k: v for k, v in tiny_model().state_dict().items() if "_high." not in k})
    g = torch.Generator().manual_seed(15)
    t = legacy.encode_text(*random_text(g, 2, 4))
    v = legacy.encode_video(*random_video(g, 3, 5))
    got = legacy.pair_scores(t, v)
    cos = torch.einsum("and,bmd->abnm", F.normalize(t.mu, dim=-1), F.normalize(v.mu, dim=-1))
    d2 = 2 - 2 * cos
    gram = sum(torch.exp(-d2 / (2 * s * s)) for s in (0.5, 1.0, 2.0)) / 3
    high = partial_aggregate(gram, t.mask, v.mask, 10.0)
    terms = score_terms(t, v, 10.0, (0.5, 1.0, 2.0))
    assert torch.allclose(terms["high"], high, atol=1e-6)
    assert torch.allclose(got, terms["low"] + 0.5 * high + 0.25 * terms["prob"], atol=1e-6)


@torch.no_grad()
def test_appended_padding_does_not_change_scores():
    model, g = tiny_model(), torch.Generator().manual_seed(4)
    ids, lengths = random_text(g, 3, 5)
    frames, mask = random_video(g, 4, 6)
    scores = model(frames, mask, ids, lengths)
    ids_p = torch.cat([ids, torch.zeros(3, 4, dtype=ids.dtype)], dim=1)
    frames_p = torch.cat([frames, torch.randn(4, 5, FRAME_DIM, generator=g)], dim=1)  # garbage in the padding
    mask_p = torch.cat([mask, torch.zeros(4, 5, dtype=torch.bool)], dim=1)
    assert torch.allclose(model(frames_p, mask_p, ids_p, lengths), scores, atol=1e-5)
    t, t_p = model.encode_text(ids, lengths), model.encode_text(ids_p, lengths)
    assert torch.allclose(t.embedding, t_p.embedding, atol=1e-5)


@torch.no_grad()
def test_rerank_equals_pair_scores():
    model, g = tiny_model(), torch.Generator().manual_seed(5)
    ids, lengths = random_text(g, 3, 7)
    t = model.encode_text(ids, lengths)
    v = model.encode_video(*random_video(g, 6, 9))
    full = model.pair_scores(t, v)
    for q in range(3):
        got = model.rerank(t.mu[q : q + 1], t.sigma[q : q + 1], lengths[q : q + 1], v.mu, v.sigma, v.mask)
        assert got.shape == (6,)
        assert torch.allclose(got, full[q], atol=1e-6)


def test_loss_finite_decreases_and_reaches_both_towers():
    model = tiny_model(dropout=0.0).train()
    g = torch.Generator().manual_seed(6)
    ids, lengths = random_text(g, 8, 6)
    frames, mask = random_video(g, 8, 7)
    criterion = ProTALoss()
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    losses = []
    for step in range(15):
        t, v = model.encode_text(ids, lengths), model.encode_video(frames, mask)
        loss, parts = criterion(model.pair_scores(t, v), t, v)
        assert torch.isfinite(loss) and set(parts) == {"nce", "kl", "margin", "global"}
        opt.zero_grad()
        loss.backward()
        if step == 0:
            for p in (model.text.tok.weight, model.text_head.sigma.weight, model.video.proj.weight):
                assert p.grad is not None and p.grad.abs().sum() > 0
            assert model.video_head.sigma.weight.grad.abs().sum() > 0
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.5


def test_global_term_gradient_reaches_global_projections():
    """The global InfoNCE is the only term that touches `text_global` / `video_global`: with w_global = 0
    they get no gradient (the token-level score does not read the global embedding)."""
    g = torch.Generator().manual_seed(9)
    ids, lengths = random_text(g, 6, 5)
    frames, mask = random_video(g, 6, 7)
    for w_global in (1.0, 0.0):
        model = tiny_model(dropout=0.0, w_global=w_global).train()
        t, v = model.encode_text(ids, lengths), model.encode_video(frames, mask)
        loss, parts = ProTALoss.of(model.cfg)(model.pair_scores(t, v), t, v)
        loss.backward()
        for layer in (model.text_global, model.video_global):
            if w_global:
                assert layer.weight.grad is not None and layer.weight.grad.abs().sum() > 0
            else:
                assert layer.weight.grad is None
        assert ("global" in parts) == bool(w_global)


def test_global_term_trains_first_stage_retrieval():
    """40 steps on 32 random (text, video) pairs: the global embeddings' R@1 (the first stage) reaches 100%
    with the term (chance 1/32 = 3.1%) against 37.5% without it (the token score alone shapes only the mean
    of mu, not its cosine); asserted with slack: >= 80%, and >= 30 points above the model without it."""
    g = torch.Generator().manual_seed(6)
    ids, lengths = random_text(g, 32, 6)
    frames, mask = random_video(g, 32, 7)
    recall = {}
    for w_global in (1.0, 0.0):
        model = tiny_model(dropout=0.0, w_global=w_global).train()
        criterion, opt = ProTALoss.of(model.cfg), torch.optim.Adam(model.parameters(), lr=3e-3)
        for _ in range(40):
            t, v = model.encode_text(ids, lengths), model.encode_video(frames, mask)
            loss, _ = criterion(model.pair_scores(t, v), t, v)
            opt.zero_grad()
            loss.backward()
            opt.step()
        with torch.no_grad():
            model.eval()
            t, v = model.encode_text(ids, lengths), model.encode_video(frames, mask)
            recall[w_global] = (t.embedding @ v.embedding.T).argmax(1).eq(torch.arange(32)).float().mean()
    assert recall[1.0] >= 0.8 and recall[1.0] - recall[0.0] >= 0.3, recall


def test_runs_saved_without_global_projections_load_with_identity():
    model = tiny_model()
    state = {k: v for k, v in model.state_dict().items() if "_global." not in k}
    fresh = ProTA(tiny_cfg())
    torch.nn.init.zeros_(fresh.text_global.weight)
    fresh.load_state_dict(state)  # strict: the missing projections are filled in
    assert torch.equal(fresh.text_global.weight, torch.eye(16)) and torch.equal(
        fresh.video_global.bias, torch.zeros(16)
    )


def test_adaptive_margin_raises_loss():
    model, g = tiny_model(), torch.Generator().manual_seed(7)
    t = model.encode_text(*random_text(g, 4, 5))
    v = model.encode_video(*random_video(g, 4, 6))
    s = model.pair_scores(t, v)
    with_margin, parts = ProTALoss(margin=0.1)(s, t, v)
    without, _ = ProTALoss(margin=0.0)(s, t, v)
    assert with_margin > without and parts["margin"] > 0


# ----------------------------------------------------------------------------- ONNX


SPECS = {
    "text_encoder": video_text_encoder_spec(16, tokens=True),
    "video_encoder": prota_video_encoder_spec(16, 12),
    "pair_scorer": prota_pair_scorer_spec(16),
}


def export(module, example, name, path):
    """Export with the I/O spec's names and dynamic dims (the project's exporter)."""
    export_onnx(module, example, SPECS[name], path)


def run_onnx(path, feeds: dict[str, torch.Tensor]) -> list[np.ndarray]:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    assert [i.name for i in sess.get_inputs()] == list(feeds)
    return sess.run(None, {k: v.numpy() for k, v in feeds.items()})


def assert_close(got: list[np.ndarray], want, names: list[str], path) -> None:
    import onnxruntime as ort

    assert [o.name for o in ort.InferenceSession(str(path)).get_outputs()] == names
    for g_, w in zip(got, want, strict=True):
        assert g_.shape == tuple(w.shape)
        assert np.abs(g_ - w.numpy()).max() < 1e-4


@pytest.mark.slow  # three dynamo exports: ~10 s on an idle CPU
def test_onnx_export_parity(tmp_path):
    pytest.importorskip("onnxruntime")
    model, g = tiny_model(), torch.Generator().manual_seed(8)

    text = Tower(model, "encode_text", ("embedding", "mu", "sigma"))
    export(text, random_text(g, 2, 5), "text_encoder", tmp_path / "text.onnx")
    video = Tower(model, "encode_video", ("embedding", "mu", "sigma"))
    export(video, random_video(g, 2, 5), "video_encoder", tmp_path / "video.onnx")
    scorer = Tower(model, "rerank")
    with torch.no_grad():
        t, v = text(*random_text(g, 1, 5)), video(*random_video(g, 3, 6))
    example = (t[1], t[2], torch.tensor([4]), v[1], v[2], torch.ones(3, 6, dtype=torch.bool))
    export(scorer, example, "pair_scorer", tmp_path / "scorer.onnx")

    for b, n, m in ((1, 3, 2), (4, 9, 11)):  # shapes unlike the examples
        ids, lengths = random_text(g, b, n)
        frames, mask = random_video(g, b + 1, m)
        with torch.no_grad():
            t, v = text(ids, lengths), video(frames, mask)
        names = SPECS["text_encoder"].output_names
        got = run_onnx(tmp_path / "text.onnx", {"input_ids": ids, "lengths": lengths})
        assert_close(got, t, names, tmp_path / "text.onnx")
        names = SPECS["video_encoder"].output_names
        got = run_onnx(tmp_path / "video.onnx", {"frames": frames, "frame_mask": mask})
        assert_close(got, v, names, tmp_path / "video.onnx")
        feeds = {
            "text_mu": t[1][:1],
            "text_sigma": t[2][:1],
            "lengths": lengths[:1],
            "video_mu": v[1],
            "video_sigma": v[2],
            "frame_mask": mask,
        }
        with torch.no_grad():
            want = scorer(*feeds.values())
        assert_close(run_onnx(tmp_path / "scorer.onnx", feeds), [want], ["scores"], tmp_path / "scorer.onnx")
