"""The per-hop breakdown from Triton's statistics (`xmr.clients.stats`) and the one-hop text search the cpu
target serves (`xmr.export.adapters.TextSearchModel`): pure arithmetic on synthetic counters, then the real
tritonserver, where the gpu target's three-hop ensemble is served beside it for comparison."""

from __future__ import annotations

import shutil
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from rich.console import Console

from xmr.clients.stats import (
    BETWEEN,
    CSV_FIELDS,
    STAGES,
    Counters,
    StatsProbe,
    breakdown_csv,
    breakdown_from,
    breakdown_table,
)
from xmr.models.data import load_split

STEPS = ["tokenizer", "text_encoder", "gallery_topk"]


def render(table) -> str:
    console = Console(width=200, record=True)
    console.print(table)
    return console.export_text()


def counters(model: str, n: int, batch: int, execs: int, us: tuple[int, int, int, int], total: int):
    return Counters(model, n, 0, n * batch, execs, total * n * 1000, *(t * n * 1000 for t in us))


def test_breakdown_diffs_snapshots_and_divides_per_request_and_per_inference():
    before = {m: counters(m, 5, 2, 5, (1, 1, 1, 1), 9) for m in ["text_search", *STEPS]}
    after = {
        "text_search": before["text_search"] + counters("text_search", 10, 4, 10, (0, 3, 60, 6), 100),
        "tokenizer": before["tokenizer"] + counters("tokenizer", 10, 4, 10, (2, 1, 10, 1), 14),
        "text_encoder": before["text_encoder"] + counters("text_encoder", 10, 4, 5, (20, 1, 40, 1), 62),
        "gallery_topk": before["gallery_topk"] + counters("gallery_topk", 10, 4, 10, (5, 1, 10, 4), 20),
    }
    b = breakdown_from("text_search", STEPS, before, after)
    assert [h.model for h in b.hops] == ["text_search", *STEPS, BETWEEN]
    enc = b["text_encoder"]
    assert (enc.requests, enc.inferences, enc.executions) == (10, 40, 5)
    assert (enc.queue_us, enc.compute_infer_us, enc.total_us) == pytest.approx((20, 40, 62))
    assert enc.batch == 4 and enc.dynamic_batch == 2
    assert enc.as_dict()["total_us_per_inference"] == pytest.approx(62 / 4)
    assert b.total_us == pytest.approx(100)
    assert b[BETWEEN].total_us == pytest.approx(100 - 14 - 62 - 20)


def test_table_and_csv_name_every_hop():
    snap = {m: counters(m, 3, 1, 3, (1, 2, 3, 4), 10) for m in ["text_search", *STEPS]}
    b = breakdown_from("text_search", STEPS, {}, snap)
    text = render(breakdown_table(b))
    assert all(m in text for m in ["text_search", *STEPS, BETWEEN])
    lines = breakdown_csv(b.rows(batch=1, concurrency=4)).splitlines()
    assert lines[0].split(",") == ["batch", "concurrency", *CSV_FIELDS]
    assert [ln.split(",")[2] for ln in lines[1:]] == ["text_search", *STEPS, BETWEEN]


# ----------------------------------------------------------------------------- the real server


@pytest.fixture(scope="module")
def shapes_test():
    test = load_split("shapes", "test")
    return {"captions": test.flat_captions()[:12], "images": test.images[:16]}


@pytest.fixture(scope="module")
def both_forms(tiny_repository, tmp_path_factory):
    """The tiny cpu repository (text_search: the one-hop python model) plus the gpu target's form of it,
    the tokenizer -> text_encoder -> gallery_topk ensemble, as `text_search_ensemble`."""
    from xmr.clients.server import TritonServer
    from xmr.export.repository import add_ensemble_form

    repo = tmp_path_factory.mktemp("forms") / "repository"
    shutil.copytree(tiny_repository, repo)
    add_ensemble_form(repo, "text_search", "text_search_ensemble")
    server = TritonServer(repo).start()
    yield server
    server.stop()


def measured(url: str, model: str, send, n: int):
    """The breakdown of `n` calls of `send(i)`, after one uncounted call."""
    with StatsProbe(url, model) as probe:
        send(0)  # outside the measurement: not counted
        probe.start()
        for i in range(n):
            send(i)
        return probe.steps, probe.stop()


@pytest.mark.server
@pytest.mark.slow
def test_stats_count_exactly_the_requests_sent_on_every_hop(both_forms, shapes_test):
    from xmr.clients.triton_client import XmrClient

    client = XmrClient(both_forms.grpc_url)
    n = 7
    images = shapes_test["images"]
    steps, b = measured(
        both_forms.grpc_url, "image_embed", lambda i: client.image_embed(images[i : i + 2]), n
    )
    assert steps == ["preprocess", "image_encoder"]
    assert [h.model for h in b.hops] == ["image_embed", *steps, BETWEEN]
    for h in b.hops[:-1]:
        assert (h.requests, h.failures, h.inferences) == (n, 0, 2 * n), h  # 2 images per request
        assert all(getattr(h, f"{s}_us") >= 0 for s in STAGES) and h.total_us > 0, h
        assert h.compute_infer_us > 0
    assert b.total_us >= max(h.total_us for h in b.hops[1:-1])
    text = render(breakdown_table(b))
    csv_text = breakdown_csv(b.rows())
    for model in ["image_embed", *steps, BETWEEN]:
        assert model in text and f"\n{model}," in csv_text

    # the served text_search is one hop: no steps, nothing between hops
    captions = shapes_test["captions"]
    steps, b = measured(
        both_forms.grpc_url, "text_search", lambda i: client.text_search(captions[i : i + 2], 5), n
    )
    assert steps == [] and [(h.model, h.role) for h in b.hops] == [("text_search", "model")]
    (h,) = b.hops
    assert (h.requests, h.failures, h.inferences) == (n, 0, 2 * n) and h.compute_infer_us > 0
    assert "\ntext_search," in breakdown_csv(b.rows()) and BETWEEN not in render(breakdown_table(b))
    client.close()


def search(client, model: str, texts: list[str], k: int) -> dict:
    text = np.array([t.encode() for t in texts], dtype=object).reshape(-1, 1)
    top_k = np.full((len(texts), 1), k, dtype=np.int64)
    inputs = {"text": (text, "BYTES"), "top_k": (top_k, "INT64")}
    return client.raw_infer(model, inputs, ["ids", "scores", "text_embedding"])


@pytest.mark.server
@pytest.mark.slow
def test_one_hop_text_search_answers_as_the_three_hop_ensemble(both_forms, shapes_test):
    from xmr.clients.triton_client import XmrClient

    captions = shapes_test["captions"]
    client = XmrClient(both_forms.grpc_url)
    for texts in [captions[:1], captions[:8], [captions[3], "red", captions[5]]]:  # mixed lengths
        ens, one = search(client, "text_search_ensemble", texts, 10), search(client, "text_search", texts, 10)
        assert (one["ids"] == ens["ids"]).all()
        assert np.abs(one["scores"] - ens["scores"]).max() < 1e-5
        assert np.abs(one["text_embedding"] - ens["text_embedding"]).max() < 1e-5
    # the text tower served on its own gives the same embedding
    tokens = client.raw_infer(
        "tokenizer",
        {"text": (np.array([[captions[0].encode()]], dtype=object), "BYTES")},
        ["input_ids", "lengths"],
    )
    lengths = tokens["lengths"].reshape(-1, 1)
    inputs = {"input_ids": (tokens["input_ids"], "INT64"), "lengths": (lengths, "INT64")}
    embedded = client.raw_infer("text_encoder", inputs, ["text_embedding"])["text_embedding"]
    assert np.abs(embedded - search(client, "text_search", captions[:1], 1)["text_embedding"]).max() < 1e-5
    # concurrent single-caption requests are dynamically batched (padded together): same answers
    with ThreadPoolExecutor(6) as pool:
        one_by_one = list(pool.map(lambda t: search(client, "text_search", [t], 5)["ids"], captions))
    assert (np.concatenate(one_by_one) == search(client, "text_search_ensemble", captions, 5)["ids"]).all()
    client.close()


@pytest.mark.server
@pytest.mark.slow
def test_one_hop_text_search_gives_the_ensembles_errors(both_forms):
    from xmr.clients.triton_client import ServerError, XmrClient

    client = XmrClient(both_forms.grpc_url)
    for model in ("text_search", "text_search_ensemble"):
        with pytest.raises(ServerError, match="text 0 is empty; expected at least one word"):
            search(client, model, [""], 5)
        with pytest.raises(ServerError, match=r"top_k is 0; expected 1 <= top_k"):
            search(client, model, ["a red circle"], 0)
    assert search(client, "text_search", ["a red circle"], 3)["ids"].shape == (1, 3)  # still up
    client.close()
