"""One repository serving every family: image-text, text-video (ViSERN) and video moments (CDNet).

A tiny ViSERN and a tiny CDNet are trained (one epoch on 64 MovingShapes videos, a 40-step frame backbone
shared through one cache) and exported in the standard form; `build_repository` puts them beside the tiny
image-text artifact (conftest) in ONE repository, which the real tritonserver serves. The served ids,
scores, embeddings and moment windows must equal the in-process ones (PyTorch, and the shared span
post-processing), and bad input must be the client's error, naming it, without failing other requests.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from test_model_configs import check_against_manifest, parse_configs

from xmr.export.iospec import ModelSpec
from xmr.export.repository import ENSEMBLES, build_repository, read_serving, serves_as, step_maps
from xmr.models.errors import InputError

XMR = str(Path(sys.executable).parent / "xmr")
TINY_DATA = {"n_train": 64, "n_val": 16, "n_test": 16}


@pytest.fixture(scope="module")
def family_artifacts(tmp_path_factory, family_exporter):
    """ViSERN and CDNet artifacts trained a little longer than the cheap ones (40 backbone steps)."""
    return family_exporter(tmp_path_factory.mktemp("families"), TINY_DATA, 40, 16)


@pytest.fixture(scope="module")
def mixed_repository(tiny_artifacts, family_artifacts, tmp_path_factory):
    folders = [tiny_artifacts, family_artifacts["visern"], family_artifacts["cdnet"]]
    return build_repository(folders, tmp_path_factory.mktemp("mixed") / "repository", "cpu")


@pytest.fixture(scope="module")
def mixed_triton(mixed_repository):
    from xmr.clients.server import TritonServer

    server = TritonServer(mixed_repository).start()
    yield server
    start = time.monotonic()
    server.stop()
    stop_s = time.monotonic() - start  # was 30 s: Triton's exit timeout, waiting for leaked requests
    assert stop_s < 10.0, f"a clean stop of the 16-model server took {stop_s:.1f} s"


# ----------------------------------------------------------------------------- export + repository


@pytest.mark.slow
def test_video_export_writes_the_gallery_and_cdnet_the_clip_store(family_artifacts):
    visern = json.loads((family_artifacts["visern"] / "manifest.json").read_text())
    gallery = np.load(family_artifacts["visern"] / "gallery.npy")
    assert gallery.shape == (16, visern["model_config"]["embed_dim"]) and gallery.dtype == np.float32
    assert np.allclose(np.linalg.norm(gallery, axis=1), 1, atol=1e-5)
    assert (np.load(family_artifacts["visern"] / "gallery_ids.npy") == np.arange(16)).all()
    assert {"gallery.npy", "gallery_ids.npy"} <= set(visern["files"]) and visern["gallery"]["size"] == 16
    cdnet = json.loads((family_artifacts["cdnet"] / "manifest.json").read_text())
    assert "clip_features.npz" in cdnet["files"]
    with np.load(family_artifacts["cdnet"] / "clip_features.npz") as store:
        assert set(store.files) == {"ids", "clips", "clip_mask", "durations"}  # no grid: a 1-D model
        assert store["clips"].shape[:2] == store["clip_mask"].shape and len(store["ids"]) == 16
        assert np.allclose(store["durations"], cdnet["preprocessing"]["duration_s"])


@pytest.mark.slow
def test_mixed_repository_configs_parse_and_name_every_family(mixed_repository):
    configs = parse_configs(mixed_repository)
    check_against_manifest(mixed_repository, configs)
    serving = read_serving(mixed_repository)
    assert set(serving["artifacts"]) == {"image_text", "video", "moments"}
    for name in ("text_search", "image_embed", "tokenizer", "text_encoder", "gallery_topk"):  # unchanged
        assert serving["families"][name] == "image_text"
    for name in (
        "text_video_search",
        "video_embed",
        "video_tokenizer",
        "video_text_encoder",
        "video_encoder",
    ):
        assert serving["families"][name] == "video"
    for name in ("moment_search", "moment_tokenizer", "moment_clips", "moment_model", "moment_postprocess"):
        assert serving["families"][name] == "moments"
    for name in set(configs) & set(ENSEMBLES):  # text_search is one python model on the cpu target
        assert (configs[name].platform == "ensemble") == (serves_as(name, "cpu") == "ensemble"), name
    # ViSERN's video_embed takes regions (ProTA's would take frames); CDNet without a grid maps no grid
    assert [i.name for i in configs["video_embed"].input] == ["regions", "frame_mask"]
    # the ensemble form (the gpu target's; the cpu target serves moment_search as one python model)
    specs = {n: ModelSpec.from_dict(d) for n, d in serving["specs"].items()}
    maps = {s.model: step_maps(s, specs[s.model]) for s in ENSEMBLES["moment_search"]}
    assert "grid" not in maps["moment_model"][0] and "grid" not in maps["moment_clips"][1]
    assert (mixed_repository / "moment_clips/1/clip_features.npz").is_file()
    assert (mixed_repository / "video_gallery_topk/1/gallery.npy").is_file()
    assert not (mixed_repository / "manifest.json").exists()  # one manifest per artifact: see serving.json


@pytest.mark.slow
def test_repository_refuses_two_of_a_family_and_plugin_graphs(tiny_artifacts, family_artifacts, tmp_path):
    with pytest.raises(InputError, match="are both image_text artifacts"):
        build_repository([tiny_artifacts, tiny_artifacts], tmp_path / "twice")
    plugin = tmp_path / "plugin"  # the standard export, relabelled as holding a plugin node
    shutil.copytree(family_artifacts["visern"], plugin)
    manifest = json.loads((plugin / "manifest.json").read_text())
    manifest["xmr_nodes"]["video_encoder"] = ["RandomWalkGCN"]
    (plugin / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(InputError, match="video_encoder.onnx holds the plugin nodes RandomWalkGCN"):
        build_repository([plugin], tmp_path / "repo")
    assert not (tmp_path / "twice").exists() and not (tmp_path / "repo").exists()


# ----------------------------------------------------------------------------- served round trips


@pytest.mark.server
@pytest.mark.slow
def test_text_video_search_and_video_embed_equal_in_process(mixed_triton, family_artifacts):
    from xmr.clients.served import check_video
    from xmr.clients.triton_client import XmrClient

    report = check_video(XmrClient(mixed_triton.grpc_url), family_artifacts["visern"], n=64)
    assert report.rows == 64 and report.rows_agreeing == 64, report
    assert report.max_abs_err_text < 1e-4 and report.max_abs_err_video < 1e-4, report
    assert report.served_recall == report.reference_recall and report.ok


@pytest.mark.server
@pytest.mark.slow
def test_moment_search_equals_in_process_postprocess(mixed_triton, family_artifacts):
    from xmr.clients.served import compare_moments, moment_reference
    from xmr.clients.triton_client import XmrClient

    texts, video_ids, reference = moment_reference(family_artifacts["cdnet"], n=32, k=5)
    served = XmrClient(mixed_triton.grpc_url).moment_search(texts, video_ids, 5)
    report = compare_moments(served, reference, tol=1e-3)
    assert report.rows == 32 and report.ok and report.min_iou > 0.999, report
    duration = json.loads((family_artifacts["cdnet"] / "manifest.json").read_text())["preprocessing"]
    for windows in served:
        assert 1 <= len(windows) <= 5 and (np.diff(windows[:, 2]) <= 0).all()  # best first
        assert ((windows[:, 0] >= 0) & (windows[:, 1] <= duration["duration_s"] + 1e-5)).all()
    # one request per query, sent at once (dynamic batching pads texts of different lengths together)
    client = XmrClient(mixed_triton.grpc_url)  # the gRPC client is thread-safe (the HTTP one is not)
    with ThreadPoolExecutor(8) as pool:
        alone = list(pool.map(lambda i: client.moment_search([texts[i]], [video_ids[i]], 5)[0], range(12)))
    assert compare_moments(alone, reference[:12], tol=1e-3).ok


@pytest.mark.server
@pytest.mark.slow
def test_unknown_video_id_is_invalid_argument_and_fails_only_its_request(mixed_triton):
    import tritonclient.grpc as grpcclient
    from tritonclient.utils import InferenceServerException

    from xmr.clients.triton_client import XmrClient

    raw = grpcclient.InferenceServerClient(mixed_triton.grpc_url)

    def ask(video_id: int):
        inputs = []
        for name, array, dtype in (
            ("text", np.array([[b"a red circle appears"]], dtype=object), "BYTES"),
            ("video_id", np.array([[video_id]], np.int64), "INT64"),
            ("top_k", np.array([[3]], np.int64), "INT64"),
        ):
            x = grpcclient.InferInput(name, list(array.shape), dtype)
            x.set_data_from_numpy(array)
            inputs.append(x)
        try:
            return raw.infer("moment_search", inputs).as_numpy("counts")
        except InferenceServerException as e:
            return e

    with ThreadPoolExecutor(6) as pool:  # bad and good requests in the same dynamic batches
        results = list(pool.map(ask, [123456, 0, 1, 123456, 2, 3]))
    for video_id, result in zip([123456, 0, 1, 123456, 2, 3], results, strict=True):
        if video_id == 123456:
            assert isinstance(result, InferenceServerException), result
            assert result.status() == "StatusCode.INVALID_ARGUMENT", result.status()
            assert "video_id 123456 is not in the clip store" in result.message()
        else:
            assert not isinstance(result, Exception) and 1 <= int(result.reshape(-1)[0]) <= 3, result
    client = XmrClient(mixed_triton.grpc_url)
    with pytest.raises(Exception, match="top_k is 50; expected 1 <= top_k <= 10"):
        client.moment_search(["a red circle"], [0], 50)
    with pytest.raises(Exception, match="text 0 is empty"):
        client.text_video_search([""], 3)
    assert client.is_ready()


@pytest.mark.server
@pytest.mark.slow
def test_cli_check_search_moments_on_the_mixed_repository(mixed_triton, mixed_repository):
    url = ["--url", mixed_triton.grpc_url]
    ok = subprocess.run(
        [XMR, "check", str(mixed_repository), "--n", "16", *url], capture_output=True, text=True
    )
    assert ok.returncode == 0, ok.stdout + ok.stderr
    for family in ("image_text", "video", "moments"):
        assert f"{family} (" in ok.stdout, ok.stdout
    assert "served models match PyTorch" in ok.stdout
    videos = subprocess.run(
        [XMR, "search", "a red circle", "--videos", "-k", "3", *url], capture_output=True, text=True
    )
    assert videos.returncode == 0 and videos.stdout.count("video id") == 3, videos.stdout + videos.stderr
    images = subprocess.run([XMR, "search", "a red circle", "-k", "2", *url], capture_output=True, text=True)
    assert images.returncode == 0 and images.stdout.count("gallery id") == 2, images.stdout + images.stderr
    spans = subprocess.run(
        [XMR, "moments", "a red circle appears", "--video", "0", "-k", "2", *url],
        capture_output=True,
        text=True,
    )
    assert spans.returncode == 0 and spans.stdout.count(" s - ") == 2, spans.stdout + spans.stderr
    unknown = subprocess.run(
        [XMR, "moments", "a red circle", "--video", "999", *url], capture_output=True, text=True
    )
    assert unknown.returncode == 1 and "video_id 999 is not in the clip store" in unknown.stderr
    assert "Traceback" not in unknown.stderr
