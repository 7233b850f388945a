"""MovingShapes video generator (pixels agree with the metadata) and the per-video feature loader."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from xmr.models.data.moving_shapes import (
    COLOURS,
    MAX_WORDS,
    MomentQuery,
    MovingShapesConfig,
    VideoSplit,
    make_moving_shapes,
    sample_videos,
)
from xmr.models.data.video_features import load_video_features
from xmr.models.errors import InputError

SMALL = MovingShapesConfig(n_train=48, n_val=16, n_test=16)


@pytest.fixture(scope="module")
def train() -> VideoSplit:
    return make_moving_shapes("train", SMALL)


# ----------------------------------------------------------------------------- moving shapes


def test_moving_shapes_is_deterministic(train: VideoSplit) -> None:
    again = make_moving_shapes("train", SMALL)
    assert again.videos.tobytes() == train.videos.tobytes()
    assert (again.captions, again.queries, again.objects) == (train.captions, train.queries, train.objects)


def test_moving_shapes_splits_and_seeds_differ(train: VideoSplit) -> None:
    val = make_moving_shapes("val", SMALL)
    assert val.videos.tobytes() != train.videos[:16].tobytes()
    assert val.captions != train.captions[:16] and val.queries != train.queries[:16]
    other_seed = make_moving_shapes("train", MovingShapesConfig(n_train=48, seed=1))
    assert other_seed.captions != train.captions


def test_moving_shapes_shapes_and_dtypes(train: VideoSplit) -> None:
    assert train.videos.shape == (48, 32, 32, 32, 3) and train.videos.dtype == np.uint8
    assert (train.name, train.split, train.fps, train.duration) == ("moving_shapes", "train", 4.0, 8.0)
    assert len(train) == 48 and train.captions_per_video == 4
    assert all(len(caps) == 4 and len(set(caps)) > 1 for caps in train.captions)
    assert all(len(qs) == 2 and all(isinstance(q, MomentQuery) for q in qs) for qs in train.queries)
    cfg = MovingShapesConfig(image_size=24, n_frames=16, fps=2.0, n_test=3, captions_per_video=2)
    small = make_moving_shapes("test", cfg)
    assert small.videos.shape == (3, 16, 24, 24, 3) and small.captions_per_video == 2
    assert small.duration == 8.0


def test_flat_captions_and_index(train: VideoSplit) -> None:
    flat, index = train.flat_captions(), train.caption_video_index()
    assert len(flat) == len(index) == 48 * 4 and index.dtype == np.int64
    assert flat[6] == train.captions[1][2] and index[6] == 1


def test_every_video_has_an_event_and_a_variety_of_objects(train: VideoSplit) -> None:
    assert {len(objs) for objs in train.objects} == {1, 2, 3}
    assert all(any(o.event != "none" for o in objs) for objs in train.objects)
    kinds = {o.event for objs in train.objects for o in objs}
    assert kinds == {"none", "appear", "disappear", "recolour"}
    assert {o.motion for objs in train.objects for o in objs} == {"still", "left", "right", "up", "down"}
    for objs in train.objects:  # colours are unique per video, a changed colour included
        colours = [c for o in objs for c in (o.colour, o.new_colour) if c]
        assert len(colours) == len(set(colours))


def _pixels_of(frames: np.ndarray, colour: str) -> np.ndarray:
    """(F, H, W) bool: pixels within the +-15 jitter of ``colour``."""
    target = np.array(COLOURS[colour], dtype=np.int16)
    return (np.abs(frames.astype(np.int16) - target) <= 15).all(-1)


def test_pixels_follow_the_metadata(train: VideoSplit) -> None:
    f = np.arange(train.videos.shape[1])
    for video, objs in zip(train.videos, train.objects, strict=True):
        for o in objs:
            visible = (f >= o.start_frame) & (f < o.end_frame)
            old = _pixels_of(video, o.colour).reshape(len(f), -1).sum(1)
            new = _pixels_of(video, o.new_colour).reshape(len(f), -1).sum(1) if o.new_colour else 0 * old
            changed = f >= o.event_frame if o.event == "recolour" else np.zeros(len(f), bool)
            assert (old[visible & ~changed] > 0).all() and (old[~visible | changed] == 0).all(), o
            assert (new[visible & changed] > 0).all() and (new[~changed] == 0).all(), o
            if o.event == "disappear":
                assert old[o.event_frame :].sum() == 0 and old[o.event_frame - 1] > 0
            if o.event == "appear":
                assert old[: o.event_frame].sum() == 0 and old[o.event_frame] > 0
            # the painted centroid follows the trajectory, so "moves left" really goes left
            for t in f[visible][:: max(1, visible.sum() // 4)]:
                ys, xs = np.nonzero(_pixels_of(video[t], o.colour_at(t)))
                cx, cy = o.centre(t)
                tol = 1 + 0.3 * o.r  # a triangle's centroid sits 0.2 r below its centre
                assert abs(xs.mean() + 0.5 - cx) < tol and abs(ys.mean() + 0.5 - cy) < tol, (o, t)


def test_motion_goes_the_named_way(train: VideoSplit) -> None:
    sign = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}
    for o in (o for objs in train.objects for o in objs):
        (x0, y0), (x1, y1) = o.centre(o.move_start), o.centre(o.move_end)
        assert (np.sign(round(x1 - x0, 6)), np.sign(round(y1 - y0, 6))) == sign[o.motion], o
        if o.motion != "still":
            assert np.hypot(x1 - x0, y1 - y0) > 4  # a visible move, several pixels


def test_captions_name_every_object(train: VideoSplit) -> None:
    for objs, caps in zip(train.objects, train.captions, strict=True):
        for cap in caps:
            words = cap.split()
            for o in objs:
                assert o.colour in words and o.shape in words, (cap, o)
                if o.new_colour:
                    assert o.new_colour in words, (cap, o)
    vocab = {w for c in train.flat_captions() for w in c.split(" ")}
    assert "" not in vocab and all(w.isalpha() and w.islower() for w in vocab)
    assert max(len(c.split()) for c in train.flat_captions()) <= MAX_WORDS


def test_query_spans_are_inside_and_varied(train: VideoSplit) -> None:
    queries = [q for qs in train.queries for q in qs]
    starts, ends = np.array([q.start for q in queries]), np.array([q.end for q in queries])
    assert (0 <= starts).all() and (starts < ends).all() and (ends <= train.duration).all()
    lengths = ends - starts
    assert (lengths < train.duration).mean() > 0.9  # rarely the whole video
    assert lengths.std() > 1.0 and starts.std() > 1.0  # varied in length and position
    for objs, qs in zip(train.objects, train.queries, strict=True):
        colours = {c for o in objs for c in (o.colour, o.new_colour) if c}
        assert all(colours & set(q.text.split()) for q in qs), qs


def test_event_queries_bracket_the_event(train: VideoSplit) -> None:
    seen = 0
    for objs, qs in zip(train.objects, train.queries, strict=True):
        for q in qs:
            for o in objs:
                if o.event == "recolour" and q.text.endswith(f"{o.colour} {o.shape} turns {o.new_colour}"):
                    assert q.start < o.event_frame / train.fps < q.end and q.end - q.start <= 1.0
                    seen += 1
    assert seen > 0


def test_max_objects_one_gives_single_objects() -> None:
    videos = sample_videos("val", MovingShapesConfig(n_val=12, max_objects=1))
    assert {len(v) for v in videos} == {1}


def test_unknown_split_lists_valid_ones() -> None:
    with pytest.raises(InputError, match=r"unknown split 'dev'.*\['test', 'train', 'val'\]"):
        make_moving_shapes("dev", SMALL)


# ----------------------------------------------------------------------------- per-video features


def _folder(root: Path, frames: dict[str, int], dims: tuple[int, ...] = (3,)) -> dict[str, np.ndarray]:
    (root / "features").mkdir(parents=True, exist_ok=True)
    feats = {}
    for k, (vid, n) in enumerate(frames.items()):
        feats[vid] = np.arange(n * np.prod(dims), dtype=np.float64).reshape(n, *dims) + 100 * k
        np.save(root / "features" / f"{vid}.npy", feats[vid])
    return feats


def test_video_features_json_object_and_split_file(tmp_path: Path) -> None:
    feats = _folder(tmp_path, {"v1": 5, "v2": 2, "v3": 3})
    caps = {"v1": ["A Dog  Runs", "a cat"], "v2": ["x"], "v3": ["y", "z", "w"]}
    (tmp_path / "captions.json").write_text(json.dumps(caps))
    (tmp_path / "test.txt").write_text("v3\nv1\n\n")
    split = load_video_features(tmp_path, "test")
    assert (split.name, split.split, split.video_ids) == (tmp_path.name, "test", ["v3", "v1"])
    assert split.captions == [["y", "z", "w"], ["a dog runs", "a cat"]]
    assert split.flat_captions() == ["y", "z", "w", "a dog runs", "a cat"]
    np.testing.assert_array_equal(split.caption_video_index(), [0, 0, 0, 1, 1])
    assert split.features[1].dtype == np.float32
    np.testing.assert_array_equal(split.features[1], feats["v1"])

    x, mask = split.padded()  # T = longest video
    assert x.shape == (2, 5, 3) and x.dtype == np.float32 and mask.dtype == bool
    np.testing.assert_array_equal(mask, [[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]])
    np.testing.assert_array_equal(x[0, :3], feats["v3"])
    np.testing.assert_array_equal(x[0, 3:], 0)
    x, mask = split.padded(max_frames=3)  # v1's 5 frames sampled uniformly: 0, 2, 4
    assert x.shape == (2, 3, 3) and mask.all()
    np.testing.assert_array_equal(x[1], feats["v1"][[0, 2, 4]])


def test_video_features_jsonl_regions_without_split_file(tmp_path: Path) -> None:
    feats = _folder(tmp_path, {"b": 4, "a": 7}, dims=(2, 3))  # (F, K, D) region features
    lines = [{"video_id": "b", "caption": "first"}, {"video_id": "a", "caption": "second"}]
    lines.append({"video_id": "b", "caption": "third"})
    (tmp_path / "captions.json").write_text("\n".join(json.dumps(r) for r in lines) + "\n")
    split = load_video_features(tmp_path, "train", max_frames=4)  # no split lists: every video
    assert split.video_ids == ["b", "a"] and split.captions == [["first", "third"], ["second"]]
    assert [f.shape for f in split.features] == [(4, 2, 3), (4, 2, 3)]
    np.testing.assert_array_equal(split.features[1], feats["a"][[0, 2, 4, 6]])
    x, mask = split.padded(6)
    assert x.shape == (2, 6, 2, 3) and mask.sum(1).tolist() == [4, 4]


def test_video_features_errors(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="folder .*nowhere does not exist"):
        load_video_features(tmp_path / "nowhere", "train")
    _folder(tmp_path, {"v1": 3, "v2": 3})
    with pytest.raises(InputError, match="missing .*captions.json"):
        load_video_features(tmp_path, "train")
    (tmp_path / "captions.json").write_text('{"v1": ["a"], "v2": ["b"]')
    with pytest.raises(InputError, match="captions.json is neither JSON"):
        load_video_features(tmp_path, "train")
    (tmp_path / "captions.json").write_text(json.dumps({"v1": ["a"], "v2": []}))
    with pytest.raises(InputError, match="video 'v2' has no"):
        load_video_features(tmp_path, "train")
    (tmp_path / "captions.json").write_text(json.dumps({"v1": ["a"], "v2": ["b"], "v9": ["c"]}))
    (tmp_path / "train.txt").write_text("v1\nv9\n")
    with pytest.raises(InputError, match=r"missing features for video 'v9'.*v9\.npy"):
        load_video_features(tmp_path, "train")
    with pytest.raises(InputError, match=r"missing .*val\.txt.*\['train.txt'\]"):
        load_video_features(tmp_path, "val")
    (tmp_path / "train.txt").write_text("v1\nv2\n")
    np.save(tmp_path / "features" / "v2.npy", np.zeros((3, 4)))
    with pytest.raises(
        InputError, match=r"video 'v2' have shape \(3, 4\); expected \(F, 3\) like video 'v1'"
    ):
        load_video_features(tmp_path, "train")
    np.save(tmp_path / "features" / "v2.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(InputError, match="v2.npy is not a plain numpy array"):
        load_video_features(tmp_path, "train")
    np.save(tmp_path / "features" / "v2.npy", np.zeros(3))
    with pytest.raises(InputError, match=r"video 'v2'\) has shape \(3,\)"):
        load_video_features(tmp_path, "train")
    with pytest.raises(InputError, match="max_frames is 0"):
        load_video_features(tmp_path, "train", max_frames=0)
