"""Text search as ONE python-backend model: tokenizer + ONNX Runtime text tower + FAISS top-k in one hop.

The `text_search` ensemble chains three python-backend models; each hop is a round trip through shared
memory to a stub process plus the scheduler's queue (Triton's statistics put 0.3-0.6 ms per hop on top of
its work at one caption per request, `xmr.clients.stats`). `TextSearchModel` runs the same three functions
the three models run (`encode_batch`, `OnnxRunner`, `GalleryIndex`), with the same settings, in one
`execute`: same inputs and outputs as the ensemble (text, top_k -> ids, scores, text_embedding), so it is a
drop-in replacement under the same name.

A dynamic batch is answered as the three models would answer it: each request tokenised on its own, the
readable ones through one ONNX Runtime call (token ids padded to the longest; the tower's mask makes the
padding invisible), then one FAISS call at the batch's largest k; a bad request gets its own error.

`add_fused_text_search(repository, artifacts)` writes the model (config.pbtxt rendered with the serving
tables' own `model_config`, a `model.py` shim, spec.json, its artifacts) into a built cpu repository.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from xmr.export.adapters import Arrays, PythonModel, each
from xmr.export.iospec import ModelSpec
from xmr.export.runtime import GalleryIndex, OnnxRunner, decode_texts
from xmr.models.errors import InputError
from xmr.models.tokenizer import TextLimits, encode_batch, load_tokenizer

SHIM = "from xmr.export.fused import TextSearchModel as TritonPythonModel  # noqa: F401\n"
TOWER_SPEC = "text_encoder.spec.json"
# {file in the version folder: artifact file}
FILES = {
    "tokenizer.json": "tokenizer.json",
    "model.onnx": "text_encoder.onnx",
    "gallery.npy": "gallery.npy",
    "gallery_ids.npy": "gallery_ids.npy",
}


class TextSearchModel(PythonModel):
    """text (B, 1) BYTES, top_k (B,) int32 -> ids (B, k), scores (B, k), text_embedding (B, D)."""

    def load(self, folder: Path, params: dict[str, str]) -> None:
        import faiss

        faiss.omp_set_num_threads(1)  # as the served gallery_topk (OMP_NUM_THREADS=1)
        self.tokenizer = load_tokenizer(folder / "tokenizer.json")
        self.limits = TextLimits(max_tokens=int(params["max_tokens"]), max_bytes=int(params["max_bytes"]))
        tower = ModelSpec.from_dict(json.loads((folder / TOWER_SPEC).read_text()))
        self.runner = OnnxRunner(folder / "model.onnx", tower, threads=int(params["threads"]))
        self.embedding = tower.output_names[0]
        embeddings = np.load(folder / "gallery.npy", allow_pickle=False)
        ids = np.load(folder / "gallery_ids.npy", allow_pickle=False)
        self.index = GalleryIndex(embeddings, ids, kind=params["index"], max_k=int(params["max_k"]))

    def encode(self, x: Arrays) -> Arrays:
        ids, lengths = encode_batch(self.tokenizer, decode_texts(x["text"]), self.limits)
        return {"input_ids": ids, "lengths": lengths}

    def run(self, inputs: list[Arrays]) -> list[Arrays | InputError]:
        results: list = each(inputs, self.encode)  # tokens, or the request's error
        good = [i for i, r in enumerate(results) if not isinstance(r, ValueError)]
        for i, out in zip(good, self.runner.run_requests([results[i] for i in good]), strict=True):
            results[i] = out if isinstance(out, InputError) else out[self.embedding]
        good = [i for i in good if not isinstance(results[i], ValueError)]
        found = self.index.search_requests([(results[i], inputs[i]["top_k"]) for i in good])
        for i, out in zip(good, found, strict=True):
            results[i] = out if isinstance(out, InputError) else {**out, "text_embedding": results[i]}
        return results


def fused_config(manifest: dict, name: str, delay_us: int | None = 0, instances: int = 1) -> str:
    """config.pbtxt of the fused model: the ensemble's I/O, one python model, dynamic batching with
    `delay_us` (None: no dynamic batching), `instances` CPU instances."""
    from xmr.export.repository import model_config, render

    pre = manifest["preprocessing"]
    spec = ModelSpec.from_dict({**manifest["specs"]["text_search"], "name": name})
    params = {
        "max_tokens": json.dumps(pre["max_tokens"]),
        "max_bytes": json.dumps(pre["max_bytes"]),
        "threads": "1",
        "index": "flat",
        "max_k": "1000",
    }
    cfg = model_config(spec, params, dynamic_batching=delay_us is not None)
    if delay_us is not None:
        cfg.dynamic_batching.max_queue_delay_microseconds = delay_us
    cfg.instance_group[0].count = instances
    return render(cfg)


def add_fused_text_search(
    repository: Path, artifacts: Path, name: str = "text_search", delay_us: int | None = 0, instances: int = 1
) -> Path:
    """Write the fused model as `name` into a built cpu `repository` (replacing what is there under that
    name, e.g. the ensemble); the composing models stay. Returns the model's folder."""
    repository, artifacts = Path(repository), Path(artifacts)
    manifest = json.loads((repository / "manifest.json").read_text())
    if "text_search" not in manifest.get("specs", {}):
        raise InputError(f"{repository} serves no text_search; nothing to fuse")
    folder = repository / name
    shutil.rmtree(folder, ignore_errors=True)
    version = folder / "1"
    version.mkdir(parents=True)
    for dest, src in FILES.items():
        shutil.copy2(artifacts / src, version / dest)
    spec = {**manifest["specs"]["text_search"], "name": name}
    (version / "spec.json").write_text(json.dumps(spec, indent=2))
    (version / TOWER_SPEC).write_text(json.dumps(manifest["specs"]["text_encoder"], indent=2))
    (version / "model.py").write_text(SHIM)
    (folder / "config.pbtxt").write_text(fused_config(manifest, name, delay_us, instances))
    return folder
