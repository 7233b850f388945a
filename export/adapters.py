"""The python-backend models of the Triton repository, as importable classes.

Every `model.py` that `xmr repo` writes is a one-line shim, e.g.
`from xmr.export.adapters import OnnxModel as TritonPythonModel`: the python backend loads the
`TritonPythonModel` attribute of that file. Each class is a thin adapter over `xmr.export.runtime`:
`initialize` checks the version folder's artifact files against the record of serving.json
(`pb.verify_files`: a corrupted file is refused before it is read), then builds the runtime object once
from the folder (`spec.json`, `bounds.json`, the artifacts) and the config's `parameters`; `execute`
reads every request of a (dynamic) batch and checks each one alone at the model's boundary (`check`:
dtype, finiteness, the structural token rules of `check_feeds`, and the bounds `xmr repo` derived from
the artifact: ids within the vocabulary, pixels within the normalised range, a query's norm, a text's
bytes, the size of dynamic dims), hands the valid ones to `run` at once, and answers each request with its
outputs or its own error (`TritonError`, INVALID_ARG for bad input), so one bad request never fails the
others nor the server. A model's float outputs are checked finite before they are returned.

`TextSearchModel` is the one-hop text search the cpu target serves as `text_search` (tokenizer + ONNX
Runtime text tower + FAISS top-k in one `execute`); the gpu target serves the three-model ensemble instead.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np

from xmr.export import pb
from xmr.export.iospec import ModelSpec
from xmr.export.runners import BOUNDS, Bound, check_bounds, check_feeds, check_outputs, read_bounds
from xmr.export.runtime import ClipStore, GalleryIndex, OnnxRunner, decode_texts, moment_windows, one_top_k
from xmr.models.errors import InputError
from xmr.models.image_text.preprocess import preprocess_images
from xmr.models.tokenizer import TextLimits, encode_batch, load_tokenizer

Arrays = dict[str, np.ndarray]


def each(inputs: list[Arrays], fn: Callable[[Arrays], Arrays]) -> list[Arrays | ValueError]:
    """`fn` on every request alone; a request that raises ValueError (InputError) gets its error back."""
    results: list[Arrays | ValueError] = []
    for x in inputs:
        try:
            results.append(fn(x))
        except ValueError as e:
            results.append(e)
    return results


def guarded(spec: ModelSpec, result: Arrays | ValueError) -> Arrays | ValueError:
    """A request's result, or an InputError if one of its float outputs is NaN or infinite."""
    if isinstance(result, ValueError):
        return result
    try:
        return check_outputs(spec, result)
    except InputError as e:
        return e


class PythonModel:
    """A python-backend model: `load` once from the version folder, `check` each request at the
    boundary, `run` on the valid requests."""

    spec: ModelSpec
    bounds: tuple[Bound, ...] = ()

    def initialize(self, args: dict) -> None:
        folder, params = pb.setup(args)
        pb.verify_files(folder)
        self.spec = pb.spec_from(folder)
        self.bounds = read_bounds(folder / BOUNDS)
        self.load(folder, params)

    def execute(self, requests):
        return pb.answer(requests, self.spec, self.run, self.check)

    def check(self, x: Arrays) -> None:
        """One request's inputs at the boundary, before `run` reads them (a text's bytes before it is
        decoded, token ids before ONNX Runtime): dtypes, finiteness and the token rules, then the bounds;
        InputError naming the input, the offending value and what is expected."""
        check_feeds(self.spec, x)
        check_bounds(self.spec, self.bounds, x)

    def load(self, folder: Path, params: dict[str, str]) -> None:
        raise NotImplementedError

    def run(self, inputs: list[Arrays]) -> list[Arrays | InputError]:
        """One result (outputs by name, or the request's error) per request, in order."""
        raise NotImplementedError


class OnnxModel(PythonModel):
    """ONNX Runtime (CPU) on the version folder's `model.onnx`: any exported tower.

    All requests of a dynamic batch run as one ONNX Runtime call (dynamic dims padded to the longest, e.g.
    token ids; the towers' masks make the padding invisible), then the outputs are split back per request.
    A graph without a batch dim (ProTA's pair scorer: one query against a shortlist) runs each request alone.
    """

    def load(self, folder: Path, params: dict[str, str]) -> None:
        self.runner = OnnxRunner(folder / "model.onnx", self.spec, threads=int(params["threads"]))

    def run(self, inputs: list[Arrays]) -> list[Arrays | InputError]:
        results = self.runner.run_requests(inputs) if self.spec.batched else each(inputs, self.runner.run)
        return [guarded(self.spec, r) for r in results]


class TokenizerModel(PythonModel):
    """BYTES text (B, 1) -> input_ids (B, T), lengths (B,) with the run's tokenizer.json.

    The same `encode_batch` as training, so served ids equal training ids. Each request is tokenised on its
    own (each gets its own padded length).
    """

    def load(self, folder: Path, params: dict[str, str]) -> None:
        self.tokenizer = load_tokenizer(folder / "tokenizer.json")
        self.limits = TextLimits(max_tokens=int(params["max_tokens"]), max_bytes=int(params["max_bytes"]))

    def encode(self, x: Arrays) -> Arrays:
        ids, lengths = encode_batch(self.tokenizer, decode_texts(x["text"]), self.limits)
        return {"input_ids": ids, "lengths": lengths}

    def run(self, inputs: list[Arrays]) -> list[Arrays | ValueError]:
        return each(inputs, self.encode)


class PreprocessModel(PythonModel):
    """uint8 images (B, H, W, 3) -> normalised float32 pixels (B, 3, H, W).

    Mean and std are config parameters (from the manifest), applied by the same `preprocess_images` that
    training used.
    """

    def load(self, folder: Path, params: dict[str, str]) -> None:
        self.mean, self.std = json.loads(params["pixel_mean"]), json.loads(params["pixel_std"])

    def preprocess(self, x: Arrays) -> Arrays:
        return {"pixel_values": preprocess_images(x["image"], self.mean, self.std)}

    def run(self, inputs: list[Arrays]) -> list[Arrays | ValueError]:
        return each(inputs, self.preprocess)


class GalleryTopKModel(PythonModel):
    """Top-k gallery search with FAISS over `gallery.npy` (N, D) unit vectors and `gallery_ids.npy` (N,).

    A dynamic batch is searched with one FAISS call at its largest requested k.
    """

    def load(self, folder: Path, params: dict[str, str]) -> None:
        embeddings = np.load(folder / "gallery.npy", allow_pickle=False)
        ids = np.load(folder / "gallery_ids.npy", allow_pickle=False)
        self.index = GalleryIndex(embeddings, ids, kind=params["index"], max_k=int(params["max_k"]))

    def run(self, inputs: list[Arrays]) -> list[dict | InputError]:
        return self.index.search_requests([(x["query_embedding"], x["top_k"]) for x in inputs])


class ClipStoreModel(PythonModel):
    """video_id (B,) -> that video's clip features for CDNet (`clips`, `clip_mask`[, `grid`]) and `durations`.

    The store is the moment export's `clip_features.npz` (the evaluation split's features by video id); the
    outputs are the ones the spec lists (the grid only for a model that samples it). An unknown id fails its
    own request only, with a message naming the id.
    """

    def load(self, folder: Path, params: dict[str, str]) -> None:
        self.store = ClipStore.load(folder / "clip_features.npz")

    def lookup(self, x: Arrays) -> Arrays:
        return self.store.lookup(x["video_id"], self.spec.output_names)

    def run(self, inputs: list[Arrays]) -> list[Arrays | ValueError]:
        return each(inputs, self.lookup)


class MomentPostprocessModel(PythonModel):
    """CDNet's spans (B, Q, 2) and logits (B, Q), durations (B,), top_k -> top-k windows in seconds.

    The shared `xmr.models.moments.postprocess` (sigmoid scores, (center, width) -> (start, end), clipping,
    NMS at the config's `nms_iou`, "none" for off), so served windows equal the in-process ones.
    """

    def load(self, folder: Path, params: dict[str, str]) -> None:
        value = params.get("nms_iou", "none")
        self.nms_iou = None if value == "none" else float(value)

    def windows(self, x: Arrays) -> Arrays:
        k = one_top_k(x["top_k"], x["logits"].shape[1], f"the model proposes {x['logits'].shape[1]} moments")
        return moment_windows(x["spans"], x["logits"], x["durations"], k, self.nms_iou)

    def run(self, inputs: list[Arrays]) -> list[Arrays | ValueError]:
        return each(inputs, self.windows)


class TextSearchModel(PythonModel):
    """Text search in one hop: text (B, 1) BYTES, top_k (B,) int64 -> ids (B, k), scores (B, k),
    text_embedding (B, D): the I/O of the tokenizer -> text_encoder -> gallery_topk ensemble, so it serves
    under the same name.

    Each python-backend hop of the ensemble is a shared-memory round trip to a stub process plus a
    scheduler queue (`xmr.clients.stats` puts 0.3-0.6 ms per hop on top of its work at one caption per
    request); this runs the same three functions with the same settings (`encode_batch`, `OnnxRunner`,
    `GalleryIndex`) in one `execute`. A dynamic batch is answered as the three models would answer it: each
    request tokenised on its own, the readable ones through one ONNX Runtime call (token ids padded to the
    longest; the tower's mask makes the padding invisible), then one FAISS call at the batch's largest k; a
    bad request gets its own error. The version folder holds the tokenizer, the tower (`model.onnx`, its I/O
    spec in `text_encoder.spec.json`) and the gallery.
    """

    TOWER_SPEC = "text_encoder.spec.json"

    def load(self, folder: Path, params: dict[str, str]) -> None:
        import faiss

        faiss.omp_set_num_threads(1)  # as the served gallery_topk (OMP_NUM_THREADS=1)
        self.tokenizer = load_tokenizer(folder / "tokenizer.json")
        self.limits = TextLimits(max_tokens=int(params["max_tokens"]), max_bytes=int(params["max_bytes"]))
        tower = ModelSpec.from_dict(json.loads((folder / self.TOWER_SPEC).read_text()))
        self.runner = OnnxRunner(folder / "model.onnx", tower, threads=int(params["threads"]))
        # the tower's "text_embedding" (a ProTA text tower also has its token outputs), else its only output
        self.embedding = "text_embedding" if "text_embedding" in tower.output_names else tower.output_names[0]
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
            out = guarded(self.runner.spec, out)
            results[i] = out if isinstance(out, ValueError) else out[self.embedding]
        good = [i for i in good if not isinstance(results[i], ValueError)]
        found = self.index.search_requests([(results[i], inputs[i]["top_k"]) for i in good])
        for i, out in zip(good, found, strict=True):
            results[i] = out if isinstance(out, InputError) else {**out, "text_embedding": results[i]}
        return results


class MomentSearchModel(PythonModel):
    """Moment search in one hop: text (B, 1) BYTES, video_id (B,) int64, top_k (B,) int64 -> moments
    (B, k, 3) [start_s, end_s, score] and counts (B,): the I/O of the moment_tokenizer, moment_clips ->
    moment_model -> moment_postprocess ensemble, served under its name on the cpu target.

    Beside saving three python-backend hops, one model keeps a bad request out of Triton's ensemble
    scheduler: in the ensemble the tokenizer and the clip store run in parallel, and Triton 2.51 mishandles
    an ensemble request whose parallel step fails while the other still runs (a bad text, an unknown video
    id): it never releases that request (a graceful stop then waits its whole exit timeout) and, now and
    then, crashes the server (SIGSEGV in its ensemble error path). Here each request is tokenised and looked
    up on its own (a bad one gets its own error, naming the text or the video id), the valid ones run
    through one ONNX Runtime call (token ids padded to the longest; every video of the store has the same
    clip count), then the shared post-processing at the config's `nms_iou`, as `moment_postprocess` does.
    The version folder holds the tokenizer, the moment graph (`model.onnx`, its I/O spec in
    `moment_model.spec.json`) and the clip store.
    """

    TOWER_SPEC = "moment_model.spec.json"

    def load(self, folder: Path, params: dict[str, str]) -> None:
        self.tokenizer = load_tokenizer(folder / "tokenizer.json")
        self.limits = TextLimits(max_tokens=int(params["max_tokens"]), max_bytes=int(params["max_bytes"]))
        tower = ModelSpec.from_dict(json.loads((folder / self.TOWER_SPEC).read_text()))
        self.runner = OnnxRunner(folder / "model.onnx", tower, threads=int(params["threads"]))
        self.store = ClipStore.load(folder / "clip_features.npz")
        self.clip_inputs = [n for n in tower.input_names if n not in ("input_ids", "lengths")]
        self.proposals = int(tower.output("logits").shape[1])
        value = params.get("nms_iou", "none")
        self.nms_iou = None if value == "none" else float(value)

    def feeds(self, x: Arrays) -> tuple[Arrays, np.ndarray, int]:
        """One request's graph inputs, its videos' durations and its top_k (InputError naming what is
        wrong: the text, the video id, top_k)."""
        ids, lengths = encode_batch(self.tokenizer, decode_texts(x["text"]), self.limits)
        clips = self.store.lookup(x["video_id"], [*self.clip_inputs, "durations"])
        k = one_top_k(x["top_k"], self.proposals, f"the model proposes {self.proposals} moments")
        durations = clips.pop("durations")
        return {**clips, "input_ids": ids, "lengths": lengths}, durations, k

    def run(self, inputs: list[Arrays]) -> list[Arrays | ValueError]:
        prepared: list = each(inputs, lambda x: dict(zip("fdk", self.feeds(x), strict=True)))
        good = [i for i, p in enumerate(prepared) if not isinstance(p, ValueError)]
        results: list = list(prepared)
        heads = self.runner.run_requests([prepared[i]["f"] for i in good])
        for i, out in zip(good, heads, strict=True):
            out = guarded(self.runner.spec, out)
            if isinstance(out, ValueError):
                results[i] = out
                continue
            p = prepared[i]
            results[i] = moment_windows(out["spans"], out["logits"], p["d"], p["k"], self.nms_iou)
        return results
