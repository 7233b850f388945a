"""`python -m xmr.perf.bench_served`: its in-process side answers as the server does, and a short run
writes every output for every entry point."""

from __future__ import annotations

import csv
import os

import numpy as np
import pytest

from xmr.clients.load import build_requests, load_content, repository_ensembles
from xmr.clients.load import read_manifest as repository_manifest
from xmr.perf.bench_served import InProcessEndpoint, batched, main, perf_analyzer_data

pytestmark = pytest.mark.server


def test_perf_analyzer_data_is_one_batch1_row_per_request_without_the_batch_dim():
    requests = [
        {"text": (np.array([[b"a red circle"]], dtype=object), "BYTES"), "k": (np.array([[3]]), "INT32")},
        {"text": (np.array([[b"two squares"]], dtype=object), "BYTES"), "k": (np.array([[5]]), "INT32")},
    ]
    data = perf_analyzer_data(requests)["data"]
    assert data[1] == {
        "text": {"content": ["two squares"], "shape": [1]},
        "k": {"content": [5], "shape": [1]},
    }
    frames = {"x": (np.arange(12, dtype=np.float32).reshape(1, 2, 6), "FP32")}
    assert perf_analyzer_data([frames])["data"][0]["x"] == {"content": list(range(12)), "shape": [2, 6]}


def test_batched_stacks_consecutive_requests_and_wraps():
    rows = [{"x": np.full((1, 2), i)} for i in range(3)]
    out = batched(rows, 2)
    assert len(out) == 3 and out[0]["x"].shape == (2, 2)
    assert [b["x"][:, 0].tolist() for b in out] == [[0, 1], [2, 0], [1, 2]]


@pytest.fixture(scope="module")
def every_family_triton(every_family_repository):
    from xmr.clients.server import TritonServer

    server = TritonServer(every_family_repository).start()
    yield server
    server.stop()


@pytest.mark.slow
def test_in_process_endpoints_answer_as_the_server(every_family_repository, every_family_triton):
    import tritonclient.grpc as grpcclient

    from xmr.clients.load import infer_inputs

    names = repository_ensembles(every_family_repository)
    assert {"text_search", "image_embed", "text_video_search", "video_embed", "moment_search"} <= set(names)
    manifest = repository_manifest(every_family_repository)
    requests = build_requests(manifest, names, load_content(manifest, n=4), n=4)
    client = grpcclient.InferenceServerClient(every_family_triton.grpc_url)
    try:
        for name in names:
            endpoint = InProcessEndpoint(every_family_repository, name)
            outputs = [t["name"] for t in client.get_model_metadata(name, as_json=True)["outputs"]]
            for request in requests[name]:
                served = client.infer(name, infer_inputs(grpcclient, request))
                local = endpoint({k: array for k, (array, _) in request.items()})
                for out in outputs:
                    want, got = served.as_numpy(out), local[out]
                    assert want.size == got.size, (name, out)
                    got = got.reshape(want.shape)  # Triton's reshape of one-value rows ((B,) -> (B, 1))
                    if np.issubdtype(want.dtype, np.floating):
                        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5, err_msg=f"{name}.{out}")
                    else:
                        assert (got == want).all(), (name, out)
    finally:
        client.close()


@pytest.mark.slow
def test_a_short_run_writes_every_output(tiny_repository, tmp_path):
    out = tmp_path / "served"
    args = ["--repository", str(tiny_repository), "--out", str(out), "--concurrency", "1", "2"]
    args += ["--window-ms", "300", "--stability", "100", "--max-trials", "3", "--min-requests", "5"]
    assert main(args) == 0
    rows = list(csv.DictReader((out / "served.csv").open()))
    assert {(r["endpoint"], r["backend"], r["concurrency"]) for r in rows} == {
        (e, b, c)
        for e in ("image_embed", "text_search")
        for b in ("served", "in-process")
        for c in ("1", "2")
    }
    assert all(float(r["throughput_qps"]) > 0 for r in rows)
    # where the CPU went: the server, its stubs and perf_analyzer for served points, this process in-process
    for r in rows:
        measured = (
            ("cores_server", "cores_stubs", "cores_client") if r["backend"] == "served" else ("cores_client",)
        )
        assert all(0 < float(r[k]) <= os.cpu_count() + 0.5 for k in measured), r
    ratios = list(csv.DictReader((out / "served_ratio.csv").open()))
    assert len(ratios) == 4 and all(float(r["served_over_in_process"]) > 0 for r in ratios)
    hops = list(csv.DictReader((out / "served_hops.csv").open()))
    assert {"image_embed", "preprocess", "image_encoder"} <= {
        h["model"] for h in hops if h["endpoint"] == "image_embed"
    }
    assert (out / "served.png").read_bytes()[:4] == b"\x89PNG"
