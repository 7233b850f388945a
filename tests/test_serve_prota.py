"""ProTA served as its paper intends at scale: `text_video_rerank`, a BLS python model that shortlists with
the FAISS first stage (`video_gallery_topk`) and re-ranks with the pair scorer (`video_pair_scorer`).

A tiny ProTA (one epoch on 64 MovingShapes videos, a 40-step frame backbone) is exported in the standard
form with its token store and served alone by the real tritonserver. The served re-ranking must equal the
same two stages run in process (PyTorch towers, FAISS, the served shortlist size and fusion weight), over
a gallery larger than the shortlist; bad input, to the re-ranker and to the pair scorer called directly,
must be the client's error naming the input, and change no other answer.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from test_hostile import (
    GOOD_TEXT,
    Case,
    Facts,
    Refused,
    Server,
    assert_same,
    col,
    filled,
    read_facts,
    swap,
    text,
    text_cases,
)

from xmr.export.bls_rerank import GALLERY_FILES
from xmr.export.repository import MODELS, build_repository, read_serving
from xmr.export.video_export import export_video_run
from xmr.models.errors import InputError
from xmr.models.train.video import VideoTrainConfig, train_video

pytestmark = [pytest.mark.server, pytest.mark.slow]

XMR = str(Path(sys.executable).parent / "xmr")
DATA = {"n_train": 64, "n_val": 16, "n_test": 48}  # 48 test videos: more than the served shortlist (20)
PROTOCOLS = ("grpc", "http")


@pytest.fixture(scope="module")
def prota_artifact(tmp_path_factory):
    root = tmp_path_factory.mktemp("prota")
    config = VideoTrainConfig(
        model="prota",
        epochs=1,
        batch_size=16,
        cache_dir=str(root / "cache"),
        data_overrides=DATA,
        backbone_steps=40,
    )
    train_video(config, root / "run")
    export_video_run(root / "run", root / "prota", "standard")
    return root / "prota"


@pytest.fixture(scope="module")
def prota_repository(prota_artifact, tmp_path_factory):
    return build_repository(prota_artifact, tmp_path_factory.mktemp("prota_repo") / "repository", "cpu")


def good(f: Facts, model: str) -> dict[str, np.ndarray]:
    """A valid one-row request for each served model of a ProTA repository."""
    d = f.dim
    if model in ("text_video_search", "text_video_rerank"):
        return {"text": text(GOOD_TEXT), "top_k": col(3, np.int64)}
    if model == "video_tokenizer":
        return {"text": text(GOOD_TEXT)}
    if model == "video_text_encoder":
        return {"input_ids": np.array([[2, 3, 4]], np.int64), "lengths": col(3, np.int64)}
    if model == "video_gallery_topk":
        dim = d(model, "query_embedding", 1)
        return {"query_embedding": np.full((1, dim), dim**-0.5, np.float32), "top_k": col(3, np.int64)}
    if model in ("video_embed", "video_encoder"):
        return {
            "frames": np.zeros((1, 3, d(model, "frames", 2)), np.float32),
            "frame_mask": np.ones((1, 3), bool),
        }
    if model == "video_pair_scorer":
        dim = d(model, "text_mu", 2)
        rng = np.random.default_rng(0)
        return {
            "text_mu": rng.normal(size=(1, 3, dim)).astype(np.float32),
            "text_sigma": np.full((1, 3, dim), 0.5, np.float32),
            "lengths": np.array([3], np.int64),
            "video_mu": rng.normal(size=(2, 4, dim)).astype(np.float32),
            "video_sigma": np.full((2, 4, dim), 0.5, np.float32),
            "frame_mask": np.ones((2, 4), bool),
        }
    raise KeyError(model)


def pair(**new):
    """A change of the pair scorer's good request: arrays by name, or functions of the good array."""
    return lambda f, x: {**x, **{k: v(x[k]) if callable(v) else v for k, v in new.items()}}


CASES = [
    *text_cases("text_video_rerank"),
    Case("text_video_rerank", "top-k-0", swap(top_k=col(0, np.int64)), r"top_k is 0; expected >= 1"),
    Case("text_video_rerank", "top-k-negative", swap(top_k=col(-3, np.int64)), r"top_k is -3; expected >= 1"),
    Case("text_video_rerank", "top-k-int32", swap(top_k=(col(3, np.int32), "INT32")), r"top_k.*INT(32|64)"),
    Case("text_video_rerank", "no-text", swap(text=None), r"text"),
    Case(
        "video_pair_scorer",
        "mask-all-false",
        pair(frame_mask=np.zeros((2, 4), bool)),
        r"'frame_mask' row 0 has 0 true",
    ),
    Case("video_pair_scorer", "sigma-nan", filled("text_sigma", np.nan), r"'text_sigma' contains NaN"),
    Case(
        "video_pair_scorer",
        "lengths-0",
        pair(lengths=np.array([0], np.int64)),
        r"'lengths' holds 0; expected 1 <= length <= 3",
    ),
    Case(
        "video_pair_scorer",
        "lengths-past-tokens",
        pair(lengths=np.array([9], np.int64)),
        r"'lengths' holds 9",
    ),
    Case(
        "video_pair_scorer",
        "frames-disagree",
        pair(frame_mask=np.ones((2, 5), bool)),
        r"input 'frame_mask' has 5 along 'frames'; input 'video_mu' has 4",
    ),
    Case(
        "video_pair_scorer",
        "shortlist-disagree",
        pair(video_sigma=lambda v: v[:1]),
        r"input 'video_sigma' has 1 along 'shortlist'; input 'video_mu' has 2",
    ),
    Case("video_pair_scorer", "two-queries", pair(text_mu=lambda v: np.concatenate([v, v])), r"text_mu"),
    Case("video_encoder", "frames-nan", filled("frames", np.nan), r"'frames' contains NaN"),
    Case(
        "video_encoder", "mask-all-false", filled("frame_mask", False, bool), r"'frame_mask' row 0 has 0 true"
    ),
]
ENTRY_POINTS = ("text_video_search", "text_video_rerank", "video_embed")


class ProTAServer(Server):
    def answers(self) -> dict:
        out = {}
        for model in ENTRY_POINTS:
            result = self.infer("grpc", model, good(self.facts, model))
            assert isinstance(result, dict), (model, result)
            out[model] = result
        return out


@pytest.fixture(scope="module")
def server(prota_repository):
    from xmr.clients.server import TritonServer

    triton = TritonServer(prota_repository).start()
    s = ProTAServer(triton, read_facts(prota_repository))
    s.reference = s.answers()
    yield s
    triton.stop()


# ----------------------------------------------------------------------------- export + repository


def test_export_writes_the_token_store_and_the_repository_serves_the_reranker(
    prota_artifact, prota_repository
):
    manifest = json.loads((prota_artifact / "manifest.json").read_text())
    gallery = np.load(prota_artifact / "gallery.npy")
    ids, mu, sigma, mask = (np.load(prota_artifact / f"{n}.npy") for n in GALLERY_FILES)
    assert len(gallery) == len(ids) == len(mu) == len(sigma) == len(mask) == DATA["n_test"]
    assert mu.shape == sigma.shape and mu.shape[:2] == mask.shape and mu.shape[2] == gallery.shape[1]
    assert (sigma > 0).all() and mask.any(axis=1).all()
    assert all(f"{n}.npy" in manifest["files"] for n in GALLERY_FILES)

    serving = read_serving(prota_repository)
    assert {"text_video_rerank", "video_pair_scorer", "text_video_search"} <= set(serving["specs"])
    scorer = (prota_repository / "video_pair_scorer" / "config.pbtxt").read_text()
    assert "max_batch_size: 0" in scorer or "max_batch_size" not in scorer  # protobuf omits a 0
    assert "dynamic_batching" not in scorer and "dims: 1" in scorer  # the query's dim 1 is the model's own
    shim = (prota_repository / "text_video_rerank" / "1" / "model.py").read_text()
    assert "from xmr.export.bls_rerank import TwoStageModel as TritonPythonModel" in shim
    rerank = (prota_repository / "text_video_rerank" / "config.pbtxt").read_text()
    for key, value in MODELS["text_video_rerank"].parameters.items():
        assert re.search(rf'key: "{key}"\s+value \{{\s+string_value: "{value}"', rerank), key


def test_an_older_export_serves_the_first_stage_and_a_missing_called_model_is_refused(
    prota_artifact, monkeypatch
):
    """An export made before the token store serves the first stage only; a BLS model whose called model
    the artifact does not serve is refused, naming both."""
    import dataclasses

    from xmr.export.repository import served_models

    manifest = json.loads((prota_artifact / "manifest.json").read_text())
    assert {"text_video_rerank", "video_pair_scorer"} <= set(served_models(manifest))
    files = {k: v for k, v in manifest["files"].items() if not k.startswith("gallery_m")}
    older = served_models({**manifest, "files": files})
    assert "text_video_search" in older
    assert "text_video_rerank" not in older and "video_pair_scorer" not in older
    row = dataclasses.replace(MODELS["text_video_rerank"], calls=("video_tokenizer", "video_reranker_v2"))
    monkeypatch.setitem(MODELS, "text_video_rerank", row)
    with pytest.raises(InputError, match="model 'text_video_rerank' calls model 'video_reranker_v2'"):
        served_models(manifest)


# ----------------------------------------------------------------------------- served answers


def test_served_rerank_equals_the_two_stages_in_process(server, prota_artifact):
    from xmr.clients.served import check_rerank, check_video
    from xmr.clients.triton_client import XmrClient

    client = XmrClient(server.triton.grpc_url)
    report = check_rerank(client, prota_artifact, n=48)
    assert report.rows == 48 and report.rows_agreeing == 48, report
    assert report.max_abs_err < 1e-4 and report.served_recall == report.reference_recall, report
    first = check_video(client, prota_artifact, n=48)
    assert first.ok, first
    # the re-ranker's top-k are the shortlist's: every served id is in the first stage's top 20
    shortlist = client.text_video_search([GOOD_TEXT, "a blue square"], 20).ids
    ranked = client.text_video_rerank([GOOD_TEXT, "a blue square"], 5)
    assert ranked.ids.shape == (2, 5) and all(
        set(r) <= set(s) for r, s in zip(ranked.ids, shortlist, strict=True)
    )
    wide = client.text_video_rerank([GOOD_TEXT], 1000)  # top_k is cut to the shortlist
    assert wide.ids.shape == (1, int(MODELS["text_video_rerank"].parameters["shortlist"]))


def test_concurrent_good_and_bad_rerank_requests(server):
    """Bad requests among good ones, in flight together: each bad one gets its own INVALID_ARGUMENT, every
    good one the answer it gets alone."""
    texts = [GOOD_TEXT, "", "a blue square above a red circle", "\xff", "a green triangle"] * 3

    def ask(t):
        return server.infer(
            "grpc", "text_video_rerank", good(server.facts, "text_video_rerank") | {"text": text(t)}
        )

    alone = {t: ask(t) for t in set(texts)}

    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(ask, texts))
    for t, result in zip(texts, results, strict=True):
        if t in ("", "\xff"):
            assert isinstance(result, Refused) and result.status == "StatusCode.INVALID_ARGUMENT", result
        else:
            assert isinstance(result, dict), result
            np.testing.assert_array_equal(result["ids"], alone[t]["ids"])
            np.testing.assert_allclose(result["scores"], alone[t]["scores"], atol=1e-6)


def test_the_catalogue_covers_the_prota_models(server):
    assert {c.model for c in CASES} >= {"text_video_rerank", "video_pair_scorer", "video_encoder"}


@pytest.mark.parametrize("protocol", PROTOCOLS)
@pytest.mark.parametrize("case", CASES, ids=[c.id for c in CASES])
def test_hostile_input_is_the_clients_error_and_changes_nothing(server, case, protocol):
    f = server.facts
    result = server.infer(protocol, case.model, case.change(f, good(f, case.model)), case.outputs)
    assert isinstance(result, Refused), f"{case.id}: answered {result}"
    assert result.status == ("StatusCode.INVALID_ARGUMENT" if protocol == "grpc" else "400"), result
    assert re.search(case.expect, result.message), result.message
    assert_same(server.answers(), server.reference)


def test_cli_rerank_search_and_check(server, prota_repository):
    url = ["--url", server.triton.grpc_url]
    ranked = subprocess.run(
        [XMR, "search", "a red circle", "--videos", "--rerank", "-k", "3", *url],
        capture_output=True,
        text=True,
    )
    assert ranked.returncode == 0 and ranked.stdout.count("video id") == 3, ranked.stdout + ranked.stderr
    alone = subprocess.run([XMR, "search", "a red circle", "--rerank", *url], capture_output=True, text=True)
    message = " ".join(alone.stderr.replace("│", " ").split())  # typer's error box, unwrapped
    assert alone.returncode == 2, message
    assert "--rerank re-ranks the video search: pass --videos too" in message, message
    check = subprocess.run(
        [XMR, "check", str(prota_repository), "--n", "16", *url], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout + check.stderr
    assert "re-ranked (text_video_rerank): rankings equal (up to ties): 16/16" in check.stdout, check.stdout


def test_bench_in_process_rerank_answers_as_the_server(server, prota_repository):
    """perf/bench_served.py's in-process side of the BLS model (its called models called directly)
    answers exactly as the served one: the ratio it reports compares like with like."""
    from xmr.perf.bench_served import InProcessEndpoint

    endpoint = InProcessEndpoint(prota_repository, "text_video_rerank")
    for t in (GOOD_TEXT, "a blue square above a red circle"):
        request = {"text": text(t), "top_k": col(5, np.int64)}
        got = endpoint(request)
        want = server.infer("grpc", "text_video_rerank", request)
        np.testing.assert_array_equal(got["ids"], want["ids"])
        np.testing.assert_allclose(got["scores"], want["scores"], atol=1e-5)
