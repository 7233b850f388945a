import numpy as np
import pytest

from xmr.models.evaluate.retrieval import i2t_ranks, retrieval_metrics, t2i_metrics_from_topk, t2i_ranks


def test_ranks_by_hand():
    # 2 images, 2 captions each: captions 0,1 -> image 0; captions 2,3 -> image 1
    cap_to_img = np.array([0, 0, 1, 1])
    sim = np.array(
        [
            [0.9, 0.1, 0.5, 0.2],  # image 0: own captions score 0.9, 0.1; best own ranks 1st
            [0.3, 0.8, 0.4, 0.2],  # image 1: caption 1 (0.8) beats its own best (0.4) -> rank 2
        ]
    )
    assert i2t_ranks(sim, cap_to_img).tolist() == [1, 2]
    # caption 0: 0.9 vs 0.3 -> 1; caption 1: 0.1 vs 0.8 -> 2; caption 2: 0.4 vs 0.5 -> 2; caption 3: tie -> 1
    assert t2i_ranks(sim, cap_to_img).tolist() == [1, 2, 2, 1]
    m = retrieval_metrics(sim, cap_to_img, ks=(1,))
    assert m["i2t_R@1"] == 50.0 and m["t2i_R@1"] == 50.0 and m["rsum"] == 100.0


def test_topk_recall_matches_full_ranking():
    rng = np.random.default_rng(0)
    sim = rng.normal(size=(20, 100))
    cap_to_img = np.repeat(np.arange(20), 5)
    topk = np.argsort(-sim.T, axis=1)[:, :10]
    full = retrieval_metrics(sim, cap_to_img)
    from_topk = t2i_metrics_from_topk(topk, cap_to_img)
    for k in (1, 5, 10):
        assert from_topk[f"t2i_R@{k}"] == pytest.approx(full[f"t2i_R@{k}"])


def test_shape_mismatch_is_named():
    with pytest.raises(ValueError, match="expected \\(N_img, 3\\)"):
        retrieval_metrics(np.zeros((2, 4)), np.array([0, 1, 1]))
