"""Shapes generator, precomputed-feature loader and the dataset registry."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from xmr.models.data import DATASETS, RetrievalSplit, ShapesConfig, load_split
from xmr.models.data.precomputed import load_precomputed
from xmr.models.data.shapes import COLOUR_NAMES, SHAPES, make_shapes, sample_scenes
from xmr.models.errors import InputError

SMALL = ShapesConfig(n_train=60, n_val=30, n_test=30)


@pytest.fixture(scope="module")
def train() -> RetrievalSplit:
    return make_shapes("train", SMALL)


# ----------------------------------------------------------------------------- shapes


def test_shapes_is_deterministic(train: RetrievalSplit) -> None:
    again = make_shapes("train", SMALL)
    assert again.images.tobytes() == train.images.tobytes()
    assert again.captions == train.captions


def test_shapes_splits_and_seeds_differ(train: RetrievalSplit) -> None:
    val = make_shapes("val", SMALL)
    assert val.images[:30].tobytes() != train.images[:30].tobytes()
    assert val.captions != train.captions[:30]
    other_seed = make_shapes("train", ShapesConfig(n_train=60, seed=1))
    assert other_seed.captions != train.captions


def test_shapes_shapes_and_dtypes(train: RetrievalSplit) -> None:
    assert train.images.shape == (60, 64, 64, 3) and train.images.dtype == np.uint8
    assert (train.name, train.split, train.kind) == ("shapes", "train", "pixels")
    assert len(train) == 60 and train.captions_per_image == 5
    assert all(len(caps) == 5 and len(set(caps)) > 1 for caps in train.captions)
    small = make_shapes("test", ShapesConfig(image_size=32, n_test=4, captions_per_image=2))
    assert small.images.shape == (4, 32, 32, 3) and small.captions_per_image == 2


def test_shapes_objects_are_painted(train: RetrievalSplit) -> None:
    bright = (train.images.max(axis=-1) > 60).reshape(len(train), -1).sum(1)  # background is < 30
    assert (bright > 20).all()


def test_flat_captions_and_index(train: RetrievalSplit) -> None:
    flat, index = train.flat_captions(), train.caption_image_index()
    assert len(flat) == len(index) == 300 and index.dtype == np.int64
    assert flat[7] == train.captions[1][2] and index[7] == 1


def test_captions_are_small_lowercase_words(train: RetrievalSplit) -> None:
    flat = train.flat_captions()
    vocab = {w for c in flat for w in c.split(" ")}
    assert "" not in vocab and all(w.isalpha() and w.islower() for w in vocab)
    assert len(vocab) < 200
    assert max(len(c.split()) for c in flat) <= 30


def test_every_caption_names_every_object(train: RetrievalSplit) -> None:
    scenes = sample_scenes("train", SMALL)
    counts = {len(s) for s in scenes}
    assert counts == {1, 2, 3}
    for scene, caps in zip(scenes, train.captions, strict=True):
        for cap in caps:
            words = cap.split()
            for obj in scene:
                assert obj.colour in words and obj.shape in words, (cap, obj)
                assert obj.colour in COLOUR_NAMES and obj.shape in SHAPES


def test_max_objects_one_gives_single_objects() -> None:
    scenes = sample_scenes("val", ShapesConfig(n_val=20, max_objects=1))
    assert {len(s) for s in scenes} == {1}


def test_unknown_split_lists_valid_ones() -> None:
    with pytest.raises(InputError, match=r"unknown split 'dev'.*\['test', 'train', 'val'\]"):
        make_shapes("dev", SMALL)


# ----------------------------------------------------------------------------- precomputed


def _write(
    root: Path, split: str, rows: int, n_caps: int, shape: tuple[int, ...] | None = None
) -> np.ndarray:
    root.mkdir(parents=True, exist_ok=True)
    ims = np.arange(np.prod(shape or (rows, 3, 4)), dtype=np.float64).reshape(shape or (rows, 3, 4))
    np.save(root / f"{split}_ims.npy", ims)
    (root / f"{split}_caps.txt").write_text("".join(f"  A Caption {i}\n" for i in range(n_caps)))
    return ims


def test_precomputed_loads(tmp_path: Path) -> None:
    ims = _write(tmp_path, "dev", rows=2, n_caps=10)
    split = load_precomputed(tmp_path, "dev")
    assert split.kind == "regions" and split.split == "dev"
    assert split.images.dtype == np.float32 and split.images.shape == (2, 3, 4)
    np.testing.assert_array_equal(split.images, ims.astype(np.float32))
    assert split.captions[1] == [f"a caption {i}" for i in range(5, 10)]


def test_precomputed_repeated_rows_take_every_fifth(tmp_path: Path) -> None:
    ims = _write(tmp_path, "train", rows=10, n_caps=10)
    split = load_precomputed(str(tmp_path), "train")
    assert split.images.shape == (2, 3, 4)
    np.testing.assert_array_equal(split.images, ims[::5].astype(np.float32))


def test_precomputed_other_captions_per_image(tmp_path: Path) -> None:
    _write(tmp_path, "test", rows=3, n_caps=6)
    assert load_precomputed(tmp_path, "test", captions_per_image=2).captions_per_image == 2


def test_precomputed_missing_folder_and_files(tmp_path: Path) -> None:
    with pytest.raises(InputError, match="folder .*nope does not exist.*test_ims.npy"):
        load_precomputed(tmp_path / "nope", "test")
    with pytest.raises(InputError, match="missing .*test_ims.npy"):
        load_precomputed(tmp_path, "test")
    np.save(tmp_path / "test_ims.npy", np.zeros((1, 2, 3)))
    with pytest.raises(InputError, match="missing .*test_caps.txt"):
        load_precomputed(tmp_path, "test")


def test_precomputed_bad_arrays(tmp_path: Path) -> None:
    _write(tmp_path, "test", rows=1, n_caps=5, shape=(1, 4))
    with pytest.raises(InputError, match=r"shape \(1, 4\); expected \(N, R, D\)"):
        load_precomputed(tmp_path, "test")
    np.save(tmp_path / "test_ims.npy", np.array([{"a": 1}], dtype=object))
    with pytest.raises(InputError, match="not a plain numpy array"):
        load_precomputed(tmp_path, "test")


def test_precomputed_caption_count_errors(tmp_path: Path) -> None:
    _write(tmp_path, "a", rows=2, n_caps=7)
    with pytest.raises(InputError, match="has 7 captions; expected a positive multiple of 5"):
        load_precomputed(tmp_path, "a")
    _write(tmp_path, "b", rows=3, n_caps=10)
    with pytest.raises(InputError, match="has 3 rows but .* has 10 captions; expected 2 rows"):
        load_precomputed(tmp_path, "b")
    _write(tmp_path, "c", rows=1, n_caps=0)
    with pytest.raises(InputError, match="has 0 captions"):
        load_precomputed(tmp_path, "c")


def test_precomputed_empty_caption_line(tmp_path: Path) -> None:
    _write(tmp_path, "test", rows=1, n_caps=5)
    (tmp_path / "test_caps.txt").write_text("a\nb\n   \nc\nd\n\n")
    with pytest.raises(InputError, match="line 3 is empty"):
        load_precomputed(tmp_path, "test")


# ----------------------------------------------------------------------------- registry


def test_registry_loads_both(tmp_path: Path) -> None:
    assert set(DATASETS) == {"shapes", "precomputed"}
    shapes = load_split("shapes", "val", n_val=3, image_size=32)
    assert shapes.images.shape == (3, 32, 32, 3)
    _write(tmp_path, "test", rows=1, n_caps=5)
    assert load_split("precomputed", "test", root=str(tmp_path)).images.shape == (1, 3, 4)


def test_registry_errors() -> None:
    with pytest.raises(InputError, match=r"unknown dataset 'coco'.*\['precomputed', 'shapes'\]"):
        load_split("coco", "train")
    with pytest.raises(InputError, match="needs root"):
        load_split("precomputed", "test")
    with pytest.raises(InputError, match=r"unknown shapes option\(s\) \['n_images'\]"):
        load_split("shapes", "train", n_images=3)
    with pytest.raises(InputError, match=r"unknown precomputed option\(s\) \['seed'\]"):
        load_split("precomputed", "test", root="x", seed=1)
