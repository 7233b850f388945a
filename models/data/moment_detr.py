"""Loader for the public Moment-DETR / QVHighlights moment-retrieval format.

A split is a JSONL file, one query per line::

    {"qid": 2579, "query": "A girl and her mother cooked while talking.", "vid": "NUMBER_60_210.0_360.0",
     "duration": 150, "relevant_windows": [[26, 36]]}

plus a folder of per-video clip features ``{vid}.npy`` (T, D), one row per ``clip_len``-second clip
(QVHighlights: 2 s clips). Moment-DETR's own release stores ``{vid}.npz`` with a ``features`` array; that
is read when no ``.npy`` exists. Many queries share one video; their features are loaded once and shared.
The hidden-label test split has no ``relevant_windows``: such queries load with no windows.
Windows are in seconds and must satisfy 0 <= start < end <= duration.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xmr.models.errors import InputError


@dataclass
class MomentSplit:
    """One split: query ``i`` asks for moments of video ``vids[i]`` (features ``features[i]``)."""

    qids: list  # as in the file (int in QVHighlights)
    queries: list[str]
    vids: list[str]
    durations: np.ndarray  # (N,) float64 seconds
    windows: list[list[list[float]]]  # per query, [[start_s, end_s], ...] ground-truth moments
    features: list[np.ndarray]  # per query (T_i, D) float32; queries of one video share one array
    clip_len: float  # seconds per feature row

    def __len__(self) -> int:
        return len(self.qids)

    @property
    def dim(self) -> int:
        return self.features[0].shape[1] if self.features else 0

    def padded(self, max_clips: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(N, T, D) float32 zero-padded features and (N, T) bool mask (True = real clip).

        T = ``max_clips`` (longer videos are truncated) or, when None, the longest video.
        """
        longest = max((len(f) for f in self.features), default=0)
        T = longest if max_clips is None else max_clips
        if T < 1:
            raise InputError(f"max_clips is {max_clips}; expected None or >= 1")
        x = np.zeros((len(self), T, self.dim), dtype=np.float32)
        mask = np.zeros((len(self), T), dtype=bool)
        for i, f in enumerate(self.features):
            n = min(len(f), T)
            x[i, :n], mask[i, :n] = f[:n], True
        return x, mask

    def span_targets(self) -> list[np.ndarray]:
        """Per query (n_i, 2) float32 (center, width) windows / duration: the MomentLoss targets."""
        out = []
        for w, d in zip(self.windows, self.durations, strict=True):
            xx = np.asarray(w, dtype=np.float64).reshape(-1, 2) / d
            out.append(np.stack([xx.mean(1), xx[:, 1] - xx[:, 0]], axis=1).astype(np.float32))
        return out


def _parse_line(path: Path, lineno: int, line: str) -> dict:
    where = f"{path} line {lineno}"
    try:
        row = json.loads(line)
    except json.JSONDecodeError as e:
        raise InputError(f"{where} is not valid JSON ({e.msg}); expected one JSON object per line") from e
    if not isinstance(row, dict):
        raise InputError(f"{where} is a {type(row).__name__}; expected a JSON object")
    for key in ("qid", "query", "vid", "duration"):
        if key not in row:
            raise InputError(f"{where} has no {key!r}; expected qid, query, vid, duration, relevant_windows")
    if not isinstance(row["query"], str):
        raise InputError(f"{where}: query is {row['query']!r}; expected a string")
    vid = row["vid"]
    if not isinstance(vid, str) or not vid or "/" in vid or "\\" in vid or vid in (".", ".."):
        raise InputError(
            f"{where}: vid {vid!r} is not a plain file name; expected e.g. 'NUMBER_60_210.0_360.0'"
        )
    dur = row["duration"]
    if isinstance(dur, bool) or not isinstance(dur, int | float) or not math.isfinite(dur) or dur <= 0:
        raise InputError(f"{where}: duration {dur!r}; expected a positive number of seconds")
    windows = row.get("relevant_windows", [])
    if not isinstance(windows, list):
        raise InputError(f"{where}: relevant_windows {windows!r}; expected a list of [start, end] pairs")
    for w in windows:
        ok = isinstance(w, list) and len(w) == 2 and all(isinstance(v, int | float) for v in w)
        if not ok or not (0 <= w[0] < w[1] <= dur):
            raise InputError(
                f"{where}: relevant window {w!r}; expected [start, end] seconds with 0 <= start < end <= "
                f"duration ({dur})"
            )
    row["relevant_windows"] = [[float(s), float(e)] for s, e in windows]
    return row


def _read_features(feature_dir: Path, vid: str, max_clips: int | None) -> np.ndarray:
    npy, npz = feature_dir / f"{vid}.npy", feature_dir / f"{vid}.npz"
    if not npy.is_file() and not npz.is_file():
        raise InputError(f"missing features for video {vid!r}: no {npy} (or {npz.name})")
    try:
        if npy.is_file():
            arr = np.load(npy, allow_pickle=False)
        else:
            with np.load(npz, allow_pickle=False) as z:
                arr = z["features"] if "features" in z else None
    except (ValueError, OSError) as e:
        raise InputError(
            f"features of video {vid!r} in {feature_dir} are not a plain numpy array ({e})"
        ) from e
    if arr is None:
        raise InputError(f"{npz} has no array named 'features'; expected Moment-DETR's {{vid}}.npz layout")
    if not isinstance(arr, np.ndarray):
        raise InputError(f"{npy} holds several arrays; expected one (T, D) array")
    if arr.ndim != 2 or len(arr) == 0 or not np.issubdtype(arr.dtype, np.number):
        raise InputError(
            f"features of video {vid!r} have shape {arr.shape} {arr.dtype}; expected (T >= 1, D)"
        )
    arr = arr[:max_clips] if max_clips is not None else arr
    return np.ascontiguousarray(arr, dtype=np.float32)


def load_moment_split(
    jsonl_path: str | Path, feature_dir: str | Path, clip_len: float = 2.0, max_clips: int | None = None
) -> MomentSplit:
    """Read a Moment-DETR JSONL split and its ``{vid}.npy`` clip features (first ``max_clips`` rows)."""
    jsonl_path, feature_dir = Path(jsonl_path), Path(feature_dir)
    if not clip_len > 0:
        raise InputError(f"clip_len is {clip_len}; expected a positive number of seconds")
    if max_clips is not None and max_clips < 1:
        raise InputError(f"max_clips is {max_clips}; expected None or >= 1")
    if not jsonl_path.is_file():
        raise InputError(f"missing {jsonl_path}; expected a Moment-DETR JSONL split (one query per line)")
    if not feature_dir.is_dir():
        raise InputError(
            f"feature folder {feature_dir} does not exist; expected a folder of {{vid}}.npy files"
        )
    rows = []
    with jsonl_path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                rows.append(_parse_line(jsonl_path, lineno, line))
    if not rows:
        raise InputError(f"{jsonl_path} has no queries; expected one JSON object per line")

    cache: dict[str, np.ndarray] = {}
    for row in rows:
        vid = row["vid"]
        if vid not in cache:
            cache[vid] = _read_features(feature_dir, vid, max_clips)
    dims = {vid: a.shape[1] for vid, a in cache.items()}
    if len(set(dims.values())) > 1:
        first = next(iter(dims))
        odd = next(v for v, d in dims.items() if d != dims[first])
        raise InputError(
            f"features in {feature_dir} disagree on D: {first!r} has {dims[first]}, {odd!r} has {dims[odd]}; "
            "expected one feature size"
        )
    return MomentSplit(
        qids=[r["qid"] for r in rows],
        queries=[r["query"] for r in rows],
        vids=[r["vid"] for r in rows],
        durations=np.array([float(r["duration"]) for r in rows], dtype=np.float64),
        windows=[r["relevant_windows"] for r in rows],
        features=[cache[r["vid"]] for r in rows],
        clip_len=float(clip_len),
    )
