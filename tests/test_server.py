"""Round trips through the real tritonserver (nvidia-pytriton's binary) on free loopback ports."""

import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest

from xmr.clients.served import rankings_agree
from xmr.clients.triton_client import ServerError, XmrClient
from xmr.models.checkpoint import load_run
from xmr.models.data import load_split
from xmr.models.errors import InputError
from xmr.models.evaluate.image_text import embed_images, embed_texts

pytestmark = [pytest.mark.server, pytest.mark.slow]
XMR = str(Path(sys.executable).parent / "xmr")


@pytest.fixture(scope="module")
def reference(tiny_run, tiny_artifacts):
    model, tokenizer, _ = load_run(tiny_run)
    test = load_split("shapes", "test")
    texts = test.flat_captions()[:40]
    return {
        "texts": texts,
        "images": test.images[:16],
        "text_embedding": embed_texts(model, tokenizer, texts),
        "image_embedding": embed_images(model, test.images[:16]),
        "gallery": np.load(tiny_artifacts / "gallery.npy"),
    }


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_text_search_ranking_equals_in_process(triton, reference, protocol):
    client = XmrClient(triton.grpc_url if protocol == "grpc" else triton.http_url, protocol)
    result = client.text_search(reference["texts"], k=10)
    assert result.ids.shape == (40, 10) and result.ids.dtype == np.int64
    assert np.abs(result.text_embedding - reference["text_embedding"]).max() < 1e-4
    brute_force = np.argsort(-(reference["text_embedding"] @ reference["gallery"].T), axis=1)[:, :10]
    agree = rankings_agree(result.ids, result.scores, reference["text_embedding"], reference["gallery"], 1e-4)
    assert agree.all(), (
        f"served top-10 differs from numpy brute force: {result.ids[~agree]} vs {brute_force[~agree]}"
    )


def test_image_embed_equals_pytorch(triton, reference):
    served = XmrClient(triton.grpc_url).image_embed(reference["images"])
    assert np.abs(served - reference["image_embedding"]).max() < 1e-4


def test_concurrent_requests_are_batched_without_changing_results(triton, reference):
    """Dynamic batching pads captions of different lengths together; answers must not change."""
    client = XmrClient(triton.grpc_url)
    texts = reference["texts"][:24]
    with ThreadPoolExecutor(8) as pool:
        results = list(pool.map(lambda t: client.text_search([t], 5), texts))
    ids = np.concatenate([r.ids for r in results])
    assert (ids == client.text_search(texts, 5).ids).all()


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "text 0 is empty; expected at least one word"),
        ("zebra giraffe elephant", "text 0 has no known words"),
        ("red " * 25_600, "text 0 is 102400 bytes; the limit is 4096"),
    ],
)
def test_bad_text_gets_a_clear_error_and_the_server_stays_up(triton, text, message):
    client = XmrClient(triton.grpc_url)
    with pytest.raises(ServerError, match=message):
        client.text_search([text], 5)
    assert client.is_ready()
    assert client.text_search(["a red circle"], 1).ids.shape == (1, 1)


def test_wrong_dtype_and_bad_top_k_are_refused(triton):
    client = XmrClient(triton.grpc_url)
    with pytest.raises(
        ServerError, match="input 'image' data-type is 'FP32', but model 'image_embed' expects 'UINT8'"
    ):
        client.raw_infer(
            "image_embed", {"image": (np.zeros((1, 64, 64, 3), np.float32), "FP32")}, ["image_embedding"]
        )
    with pytest.raises(InputError, match="input 'image' has dtype float32; expected uint8"):
        client.image_embed(np.zeros((1, 64, 64, 3), np.float32))
    with pytest.raises(ServerError, match="top_k is 100000; expected 1 <= top_k <= 64"):
        client.text_search(["a red circle"], 100_000)
    with pytest.raises(ServerError, match="unknown|not found"):
        client.raw_infer("no_such_model", {"x": (np.zeros((1, 1), np.float32), "FP32")}, ["y"])
    assert client.is_ready()


def test_cli_check_search_and_errors(triton, tiny_artifacts):
    ok = subprocess.run(
        [XMR, "check", str(tiny_artifacts), "--url", triton.grpc_url, "--n", "16"],
        capture_output=True,
        text=True,
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "served models match PyTorch" in ok.stdout
    found = subprocess.run(
        [XMR, "search", "a red circle", "-k", "3", "--protocol", "http", "--url", triton.http_url],
        capture_output=True,
        text=True,
    )
    assert found.returncode == 0 and found.stdout.count("gallery id") == 3
    empty = subprocess.run([XMR, "search", "", "--url", triton.grpc_url], capture_output=True, text=True)
    assert empty.returncode == 1 and "text 0 is empty" in empty.stderr and "Traceback" not in empty.stderr


def test_served_tokenizer_gives_the_training_ids(triton, tiny_run, reference):
    from xmr.models.tokenizer import TextLimits, encode_batch, load_tokenizer

    texts = reference["texts"][:8] + ["A RED Circle, above   a blue square!"]
    text = np.array([t.encode() for t in texts], dtype=object).reshape(-1, 1)
    served = XmrClient(triton.grpc_url).raw_infer(
        "tokenizer", {"text": (text, "BYTES")}, ["input_ids", "lengths"]
    )
    ids, lengths = encode_batch(load_tokenizer(tiny_run / "tokenizer.json"), texts, TextLimits())
    assert np.array_equal(served["input_ids"], ids) and np.array_equal(served["lengths"].reshape(-1), lengths)


def test_xmr_serve_binds_loopback_and_stops_on_sigterm(tiny_repository):
    import signal
    import time

    from xmr.clients.server import free_port

    grpc_port, http_port = free_port(), free_port()
    proc = subprocess.Popen(
        [XMR, "serve", str(tiny_repository), "--grpc-port", str(grpc_port), "--http-port", str(http_port)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        line = proc.stdout.readline()
        assert f"gRPC 127.0.0.1:{grpc_port}" in line and f"HTTP 127.0.0.1:{http_port}" in line, line
        assert XmrClient(f"127.0.0.1:{grpc_port}").is_ready()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0
        time.sleep(0.5)
        assert not XmrClient(f"127.0.0.1:{http_port}", "http").is_ready()
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.mark.parametrize("protocol", ["grpc", "http"])
def test_text_search_answers_any_subset_of_its_outputs(triton, reference, protocol):
    """A client may ask for `ids` alone (the ensemble form failed that with "unexpected deadlock")."""
    if protocol == "grpc":
        import tritonclient.grpc as tc

        client = tc.InferenceServerClient(triton.grpc_url)
    else:
        import tritonclient.http as tc

        client = tc.InferenceServerClient(triton.http_url)
    text = tc.InferInput("text", [2, 1], "BYTES")
    text.set_data_from_numpy(np.array([[t.encode()] for t in reference["texts"][:2]], dtype=object))
    top_k = tc.InferInput("top_k", [2, 1], "INT64")
    top_k.set_data_from_numpy(np.full((2, 1), 5, np.int64))
    full = XmrClient(triton.grpc_url, "grpc").text_search(reference["texts"][:2], k=5)
    for names in (["ids"], ["ids", "scores"], ["text_embedding"]):
        result = client.infer(
            "text_search", [text, top_k], outputs=[tc.InferRequestedOutput(n) for n in names]
        )
        got = {n: result.as_numpy(n) for n in ("ids", "scores", "text_embedding")}
        assert {n for n, v in got.items() if v is not None} == set(names)
        if "ids" in names:
            np.testing.assert_array_equal(got["ids"], full.ids)
