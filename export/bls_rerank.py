"""ProTA's two-stage search served as one Triton python-backend model with Business Logic Scripting (BLS).

A fixed ensemble cannot loop over the queries of a batch nor gather a data-dependent shortlist, so this
model (served as `text_video_rerank`) drives the other served models itself with
`pb_utils.InferenceRequest(...).exec()`, one request at a time:

    text (B, 1) BYTES, top_k (B,) int64
      -> video_tokenizer     (one BLS call)       input_ids (B, T), lengths (B,)
      -> video_text_encoder  (one BLS call)       text_embedding, text_mu, text_sigma
      -> video_gallery_topk  (one BLS call, k=S)  ids (B, S): the first stage (FAISS over ProTA's global
                                                  video embeddings, the gallery `text_video_search` serves)
      -> video_pair_scorer   (one call a query)   scores (S,) of that query's shortlist
      -> merge: the top `top_k` of each shortlist by the token-level score -> ids (B, k), scores (B, k)

The pair scorer needs the shortlisted videos' token Gaussians: the version folder holds them with the ids
that the first stage returns (`gallery_ids.npy` (N,) int64, `gallery_mu.npy` / `gallery_sigma.npy`
(N, M, D) float32, `gallery_mask.npy` (N, M) bool; the video export writes them with `write_gallery`).
Config parameters (strings): `shortlist` (S; the repository renders 20, absent 50); `fuse` (the repository
renders 1.0, absent 0: 0 ranks by the pair score alone, f > 0 by pair score + f * the first stage's
cosine; see perf/figures/prota_rerank.md for both choices); `tokenizer_model`,
`text_model`, `first_stage_model`, `pair_scorer_model` (the served names of the called models, defaults
in `DEFAULT_MODELS`). `top_k` is cut to S.

All the logic is `models/video/two_stage.py`'s, fed a `Run` (`BLSRun`), a `FirstStage` (`BLSFirstStage`)
and a tokenizer (`BLSTokenizer`) that call the other models; `answer_queries` takes any of them, so the
tests drive it in-process with ONNX Runtime and FAISS as well as through the real server. The answer of a
request whose query fails (a bad input, or an error from a called model, which names it) is that
request's own `TritonError` (INVALID_ARG); the other requests of the batch are answered.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from xmr.export import pb
from xmr.export.adapters import PythonModel
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
Tokenize = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]  # text (B, 1) -> input_ids, lengths
# (served model, inputs, wanted outputs) -> outputs: a BLS inference (`bls_call`), or a direct call
Call = Callable[[str, Arrays, tuple[str, ...]], Arrays]
GRAPH_OUTPUTS = {
    "text_encoder": ("text_embedding", "text_mu", "text_sigma"),
    "pair_scorer": ("scores",),
}
BATCHED = ("text_encoder",)  # the pair scorer is not: its `lengths` (1,) is the whole tensor
DEFAULT_MODELS = {
    "tokenizer_model": "video_tokenizer",
    "text_model": "video_text_encoder",
    "first_stage_model": "video_gallery_topk",
    "pair_scorer_model": "video_pair_scorer",
}
GALLERY_FILES = ("gallery_ids", "gallery_mu", "gallery_sigma", "gallery_mask")


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
    calling request's error, INVALID_ARG: see the comment below). Outputs are asked for in CPU memory (a
    TensorRT model may run on the GPU)."""
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
        # Triton 2.51 answers every BLS error with code INTERNAL, whatever the called model said (its
        # INVALID_ARG is lost), so the code cannot tell a client's bad input from a fault. The called
        # models are this repository's own, whose errors are their input checks: the request's error.
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

    def __init__(self, models: dict[str, str], call: Call = bls_call):
        self.models, self.call = models, call

    def __call__(self, graph: str, feeds: Arrays) -> Arrays:
        if graph in BATCHED:  # one value per row goes on the wire as (B, 1) (the config's dims [1])
            feeds = {k: v.reshape(-1, 1) if v.ndim == 1 else v for k, v in feeds.items()}
        return self.call(self.models[graph], feeds, GRAPH_OUTPUTS[graph])


class BLSFirstStage:
    """A `FirstStage` that asks the served `gallery_topk` model (FAISS over the global video embeddings)."""

    def __init__(self, model: str, call: Call = bls_call):
        self.model, self.call = model, call

    def __call__(self, queries: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        top_k = np.full((len(queries), 1), k, np.int64)  # gallery_topk: one k per row, (B, 1) on the wire
        out = self.call(self.model, {"query_embedding": queries, "top_k": top_k}, ("ids", "scores"))
        return out["ids"], out["scores"]


class BLSTokenizer:
    """A `Tokenize` that asks the served tokenizer model (the family's tokenizer.json, `encode_batch`)."""

    def __init__(self, model: str, call: Call = bls_call):
        self.model, self.call = model, call

    def __call__(self, text: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        out = self.call(self.model, {"text": text}, ("input_ids", "lengths"))
        return out["input_ids"], out["lengths"]


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


class TwoStageModel(PythonModel):
    """`TritonPythonModel`: ProTA's first stage + pair-scorer re-ranking, through BLS (see the module doc).

    Its boundary check is every python model's (`PythonModel.check`: dtypes, the text's bytes before it is
    decoded); the called models check what they receive."""

    fuse = 0.0

    def load(self, folder: Path, params: dict[str, str]) -> None:
        self.gallery = load_gallery(folder)
        self.shortlist = int(params.get("shortlist", "50"))
        self.fuse = float(params.get("fuse", "0"))
        self.models = {key: params.get(key, name) for key, name in DEFAULT_MODELS.items()}
        self.connect(bls_call)

    def connect(self, call: Call) -> None:
        """Reach the called models through `call`: BLS when served; perf/bench_served.py's in-process
        side passes the same python models, loaded and called directly."""
        m = self.models
        self.tokenize: Tokenize = BLSTokenizer(m["tokenizer_model"], call)
        self.run_graph = BLSRun(
            {"text_encoder": m["text_model"], "pair_scorer": m["pair_scorer_model"]}, call
        )
        self.first_stage: FirstStage = BLSFirstStage(m["first_stage_model"], call)

    def run(self, inputs: list[Arrays]) -> list[Arrays | InputError]:
        """One result per request: {"ids": (B, k), "scores": (B, k)} or the request's error. A request
        with several texts fails as a whole if one of its texts does (its arrays are one tensor)."""
        results: list[Arrays | InputError] = []
        for x in inputs:
            try:
                ks = np.asarray(x["top_k"]).reshape(-1)
                if len(ks) != len(x["text"]):
                    raise InputError(f"text has {len(x['text'])} rows, top_k {len(ks)}; expected one each")
                ids, lengths = self.tokenize(x["text"])
                queries = encode_queries(self.run_graph, ids, np.asarray(lengths, np.int64).reshape(-1))
                rows = answer_queries(
                    queries,
                    ks.tolist(),
                    self.run_graph,
                    self.first_stage,
                    self.gallery,
                    self.shortlist,
                    self.fuse,
                )
                bad = next((r for r in rows if isinstance(r, InputError)), None)
                results.append(bad if bad is not None else pad_results(rows))
            except InputError as e:
                results.append(e)
        return results
