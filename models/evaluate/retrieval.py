"""Retrieval metrics from a similarity matrix: Recall@K both directions, rSum, median/mean rank.

Image-caption convention (VSE family): `sim` is (N_img, N_cap); `cap_to_img[j]` is the image caption j
describes. Image->text counts the best-ranked of an image's captions; text->image the rank of the caption's
image. Ranks are 1-based and ties are broken optimistically (only strictly higher scores rank above).
"""

from __future__ import annotations

import numpy as np

KS = (1, 5, 10)


def t2i_ranks(sim: np.ndarray, cap_to_img: np.ndarray) -> np.ndarray:
    """(N_cap,) 1-based rank of each caption's image among all images."""
    scores = sim.T  # (N_cap, N_img)
    true = scores[np.arange(len(cap_to_img)), cap_to_img][:, None]
    return (scores > true).sum(axis=1) + 1


def i2t_ranks(sim: np.ndarray, cap_to_img: np.ndarray) -> np.ndarray:
    """(N_img,) 1-based rank of the best-ranked caption of each image among all captions."""
    n_img = sim.shape[0]
    own = cap_to_img[None, :] == np.arange(n_img)[:, None]  # (N_img, N_cap)
    best_own = np.where(own, sim, -np.inf).max(axis=1, keepdims=True)
    return (np.where(own, -np.inf, sim) > best_own).sum(axis=1) + 1


def recall_from_ranks(ranks: np.ndarray, ks=KS) -> dict[str, float]:
    return {f"R@{k}": float(100.0 * (ranks <= k).mean()) for k in ks}


def retrieval_metrics(sim: np.ndarray, cap_to_img: np.ndarray, ks=KS) -> dict[str, float]:
    """{'i2t_R@1': ..., 't2i_R@1': ..., 'rsum': ..., 'i2t_medr': ..., 't2i_medr': ...} in percent."""
    sim = np.asarray(sim, dtype=np.float64)
    cap_to_img = np.asarray(cap_to_img)
    if sim.shape != (sim.shape[0], len(cap_to_img)):
        raise ValueError(f"sim is {sim.shape}; expected (N_img, {len(cap_to_img)}) to match cap_to_img")
    out: dict[str, float] = {}
    for direction, ranks in (("i2t", i2t_ranks(sim, cap_to_img)), ("t2i", t2i_ranks(sim, cap_to_img))):
        out.update({f"{direction}_{k}": v for k, v in recall_from_ranks(ranks, ks).items()})
        out[f"{direction}_medr"] = float(np.median(ranks))
        out[f"{direction}_meanr"] = float(ranks.mean())
    out["rsum"] = sum(v for k, v in out.items() if "_R@" in k)
    return out


def t2i_metrics_from_topk(topk_ids: np.ndarray, cap_to_img: np.ndarray, ks=KS) -> dict[str, float]:
    """Text->image Recall@K from returned top-k image ids (N_cap, k), as a served search gives them."""
    hits = topk_ids == np.asarray(cap_to_img)[:, None]
    ranks = np.where(hits.any(axis=1), hits.argmax(axis=1) + 1, topk_ids.shape[1] + 1)
    return {
        f"t2i_{k}": v for k, v in recall_from_ranks(ranks, [k for k in ks if k <= topk_ids.shape[1]]).items()
    }
