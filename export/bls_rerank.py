"""ProTA's two-stage search served as one Triton python-backend model with Business Logic Scripting (BLS).

A fixed ensemble cannot loop over the queries of a batch nor gather a data-dependent shortlist, so this
model drives the other served models itself with `pb_utils.InferenceRequest(...).exec()`:

    input_ids (B, T) int64, lengths (B,) int64, top_k (B,) int64
      -> text_encoder  (one BLS call per request)         text_embedding, text_mu, text_sigma
      -> gallery_topk  (one BLS call per request, k = S)  ids (B, S): the first stage (FAISS over
                                                          ProTA's global video embeddings)
      -> pair_scorer   (one BLS call per query)           scores (S,) of that query's shortlist
      -> merge: the top `top_k` of each shortlist by the token-level score -> ids (B, k), scores (B, k)

The pair scorer needs the shortlisted videos' token Gaussians: the version folder holds them with the ids
that gallery_topk returns (`gallery_ids.npy` (N,) int64, `gallery_mu.npy` / `gallery_sigma.npy` (N, M, D)
float32, `gallery_mask.npy` (N, M) bool; `write_gallery` writes them). Config parameters (strings):
`shortlist` (S, default 50); `fuse` (default 0: rank by the pair score alone; f > 0: by pair score +
f * the first stage's cosine, see perf/figures/prota_rerank.md); `text_model`, `first_stage_model`,
`pair_scorer_model` (the served names of the three graphs; defaults text_encoder, gallery_topk,
pair_scorer). `top_k` is cut to S.

All the logic is `models/video/two_stage.py`'s, fed a `Run` (`BLSRun`) and a `FirstStage`
(`BLSFirstStage`) that call the other models; `TwoStageModel.run` takes any `Run` / `FirstStage`, so the
tests drive it in-process with ONNX Runtime and FAISS, without a server. The answer of a request whose
query fails (a bad input, or an error from a called model) is that request's own `TritonError`.

Registering it in the repository (config.pbtxt: backend "python", the three inputs/two outputs of
`bls_rerank_spec`, the called models loaded alongside; model.py:
`from xmr.export.bls_rerank import TwoStageModel as TritonPythonModel`) is left to export/repository.py.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from xmr.export import pb
from xmr.export.iospec import ModelSpec, TensorSpec
from xmr.models.errors import InputError
from xmr.models.video.two_stage import (
    FirstStage,
    Query,
    VideoGallery,
    encode_queries,
    fused,
    merge,
    rerank,
)

Arrays = dict[str, np.ndarray]
GRAPH_OUTPUTS = {
    "text_encoder": ("text_embedding", "text_mu", "text_sigma"),
    "pair_scorer": ("scores",),
}
DEFAULT_MODELS = {"text_encoder": "text_encoder", "first_stage": "gallery_topk", "pair_scorer": "pair_scorer"}
GALLERY_FILES = ("gallery_ids", "gallery_mu", "gallery_sigma", "gallery_mask")


def bls_rerank_spec() -> ModelSpec:
    return ModelSpec(
        "prota_search",
        inputs=(
            TensorSpec("input_ids", "int64", ("batch", "tokens")),
            TensorSpec("lengths", "int64", ("batch",)),
            TensorSpec("top_k", "int64", ("batch",)),
        ),
        outputs=(
            TensorSpec("ids", "int64", ("batch", "k")),
            TensorSpec("scores", "float32", ("batch", "k")),
        ),
    )


def write_gallery(folder: Path, gallery: VideoGallery) -> None:
    """The version folder's token store (and ids) for `load_gallery`."""
    folder.mkdir(parents=True, exist_ok=True)
    for name, arr in zip(GALLERY_FILES, (gallery.ids, gallery.mu, gallery.sigma, gallery.mask), strict=True):
        np.save(folder / f"{name}.npy", arr, allow_pickle=False)


def load_gallery(folder: Path) -> VideoGallery:
    """The token store; the global embeddings live in the first-stage model, so none here."""
    ids, mu, sigma, mask = (np.load(folder / f"{n}.npy", allow_pickle=False) for n in GALLERY_FILES)
    return VideoGallery(np.zeros((len(ids), 0), np.float32), mu, sigma, mask, ids)


# ----------------------------------------------------------------------------- BLS calls


def bls_call(model: str, inputs: Arrays, outputs: tuple[str, ...]) -> Arrays:
    """One synchronous BLS inference on the served `model`; an error it answers raises InputError (the
    calling request's error). Outputs are asked for in CPU memory (a TensorRT model may run on the GPU)."""
    pb_utils = pb._pb()
    kwargs = {}
    if hasattr(pb_utils, "PreferredMemory"):  # Triton >= 23.04
        kwargs["preferred_memory"] = pb_utils.PreferredMemory(pb_utils.TRITONSERVER_MEMORY_CPU, 0)
    request = pb_utils.InferenceRequest(
        model_name=model,
        requested_output_names=list(outputs),
        inputs=[pb_utils.Tensor(k, np.ascontiguousarray(v)) for k, v in inputs.items()],
        **kwargs,
    )
    response = request.exec()
    if response.has_error():
        raise InputError(f"model {model!r}: {response.error().message()}")
    out = {}
    for name in outputs:
        tensor = pb_utils.get_output_tensor_by_name(response, name)
        if tensor is None:
            raise InputError(f"model {model!r} answered without output {name!r}")
        out[name] = tensor.as_numpy()
    return out


class BLSRun:
    """A `Run` (export/scoring.py) whose graphs are served models: graph name -> its served model name."""

    def __init__(self, models: dict[str, str]):
        self.models = models

    def __call__(self, graph: str, feeds: Arrays) -> Arrays:
        return bls_call(self.models[graph], feeds, GRAPH_OUTPUTS[graph])


class BLSFirstStage:
    """A `FirstStage` that asks the served `gallery_topk` model (FAISS over the global video embeddings)."""

    def __init__(self, model: str):
        self.model = model

    def __call__(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        top_k = np.full((len(queries), 1), k, np.int64)  # gallery_topk: one k per row, (B, 1) on the wire
        out = bls_call(self.model, {"query_embedding": queries, "top_k": top_k}, ("ids", "scores"))
        return out["ids"], out["scores"]


# ----------------------------------------------------------------------------- the model


def answer_queries(
    queries: list[Query],
    ks: list[int],
    run,
    first_stage: FirstStage,
    gallery: VideoGallery,
    shortlist_size: int,
    fuse: float = 0.0,
) -> list[Arrays | InputError]:
    """Per query: the first stage's shortlist of `shortlist_size`, re-ranked by the pair scorer, cut to its
    k -> {"ids": (k,), "scores": (k,)}, or that query's error. One first-stage call for all queries."""
    results: list[Arrays | InputError] = []
    if not queries:
        return results
    embeddings = np.stack([q.embedding for q in queries]).astype(np.float32)
    all_ids, all_scores = first_stage(embeddings, shortlist_size)
    for q, k, row, first_scores in zip(queries, ks, all_ids, all_scores, strict=True):
        try:
            if k < 1:
                raise InputError(f"top_k is {k}; expected >= 1")
            ids, first_scores = row[row >= 0], first_scores[row >= 0]
            scores = fused(rerank(run, gallery, q, ids), first_scores, fuse)
            ids, scores = merge(ids, scores, min(k, shortlist_size))
            results.append({"ids": ids, "scores": scores})
        except InputError as e:
            results.append(e)
    return results


def pad_results(rows: list[Arrays]) -> Arrays:
    """Rows of one request, each (k_i,), -> (B, max k): ids padded with -1 (as FAISS), scores with -inf."""
    width = max(len(r["ids"]) for r in rows)
    ids = np.full((len(rows), width), -1, np.int64)
    scores = np.full((len(rows), width), -np.inf, np.float32)
    for i, r in enumerate(rows):
        ids[i, : len(r["ids"])], scores[i, : len(r["scores"])] = r["ids"], r["scores"]
    return {"ids": ids, "scores": scores}


class TwoStageModel:
    """`TritonPythonModel`: ProTA's first stage + pair-scorer re-ranking, through BLS (see the module doc)."""

    spec = bls_rerank_spec()
    fuse = 0.0

    def initialize(self, args: dict) -> None:
        folder, params = pb.setup(args)
        self.gallery = load_gallery(folder)
        self.shortlist = int(params.get("shortlist", "50"))
        self.fuse = float(params.get("fuse", "0"))
        self.run_graph = BLSRun(
            {
                "text_encoder": params.get("text_model", DEFAULT_MODELS["text_encoder"]),
                "pair_scorer": params.get("pair_scorer_model", DEFAULT_MODELS["pair_scorer"]),
            }
        )
        self.first_stage = BLSFirstStage(params.get("first_stage_model", DEFAULT_MODELS["first_stage"]))

    def execute(self, requests):
        return pb.answer(requests, self.spec, self.run)

    def run(self, inputs: list[Arrays]) -> list[Arrays | InputError]:
        """One result per request: {"ids": (B, k), "scores": (B, k)} or the request's error. A request
        with several queries fails as a whole if one of its queries does (its arrays are one tensor)."""
        results: list[Arrays | InputError] = []
        for x in inputs:
            try:
                ids, lengths = np.asarray(x["input_ids"], np.int64), np.asarray(x["lengths"], np.int64)
                lengths, ks = lengths.reshape(-1), np.asarray(x["top_k"]).reshape(-1).astype(int).tolist()
                if not (len(ids) == len(lengths) == len(ks)):
                    raise InputError(f"input_ids {ids.shape}, lengths {lengths.shape}, top_k: one row each")
                queries = encode_queries(self.run_graph, ids, lengths)
                rows = answer_queries(
                    queries, ks, self.run_graph, self.first_stage, self.gallery, self.shortlist, self.fuse
                )
                bad = next((r for r in rows if isinstance(r, InputError)), None)
                results.append(bad if bad is not None else pad_results(rows))
            except InputError as e:
                results.append(e)
        return results
