"""Moment retrieval: span algebra, matching, losses, decoding, QVHighlights metrics and the JSONL loader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.optimize import linear_sum_assignment

from xmr.models.data.moment_detr import load_moment_split
from xmr.models.errors import InputError
from xmr.models.evaluate.moment_metrics import moment_metrics, random_span_baseline
from xmr.models.moments.loss import MomentLoss, hungarian_match, saliency_hinge
from xmr.models.moments.postprocess import postprocess
from xmr.models.moments.spans import generalized_temporal_iou, span_cxw_to_xx, span_xx_to_cxw, temporal_iou

torch.set_num_threads(1)
T = torch.tensor


# --- span algebra ---------------------------------------------------------------------------------------


def test_span_conversions_round_trip_any_leading_dims():
    xx = torch.rand(3, 4, 2).sort(-1).values
    cxw = span_xx_to_cxw(xx)
    assert torch.allclose(span_cxw_to_xx(cxw), xx, atol=1e-6)
    assert torch.allclose(span_cxw_to_xx(T([0.5, 0.2])), T([0.4, 0.6]))


@pytest.mark.parametrize(
    "a, b, iou, giou",
    [
        ([0.0, 2.0], [0.0, 2.0], 1.0, 1.0),  # identical
        ([0.0, 2.0], [1.0, 3.0], 1 / 3, 1 / 3),  # overlap: hull == union
        ([0.0, 1.0], [2.0, 3.0], 0.0, -1 / 3),  # disjoint: gap 1 in hull 3
        ([0.0, 4.0], [1.0, 2.0], 1 / 4, 1 / 4),  # nested
    ],
)
def test_iou_and_giou_hand_cases(a, b, iou, giou):
    assert temporal_iou(T([a]), T([b])).item() == pytest.approx(iou)
    assert generalized_temporal_iou(T([a]), T([b])).item() == pytest.approx(giou)


def test_giou_shape_and_disjoint_is_negative():
    g = generalized_temporal_iou(T([[0.0, 1.0], [0.0, 0.5]]), T([[2.0, 3.0], [5.0, 9.0], [0.0, 1.0]]))
    assert g.shape == (2, 3)
    assert (g[:, :2] < 0).all() and g[0, 2] == 1
    with pytest.raises(InputError, match="a has shape"):
        temporal_iou(T([0.0, 1.0]), T([[0.0, 1.0]]))


# --- matching -------------------------------------------------------------------------------------------


def _hand_giou(p, q):
    (s1, e1), (s2, e2) = p, q
    inter = max(0.0, min(e1, e2) - max(s1, s2))
    union = (e1 - s1) + (e2 - s2) - inter
    hull = max(e1, e2) - min(s1, s2)
    return inter / union - (hull - union) / hull


def test_hungarian_equals_scipy_on_hand_cost():
    spans = T([[[0.2, 0.1], [0.5, 0.3], [0.8, 0.2]]])
    logits = T([[0.5, -1.0, 2.0]])
    tgt = T([[0.75, 0.25], [0.3, 0.2]])
    cost = np.zeros((3, 2))
    for i, (c, w) in enumerate(spans[0].tolist()):
        for j, (tc, tw) in enumerate(tgt.tolist()):
            l1 = abs(c - tc) + abs(w - tw)
            g = _hand_giou((c - w / 2, c + w / 2), (tc - tw / 2, tc + tw / 2))
            p = 1 / (1 + np.exp(-logits[0, i].item()))
            cost[i, j] = 10 * l1 - 1 * g - 4 * p
    rows, cols = linear_sum_assignment(cost)
    [(qi, ti)] = hungarian_match(spans, logits, [tgt])
    assert qi.tolist() == rows.tolist() and ti.tolist() == cols.tolist()
    assert qi.tolist() == [0, 2] and ti.tolist() == [1, 0]


def test_hungarian_recovers_permutation_and_handles_empty_targets():
    spans = T([[[0.1, 0.1], [0.4, 0.2], [0.7, 0.1], [0.9, 0.05]]])
    perm = [2, 0, 3, 1]
    [(qi, ti)] = hungarian_match(spans, torch.zeros(1, 4), [spans[0, perm]])
    assert [perm[t] for t in ti.tolist()] == qi.tolist()
    [(qi, ti)] = hungarian_match(spans, torch.zeros(1, 4), [torch.zeros(0, 2)])
    assert len(qi) == len(ti) == 0
    with pytest.raises(InputError, match="targets has 2 entries"):
        hungarian_match(spans, torch.zeros(1, 4), [spans[0], spans[0]])


# --- losses ---------------------------------------------------------------------------------------------


def test_moment_loss_finite_and_decreases_toward_targets():
    torch.manual_seed(0)
    targets = [T([[0.3, 0.2]]), T([[0.2, 0.1], [0.7, 0.3]])]
    start = torch.rand(2, 5, 2) * 0.5 + 0.25
    goal = torch.stack([t[torch.arange(5) % len(t)] for t in targets])  # every query aims at a target
    logits = torch.zeros(2, 5)
    loss_fn = MomentLoss()
    values = []
    for alpha in (0.0, 0.5, 1.0):
        spans = (start + alpha * (goal - start)).requires_grad_(True)
        loss, parts = loss_fn({"spans": spans, "logits": logits}, targets)
        loss.backward()
        assert torch.isfinite(loss) and torch.isfinite(spans.grad).all()
        assert set(parts) == {"span_l1", "giou", "cls", "saliency"}
        values.append(loss.item())
    assert values[0] > values[1] > values[2]
    assert parts["span_l1"] == pytest.approx(0.0, abs=1e-6) and parts["giou"] == pytest.approx(0.0, abs=1e-6)


def test_class_loss_downweights_no_object():
    # one query matched (target 1, weight 1), one unmatched (target 0, weight eos_coef); both logits 0
    out = {"spans": T([[[0.5, 0.2], [0.1, 0.1]]]), "logits": torch.zeros(1, 2)}
    _, parts = MomentLoss(eos_coef=0.1)(out, [T([[0.5, 0.2]])])
    assert parts["cls"].item() == pytest.approx((1.0 + 0.1) * np.log(2) / 2, rel=1e-5)
    _, focal = MomentLoss(class_loss="focal")(out, [T([[0.5, 0.2]])])
    assert focal["cls"].item() == pytest.approx(parts["cls"].item() * 0.25, rel=1e-5)  # (1 - 0.5)^2
    with pytest.raises(InputError, match="class_loss"):
        MomentLoss(class_loss="softmax")


def test_saliency_hinge_zero_when_positives_beat_negatives_by_margin():
    # 12 slots, 10 real clips; target [0.3, 0.7] normalised -> clips 3..6 (centres 0.35..0.65) positive
    mask = torch.zeros(1, 12, dtype=torch.bool)
    mask[0, :10] = True
    tgt = [T([[0.5, 0.4]])]
    sal = torch.full((1, 12), 0.7)
    sal[0, 3:7] = 1.0
    sal[0, 10:] = 50.0  # padding never counts
    assert saliency_hinge(sal, mask, tgt, margin=0.2).item() == 0.0
    sal[0, :3] = sal[0, 7:10] = 0.9  # every pair violates the margin by 0.1
    assert saliency_hinge(sal, mask, tgt, margin=0.2).item() == pytest.approx(0.1, abs=1e-6)
    out = {"spans": T([[[0.5, 0.4]]]), "logits": torch.zeros(1, 1), "saliency": sal, "clip_mask": mask}
    _, parts = MomentLoss()(out, tgt)
    assert parts["saliency"].item() == pytest.approx(0.1, abs=1e-6)


def test_saliency_hinge_short_span_still_has_a_positive():
    sal = torch.zeros(1, 10, requires_grad=True)
    loss = saliency_hinge(sal, torch.ones(1, 10, dtype=torch.bool), [T([[0.42, 0.01]])], margin=0.2)
    loss.backward()
    assert loss.item() == pytest.approx(0.2) and sal.grad[0, 4] < 0  # clip 4 holds the centre 0.42


# --- postprocess ----------------------------------------------------------------------------------------


def test_postprocess_converts_clips_sorts_and_nms():
    spans = np.array([[[0.5, 0.2], [0.95, 0.2], [0.5, 0.25]]])
    logits = np.array([[0.0, 2.0, 1.0]])
    sig = 1 / (1 + np.exp(-np.array([2.0, 1.0, 0.0])))
    [out] = postprocess(spans, logits, np.array([100.0]))
    np.testing.assert_allclose(out, [[85, 100, sig[0]], [37.5, 62.5, sig[1]], [40, 60, sig[2]]], atol=1e-9)
    [nms] = postprocess(spans, logits, [100.0], nms_iou=0.5)  # [40, 60] vs [37.5, 62.5]: IoU 0.8
    np.testing.assert_allclose(nms[:, :2], [[85, 100], [37.5, 62.5]])
    [top] = postprocess(torch.tensor(spans), torch.tensor(logits), torch.tensor([100.0]), top_k=1)
    np.testing.assert_allclose(top, out[:1])
    [neg] = postprocess([[[-0.5, 0.2], [0.3, -0.1]]], [[0.0, 0.0]], [10.0])
    np.testing.assert_allclose(neg[:, :2], [[0, 0], [3, 3]])  # wholly before 0 -> [0, 0]; width < 0 -> 0
    with pytest.raises(InputError, match="durations"):
        postprocess(spans, logits, [0.0])
    with pytest.raises(InputError, match="logits has shape"):
        postprocess(spans, logits[:, :2], [1.0])


# --- metrics --------------------------------------------------------------------------------------------


def test_metrics_perfect_predictions_score_100():
    gt = [[[0, 10]], [[20, 30], [50, 60]]]
    preds = [np.array([[0, 10, 0.9]]), np.array([[50, 60, 0.9], [20, 30, 0.8]])]
    m = moment_metrics(preds, gt)
    assert m == pytest.approx({k: 100.0 for k in ("R1@0.5", "R1@0.7", "mAP@0.5", "mAP@0.75", "mAP", "mIoU")})


def test_metrics_r1_boundary_and_miou():
    gt = [[[0, 20]]]
    m = moment_metrics([np.array([[0, 10, 1.0]])], gt)  # IoU exactly 0.5 counts (>=)
    assert m["R1@0.5"] == 100 and m["R1@0.7"] == 0 and m["mIoU"] == pytest.approx(50)
    assert moment_metrics([np.array([[0, 9.99, 1.0]])], gt)["R1@0.5"] == 0
    half = moment_metrics([np.array([[5, 15, 1.0]])], [[[0, 10]]])  # half the span overlaps: IoU 1/3
    assert half["R1@0.5"] == 0 and half["mIoU"] == pytest.approx(100 / 3)
    # mIoU averages queries' top-1 best IoU: 0.5 and 1.0; top-1 is the highest score, not the first row
    two = moment_metrics([np.array([[0, 5, 0.9]]), np.array([[90, 95, 0.1], [0, 10, 0.8]])], [[[0, 10]]] * 2)
    assert two["mIoU"] == pytest.approx(75) and two["R1@0.5"] == 100 and two["R1@0.7"] == 50


def test_metrics_ap_false_positive_first_and_each_gt_once():
    # rank 1 misses, rank 2 hits: precision [0, 1/2], recall [0, 1] -> AP 0.5 at every threshold
    m = moment_metrics([np.array([[20, 30, 0.9], [0, 10, 0.8]])], [[[0, 10]]])
    assert m["mAP@0.5"] == pytest.approx(50) and m["mAP"] == pytest.approx(50) and m["R1@0.5"] == 0
    # two identical predictions can take one GT window only once: recall 1/2 -> AP 0.5
    once = moment_metrics([np.array([[0, 10, 0.9], [0, 10, 0.8]])], [[[0, 10], [20, 30]]])
    assert once["mAP@0.5"] == pytest.approx(50)
    # IoU 0.8 counts at 0.5..0.8 (7 of 10 thresholds) -> mAP 70, mAP@0.75 100
    part = moment_metrics([np.array([[0, 8, 1.0]])], [[[0, 10]]])
    assert part["mAP@0.75"] == pytest.approx(100) and part["mAP"] == pytest.approx(70)
    # only the first 10 predictions count
    late = np.array([[50 + i, 51 + i, 1 - i / 100] for i in range(10)] + [[0, 10, 0.5]])
    assert moment_metrics([late], [[[0, 10]]])["mAP"] == 0
    assert moment_metrics([late], [[[0, 10]]], max_pred_windows=None)["mAP"] == pytest.approx(100 / 11)


def test_metrics_errors():
    with pytest.raises(InputError, match="predictions has 1 queries"):
        moment_metrics([np.zeros((1, 3))], [])
    with pytest.raises(InputError, match=r"ground_truth\[0\]"):
        moment_metrics([np.zeros((1, 3))], [[]])
    assert moment_metrics([np.zeros((0, 3))], [[[0, 1]]])["mAP"] == 0


def test_random_baseline_clearly_below_perfect():
    rng = np.random.default_rng(1)
    durations = np.full(60, 150.0)
    starts = rng.uniform(0, 130, size=60)
    gt = [[[s, s + rng.uniform(4, 20)]] for s in starts]
    perfect = moment_metrics([np.array([[*g[0], 1.0]]) for g in gt], gt)
    rand = random_span_baseline(durations, n_per_query=10, seed=0)
    assert all(
        r.shape == (10, 3) and (np.diff(r[:, 2]) <= 0).all() and (r[:, 0] <= r[:, 1]).all() for r in rand
    )
    assert all((r[:, :2] >= 0).all() and (r[:, :2] <= 150).all() for r in rand)
    m = moment_metrics(rand, gt)
    assert perfect["mAP"] == 100 and m["mAP"] < 15 and m["R1@0.5"] < 25 and m["mIoU"] < 30
    np.testing.assert_array_equal(rand[3], random_span_baseline(durations, 10, seed=0)[3])


# --- loader ---------------------------------------------------------------------------------------------


def _write_split(tmp_path, rows, feats=None):
    jsonl = tmp_path / "val.jsonl"
    jsonl.write_text("\n".join(r if isinstance(r, str) else json.dumps(r) for r in rows) + "\n")
    fdir = tmp_path / "feats"
    fdir.mkdir(exist_ok=True)
    for vid, arr in (feats or {}).items():
        np.save(fdir / f"{vid}.npy", arr)
    return jsonl, fdir


ROWS = [
    {"qid": 1, "query": "a dog runs", "vid": "v1", "duration": 20, "relevant_windows": [[2, 6], [10, 14]]},
    {"qid": 2, "query": "a cat sits", "vid": "v2", "duration": 8.0, "relevant_windows": [[0, 8]]},
    {"qid": 3, "query": "the dog stops", "vid": "v1", "duration": 20, "relevant_windows": [[16, 20]]},
]


def test_loader_reads_split_shares_features_and_pads(tmp_path):
    feats = {"v1": np.arange(30, dtype=np.float64).reshape(10, 3), "v2": np.ones((4, 3), np.float32)}
    jsonl, fdir = _write_split(tmp_path, ROWS[:2] + [""] + ROWS[2:], feats)  # blank lines are skipped
    s = load_moment_split(jsonl, fdir)
    assert len(s) == 3 and s.qids == [1, 2, 3] and s.vids == ["v1", "v2", "v1"] and s.clip_len == 2.0
    assert s.queries[1] == "a cat sits" and s.windows[0] == [[2.0, 6.0], [10.0, 14.0]] and s.dim == 3
    np.testing.assert_array_equal(s.durations, [20, 8, 20])
    assert s.features[0] is s.features[2] and s.features[0].dtype == np.float32
    x, mask = s.padded()
    assert x.shape == (3, 10, 3) and x.dtype == np.float32 and mask.sum(1).tolist() == [10, 4, 10]
    assert not x[1, 4:].any()
    x6, m6 = s.padded(6)
    assert x6.shape == (3, 6, 3) and m6.sum(1).tolist() == [6, 4, 6]
    np.testing.assert_allclose(s.span_targets()[0], [[0.2, 0.2], [0.6, 0.2]])
    assert len(load_moment_split(jsonl, fdir, max_clips=5).features[0]) == 5


def test_loader_reads_moment_detr_npz_and_hidden_test_split(tmp_path):
    jsonl, fdir = _write_split(tmp_path, [{"qid": 7, "query": "q", "vid": "v9", "duration": 10}])
    np.savez(fdir / "v9.npz", features=np.zeros((5, 4), np.float32))
    s = load_moment_split(jsonl, fdir)
    assert s.features[0].shape == (5, 4) and s.windows == [[]]


@pytest.mark.parametrize(
    "rows, match",
    [
        ([ROWS[0], '{"qid": 2, "query": '], r"line 2 is not valid JSON"),
        ([{k: v for k, v in ROWS[0].items() if k != "vid"}], "has no 'vid'"),
        ([{**ROWS[0], "relevant_windows": [[2, 25]]}], r"relevant window \[2, 25\]"),
        ([{**ROWS[0], "relevant_windows": [[-1, 5]]}], "relevant window"),
        ([{**ROWS[0], "relevant_windows": [[6, 6]]}], r"0 <= start < end <= duration \(20\)"),
        ([{**ROWS[0], "duration": 0}], "duration 0"),
        ([{**ROWS[0], "vid": "../v1"}], "not a plain file name"),
        ([ROWS[0], {**ROWS[1], "vid": "nope"}], "missing features for video 'nope'"),
    ],
)
def test_loader_errors(tmp_path, rows, match):
    jsonl, fdir = _write_split(tmp_path, rows, {"v1": np.zeros((10, 3)), "v2": np.zeros((4, 3))})
    with pytest.raises(InputError, match=match):
        load_moment_split(jsonl, fdir)


def test_loader_file_and_feature_errors(tmp_path):
    jsonl, fdir = _write_split(tmp_path, ROWS, {"v1": np.zeros((10, 3)), "v2": np.zeros((4, 5))})
    with pytest.raises(InputError, match="disagree on D: 'v1' has 3, 'v2' has 5"):
        load_moment_split(jsonl, fdir)
    with pytest.raises(InputError, match="missing .*nope.jsonl"):
        load_moment_split(tmp_path / "nope.jsonl", fdir)
    with pytest.raises(InputError, match="does not exist"):
        load_moment_split(jsonl, tmp_path / "nofeats")
    np.save(fdir / "v2.npy", np.zeros(4))
    with pytest.raises(InputError, match=r"video 'v2'.*expected \(T >= 1, D\)"):
        load_moment_split(jsonl, fdir)
    np.save(fdir / "v2.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="not a plain numpy array"):
        load_moment_split(jsonl, fdir)
    with pytest.raises(InputError, match="clip_len"):
        load_moment_split(jsonl, fdir, clip_len=0)
