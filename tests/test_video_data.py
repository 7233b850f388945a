"""Video features: the pre-trained frame backbone, the MovingShapes feature cache, public feature folders."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from xmr.models.data import video
from xmr.models.data.moving_shapes import MomentQuery, MovingShapesConfig, draw_videos, make_moving_shapes
from xmr.models.data.video import (
    VIDEO_DATASETS,
    VideoFeatures,
    from_feature_split,
    load_moving_shapes_features,
    load_video_split,
    squarest_grid,
)
from xmr.models.data.video_features import load_video_features
from xmr.models.errors import InputError
from xmr.models.video.backbone import (
    N_GLOBAL,
    N_REGION,
    BackboneConfig,
    extract_regions,
    frame_labels,
    load_backbone,
)

TINY = dict(n_train=64, n_val=16, n_test=16)
CFG = MovingShapesConfig(**TINY)
BACKBONE = BackboneConfig(steps=40, batch_size=32)


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """One torch thread: on this 2-core box, 2 threads with the other core busy make the tiny
    pre-training ~40x slower (33 s instead of 0.8 s); restored afterwards."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("video_cache")


@pytest.fixture(scope="module")
def val(cache) -> VideoFeatures:
    return load_moving_shapes_features("val", CFG, cache, BACKBONE)


def _backbone_folder(cache: Path) -> Path:
    (folder,) = (cache / "moving_shapes").iterdir()
    return folder


# ----------------------------------------------------------------------------- moving shapes features


def test_moving_shapes_features_shapes(val: VideoFeatures) -> None:
    n, f, k, d = 16, CFG.n_frames, 16, BACKBONE.channels[-1]
    assert val.regions.shape == (n, f, k, d) and val.regions.dtype == np.float32
    assert val.mask.shape == (n, f) and val.mask.dtype == bool and val.mask.all()
    assert val.frames.shape == (n, f, d) and val.frames.dtype == np.float32
    np.testing.assert_allclose(val.frames, val.regions.mean(axis=2), rtol=1e-6)
    assert val.grid == (4, 4)
    grid = val.grid_features()
    assert grid.shape == (n, f, 4, 4, d)
    np.testing.assert_array_equal(grid[:, :, 1, 2], val.regions[:, :, 1 * 4 + 2])  # row-major cells
    assert np.isfinite(val.regions).all() and val.regions.std() > 0
    assert len(val) == n and val.captions_per_video == CFG.captions_per_video
    assert len(val.flat_captions()) == n * CFG.captions_per_video
    np.testing.assert_array_equal(val.caption_video_index()[:5], [0, 0, 0, 0, 1])
    assert all(len(qs) == CFG.queries_per_video and isinstance(qs[0], MomentQuery) for qs in val.queries)
    assert val.fps == CFG.fps
    sub = val.subset(3)
    assert len(sub) == 3 and sub.regions.shape[0] == 3 and sub.mask.shape[0] == 3 and len(sub.queries) == 3


def test_moving_shapes_text_matches_the_generator(val: VideoFeatures) -> None:
    data = make_moving_shapes("val", CFG)
    assert val.captions == data.captions and val.queries == data.queries


def test_cache_is_reused_and_deterministic(val: VideoFeatures, cache: Path, monkeypatch) -> None:
    folder = _backbone_folder(cache)
    assert {p.suffix for p in folder.iterdir()} == {".safetensors", ".json", ".npy"}

    def no_generation(*args, **kwargs):
        raise AssertionError("a cached split was generated again")

    monkeypatch.setattr(video, "make_moving_shapes", no_generation)
    again = load_moving_shapes_features("val", CFG, cache, BACKBONE)
    np.testing.assert_array_equal(again.regions, val.regions)
    assert (again.captions, again.queries, again.grid) == (val.captions, val.queries, val.grid)
    # the registry reaches the same cache; the cached backbone re-extracts the same features
    np.testing.assert_array_equal(
        load_video_split("moving-shapes", "val", cache_dir=cache, backbone=BACKBONE, **TINY).regions,
        val.regions,
    )
    monkeypatch.undo()
    videos = make_moving_shapes("val", CFG).videos[:2]
    np.testing.assert_allclose(extract_regions(load_backbone(folder), videos), val.regions[:2], atol=1e-5)


def test_backbone_pretraining_reduces_the_loss(val: VideoFeatures, cache: Path) -> None:
    report = load_backbone(_backbone_folder(cache)).report
    assert report["steps"] == BACKBONE.steps
    assert report["loss_last"] < 0.7 * report["loss_first"]
    assert 0.0 <= report["heldout"]["frame_f1"] <= 1.0


def test_a_colour_change_moves_features_more_than_a_repaint(val: VideoFeatures, cache: Path) -> None:
    """The same object recoloured vs repainted (another background grey and colour jitter), frame 0 of
    eight one-object videos: colour is what the backbone was trained to see, the rest is noise."""
    backbone, n = load_backbone(_backbone_folder(cache)), CFG.n_frames
    recolour = repaint = 0.0
    for objs in make_moving_shapes("val", CFG).objects[:8]:
        obj = dataclasses.replace(
            objs[0], event="none", event_frame=-1, new_colour=None, start_frame=0, end_frame=n
        )
        other = dataclasses.replace(obj, colour="red" if obj.colour != "red" else "blue")
        first = extract_regions(backbone, draw_videos([[obj]], n, CFG.image_size, seed=1))[0, 0]
        again = extract_regions(backbone, draw_videos([[obj]], n, CFG.image_size, seed=1))[0, 0]
        np.testing.assert_array_equal(first, again)  # identical frames, identical features
        repainted = extract_regions(backbone, draw_videos([[obj]], n, CFG.image_size, seed=2))[0, 0]
        recoloured = extract_regions(backbone, draw_videos([[other]], n, CFG.image_size, seed=1))[0, 0]
        repaint += np.abs(first - repainted).sum()
        recolour += np.abs(first - recoloured).sum()
    assert recolour > 1.5 * repaint


def test_frame_labels_follow_the_metadata() -> None:
    data = make_moving_shapes("val", CFG)
    glob, region = frame_labels(data.objects, CFG.n_frames, CFG.image_size, (4, 4), 2)
    assert glob.shape == (16, CFG.n_frames, N_GLOBAL) and region.shape == (16, CFG.n_frames, 16, N_REGION)
    visible = [
        [sum(o.start_frame <= f < o.end_frame for o in objs) for f in range(CFG.n_frames)]
        for objs in data.objects
    ]
    np.testing.assert_array_equal(glob[:, :, :6].sum(-1), visible)  # one distinct colour per visible object
    assert (region[:, :, :, :6].max(axis=2) <= glob[:, :, :6]).all()  # a region colour is a frame colour


def test_moving_shapes_bad_inputs(cache: Path) -> None:
    with pytest.raises(InputError, match="split"):
        load_moving_shapes_features("dev", CFG, cache, BACKBONE)
    with pytest.raises(InputError, match="image_size"):
        load_moving_shapes_features("val", MovingShapesConfig(image_size=48, **TINY), cache, BACKBONE)
    with pytest.raises(InputError, match="videos"):
        extract_regions(load_backbone(_backbone_folder(cache)), np.zeros((1, 2, 16, 16, 3), np.uint8))


# ----------------------------------------------------------------------------- public feature folders


def _feature_folder(root: Path, trailing: tuple[int, ...], lengths=(5, 3, 7)) -> Path:
    rng = np.random.default_rng(0)
    (root / "features").mkdir(parents=True)
    captions = {}
    for i, n in enumerate(lengths):
        np.save(root / "features" / f"v{i}.npy", rng.normal(size=(n, *trailing)).astype(np.float32))
        captions[f"v{i}"] = [f"video {i} caption {j}" for j in range(2 + i % 2)]
    (root / "captions.json").write_text(json.dumps(captions))
    return root


def test_from_feature_split_frame_features(tmp_path: Path) -> None:
    root = _feature_folder(tmp_path / "msrvtt", (8,))
    out = from_feature_split(load_video_features(root, "all"))
    assert out.regions.shape == (3, 7, 1, 8) and out.grid == (1, 1) and out.regions.dtype == np.float32
    np.testing.assert_array_equal(out.mask.sum(1), [5, 3, 7])
    np.testing.assert_array_equal(out.frames[0, :5], np.load(root / "features" / "v0.npy"))
    assert (out.frames[1, 3:] == 0).all() and (out.regions[1, 3:] == 0).all()
    assert out.queries == [[], [], []] and np.isnan(out.fps)
    np.testing.assert_array_equal(out.caption_video_index(), [0, 0, 1, 1, 1, 2, 2])
    with pytest.raises(InputError, match="captions"):
        _ = out.captions_per_video
    assert out.grid_features().shape == (3, 7, 1, 1, 8)


def test_from_feature_split_region_features(tmp_path: Path) -> None:
    root = _feature_folder(tmp_path / "regions", (6, 8))
    out = load_video_split("video-features", "all", root=str(root), max_frames=4)
    assert out.regions.shape == (3, 4, 6, 8) and out.grid == (2, 3)
    np.testing.assert_array_equal(out.mask.sum(1), [4, 3, 4])
    assert out.grid_features().shape == (3, 4, 2, 3, 8)
    np.testing.assert_allclose(out.frames[1, :3], np.load(root / "features" / "v1.npy").mean(1), rtol=1e-6)


def test_squarest_grid() -> None:
    assert [squarest_grid(k) for k in (1, 7, 12, 16, 36, 100)] == [
        (1, 1),
        (1, 7),
        (3, 4),
        (4, 4),
        (6, 6),
        (10, 10),
    ]


# ----------------------------------------------------------------------------- registry


def test_registry_errors(tmp_path: Path) -> None:
    assert sorted(VIDEO_DATASETS) == ["moving-shapes", "video-features"]
    with pytest.raises(InputError, match="moving-shapes.*video-features"):
        load_video_split("msrvtt", "train")
    with pytest.raises(InputError, match="root"):
        load_video_split("video-features", "train")
    with pytest.raises(InputError, match="n_frame"):
        load_video_split("moving-shapes", "train", cache_dir=tmp_path, n_frame=8)
    with pytest.raises(InputError, match="max_frames"):
        load_video_split("video-features", "train", root=str(tmp_path), n_train=8)
