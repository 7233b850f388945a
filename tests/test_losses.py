"""Every loss against a naive per-anchor loop written from the paper's formula, hand-worked cases that a
plausible wrong reading fails, each paper's claim as a test, and degenerate batches for every loss."""

import math

import numpy as np
import pytest
import torch
from scipy.stats import kendalltau

from xmr.models.losses import (
    BCLS,
    LOSSES,
    InfoNCE,
    KendallRankLoss,
    ListwiseLoss,
    SelHN,
    SmoothNDCGLoss,
    TripletHN,
    TripletSN,
    UnifiedLoss,
    make_loss,
)
from xmr.models.losses.listwise import rsc_relevance
from xmr.models.losses.mining import sliding_windows

# ----------------------------------------------------------------------------- naive references (one anchor)


def hinges(row, p, margin):
    return [max(0.0, margin - row[p] + row[n]) for n in range(len(row)) if n != p]


def negatives(row, p):
    return [row[n] for n in range(len(row)) if n != p]


def ref_triplet_hn(row, p, margin=0.2):
    return max(hinges(row, p, margin))


def ref_triplet_sh(row, p, margin=0.2):
    return sum(hinges(row, p, margin))


def ref_selhn(row, p, margin=0.2, threshold=0.1):
    vanishing = abs(row[p] - max(negatives(row, p))) < threshold
    return ref_triplet_sh(row, p, margin) if vanishing else ref_triplet_hn(row, p, margin)


def ref_triplet_sn(row, p, margin=0.2, tau=0.1):
    neg = negatives(row, p)
    z = sum(math.exp(s / tau) for s in neg)
    return sum(math.exp(s / tau) / z * h for s, h in zip(neg, hinges(row, p, margin), strict=True))


def ref_unified(row, p, tau=0.05, margin=0.2):
    return tau * math.log(1 + sum(math.exp((s - row[p] + margin) / tau) for s in negatives(row, p)))


def ref_infonce(row, p, tau=0.05):
    return -math.log(math.exp(row[p] / tau) / sum(math.exp(s / tau) for s in row))


def ref_kendall(row, rel, tau_label=0.05, tau_sim=0.05):
    pairs = [(j, k) for j in range(len(row)) for k in range(j + 1, len(row))]
    return -sum(
        math.tanh((rel[j] - rel[k]) / tau_label) * math.tanh((row[j] - row[k]) / tau_sim) for j, k in pairs
    ) / len(pairs)


def ref_kendall_swhs(row, rel, window, tau_label=0.05, tau_sim=0.05):
    """BCLS's SW-HS: sort the candidates by label; a window starts at every position and holds the pairs
    (start, one of the next `window` candidates); only the hardest pair of a window (the largest Kendall
    term) counts; the loss is the mean over windows (0 without any pair)."""

    def term(j, k):
        return -math.tanh((rel[j] - rel[k]) / tau_label) * math.tanh((row[j] - row[k]) / tau_sim)

    n = len(row)
    order = sorted(range(n), key=lambda i: -rel[i])  # stable: ties keep index order
    hardest = [
        max(term(order[a], order[b]) for b in range(a + 1, min(a + window, n - 1) + 1)) for a in range(n - 1)
    ]
    return sum(hardest) / len(hardest) if hardest else 0.0


def ref_ndcg(row, rel, k=None):
    """Exact NDCG with gains 2^rel - 1, from the true ranking."""
    order = sorted(range(len(row)), key=lambda i: -row[i])
    cut = len(row) if k is None else k
    dcg = sum((2 ** rel[i] - 1) / math.log2(r + 2) for r, i in enumerate(order[:cut]))
    idcg = sum((2**g - 1) / math.log2(r + 2) for r, g in enumerate(sorted(rel, reverse=True)[:cut]))
    return dcg / idcg


def ref_smooth_ndcg(row, rel, tau=0.01, k=None):
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    ranks = [
        1 + sum(sig((row[j] - row[i]) / tau) for j in range(len(row)) if j != i) for i in range(len(row))
    ]
    gains = [2**g - 1 for g in rel]
    terms = [g / math.log2(1 + r) for g, r in zip(gains, ranks, strict=True)]
    ideal = [g / math.log2(r + 2) for r, g in enumerate(sorted(gains, reverse=True))]
    if k is not None:
        terms = [t * sig((k + 0.5 - r) / tau) for t, r in zip(terms, ranks, strict=True)]
        ideal = ideal[:k]
    return sum(terms) / sum(ideal)


def both(ref, sim, rel=None):
    """Mean over row anchors + mean over column anchors, diagonal positives."""
    total = 0.0
    for s, r in ((sim, rel), (sim.T, None if rel is None else rel.T)):
        values = [
            ref(s[i].tolist(), i) if r is None else ref(s[i].tolist(), r[i].tolist()) for i in range(len(s))
        ]
        total += sum(values) / len(values)
    return total


def random_case(dtype, n=6, seed=0):
    g = torch.Generator().manual_seed(seed)
    sim = (torch.rand(n, n, generator=g, dtype=torch.float64) * 2 - 1).to(dtype)
    rel = torch.rand(n, n, generator=g, dtype=torch.float64).to(dtype)
    rel.fill_diagonal_(1.0)
    return sim, rel


# ----------------------------------------------------------------------------- equality with the loops

PAIR_CASES = [
    (TripletHN(), ref_triplet_hn),
    (TripletHN(hardest=False), ref_triplet_sh),
    (SelHN(), ref_selhn),
    (TripletSN(), ref_triplet_sn),
    (UnifiedLoss(), ref_unified),
    (InfoNCE(), ref_infonce),
]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize(
    ("loss", "ref"), PAIR_CASES, ids=lambda x: type(x).__name__ if hasattr(x, "forward") else ""
)
def test_pair_losses_match_naive_loop(loss, ref, dtype):
    for seed in range(3):
        sim, _ = random_case(dtype, seed=seed)
        want = both(ref, sim.double().numpy())
        assert loss(sim).item() == pytest.approx(want, rel=1e-5, abs=1e-5)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_relevance_losses_match_naive_loop(dtype):
    for seed in range(3):
        sim, rel = random_case(dtype, n=7, seed=seed)
        s, r = sim.double().numpy(), rel.double().numpy()
        assert KendallRankLoss()(sim, rel).item() == pytest.approx(both(ref_kendall, s, r), abs=1e-5)
        swhs = both(lambda a, b: ref_kendall_swhs(a, b, 3), s, r)
        assert KendallRankLoss(window=3)(sim, rel).item() == pytest.approx(swhs, abs=1e-5)
        sndcg = both(lambda a, b: 1 - ref_smooth_ndcg(a, b), s, r)
        assert SmoothNDCGLoss()(sim, rel).item() == pytest.approx(sndcg, abs=1e-4)
        bcls = both(ref_triplet_sn, s) + 0.1 * both(lambda a, b: ref_kendall_swhs(a, b, 8), s, r)
        assert BCLS()(sim, rel).item() == pytest.approx(bcls, abs=1e-4)
        listwise = 0.5 * both(ref_triplet_hn, s) + 0.5 * sndcg  # (1 - w) pairwise + w listwise, w = 0.5
        assert ListwiseLoss()(sim, rel).item() == pytest.approx(listwise, abs=1e-4)
        assert ListwiseLoss(weight=0.2)(sim, rel).item() == pytest.approx(
            0.8 * both(ref_triplet_hn, s) + 0.2 * sndcg, abs=1e-4
        )


def test_reductions_and_registry():
    sim, rel = random_case(torch.float64)
    for name, cls in LOSSES.items():
        loss = cls()  # every entry constructs with the papers' defaults
        args = (sim, rel) if cls.needs_relevance else (sim,)
        assert torch.isfinite(loss(*args)), name
        per_anchor = cls(reduction="none")(*args)
        assert per_anchor.shape == (12,), name  # rows then columns
        assert cls(reduction="sum")(*args).item() == pytest.approx(per_anchor.sum().item(), abs=1e-9), name
        assert loss(*args).item() == pytest.approx(
            per_anchor[:6].mean().item() + per_anchor[6:].mean().item(), abs=1e-9
        ), name
    assert set(LOSSES) == {
        "triplet_hn",
        "selhn",
        "triplet_sn",
        "kendall",
        "bcls",
        "unified",
        "infonce",
        "listwise",
    }
    with pytest.raises(ValueError, match="unknown loss 'nope'; valid: triplet_hn, selhn"):
        make_loss("nope")


def test_input_checks_name_the_problem():
    with pytest.raises(ValueError, match="pos_mask is"):
        TripletHN()(torch.rand(3, 3), torch.eye(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="non-square sim needs an explicit pos_mask"):
        TripletHN()(torch.rand(3, 4))
    with pytest.raises(
        ValueError, match="relevance is \\(2, 2\\); expected continuous labels shaped like sim"
    ):
        KendallRankLoss()(torch.rand(3, 3), torch.rand(2, 2))
    with pytest.raises(ValueError, match="reduction='avg'"):
        TripletHN(reduction="avg")(torch.rand(3, 3))


def test_explicit_pos_mask_on_a_non_square_batch():
    """Two captions per image: the first positive of each row is the anchor's positive; others are skipped."""
    sim = torch.rand(3, 6, dtype=torch.float64)
    pos = torch.zeros(3, 6, dtype=torch.bool)
    for i in range(3):
        pos[i, 2 * i : 2 * i + 2] = True
    rows = [
        max(0.2 - sim[i, 2 * i] + sim[i, n] for n in range(6) if not pos[i, n]).clamp_min(0) for i in range(3)
    ]
    cols = [
        max(0.2 - sim[j // 2, j] + sim[m, j] for m in range(3) if not pos[m, j]).clamp_min(0)
        for j in range(6)
    ]
    want = sum(rows) / 3 + sum(cols) / 6
    assert TripletHN()(sim, pos).item() == pytest.approx(float(want))


# ----------------------------------------------------------------------------- the papers' claims


def test_unified_tends_to_triplet_hn_as_tau_goes_to_zero():
    sim, _ = random_case(torch.float64, n=8)
    target = TripletHN(margin=0.2)(sim).item()
    gaps = [abs(UnifiedLoss(tau=tau, margin=0.2)(sim).item() - target) for tau in (0.1, 0.01, 0.001, 1e-4)]
    assert gaps == sorted(gaps, reverse=True) and gaps[-1] < 1e-3


def test_unified_with_zero_margin_is_infonce_times_tau():
    sim, _ = random_case(torch.float64, n=8)
    for tau in (0.05, 0.5):
        assert UnifiedLoss(tau=tau, margin=0.0)(sim).item() == pytest.approx(
            tau * InfoNCE(tau=tau)(sim).item()
        )


@pytest.mark.parametrize("k", [None, 3])
def test_smooth_ndcg_tends_to_exact_ndcg(k):
    sim, rel = random_case(torch.float64, n=8, seed=3)
    exact = np.mean([ref_ndcg(sim[i].tolist(), rel[i].tolist(), k) for i in range(8)])
    exact += np.mean([ref_ndcg(sim.T[i].tolist(), rel.T[i].tolist(), k) for i in range(8)])
    gaps = [abs((2 - SmoothNDCGLoss(tau=tau, k=k)(sim, rel).item()) - exact) for tau in (0.1, 0.01, 1e-4)]
    assert gaps[-1] < 1e-6 and gaps[0] > gaps[-1]
    per_anchor = 1 - SmoothNDCGLoss(tau=0.05, k=k, reduction="none")(sim, rel)
    assert ((per_anchor > 0) & (per_anchor <= 1 + 1e-12)).all()  # S-NDCG in (0, 1]


def test_kendall_loss_tracks_kendalls_tau():
    rng = np.random.default_rng(0)
    sharp, default = KendallRankLoss(tau_label=1e-9, tau_sim=1e-9), KendallRankLoss()
    checked = 0
    for _ in range(50):
        labels, scores = rng.random(12), rng.random(12)
        tau = kendalltau(labels, scores).statistic
        s, c = torch.tensor(scores[None]), torch.tensor(labels[None])
        assert -sharp.rows(s, c).item() == pytest.approx(tau, abs=1e-6)  # sharp temperatures: Kendall's tau-a
        if abs(tau) > 0.1:
            assert np.sign(-default.rows(s, c).item()) == np.sign(tau)
            checked += 1
    assert checked > 20


def test_kendall_loss_is_minimal_when_orders_agree():
    rng = np.random.default_rng(1)
    labels = torch.tensor(rng.random((1, 10)))
    agree = KendallRankLoss().rows(labels.clone(), labels).item()
    for _ in range(30):
        shuffled = labels[:, torch.randperm(10)]
        assert KendallRankLoss().rows(shuffled, labels).item() >= agree


def test_sliding_windows_pair_label_neighbours():
    for c, w in ((128, 8), (64, 4)):
        hi, lo, valid = sliding_windows(torch.rand(5, c), w)
        assert hi.shape == lo.shape == valid.shape == (5, c - 1, w)
        assert int(valid[0].sum()) == sum(c - d for d in range(1, w + 1))  # every pair within w positions
    rel = torch.tensor([[0.1, 0.9, 0.5, 0.7]])  # label order: 1, 3, 2, 0
    hi, lo, valid = sliding_windows(rel, 2)
    assert hi[0, :, 0].tolist() == [1, 3, 2]
    assert lo[0][valid[0]].tolist() == [3, 2, 2, 0, 0]  # windows (1: 3, 2), (3: 2, 0), (2: 0)


def test_swhs_keeps_only_the_hardest_pair_of_each_window():
    """Hand-worked, sharp temperatures (each term is -sign(dc) sign(ds) = +1 misordered, -1 in order).
    Labels 0.9 > 0.6 > 0.3 > 0.0, scores 0.1, 0.2, 0.3, 0.0, window 2:
    window 0: (0,1) +1, (0,2) +1 -> +1; window 1: (1,2) +1, (1,3) -1 -> +1; window 2: (2,3) -1 -> -1.
    SW-HS = (1 + 1 - 1) / 3 = 1/3. Keeping every misordered pair instead gives +1; all pairs (plain
    Kendall) give 0; a window's mean instead of its hardest gives (1 + 0 - 1) / 3 = 0."""
    sharp = dict(tau_label=1e-9, tau_sim=1e-9)
    rel = torch.tensor([[0.9, 0.6, 0.3, 0.0]], dtype=torch.float64)
    sim = torch.tensor([[0.1, 0.2, 0.3, 0.0]], dtype=torch.float64)
    assert KendallRankLoss(window=2, **sharp).rows(sim, rel).item() == pytest.approx(1 / 3)
    assert KendallRankLoss(**sharp).rows(sim, rel).item() == pytest.approx(0.0)
    perm = torch.tensor([2, 0, 3, 1])  # the candidates' order in the row does not matter
    assert KendallRankLoss(window=2, **sharp).rows(sim[:, perm], rel[:, perm]).item() == pytest.approx(1 / 3)


def test_swhs_selects_one_pair_per_window():
    """On random scores about half the window pairs are misordered; SW-HS keeps C - 1 of C x window."""
    torch.manual_seed(0)
    c, w = 64, 8
    sim = torch.rand(1, c, dtype=torch.float64, requires_grad=True)
    rel = torch.rand(1, c, dtype=torch.float64)
    KendallRankLoss(window=w).rows(sim, rel).sum().backward()
    touched = int((sim.grad != 0).sum())
    hi, lo, valid = sliding_windows(rel, w)
    misordered = int(
        (
            (sim.gather(1, hi.reshape(1, -1)) < sim.gather(1, lo.reshape(1, -1))).reshape(valid.shape) & valid
        ).sum()
    )
    assert misordered > int(valid.sum()) // 3  # what "keep the misordered pairs" would have kept
    assert touched <= 2 * (c - 1)  # candidates touched by the C - 1 selected pairs
    want = ref_kendall_swhs(sim[0].tolist(), rel[0].tolist(), w)
    assert KendallRankLoss(window=w).rows(sim, rel).item() == pytest.approx(want, abs=1e-9)


def test_selhn_selection_flips_exactly_at_the_condition():
    threshold, margin, eps = 0.125, 0.2, 2.0**-20  # exactly representable: 0.5 - d is exact
    for d, rule in (
        (threshold - eps, ref_triplet_sh),
        (threshold, ref_triplet_hn),
        (threshold + eps, ref_triplet_hn),
        (-threshold + eps, ref_triplet_sh),
        (-threshold, ref_triplet_hn),
    ):
        row = [0.5, 0.5 - d, 0.25, 0.5 - d - 0.0625]  # positive 0.5, hardest negative 0.5 - d
        sim = torch.tensor([row], dtype=torch.float64)
        pos = torch.tensor([[True, False, False, False]])
        got = SelHN(margin, threshold).rows(sim, pos).item()
        assert got == pytest.approx(rule(row, 0, margin)), d


def test_selhn_keeps_gradients_where_triplet_hn_vanishes():
    """Anchor image 0's hardest negative caption is (almost) a copy of its positive caption: Triplet-HN's
    gradient on the image embedding, t_hn - t_p, vanishes; SelHN falls back to all negatives and keeps one."""
    g = torch.Generator().manual_seed(0)
    unit = torch.nn.functional.normalize
    base = torch.randn(16, generator=g, dtype=torch.float64)
    # early training: every embedding close to every other, so all hinges are active
    texts = unit(base + 0.1 * torch.randn(6, 16, generator=g, dtype=torch.float64), dim=1)
    texts[1] = unit(texts[0] + 1e-6 * torch.randn(16, generator=g, dtype=torch.float64), dim=0)
    start = unit(texts[0] + 0.01 * torch.randn(16, generator=g, dtype=torch.float64), dim=0)
    grads = {}
    for name, loss in (("hn", TripletHN()), ("selhn", SelHN())):
        image = start.clone().unsqueeze(0).requires_grad_(True)
        sim = image @ texts.T  # (1, 6): positive 0; caption 1 is the hardest negative
        assert sim[0, 1] == sim[0, 1:].max()
        pos = torch.zeros(1, 6, dtype=torch.bool)
        pos[0, 0] = True
        loss.rows(sim, pos).sum().backward()
        grads[name] = image.grad.norm().item()
    assert grads["hn"] < 1e-3
    assert grads["selhn"] > 100 * grads["hn"]


def test_selhn_hand_worked():
    """Margin 0.2, threshold 0.1, positive first. Gap to the hardest negative 0.05 < 0.1: all negatives,
    hinges 0.15 + 0.10 + 0 = 0.25 (Triplet-HN alone: 0.15). Gap 0.15: the hardest only, 0.05 (SH: 0.07)."""
    pos = torch.tensor([[True, False, False, False]])
    close = torch.tensor([[0.5, 0.45, 0.4, 0.0]], dtype=torch.float64)
    far = torch.tensor([[0.5, 0.35, 0.32, 0.0]], dtype=torch.float64)
    assert SelHN().rows(close, pos).item() == pytest.approx(0.25)
    assert SelHN().rows(far, pos).item() == pytest.approx(0.05)


DEGENERATE = {
    "1x1": (torch.Size([1, 1]), None),
    "1 image x 5 captions": (torch.Size([1, 5]), torch.ones(1, 5, dtype=torch.bool)),
    "5 captions x 1 image": (torch.Size([5, 1]), torch.ones(5, 1, dtype=torch.bool)),
    "2x2": (torch.Size([2, 2]), None),
}


@pytest.mark.parametrize("batch", list(DEGENERATE))
@pytest.mark.parametrize("name", list(LOSSES))
def test_degenerate_batches_give_finite_loss_and_gradient(name, batch):
    """A last batch of one image (with one caption or several) must not poison training with NaN."""
    shape, pos = DEGENERATE[batch]
    g = torch.Generator().manual_seed(0)
    sim = (torch.rand(shape, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_(True)
    rel = torch.rand(shape, generator=g, dtype=torch.float64)
    loss_fn = LOSSES[name]()
    loss = loss_fn(sim, rel, pos) if loss_fn.needs_relevance else loss_fn(sim, pos)
    loss.backward()
    assert torch.isfinite(loss), (name, batch, loss)
    assert sim.grad is not None and torch.isfinite(sim.grad).all(), (name, batch, sim.grad)
    if batch == "1x1":  # nothing to rank against: every objective is exactly 0
        assert loss.item() == 0.0, (name, loss)


def test_rsc_grades():
    rel = torch.tensor([[0.34, 0.81, 0.05]])
    pos = torch.tensor([[False, False, True]])
    assert rsc_relevance(rel, pos)[0].tolist() == pytest.approx([0.34, 0.81, 1.0])  # continuous (authors)
    assert rsc_relevance(rel, pos, levels=4)[0].tolist() == pytest.approx([0.25, 0.75, 1.0])
    assert ListwiseLoss().levels is None and ListwiseLoss.label_kind == "rsc"
    assert BCLS.label_kind == KendallRankLoss.label_kind == "bcls"
