"""What runs inside the served models, as plain importable functions and classes.

The python-backend `model.py` files in `model_repository/` are thin adapters around this module: they build
these objects once in `initialize` and call them in `execute`. Everything here is numpy + onnxruntime + faiss
(no torch), so a served model starts fast, and everything is unit-tested without a server.

Bad input raises `InputError` with a message naming the input; the adapters turn it into a per-request
`TritonError`, so one bad request never fails the others in its batch nor the server.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np

# OnnxRunner lives with the other runners; the served models import it from here
from xmr.export.runners import OnnxRunner, check_finite  # noqa: F401
from xmr.models.errors import InputError


def decode_texts(arr: np.ndarray, name: str = "text") -> list[str]:
    """A Triton BYTES tensor (B, 1) of UTF-8 -> B strings."""
    texts = []
    for i, item in enumerate(np.asarray(arr, dtype=object).reshape(-1)):
        if isinstance(item, bytes):
            try:
                item = item.decode("utf-8")
            except UnicodeDecodeError as e:
                raise InputError(f"{name} {i} is not valid UTF-8 ({e.reason} at byte {e.start})") from e
        texts.append(str(item))
    return texts


def pad_concat(arrays: Sequence[np.ndarray], pad_value=0) -> np.ndarray:
    """Concatenate along the batch dim, right-padding every other dim to the largest size."""
    if len({a.shape[1:] for a in arrays}) == 1:
        return np.concatenate(arrays)
    target = np.max([a.shape[1:] for a in arrays], axis=0)
    padded = [
        np.pad(
            a,
            [(0, 0)] + [(0, int(t) - s) for t, s in zip(target, a.shape[1:], strict=True)],
            constant_values=pad_value,
        )
        for a in arrays
    ]
    return np.concatenate(padded)


def run_batched(
    requests: list[dict[str, np.ndarray]], fn: Callable[[dict[str, np.ndarray]], dict[str, np.ndarray]]
) -> list[dict[str, np.ndarray] | InputError]:
    """Concatenate the requests' inputs, call `fn` once, split the outputs back per request.

    If the batch fails with an InputError, each request is run alone so only the bad ones get the error.
    """
    if not requests:
        return []
    sizes = [len(next(iter(r.values()))) for r in requests]
    try:
        merged = {name: pad_concat([r[name] for r in requests]) for name in requests[0]}
        out = fn(merged)
    except InputError as e:
        if len(requests) == 1:
            return [e]
        return [item for r in requests for item in run_batched([r], fn)]
    bounds = np.cumsum([0, *sizes])
    return [{k: v[a:b] for k, v in out.items()} for a, b in zip(bounds[:-1], bounds[1:], strict=True)]


class GalleryIndex:
    """Top-k inner-product search over unit-norm gallery embeddings with FAISS.

    `kind="flat"` is exact (`IndexFlatIP`); "hnsw" trades exactness for speed on large galleries.
    """

    def __init__(
        self, embeddings: np.ndarray, ids: np.ndarray | None = None, kind: str = "flat", max_k: int = 1000
    ):
        import faiss

        embeddings = np.ascontiguousarray(embeddings, dtype=np.float32)
        if embeddings.ndim != 2 or len(embeddings) == 0:
            raise InputError(f"gallery embeddings have shape {embeddings.shape}; expected (N>0, D)")
        check_finite("gallery embeddings", embeddings)
        ids = np.arange(len(embeddings), dtype=np.int64) if ids is None else np.asarray(ids, dtype=np.int64)
        if ids.shape != (len(embeddings),):
            raise InputError(f"gallery ids have shape {ids.shape}; expected ({len(embeddings)},)")
        self.dim = embeddings.shape[1]
        if kind == "flat":
            base = faiss.IndexFlatIP(self.dim)
        elif kind == "hnsw":
            base = faiss.IndexHNSWFlat(self.dim, 32, faiss.METRIC_INNER_PRODUCT)
        else:
            raise InputError(f"unknown gallery index kind {kind!r}; valid: flat, hnsw")
        self.index = faiss.IndexIDMap(base)
        self.index.add_with_ids(embeddings, ids)
        self.max_k = min(max_k, len(embeddings))

    def __len__(self) -> int:
        return self.index.ntotal

    def check_k(self, k: int) -> int:
        if not 1 <= k <= self.max_k:
            raise InputError(f"top_k is {k}; expected 1 <= top_k <= {self.max_k} (gallery of {len(self)})")
        return int(k)

    def search(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """(B, D) float32 queries -> ids (B, k) int64, scores (B, k) float32, best first."""
        k = self.check_k(k)
        queries = np.ascontiguousarray(queries, dtype=np.float32)
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise InputError(f"query_embedding has shape {queries.shape}; expected (B, {self.dim})")
        check_finite("query_embedding", queries)
        scores, ids = self.index.search(queries, k)
        return ids.astype(np.int64), scores.astype(np.float32)

    def search_requests(self, requests: list[tuple[np.ndarray, np.ndarray]]) -> list[dict | InputError]:
        """Each request is (query_embedding (B, D), top_k (B,)) -> {"ids", "scores"} or its error.

        One FAISS call with the largest k of the batch; each request's answer is cut to its own k.
        """
        ks: list[int | InputError] = []
        for _, top_k in requests:
            values = np.unique(np.asarray(top_k).reshape(-1))
            try:
                if len(values) != 1:
                    raise InputError(
                        f"top_k differs across the rows of one request ({values.tolist()}); "
                        "expected one value per request"
                    )
                ks.append(self.check_k(int(values[0])))
            except InputError as e:
                ks.append(e)
        good = [i for i, k in enumerate(ks) if not isinstance(k, InputError)]
        results: list[dict | InputError] = [k if isinstance(k, InputError) else {} for k in ks]
        if not good:
            return results
        k_max = max(ks[i] for i in good)
        batch = run_batched(
            [{"q": requests[i][0]} for i in good],
            lambda f: dict(zip(("ids", "scores"), self.search(f["q"], k_max), strict=True)),
        )
        for i, out in zip(good, batch, strict=True):
            results[i] = out if isinstance(out, InputError) else {k: v[:, : ks[i]] for k, v in out.items()}
        return results


def one_top_k(top_k: np.ndarray, limit: int, what: str) -> int:
    """The one `top_k` value of a request (every row the same), checked to be in [1, limit]."""
    values = np.unique(np.asarray(top_k).reshape(-1))
    if len(values) != 1:
        raise InputError(
            f"top_k differs across the rows of one request ({values.tolist()}); "
            "expected one value per request"
        )
    k = int(values[0])
    if not 1 <= k <= limit:
        raise InputError(f"top_k is {k}; expected 1 <= top_k <= {limit} ({what})")
    return k


class ClipStore:
    """The clip features of a video gallery by video id: what `moment_search` runs CDNet on.

    Read from the moment export's `clip_features.npz` (`ids` (N,), `clips` (N, T, D), `clip_mask` (N, T),
    `durations` (N,) seconds, and `grid` (N, T, h, w, D) for a model sampling each clip's grid). Every
    video of the store has the same padded length T (the export's split), so a batch needs no padding.
    """

    def __init__(self, arrays: dict[str, np.ndarray]):
        missing = [k for k in ("ids", "clips", "clip_mask", "durations") if k not in arrays]
        if missing:
            raise InputError(f"the clip store has no {', '.join(missing)}")
        self.ids = np.asarray(arrays["ids"], dtype=np.int64)
        self.arrays = {k: v for k, v in arrays.items() if k != "ids"}
        n = len(self.ids)
        for k, v in self.arrays.items():
            if len(v) != n:
                raise InputError(f"clip store {k!r} has {len(v)} rows; expected {n} (one per video id)")
        self.row = {int(v): i for i, v in enumerate(self.ids)}
        if len(self.row) != n:
            raise InputError("the clip store's video ids are not unique")

    @classmethod
    def load(cls, path) -> ClipStore:
        with np.load(path, allow_pickle=False) as f:
            return cls({k: f[k] for k in f.files})

    def __len__(self) -> int:
        return len(self.ids)

    def lookup(self, video_ids: np.ndarray, names: Sequence[str]) -> dict[str, np.ndarray]:
        """The `names` arrays of the rows of `video_ids` (B,); InputError naming an unknown id."""
        rows = []
        for v in np.asarray(video_ids).reshape(-1):
            if int(v) not in self.row:
                raise InputError(
                    f"video_id {int(v)} is not in the clip store ({len(self)} videos, ids "
                    f"{int(self.ids.min())}..{int(self.ids.max())})"
                )
            rows.append(self.row[int(v)])
        missing = [k for k in names if k not in self.arrays]
        if missing:
            raise InputError(f"the clip store has no {', '.join(missing)}")
        return {k: np.ascontiguousarray(self.arrays[k][rows]) for k in names}


def moment_windows(
    spans: np.ndarray, logits: np.ndarray, durations: np.ndarray, top_k: int, nms_iou: float | None
) -> dict[str, np.ndarray]:
    """The moment head's outputs -> `moments` (B, k, 3) float32 [start_s, end_s, score], best first, and
    `counts` (B,): how many rows are real (NMS may keep fewer than k; the rest are zeros).

    The post-processing is `xmr.models.moments.postprocess`, the one evaluation and the export's parity use.
    """
    from xmr.models.moments.postprocess import postprocess

    windows = postprocess(spans, logits, durations, top_k=top_k, nms_iou=nms_iou)
    counts = np.array([len(w) for w in windows], dtype=np.int64)
    moments = np.zeros((len(windows), max(1, int(counts.max(initial=0))), 3), dtype=np.float32)
    for i, w in enumerate(windows):
        moments[i, : len(w)] = w
    return {"moments": moments, "counts": counts}
