"""ProTA's two-stage retrieval: FAISS first stage + pair-scorer re-ranking, in-process (PyTorch and ONNX
graphs through the same `Run`), and the BLS serving model's logic without a server."""

import sys
import types

import numpy as np
import pytest
import torch
from test_prota import random_text, random_video, tiny_model

from xmr.export.bls_rerank import (
    BLSFirstStage,
    BLSRun,
    BLSTokenizer,
    TwoStageModel,
    answer_queries,
    load_gallery,
    write_gallery,
)
from xmr.export.runners import TorchRunner
from xmr.export.scoring import run_of
from xmr.export.video_export import modules_for, specs_for
from xmr.models.errors import InputError
from xmr.models.video.two_stage import (
    VideoGallery,
    encode_queries,
    exhaustive_search,
    faiss_first_stage,
    first_stage_search,
    merge,
    recall_at,
    rerank,
    two_stage_search,
)

N_VIDEOS, N_QUERIES = 12, 5


@pytest.fixture(scope="module")
def setup():
    """A tiny ProTA, its PyTorch `Run`, a 12-video gallery (ids not 0..N-1) and 5 queries."""
    model, g = tiny_model(), torch.Generator().manual_seed(11)
    specs, modules = specs_for(model, 1), modules_for(model)
    run = run_of({name: TorchRunner(modules[name], spec) for name, spec in specs.items()})
    frames, mask = (x.numpy() for x in random_video(g, N_VIDEOS, 9))
    ids = np.arange(N_VIDEOS, dtype=np.int64)[::-1] * 10 + 7  # arbitrary, unsorted gallery ids
    gallery = VideoGallery.encode(run, [(frames[:7], mask[:7]), (frames[7:], mask[7:])], ids)
    input_ids, lengths = (x.numpy() for x in random_text(g, N_QUERIES, 6))
    queries = encode_queries(run, input_ids, lengths)
    with torch.no_grad():
        t = model.encode_text(torch.from_numpy(input_ids), torch.from_numpy(lengths))
        v = model.encode_video(torch.from_numpy(frames), torch.from_numpy(mask))
        full = model.pair_scores(t, v).numpy()  # (queries, videos)
        cos = (t.embedding @ v.embedding.T).numpy()
    return dict(
        model=model,
        run=run,
        gallery=gallery,
        queries=queries,
        full=full,
        cos=cos,
        ids=ids,
        input_ids=input_ids,
        lengths=lengths,
        specs=specs,
        modules=modules,
        frames=frames,
        mask=mask,
    )


def test_queries_are_cut_to_their_length(setup):
    for q, n in zip(setup["queries"], setup["lengths"], strict=True):
        assert q.mu.shape == q.sigma.shape == (1, n, 16) and q.embedding.shape == (16,)
        assert np.isclose(np.linalg.norm(q.embedding), 1.0, atol=1e-5)


def test_first_stage_is_the_global_cosine_top_k(setup):
    first = faiss_first_stage(setup["gallery"])
    for qi, q in enumerate(setup["queries"]):
        ids, scores = first_stage_search(first, q, 4)
        order = np.argsort(-setup["cos"][qi], kind="stable")[:4]
        np.testing.assert_allclose(scores, setup["cos"][qi][order], atol=1e-5)
        assert set(ids.tolist()) == set(setup["ids"][order].tolist())


def test_exhaustive_equals_the_models_pair_scores(setup):
    for qi, q in enumerate(setup["queries"]):
        ids, scores = exhaustive_search(setup["run"], setup["gallery"], q, N_VIDEOS, chunk=5)
        order = np.argsort(-setup["full"][qi], kind="stable")
        np.testing.assert_array_equal(ids, setup["ids"][order])
        np.testing.assert_allclose(scores, setup["full"][qi][order], atol=1e-5)


def test_two_stage_reranks_the_shortlist_and_equals_exhaustive_when_it_covers_the_gallery(setup):
    run, gallery = setup["run"], setup["gallery"]
    first = faiss_first_stage(gallery)
    for qi, q in enumerate(setup["queries"]):
        whole = two_stage_search(run, first, gallery, q, 5, N_VIDEOS)
        exhaustive = exhaustive_search(run, gallery, q, 5)
        np.testing.assert_array_equal(whole[0], exhaustive[0])
        np.testing.assert_allclose(whole[1], exhaustive[1], atol=1e-5)

        short_ids, _ = first_stage_search(first, q, 4)
        ids, scores = two_stage_search(run, first, gallery, q, 10, 4)
        assert len(ids) == 4 and set(ids.tolist()) == set(short_ids.tolist())  # k > S: the whole shortlist
        rows = gallery.rows(ids)
        assert np.all(np.diff(scores) <= 0)
        np.testing.assert_allclose(scores, setup["full"][qi][rows], atol=1e-5)  # the token-level scores


def test_fused_reranking(setup):
    """pair score + f * global cosine: a whole-gallery shortlist equals fused exhaustive scoring; with a huge
    f the order is the first stage's."""
    run, gallery = setup["run"], setup["gallery"]
    first = faiss_first_stage(gallery)
    for qi, q in enumerate(setup["queries"]):
        want = setup["full"][qi] + 0.5 * setup["cos"][qi]
        order = np.argsort(-want, kind="stable")[:5]
        for ids, scores in (
            two_stage_search(run, first, gallery, q, 5, N_VIDEOS, fuse=0.5),
            exhaustive_search(run, gallery, q, 5, fuse=0.5),
        ):
            np.testing.assert_array_equal(ids, setup["ids"][order])
            np.testing.assert_allclose(scores, want[order], atol=1e-5)
        ids, _ = two_stage_search(run, first, gallery, q, 4, 4, fuse=1e4)
        np.testing.assert_array_equal(ids, first_stage_search(first, q, 4)[0])


def test_pair_feeds_cut_padding_frames_without_changing_scores(setup):
    gallery, q = setup["gallery"], setup["queries"][0]
    rows = np.array([int(np.argmin(gallery.mask.sum(1)))])  # the shortest video alone
    feeds = gallery.pair_feeds(q, rows)
    assert feeds["video_mu"].shape[1] == gallery.mask[rows].sum()
    got = rerank(setup["run"], gallery, q, gallery.ids[rows])
    np.testing.assert_allclose(got, setup["full"][0][rows], atol=1e-5)


def test_gallery_rows_and_unknown_ids(setup):
    gallery = setup["gallery"]
    np.testing.assert_array_equal(gallery.rows(gallery.ids[[3, 0, 11]]), [3, 0, 11])
    with pytest.raises(InputError, match="not in the gallery"):
        gallery.rows(np.array([gallery.ids[0], 12345]))
    with pytest.raises(InputError, match="disagree"):
        VideoGallery(gallery.embedding, gallery.mu[:3], gallery.sigma, gallery.mask, gallery.ids)


def test_merge_and_recall():
    ids, scores = merge(np.array([5, 6, 7, 8]), np.array([0.1, 0.9, 0.9, 0.3]), 3)
    np.testing.assert_array_equal(ids, [6, 7, 8])  # ties keep the shortlist order
    np.testing.assert_allclose(scores, [0.9, 0.9, 0.3])
    assert len(merge(np.array([1, 2]), np.array([0.0, 1.0]), 5)[0]) == 2
    ranked = [np.array([3, 1, 2]), np.array([0, 2, 1]), np.array([9, 8, 7])]
    assert recall_at(ranked, np.array([3, 2, 1]), (1, 2, 3)) == pytest.approx(
        {"R@1": 100 / 3, "R@2": 200 / 3, "R@3": 200 / 3}
    )


# ----------------------------------------------------------------------------- the BLS model, no server


def texts(rows) -> np.ndarray:
    """The request's text tensor (B, 1) BYTES for queries `rows` of the setup ("q<row>")."""
    return np.array([[f"q{r}".encode()] for r in rows], dtype=object)


def fake_tokenize(setup):
    """A stand-in tokenizer: "q<row>" -> that row's token ids of the setup; anything else is refused."""

    def tokenize(text: np.ndarray):
        words = [t[0].decode() for t in text]
        if not all(w.removeprefix("q").isdigit() for w in words):
            raise InputError(f"text {words} is not a known query")
        rows = [int(w[1:]) for w in words]
        return setup["input_ids"][rows], setup["lengths"][rows]

    return tokenize


def bls_model(setup, tmp_path, shortlist: int) -> TwoStageModel:
    """The served model as `initialize` builds it, with in-process stand-ins for the called models."""
    write_gallery(tmp_path, setup["gallery"])
    model = TwoStageModel()
    model.gallery, model.shortlist = load_gallery(tmp_path), shortlist
    model.run_graph, model.first_stage = setup["run"], faiss_first_stage(setup["gallery"])
    model.tokenize = fake_tokenize(setup)
    return model


def test_bls_model_answers_like_two_stage_search(setup, tmp_path):
    model = bls_model(setup, tmp_path, shortlist=6)
    first = faiss_first_stage(setup["gallery"])
    good = {"text": texts(range(N_QUERIES)), "top_k": np.full(N_QUERIES, 3, np.int64)}
    bad = {"text": texts(range(N_QUERIES)), "top_k": np.full(2, 3, np.int64)}  # one k for two texts
    unknown = {"text": np.array([[b"nonsense"]], dtype=object), "top_k": np.array([3], np.int64)}
    wide = {"text": texts([0]), "top_k": np.array([100], np.int64)}
    out_good, out_bad, out_unknown, out_wide = model.run([good, bad, unknown, wide])
    # each bad request gets its own error, naming what was wrong; the other requests are answered
    assert isinstance(out_bad, InputError) and "top_k 2" in str(out_bad)
    assert isinstance(out_unknown, InputError) and "nonsense" in str(out_unknown)
    assert out_good["ids"].shape == out_good["scores"].shape == (N_QUERIES, 3)
    for qi, q in enumerate(setup["queries"]):
        want_ids, want_scores = two_stage_search(setup["run"], first, setup["gallery"], q, 3, 6)
        np.testing.assert_array_equal(out_good["ids"][qi], want_ids)
        np.testing.assert_allclose(out_good["scores"][qi], want_scores, atol=1e-5)
    assert out_wide["ids"].shape == (1, 6)  # top_k is cut to the shortlist
    np.testing.assert_array_equal(out_wide["ids"][0][:3], out_good["ids"][0])  # q0's top 3 lead its top 6

    model.fuse = 0.5
    (fused,) = model.run([good])
    for qi, q in enumerate(setup["queries"]):
        want_ids, want_scores = two_stage_search(setup["run"], first, setup["gallery"], q, 3, 6, fuse=0.5)
        np.testing.assert_array_equal(fused["ids"][qi], want_ids)
        np.testing.assert_allclose(fused["scores"][qi], want_scores, atol=1e-5)


def test_answer_queries_reports_a_bad_k_per_query(setup):
    gallery = setup["gallery"]
    queries = setup["queries"][:2]
    out = answer_queries(queries, [0, 2], setup["run"], faiss_first_stage(gallery), gallery, 4)
    assert isinstance(out[0], InputError) and out[1]["ids"].shape == (2,)


class FakeTensor:
    def __init__(self, name, array):
        self._name, self.array = name, array

    def name(self):
        return self._name

    def as_numpy(self):
        return self.array


def fake_pb_utils(serve, calls):
    """A stand-in `triton_python_backend_utils`: `serve(model, inputs) -> outputs | error message`."""

    class Response:
        def __init__(self, result):
            self.result = result

        def has_error(self):
            return isinstance(self.result, str)

        def error(self):  # as Triton 2.51's BLS answers any error: code INTERNAL
            return types.SimpleNamespace(message=lambda: self.result, code=lambda: "INTERNAL")

    class InferenceRequest:
        def __init__(self, model_name, requested_output_names, inputs, **kwargs):
            self.model, self.outputs, self.inputs, self.kwargs = (
                model_name,
                requested_output_names,
                inputs,
                kwargs,
            )

        def exec(self):
            calls.append(self)
            return Response(serve(self.model, {t.name(): t.as_numpy() for t in self.inputs}))

    def get_output_tensor_by_name(response, name):
        return FakeTensor(name, response.result[name]) if name in response.result else None

    return types.SimpleNamespace(
        Tensor=FakeTensor,
        InferenceRequest=InferenceRequest,
        get_output_tensor_by_name=get_output_tensor_by_name,
        PreferredMemory=lambda kind, device: (kind, device),
        TRITONSERVER_MEMORY_CPU="cpu",
    )


def test_bls_calls_the_served_models(setup, tmp_path, monkeypatch):
    """The BLS path end to end with a fake pb_utils: the served names, the requested outputs, the inputs."""
    first, run = faiss_first_stage(setup["gallery"]), setup["run"]

    def serve(model, inputs):
        if model == "tok":
            return dict(zip(("input_ids", "lengths"), fake_tokenize(setup)(inputs["text"]), strict=True))
        if model == "prota_text":  # one length per row on the wire as (B, 1); Triton's reshape gives (B,)
            assert inputs["lengths"].shape == (len(inputs["input_ids"]), 1)
            return run("text_encoder", {**inputs, "lengths": inputs["lengths"].reshape(-1)})
        if model == "gallery_topk":
            assert inputs["top_k"].dtype == np.int64 and inputs["top_k"].shape == (
                len(inputs["query_embedding"]),
                1,
            )
            return dict(
                zip(
                    ("ids", "scores"),
                    first(inputs["query_embedding"], int(inputs["top_k"][0, 0])),
                    strict=True,
                )
            )
        if model == "prota_scorer":
            return "scorer unavailable" if inputs["video_mu"].shape[0] == 1 else run("pair_scorer", inputs)
        raise AssertionError(model)

    calls = []
    monkeypatch.setitem(sys.modules, "triton_python_backend_utils", fake_pb_utils(serve, calls))
    model = bls_model(setup, tmp_path, shortlist=5)
    model.run_graph = BLSRun({"text_encoder": "prota_text", "pair_scorer": "prota_scorer"})
    model.first_stage = BLSFirstStage("gallery_topk")
    model.tokenize = BLSTokenizer("tok")
    x = {"text": texts(range(N_QUERIES)), "top_k": np.full(N_QUERIES, 2, np.int64)}
    (out,) = model.run([x])
    assert [c.model for c in calls] == ["tok", "prota_text", "gallery_topk"] + ["prota_scorer"] * N_QUERIES
    assert calls[0].outputs == ["input_ids", "lengths"]
    assert calls[1].outputs == ["text_embedding", "text_mu", "text_sigma"]
    assert all(c.kwargs["preferred_memory"] == ("cpu", 0) for c in calls)
    for qi, q in enumerate(setup["queries"]):
        want = two_stage_search(run, first, setup["gallery"], q, 2, 5)[0]
        np.testing.assert_array_equal(out["ids"][qi], want)

    model.shortlist = 1  # the fake scorer fails on a 1-video shortlist: the request gets the error
    (err,) = model.run([x])
    assert isinstance(err, InputError) and "scorer unavailable" in str(err)


# ----------------------------------------------------------------------------- ONNX graphs


@pytest.mark.slow  # three dynamo exports: ~10 s on an idle CPU
def test_two_stage_on_onnx_graphs_matches_pytorch(setup, tmp_path):
    pytest.importorskip("onnxruntime")
    from xmr.export.onnx_export import export_onnx
    from xmr.export.runners import OnnxRunner

    specs, modules, torch_run = setup["specs"], setup["modules"], setup["run"]
    q, gallery = setup["queries"][0], setup["gallery"]
    examples = {
        "text_encoder": (torch.from_numpy(setup["input_ids"][:2]), torch.from_numpy(setup["lengths"][:2])),
        "video_encoder": (torch.from_numpy(setup["frames"][:2]), torch.from_numpy(setup["mask"][:2])),
        "pair_scorer": tuple(torch.from_numpy(v) for v in gallery.pair_feeds(q, np.arange(3)).values()),
    }
    for name, spec in specs.items():
        export_onnx(modules[name], examples[name], spec, tmp_path / f"{name}.onnx")
    onnx_run = run_of({name: OnnxRunner(tmp_path / f"{name}.onnx", spec) for name, spec in specs.items()})
    onnx_gallery = VideoGallery.encode(onnx_run, [(setup["frames"], setup["mask"])], setup["ids"])
    onnx_queries = encode_queries(onnx_run, setup["input_ids"], setup["lengths"])
    first_t, first_o = faiss_first_stage(gallery), faiss_first_stage(onnx_gallery)
    for qt, qo in zip(setup["queries"], onnx_queries, strict=True):
        want = two_stage_search(torch_run, first_t, gallery, qt, 5, 8)
        got = two_stage_search(onnx_run, first_o, onnx_gallery, qo, 5, 8)
        np.testing.assert_array_equal(got[0], want[0])
        np.testing.assert_allclose(got[1], want[1], atol=1e-4)


# ----------------------------------------------------------------------------- the report's measurement


def test_prota_rerank_report_rows(tmp_path):
    """perf/prota_rerank.py's measurement on a 12-video toy split: one row per method, consistent recalls."""
    from xmr.models.data.video import VideoFeatures
    from xmr.models.tokenizer import train_tokenizer
    from xmr.perf.prota_rerank import measure, table, write_csv, write_figure

    rng = np.random.default_rng(0)
    words = ["red", "blue", "circle", "square", "moves", "left", "right", "up"]
    captions = [[" ".join(rng.choice(words, 4)) for _ in range(2)] for _ in range(N_VIDEOS)]
    regions = rng.standard_normal((N_VIDEOS, 6, 2, 12)).astype(np.float32)
    split = VideoFeatures("toy", "test", regions, np.ones((N_VIDEOS, 6), bool), captions, [], 1.0, (1, 2))
    model = tiny_model()
    specs, modules = specs_for(model, 2), modules_for(model)
    run = run_of({name: TorchRunner(modules[name], spec) for name, spec in specs.items()})
    rows = measure(run, model, split, train_tokenizer(split.flat_captions()), [4, N_VIDEOS], None)
    by = {r["method"]: r for r in rows}
    assert list(by) == [
        "first stage",
        "shortlist 4 + re-rank",
        "shortlist 12 + re-rank",
        "exhaustive pair scoring",
    ]
    for key in ("R@1", "R@5", "R@10"):  # a shortlist of the whole gallery is exhaustive scoring
        assert by["shortlist 12 + re-rank"][key] == by["exhaustive pair scoring"][key]
    assert by["shortlist 4 + re-rank"]["R@10"] == by["shortlist 4 + re-rank"]["ceiling"]  # only 4 returned
    assert all(r["ms_median"] > 0 and r["ms_text"] > 0 for r in rows)
    rows = [{"backend": "pytorch", **r} for r in rows]
    assert len(table(rows)) == 2 + len(rows)
    write_csv(rows, tmp_path / "rows.csv")
    assert len((tmp_path / "rows.csv").read_text().splitlines()) == 1 + len(rows)
    write_figure(rows, tmp_path / "fig.png")
    assert (tmp_path / "fig.png").stat().st_size > 0
