"""ONNX export parity: the exported towers compute what PyTorch computes and retrieve the same items."""

import json

import numpy as np
import onnxruntime as ort
import torch

from xmr.models.checkpoint import load_run


def test_manifest_parity_figures(tiny_artifacts):
    parity = json.loads((tiny_artifacts / "manifest.json").read_text())["parity"]
    for tower in ("image_encoder", "text_encoder"):
        assert parity[tower]["max_abs_err"] < 1e-4
        assert parity[tower]["min_cosine"] > 0.9999
    torch_r, onnx_r = parity["recall"]["pytorch"], parity["recall"]["onnxruntime"]
    for key in ("i2t_R@1", "i2t_R@5", "t2i_R@1", "t2i_R@5", "t2i_R@10"):
        assert abs(torch_r[key] - onnx_r[key]) <= 1.0  # identical up to near-ties


def test_dynamic_batch_and_length_match_pytorch(tiny_run, tiny_artifacts):
    model, _, _ = load_run(tiny_run)
    text = ort.InferenceSession(str(tiny_artifacts / "text_encoder.onnx"))
    image = ort.InferenceSession(str(tiny_artifacts / "image_encoder.onnx"))
    rng = np.random.default_rng(0)
    vocab = model.cfg.vocab_size
    for batch, length in ((1, 1), (3, 17), (9, 32)):
        ids = rng.integers(2, vocab, size=(batch, length)).astype(np.int64)
        lengths = rng.integers(1, length + 1, size=batch).astype(np.int64)
        got = text.run(None, {"input_ids": ids, "lengths": lengths})[0]
        with torch.no_grad():
            want = model.encode_text(torch.from_numpy(ids), torch.from_numpy(lengths)).numpy()
        assert np.abs(got - want).max() < 1e-4
    for batch in (1, 5):
        pixels = rng.normal(size=(batch, 3, 64, 64)).astype(np.float32)
        got = image.run(None, {"pixel_values": pixels})[0]
        with torch.no_grad():
            want = model.encode_image(torch.from_numpy(pixels)).numpy()
        assert np.abs(got - want).max() < 1e-4


def test_precomputed_features_train_export_and_serve_specs(precomputed_root, tmp_path):
    from xmr.export.onnx_export import export_run
    from xmr.export.repository import build_repository
    from xmr.models.train.image_text import TrainConfig, train

    run = tmp_path / "run"
    train(TrainConfig(data="precomputed", data_root=str(precomputed_root), epochs=1, batch_size=32), run)
    manifest = export_run(run, tmp_path / "artifacts")
    assert manifest["specs"]["image_encoder"]["inputs"][0]["name"] == "regions"
    assert "image_embed" not in manifest["specs"]  # no pixels, no raw-image ensemble
    assert manifest["parity"]["image_encoder"]["max_abs_err"] < 1e-4
    repo = build_repository(tmp_path / "artifacts", tmp_path / "repo", "cpu")
    assert sorted(p.name for p in repo.iterdir() if p.is_dir()) == [
        "gallery_topk",
        "image_encoder",
        "text_encoder",
        "text_search",
        "tokenizer",
    ]
