"""Loader for the public per-video feature format of text-video retrieval (MSR-VTT, Dual Encoding).

A data folder holds:

- ``features/{video_id}.npy``: one array per video, ``(F, D)`` frame features (e.g. ResNet-152 or
  CLIP per frame) or ``(F, K, D)`` region features (K regions per frame, as ViSERN uses); the
  number of frames F varies between videos, the trailing dims must not;
- ``captions.json``: either one JSON object ``{video_id: [caption, ...]}``, or JSON Lines
  ``{"video_id": ..., "caption": ...}`` (one caption per line, the MSR-VTT ``sentences`` records),
  or a JSON list of those records (``captions.jsonl`` is read the same way);
- optionally ``{split}.txt``: the video ids of a split, one per line. Without it, a folder with no
  split lists at all is one split holding every captioned video, in caption-file order.

Released folders store features in other containers too (Dual Encoding's BigFile, HDF5); convert
them to one ``.npy`` per video first. Captions are lower-cased and stripped, as in ``precomputed``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from xmr.models.errors import InputError

CAPTION_FILES = ("captions.json", "captions.jsonl")


@dataclass
class VideoFeatureSplit:
    """One split of a video-caption dataset as variable-length feature arrays; ``captions[i]``
    describes ``features[i]``. Videos may have different numbers of captions."""

    name: str  # the data folder's name, e.g. "msrvtt"
    split: str
    video_ids: list[str]
    features: list[np.ndarray]  # N float32 arrays, (F_i, D) or (F_i, K, D), same trailing dims
    captions: list[list[str]]

    def __len__(self) -> int:
        return len(self.video_ids)

    def flat_captions(self) -> list[str]:
        """All captions, video by video (caption ``j`` of video ``i`` at ``i * cpv + j`` when every
        video has ``cpv`` captions)."""
        return [c for caps in self.captions for c in caps]

    def caption_video_index(self) -> np.ndarray:
        """(n_captions,) int64: the video index each flat caption describes."""
        counts = [len(caps) for caps in self.captions]
        return np.repeat(np.arange(len(self.captions), dtype=np.int64), counts)

    def padded(self, max_frames: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """``(N, T, ...)`` float32 features and ``(N, T)`` bool mask (True = a real frame).

        ``T`` is ``max_frames``, or the longest video if None; longer videos are sampled uniformly
        down to ``T`` frames, shorter ones zero-padded at the end."""
        if max_frames is not None and max_frames < 1:
            raise InputError(f"max_frames is {max_frames}; expected at least 1 (or None for the longest)")
        t = max_frames or max((len(f) for f in self.features), default=1)
        trailing = self.features[0].shape[1:] if self.features else ()
        out = np.zeros((len(self.features), t, *trailing), dtype=np.float32)
        mask = np.zeros((len(self.features), t), dtype=bool)
        for i, f in enumerate(self.features):
            f = sample_frames(f, t)
            out[i, : len(f)] = f
            mask[i, : len(f)] = True
        return out, mask


def sample_frames(features: np.ndarray, max_frames: int) -> np.ndarray:
    """At most ``max_frames`` frames, evenly spaced from first to last (all of them if fewer)."""
    n = len(features)
    if n <= max_frames:
        return features
    return features[np.linspace(0, n - 1, max_frames).round().astype(np.int64)]


# ----------------------------------------------------------------------------- files


def _read_json_captions(path: Path) -> dict[str, list[str]]:
    """``{video_id: [captions]}`` in file order, from any of the three caption layouts."""
    text = path.read_text(encoding="utf-8")
    try:
        data = json.loads(text)
    except json.JSONDecodeError as doc_error:  # not one JSON document: JSON Lines?
        try:
            data = [json.loads(line) for line in text.splitlines() if line.strip()]
        except json.JSONDecodeError as e:
            raise InputError(
                f"{path} is neither JSON ({doc_error.msg} at line {doc_error.lineno}) nor JSON Lines "
                f'({e.msg}); expected {{video_id: [captions]}} or one {{"video_id", "caption"}} per line'
            ) from e
    if isinstance(data, dict) and isinstance(data.get("caption"), str):  # a one-line JSON Lines file
        data = [data]
    captions: dict[str, list[str]] = {}
    if isinstance(data, dict):  # {video_id: [captions]}
        for vid, caps in data.items():
            if not isinstance(caps, list) or not all(isinstance(c, str) for c in caps):
                raise InputError(f"{path}: captions of video {vid!r} are not a list of strings")
            captions[vid] = [_clean(c) for c in caps]
        return captions
    records = data if isinstance(data, list) else [data]
    for n, rec in enumerate(records, start=1):
        if not (
            isinstance(rec, dict)
            and isinstance(rec.get("video_id"), str)
            and isinstance(rec.get("caption"), str)
        ):
            raise InputError(
                f'{path} record {n} is {str(rec)[:80]!r}; expected {{"video_id": str, "caption": str}}'
            )
        captions.setdefault(rec["video_id"], []).append(_clean(rec["caption"]))
    return captions


def _clean(caption: str) -> str:
    return " ".join(caption.lower().split())


def _split_ids(root: Path, split: str, captions: dict[str, list[str]]) -> list[str]:
    if not split or "/" in split or "\\" in split:
        raise InputError(f"split {split!r} is not a plain name; expected e.g. 'train', 'val' or 'test'")
    path = root / f"{split}.txt"
    if path.is_file():
        return [line.strip() for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    others = sorted(p.name for p in root.glob("*.txt"))
    if others:
        raise InputError(f"missing {path}; {root} has split lists {others}")
    return list(captions)


def _read_features(root: Path, vid: str) -> np.ndarray:
    if not vid or "/" in vid or "\\" in vid or vid.startswith("."):
        raise InputError(f"video id {vid!r} is not a plain file name")
    path = root / "features" / f"{vid}.npy"
    if not path.is_file():
        raise InputError(f"missing features for video {vid!r}: {path} does not exist")
    try:
        f = np.load(path, allow_pickle=False)
    except ValueError as e:
        raise InputError(f"{path} is not a plain numpy array file ({e}); expected (F, D) features") from e
    if f.ndim not in (2, 3) or len(f) == 0:
        raise InputError(
            f"{path} (video {vid!r}) has shape {f.shape}; expected (F, D) frame or (F, K, D) region "
            "features with F >= 1"
        )
    return np.asarray(f, dtype=np.float32)


def load_video_features(root: str | Path, split: str, max_frames: int | None = None) -> VideoFeatureSplit:
    """Load ``split`` of the per-video feature folder ``root``; ``max_frames`` samples each video
    uniformly down to at most that many frames at load time (keeps memory bounded)."""
    root = Path(root)
    if not root.is_dir():
        raise InputError(
            f"video feature folder {root} does not exist; "
            "expected features/{video_id}.npy and captions.json in it"
        )
    if max_frames is not None and max_frames < 1:
        raise InputError(f"max_frames is {max_frames}; expected at least 1 (or None for all frames)")
    caption_path = next((root / n for n in CAPTION_FILES if (root / n).is_file()), None)
    if caption_path is None:
        raise InputError(f"missing {root / CAPTION_FILES[0]}; expected the captions of every video there")
    captions = _read_json_captions(caption_path)
    ids = _split_ids(root, split, captions)
    if not ids:
        raise InputError(f"split {split!r} of {root} lists no videos")
    features, grouped = [], []
    for vid in ids:
        caps = captions.get(vid, [])
        if not caps or not all(caps):
            raise InputError(f"video {vid!r} has no (or an empty) caption in {caption_path}")
        f = _read_features(root, vid)
        if features and f.shape[1:] != features[0].shape[1:]:
            want = ", ".join(["F", *map(str, features[0].shape[1:])])
            raise InputError(
                f"features of video {vid!r} have shape {f.shape}; expected ({want}) like video {ids[0]!r}"
            )
        features.append(f if max_frames is None else sample_frames(f, max_frames))
        grouped.append(caps)
    return VideoFeatureSplit(name=root.name, split=split, video_ids=ids, features=features, captions=grouped)
