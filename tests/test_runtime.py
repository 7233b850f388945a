"""The functions inside the served models, tested without a server."""

import numpy as np
import pytest

from xmr.export.iospec import text_encoder_spec
from xmr.export.runtime import GalleryIndex, OnnxRunner, decode_texts, pad_concat, run_batched
from xmr.models.errors import InputError


def unit(rows: int, dim: int, seed: int) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(rows, dim)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


@pytest.mark.parametrize("kind", ["flat", "hnsw"])
def test_gallery_topk_matches_numpy_brute_force(kind):
    gallery, queries = unit(500, 32, 0), unit(20, 32, 1)
    ids = np.arange(1000, 1500, dtype=np.int64)
    got_ids, got_scores = GalleryIndex(gallery, ids, kind=kind).search(queries, 10)
    scores = queries @ gallery.T
    want = np.argsort(-scores, axis=1)[:, :10]
    if kind == "flat":  # exact
        assert (got_ids == ids[want]).all()
        assert np.allclose(got_scores, np.take_along_axis(scores, want, axis=1), atol=1e-5)
    else:  # approximate: nearly all of the true top-10
        overlap = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(got_ids, ids[want], strict=True)])
        assert overlap > 0.9


def test_gallery_errors_name_the_problem():
    index = GalleryIndex(unit(8, 4, 0))
    with pytest.raises(InputError, match="top_k is 0; expected 1 <= top_k <= 8"):
        index.search(unit(1, 4, 1), 0)
    with pytest.raises(InputError, match="query_embedding has shape \\(1, 5\\); expected \\(B, 4\\)"):
        index.search(unit(1, 5, 1), 3)
    with pytest.raises(InputError, match="NaN"):
        index.search(np.full((1, 4), np.nan, np.float32), 3)
    with pytest.raises(InputError, match="unknown gallery index kind"):
        GalleryIndex(unit(8, 4, 0), kind="ivf-nope")


def test_search_requests_cuts_each_request_to_its_own_k_and_isolates_errors():
    index = GalleryIndex(unit(50, 8, 0))
    q = unit(3, 8, 1)
    requests = [
        (q[:2], np.array([5, 5])),
        (q[2:], np.array([2])),
        (q[:1], np.array([0])),
        (q[:2], np.array([1, 2])),
    ]
    out = index.search_requests(requests)
    assert out[0]["ids"].shape == (2, 5) and out[1]["ids"].shape == (1, 2)
    assert (out[1]["ids"] == index.search(q[2:], 2)[0]).all()
    assert isinstance(out[2], InputError) and "top_k is 0" in str(out[2])
    assert isinstance(out[3], InputError) and "differs across the rows" in str(out[3])


def test_pad_concat_and_run_batched_isolate_a_bad_request():
    a, b = np.ones((1, 3), np.int64), np.ones((2, 5), np.int64)
    merged = pad_concat([a, b])
    assert merged.shape == (3, 5) and merged[0, 3:].tolist() == [0, 0]

    def fn(feeds):
        if (feeds["x"] < 0).any():
            raise InputError("x has negative values")
        return {"y": feeds["x"].sum(axis=1)}

    out = run_batched([{"x": a}, {"x": -b}, {"x": b}], fn)
    assert out[0]["y"].tolist() == [3] and out[2]["y"].tolist() == [5, 5]
    assert isinstance(out[1], InputError)


def test_decode_texts():
    assert decode_texts(np.array([[b"a red circle"], ["\u00e9t\u00e9".encode()]], dtype=object)) == [
        "a red circle",
        "été",
    ]
    with pytest.raises(InputError, match="text 1 is not valid UTF-8"):
        decode_texts(np.array([[b"ok"], [b"\xff\xfe"]], dtype=object))


def test_onnx_runner_checks_dtype_nan_and_file(tiny_artifacts, tmp_path):
    runner = OnnxRunner(tiny_artifacts / "text_encoder.onnx", text_encoder_spec(256))
    out = runner.run({"input_ids": np.array([[3, 4, 5]], np.int64), "lengths": np.array([3], np.int64)})
    assert out["text_embedding"].shape == (1, 256)
    with pytest.raises(InputError, match="input 'input_ids' has dtype int32; expected int64"):
        runner.run({"input_ids": np.array([[3]], np.int32), "lengths": np.array([1], np.int64)})
    with pytest.raises(InputError, match="missing input 'lengths'"):
        runner.run({"input_ids": np.array([[3]], np.int64)})
    with pytest.raises(InputError, match="does not exist"):
        OnnxRunner(tmp_path / "nope.onnx", text_encoder_spec(256))
    (tmp_path / "bad.onnx").write_bytes(b"not a model")
    with pytest.raises(InputError, match="not a loadable ONNX model"):
        OnnxRunner(tmp_path / "bad.onnx", text_encoder_spec(256))


def test_token_inputs_that_would_be_read_as_something_else_are_refused(tiny_artifacts):
    """Negative ids, lengths of 0 (a NaN embedding) or past the tokens, ids past the vocabulary: each an
    InputError naming the input, never a silent embedding."""
    runner = OnnxRunner(tiny_artifacts / "text_encoder.onnx", text_encoder_spec(256))
    ids = np.array([[3, 4, 5]], np.int64)
    for feeds, message in (
        ({"input_ids": np.array([[3, -1, 5]], np.int64), "lengths": np.array([3])}, "'input_ids' holds -1"),
        ({"input_ids": ids, "lengths": np.array([0])}, r"'lengths' holds 0; expected 1 <= length <= 3"),
        ({"input_ids": ids, "lengths": np.array([-2])}, "'lengths' holds -2"),
        ({"input_ids": ids, "lengths": np.array([4])}, "'lengths' holds 4"),
        ({"input_ids": np.array([[3, 100000, 5]], np.int64), "lengths": np.array([3])}, "cannot run"),
    ):
        with pytest.raises(InputError, match=message):
            runner.run(feeds)


def test_a_bad_request_in_a_batch_fails_alone(tiny_artifacts):
    """An id past the vocabulary makes ONNX Runtime fail the whole batched call; the batch is then run
    request by request, so the valid requests of the same batch get exactly their own answers."""
    runner = OnnxRunner(tiny_artifacts / "text_encoder.onnx", text_encoder_spec(256))

    def request(ids):
        return {"input_ids": np.array([ids], np.int64), "lengths": np.array([len(ids)], np.int64)}

    good = [request([3, 4, 5]), request([7, 8]), request([9])]
    bad = request([3, 100000])
    results = runner.run_requests([good[0], bad, good[1], good[2]])
    assert isinstance(results[1], InputError) and "text_encoder" in str(results[1])
    for got, feeds in zip([results[0], *results[2:]], good, strict=True):
        np.testing.assert_allclose(got["text_embedding"], runner.run(feeds)["text_embedding"], atol=1e-6)


def test_onnx_runner_is_the_runners_one():
    """The served models import OnnxRunner from runtime; it is the runner of `runners.py`."""
    from xmr.export import runners

    assert OnnxRunner is runners.OnnxRunner and OnnxRunner.backend == "onnxruntime"


# ----------------------------------------------------------------------------- boundary bounds


def test_check_bounds_names_the_input_the_value_and_the_range(tmp_path):
    import json

    from xmr.export.iospec import ModelSpec, TensorSpec
    from xmr.export.runners import Bound, check_bounds, read_bounds

    spec = ModelSpec(
        "m",
        inputs=(
            TensorSpec("ids", "int64", ("batch", "tokens")),
            TensorSpec("q", "float32", ("batch", 4)),
            TensorSpec("mask", "bool", ("batch", "frames")),
            TensorSpec("text", "bytes", ("batch", 1)),
        ),
        outputs=(TensorSpec("y", "float32", ("batch", 4)),),
    )
    bounds = (
        Bound("ids", 0, 99, why="vocabulary of 100"),
        Bound("ids", 1, 8, of="tokens"),
        Bound("q", 0.1, 10.0, of="norm"),
        Bound("mask", 1, None, of="true"),
        Bound("text", None, 16, of="bytes"),
    )
    good = {
        "ids": np.array([[1, 99]]),
        "q": np.full((1, 4), 0.5, np.float32),
        "mask": np.array([[True, False]]),
        "text": np.array([[b"a red circle"]], dtype=object),
    }
    check_bounds(spec, bounds, good)  # inside every bound: no error
    cases = {
        "ids": (
            np.array([[1, 100]]),
            r"input 'ids' holds 100; expected 0 <= value <= 99 \(vocabulary of 100\)",
        ),
        "q": (
            np.full((1, 4), 1e30, np.float32),
            r"input 'q' row 0 has L2 norm 2e\+30; expected 0.1 <= norm <= 10",
        ),
        "mask": (
            np.array([[False, False]]),
            r"input 'mask' row 0 has 0 true values; expected true values >= 1",
        ),
        "text": (np.array([[b"x" * 17]], dtype=object), r"text 0 is 17 bytes; the limit is 16"),
    }
    for name, (bad, message) in cases.items():
        with pytest.raises(InputError, match=message):
            check_bounds(spec, bounds, {**good, name: bad})
    with pytest.raises(InputError, match=r"input 'ids' has 9 tokens \(axis 1\); expected 1 <= tokens <= 8"):
        check_bounds(spec, bounds, {**good, "ids": np.ones((1, 9), np.int64)})
    (tmp_path / "bounds.json").write_text(json.dumps([b.to_dict() for b in bounds]))
    assert read_bounds(tmp_path / "bounds.json") == bounds
    assert read_bounds(tmp_path / "absent.json") == ()
