"""ONNX export parity: the exported towers compute what PyTorch computes and retrieve the same items."""

import json

import numpy as np
import onnx
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
    assert manifest["run"] == str(run)  # what `xmr check` and `xmr optimize` reload the model from
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


def tiny_visern():
    from xmr.models.video.visern import ViSERN, ViSERNConfig

    torch.manual_seed(0)
    cfg = ViSERNConfig(vocab_size=30, region_dim=12, gcn_dim=16, embed_dim=16, conv_channels=8, word_dim=16)
    return ViSERN(cfg).eval()


def video_feeds(seed: int, batch: int, frames: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    mask = np.ones((batch, frames), dtype=bool)
    mask[-1, frames // 2 :] = False  # a padded video
    return {"regions": rng.normal(size=(batch, frames, 4, 12)).astype(np.float32), "frame_mask": mask}


def test_runners_agree_on_one_exported_graph(tmp_path):
    """PyTorch, ONNX Runtime and the reference evaluator through the same `run(feeds)` interface, on one
    graph exported from a `Tower`; the plugin form (an `xmr` node per GCN layer) runs in the runner that
    `runner_for` picks for it."""
    from xmr.export.iospec import visern_video_encoder_spec
    from xmr.export.onnx_export import Tower, export_onnx
    from xmr.export.runners import OnnxRunner, ReferenceRunner, TorchRunner, runner_for

    model = tiny_visern()
    spec = visern_video_encoder_spec(16, 4, 12)
    tower = Tower(model, "encode_video")
    example = tuple(torch.from_numpy(x) for x in video_feeds(0, 2, 5).values())
    for form in ("standard", "plugin"):
        export_onnx(tower, example, spec, tmp_path / f"{form}.onnx", form)
    graph = onnx.load(tmp_path / "standard.onnx")
    assert [i.name for i in graph.graph.input] == spec.input_names
    assert [o.name for o in graph.graph.output] == spec.output_names

    runners = {
        "torch": TorchRunner(tower, spec),
        "onnxruntime": OnnxRunner(tmp_path / "standard.onnx", spec),
        "reference": ReferenceRunner(tmp_path / "standard.onnx", spec),
        "plugin": runner_for(tmp_path / "plugin.onnx", spec, "plugin"),
    }
    assert isinstance(runner_for(tmp_path / "standard.onnx", spec), OnnxRunner)
    assert isinstance(runners["plugin"], ReferenceRunner)
    feeds = video_feeds(1, 3, 7)  # not the export shapes
    outs = {name: r.run(feeds) for name, r in runners.items()}
    want = outs.pop("torch")
    assert list(want) == ["video_embedding"] and want["video_embedding"].shape == (3, 16)
    for name, got in outs.items():
        assert list(got) == list(want), name
        assert np.abs(got["video_embedding"] - want["video_embedding"]).max() < 1e-5, name


def test_manifest_round_trips_through_manifest_json(tmp_path, tiny_artifacts):
    from xmr.export.manifest import Manifest, file_facts, read_manifest, verify_artifacts

    (tmp_path / "model.onnx").write_bytes(b"graph")
    manifest = Manifest(
        model="visern",
        model_config={"embed_dim": 16, "conv_kernels": [2, 3, 4]},
        run="runs/visern",
        specs={"text_encoder": {"name": "text_encoder", "inputs": [], "outputs": []}},
        preprocessing={"max_tokens": 32},
        files=file_facts(tmp_path, ["model.onnx"]),
        versions={"torch": "2"},
        parity={"text_encoder": {"text_embedding": {"max_abs_err": 1e-7, "min_cosine": 1.0}}},
        custom_ops="plugin",
        xmr_nodes={"text_encoder": []},
    )
    path = manifest.write(tmp_path)
    assert path == tmp_path / "manifest.json" and sorted(p.name for p in tmp_path.iterdir()) == [
        "manifest.json",
        "model.onnx",
    ]  # no temporary file left behind
    raw = read_manifest(tmp_path)
    assert "gallery" not in raw and "opset" not in raw  # unset optional fields are left out
    assert Manifest.read(tmp_path) == manifest
    verify_artifacts(tmp_path, raw)

    # a real export's manifest reads back as a Manifest, unchanged
    raw = json.loads((tiny_artifacts / "manifest.json").read_text())
    exported = Manifest.read(tiny_artifacts)
    assert exported.to_dict() == raw
    assert {"model", "specs", "preprocessing", "files", "parity", "gallery"} <= set(raw)
