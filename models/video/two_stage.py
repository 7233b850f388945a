"""ProTA as a two-stage retriever: a FAISS first stage over global video embeddings, then the pair scorer.

The paper's token-level score costs one pair-scorer call per (query, video): fine for re-ranking, too slow
for a whole gallery at scale. So a query is answered in two stages:
1. first stage: the query's global text embedding against an inner-product index of the gallery's global
   video embeddings (`GalleryIndex`, exact `flat` or `hnsw`) -> a shortlist of S video ids;
2. re-rank: one `pair_scorer` call scores the query's token Gaussians against the S videos' -> the top k
   of the shortlist by the token-level score (`merge`).
`exhaustive_search` scores every gallery video with the pair scorer (today's `video_similarity`), the
reference a shortlist can at best match.

Everything here is numpy and works on any backend through the `Run` callable of export/scoring.py
(`run(graph, feeds) -> outputs`, graphs `text_encoder`, `video_encoder`, `pair_scorer`): PyTorch
(`TorchRunner`s), the exported ONNX graphs (`OnnxRunner`s), or Triton models called from a BLS python model
(export/bls_rerank.py). The first stage is a `FirstStage` callable too, so a served model can call a
`gallery_topk` model instead of holding an index. No torch import: a served model starts fast.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from xmr.models.errors import InputError

if TYPE_CHECKING:
    from xmr.export.scoring import Run

# (B, D) float32 query embeddings, k -> ids (B, k) int64, scores (B, k) float32, best first (FAISS pads with
# id -1 when the gallery holds fewer than k)
FirstStage = Callable[[np.ndarray, int], tuple[np.ndarray, np.ndarray]]


@dataclass
class Query:
    """One query's text-encoder outputs, padding cut off."""

    embedding: np.ndarray  # (D,) unit vector: the first stage's query
    mu: np.ndarray  # (1, n, D)
    sigma: np.ndarray  # (1, n, D)

    @property
    def length(self) -> np.ndarray:
        return np.array([self.mu.shape[1]], np.int64)


def encode_queries(run: Run, input_ids: np.ndarray, lengths: np.ndarray) -> list[Query]:
    """`text_encoder` on a batch of token ids (B, T) int64 and lengths (B,) int64 -> one `Query` per row."""
    out = run("text_encoder", {"input_ids": input_ids, "lengths": lengths})
    return [
        Query(out["text_embedding"][i], out["text_mu"][i : i + 1, :n], out["text_sigma"][i : i + 1, :n])
        for i, n in enumerate(np.asarray(lengths).reshape(-1).tolist())
    ]


@dataclass
class VideoGallery:
    """What both stages need of the gallery: global embeddings (N, D) for the index; token Gaussians
    mu, sigma (N, M, D) and the frame mask (N, M) for the pair scorer; the ids (N,) both return."""

    embedding: np.ndarray
    mu: np.ndarray
    sigma: np.ndarray
    mask: np.ndarray
    ids: np.ndarray | None = None  # default: 0..N-1

    def __post_init__(self):
        n = len(self.embedding)
        self.ids = np.arange(n, dtype=np.int64) if self.ids is None else np.asarray(self.ids, np.int64)
        self.mask = np.asarray(self.mask, dtype=bool)
        shapes = (self.mu.shape[:2], self.sigma.shape[:2], self.mask.shape, self.ids.shape)
        if len(set(shapes[:3])) != 1 or shapes[0][0] != n or shapes[3] != (n,):
            raise InputError(
                f"gallery arrays disagree: embedding {self.embedding.shape}, mu {self.mu.shape}, "
                f"sigma {self.sigma.shape}, mask {self.mask.shape}, ids {self.ids.shape}"
            )
        self._order = np.argsort(self.ids, kind="stable")
        if len(np.unique(self.ids)) != n:
            raise InputError("gallery ids are not unique")

    def __len__(self) -> int:
        return len(self.ids)

    @classmethod
    def encode(
        cls,
        run: Run,
        batches: Iterable[tuple[np.ndarray, np.ndarray]],
        ids: np.ndarray | None = None,
    ) -> VideoGallery:
        """`video_encoder` on (frames (B, M, F) float32, frame_mask (B, M) bool) batches of one M."""
        outs, masks = [], []
        for frames, mask in batches:
            outs.append(run("video_encoder", {"frames": frames, "frame_mask": mask}))
            masks.append(mask)
        cat = {k: np.concatenate([o[k] for o in outs]) for k in outs[0]}
        return cls(cat["video_embedding"], cat["video_mu"], cat["video_sigma"], np.concatenate(masks), ids)

    def rows(self, ids: np.ndarray) -> np.ndarray:
        """Row of each gallery id; InputError on an id the gallery does not hold."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        pos = np.searchsorted(self.ids, ids, sorter=self._order)
        pos = np.minimum(pos, len(self) - 1)
        rows = self._order[pos]
        if not np.array_equal(self.ids[rows], ids):
            raise InputError(
                f"ids {sorted(set(ids.tolist()) - set(self.ids.tolist()))} are not in the gallery"
            )
        return rows

    def pair_feeds(self, query: Query, rows: np.ndarray) -> dict[str, np.ndarray]:
        """The pair scorer's inputs for one query against gallery `rows`; frames past the longest valid
        video of `rows` are cut (the mask makes them invisible, so the scores do not change)."""
        mask = self.mask[rows]
        valid = mask.any(axis=0)
        m = int(np.flatnonzero(valid)[-1]) + 1 if valid.any() else 1
        return {
            "text_mu": np.ascontiguousarray(query.mu, np.float32),
            "text_sigma": np.ascontiguousarray(query.sigma, np.float32),
            "lengths": query.length,
            "video_mu": np.ascontiguousarray(self.mu[rows, :m], np.float32),
            "video_sigma": np.ascontiguousarray(self.sigma[rows, :m], np.float32),
            "frame_mask": np.ascontiguousarray(mask[:, :m]),
        }


def faiss_first_stage(gallery: VideoGallery, kind: str = "flat") -> FirstStage:
    """An in-process FAISS index of the gallery's global embeddings (export/runtime.py's `GalleryIndex`)."""
    from xmr.export.runtime import GalleryIndex

    index = GalleryIndex(gallery.embedding, gallery.ids, kind=kind, max_k=len(gallery))
    return index.search


def shortlist(first_stage: FirstStage, query: Query, size: int) -> tuple[np.ndarray, np.ndarray]:
    """The first stage's top `size` (ids (S,), scores (S,)), best first; FAISS's -1 padding dropped."""
    if size < 1:
        raise InputError(f"shortlist size is {size}; expected >= 1")
    ids, scores = first_stage(query.embedding[None].astype(np.float32), size)
    keep = ids[0] >= 0
    return ids[0][keep], scores[0][keep]


def merge(ids: np.ndarray, scores: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """The top `k` of a re-ranked shortlist by score, best first; ties keep the shortlist's (first-stage)
    order. Returns min(k, S) rows."""
    order = np.argsort(-np.asarray(scores, np.float32), kind="stable")[: max(int(k), 0)]
    return np.asarray(ids, np.int64)[order], np.asarray(scores, np.float32)[order]


def rerank(run: Run, gallery: VideoGallery, query: Query, ids: np.ndarray) -> np.ndarray:
    """Token-level scores (S,) of `query` against the gallery videos `ids`: one `pair_scorer` call."""
    if len(ids) == 0:
        return np.zeros(0, np.float32)
    return np.asarray(run("pair_scorer", gallery.pair_feeds(query, gallery.rows(ids)))["scores"]).reshape(-1)


def first_stage_search(first_stage: FirstStage, query: Query, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Stage 1 alone: the global-embedding top k."""
    return shortlist(first_stage, query, k)


def two_stage_search(
    run: Run,
    first_stage: FirstStage,
    gallery: VideoGallery,
    query: Query,
    k: int,
    shortlist_size: int,
    fuse: float = 0.0,
) -> tuple[np.ndarray, np.ndarray]:
    """Stage 1 shortlists `shortlist_size` videos, the pair scorer re-ranks them -> top min(k, S).
    `fuse` > 0 ranks by pair score + fuse * the first stage's cosine (0: the pair score alone)."""
    ids, first_scores = shortlist(first_stage, query, shortlist_size)
    return merge(ids, fused(rerank(run, gallery, query, ids), first_scores, fuse), k)


def fused(pair_scores: np.ndarray, first_scores: np.ndarray, fuse: float) -> np.ndarray:
    """The re-ranking score: the token-level pair score, plus `fuse` times the global cosine."""
    return pair_scores + np.float32(fuse) * first_scores if fuse else pair_scores


def exhaustive_search(
    run: Run, gallery: VideoGallery, query: Query, k: int, chunk: int = 1024, fuse: float = 0.0
) -> tuple[np.ndarray, np.ndarray]:
    """The pair scorer over the whole gallery (in chunks of `chunk` videos) -> top k; `fuse` as in
    `two_stage_search` (needs the gallery's global embeddings)."""
    scores = np.concatenate(
        [
            np.asarray(
                run("pair_scorer", gallery.pair_feeds(query, np.arange(i, min(i + chunk, len(gallery)))))[
                    "scores"
                ]
            ).reshape(-1)
            for i in range(0, len(gallery), chunk)
        ]
    )
    if fuse:
        scores = fused(scores, gallery.embedding @ query.embedding, fuse)
    return merge(gallery.ids, scores, k)


def recall_at(
    ranked: list[np.ndarray], truth: np.ndarray, ks: Iterable[int] = (1, 5, 10)
) -> dict[str, float]:
    """Text -> video Recall@K in %: the share of queries whose true video id is in their first K ids."""
    truth = np.asarray(truth).reshape(-1)
    if len(ranked) != len(truth):
        raise InputError(f"{len(ranked)} ranked lists for {len(truth)} queries")
    return {
        f"R@{k}": 100.0 * float(np.mean([t in r[:k] for r, t in zip(ranked, truth, strict=True)])) for k in ks
    }
