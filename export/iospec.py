"""The one definition of every served model's tensors: names, dtypes, shapes with named dynamic dims.

The ONNX export, the `config.pbtxt` files, the python-backend models and the clients all read these specs;
a test renders the committed `model_repository/*/config.pbtxt` from them and checks they agree.

A shape is a tuple whose entries are ints (fixed) or strings (a named dynamic dim). The first entry of a
batched model is always "batch"; Triton's `dims` leave it out (it is `max_batch_size`'s). A batched input
of shape ("batch",) is one value per request row; Triton needs `dims: [1]` there, so it is rendered with
`reshape { shape: [] }`.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# numpy dtype name -> (Triton config type, Triton client datatype)
DTYPES: dict[str, tuple[str, str]] = {
    "float32": ("TYPE_FP32", "FP32"),
    "float16": ("TYPE_FP16", "FP16"),
    "int64": ("TYPE_INT64", "INT64"),
    "int32": ("TYPE_INT32", "INT32"),
    "uint8": ("TYPE_UINT8", "UINT8"),
    "bool": ("TYPE_BOOL", "BOOL"),
    "bytes": ("TYPE_STRING", "BYTES"),
}


@dataclass(frozen=True)
class TensorSpec:
    name: str
    dtype: str  # a key of DTYPES
    shape: tuple[int | str, ...]  # "batch" first for batched models; other strings are dynamic dims

    @property
    def triton_type(self) -> str:
        return DTYPES[self.dtype][0]

    @property
    def client_dtype(self) -> str:
        return DTYPES[self.dtype][1]

    @property
    def numpy_dtype(self) -> np.dtype:
        return np.dtype(object) if self.dtype == "bytes" else np.dtype(self.dtype)

    def example_shape(self, sizes: dict[str, int]) -> tuple[int, ...]:
        """A concrete shape: dynamic dims from `sizes` (default 2)."""
        return tuple(d if isinstance(d, int) else sizes.get(d, 2) for d in self.shape)

    def triton_dims(self, batched: bool = True) -> list[int]:
        """`dims` of config.pbtxt: -1 for dynamic dims, without the batch dim (`batched`, the model's
        `max_batch_size` > 0) or the whole shape (an unbatched model: `max_batch_size: 0`)."""
        dims = [d if isinstance(d, int) else -1 for d in (self.shape[1:] if batched else self.shape)]
        return dims or [1]

    def onnx_dynamic_axes(self) -> dict[int, str]:
        return {i: d for i, d in enumerate(self.shape) if isinstance(d, str)}


@dataclass(frozen=True)
class ModelSpec:
    name: str
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]

    def input(self, name: str) -> TensorSpec:
        return _by_name(self.inputs, name, f"input of {self.name}")

    def output(self, name: str) -> TensorSpec:
        return _by_name(self.outputs, name, f"output of {self.name}")

    @property
    def batched(self) -> bool:
        """Whether every tensor's first dim is "batch" (a dynamically batched model); ProTA's pair scorer
        is not: one query (1, ...) against a shortlist (S, ...)."""
        return all(t.shape[:1] == ("batch",) for t in (*self.inputs, *self.outputs))

    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def to_dict(self) -> dict:
        def tensors(ts):
            return [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in ts]

        return {"name": self.name, "inputs": tensors(self.inputs), "outputs": tensors(self.outputs)}

    @classmethod
    def from_dict(cls, d: dict) -> ModelSpec:
        def tensors(ts):
            return tuple(TensorSpec(t["name"], t["dtype"], tuple(t["shape"])) for t in ts)

        return cls(d["name"], tensors(d["inputs"]), tensors(d["outputs"]))


def _by_name(tensors, name: str, what: str) -> TensorSpec:
    for t in tensors:
        if t.name == name:
            return t
    raise KeyError(f"no {what} named {name!r}; valid: {', '.join(t.name for t in tensors)}")


# ----------------------------------------------------------------------------- the image-text models


def text_encoder_spec(embed_dim: int) -> ModelSpec:
    return ModelSpec(
        "text_encoder",
        inputs=(
            TensorSpec("input_ids", "int64", ("batch", "tokens")),
            TensorSpec("lengths", "int64", ("batch",)),
        ),
        outputs=(TensorSpec("text_embedding", "float32", ("batch", embed_dim)),),
    )


def image_encoder_spec(embed_dim: int, image_size: int, region_dim: int | None = None) -> ModelSpec:
    """Normalised pixels (B, 3, H, W), or region features (B, R, Dr) for a precomputed-features model."""
    if region_dim:
        x = TensorSpec("regions", "float32", ("batch", "regions", region_dim))
    else:
        x = TensorSpec("pixel_values", "float32", ("batch", 3, image_size, image_size))
    return ModelSpec("image_encoder", (x,), (TensorSpec("image_embedding", "float32", ("batch", embed_dim)),))


def tokenizer_spec() -> ModelSpec:
    return ModelSpec(
        "tokenizer",
        inputs=(TensorSpec("text", "bytes", ("batch", 1)),),
        outputs=(
            TensorSpec("input_ids", "int64", ("batch", "tokens")),
            TensorSpec("lengths", "int64", ("batch",)),
        ),
    )


def preprocess_spec(image_size: int) -> ModelSpec:
    return ModelSpec(
        "preprocess",
        inputs=(TensorSpec("image", "uint8", ("batch", image_size, image_size, 3)),),
        outputs=(TensorSpec("pixel_values", "float32", ("batch", 3, image_size, image_size)),),
    )


def gallery_topk_spec(embed_dim: int) -> ModelSpec:
    return ModelSpec(
        "gallery_topk",
        inputs=(
            TensorSpec("query_embedding", "float32", ("batch", embed_dim)),
            TensorSpec("top_k", "int64", ("batch",)),
        ),
        outputs=(TensorSpec("ids", "int64", ("batch", "k")), TensorSpec("scores", "float32", ("batch", "k"))),
    )


def text_search_spec(embed_dim: int) -> ModelSpec:
    """Ensemble: text -> tokenizer -> text_encoder -> gallery_topk."""
    return ModelSpec(
        "text_search",
        inputs=(TensorSpec("text", "bytes", ("batch", 1)), TensorSpec("top_k", "int64", ("batch",))),
        outputs=(
            TensorSpec("ids", "int64", ("batch", "k")),
            TensorSpec("scores", "float32", ("batch", "k")),
            TensorSpec("text_embedding", "float32", ("batch", embed_dim)),
        ),
    )


def image_embed_spec(embed_dim: int, image_size: int) -> ModelSpec:
    """Ensemble: uint8 image -> preprocess -> image_encoder."""
    return ModelSpec(
        "image_embed",
        inputs=(TensorSpec("image", "uint8", ("batch", image_size, image_size, 3)),),
        outputs=(TensorSpec("image_embedding", "float32", ("batch", embed_dim)),),
    )


def image_text_specs(embed_dim: int, image_size: int, region_dim: int | None = None) -> dict[str, ModelSpec]:
    """Every model of the image-text repository, by name."""
    specs = [
        tokenizer_spec(),
        text_encoder_spec(embed_dim),
        image_encoder_spec(embed_dim, image_size, region_dim),
        gallery_topk_spec(embed_dim),
        text_search_spec(embed_dim),
    ]
    if not region_dim:  # a pixel model also serves raw images
        specs += [preprocess_spec(image_size), image_embed_spec(embed_dim, image_size)]
    return {s.name: s for s in specs}


# ----------------------------------------------------------------------------- the text-video models


def video_text_encoder_spec(embed_dim: int, tokens: bool = False) -> ModelSpec:
    """Text tower of a video model; `tokens=True` adds ProTA's token Gaussians."""
    outputs = [TensorSpec("text_embedding", "float32", ("batch", embed_dim))]
    if tokens:
        outputs += [
            TensorSpec("text_mu", "float32", ("batch", "tokens", embed_dim)),
            TensorSpec("text_sigma", "float32", ("batch", "tokens", embed_dim)),
        ]
    return ModelSpec("text_encoder", text_encoder_spec(embed_dim).inputs, tuple(outputs))


def visern_video_encoder_spec(embed_dim: int, regions: int, region_dim: int) -> ModelSpec:
    return ModelSpec(
        "video_encoder",
        inputs=(
            TensorSpec("regions", "float32", ("batch", "frames", regions, region_dim)),
            TensorSpec("frame_mask", "bool", ("batch", "frames")),
        ),
        outputs=(TensorSpec("video_embedding", "float32", ("batch", embed_dim)),),
    )


def prota_video_encoder_spec(embed_dim: int, frame_dim: int) -> ModelSpec:
    return ModelSpec(
        "video_encoder",
        inputs=(
            TensorSpec("frames", "float32", ("batch", "frames", frame_dim)),
            TensorSpec("frame_mask", "bool", ("batch", "frames")),
        ),
        outputs=(
            TensorSpec("video_embedding", "float32", ("batch", embed_dim)),
            TensorSpec("video_mu", "float32", ("batch", "frames", embed_dim)),
            TensorSpec("video_sigma", "float32", ("batch", "frames", embed_dim)),
        ),
    )


def prota_pair_scorer_spec(embed_dim: int) -> ModelSpec:
    """Re-rank a shortlist of K videos for one query with the token-level score."""
    return ModelSpec(
        "pair_scorer",
        inputs=(
            TensorSpec("text_mu", "float32", (1, "tokens", embed_dim)),
            TensorSpec("text_sigma", "float32", (1, "tokens", embed_dim)),
            TensorSpec("lengths", "int64", (1,)),
            TensorSpec("video_mu", "float32", ("shortlist", "frames", embed_dim)),
            TensorSpec("video_sigma", "float32", ("shortlist", "frames", embed_dim)),
            TensorSpec("frame_mask", "bool", ("shortlist", "frames")),
        ),
        outputs=(TensorSpec("scores", "float32", ("shortlist",)),),
    )


# ----------------------------------------------------------------------------- served text-video and moments
#
# The served names of the other families are prefixed (`video_...`, `moment_...`) so one repository can hold
# every family beside the image-text models, whose names stay unprefixed. Each served spec is derived from
# the exported graphs' specs (the artifact's manifest), so the rendered configs cannot disagree with the
# graphs they host.


def renamed(spec: ModelSpec, name: str) -> ModelSpec:
    """`spec` under another served name (the same tensors)."""
    return ModelSpec(name, spec.inputs, spec.outputs)


def text_video_search_spec(embed_dim: int) -> ModelSpec:
    """Ensemble: text -> video_tokenizer -> video_text_encoder -> video_gallery_topk (video ids)."""
    return renamed(text_search_spec(embed_dim), "text_video_search")


def video_embed_spec(video_encoder: ModelSpec) -> ModelSpec:
    """Ensemble: the video tower's inputs (ViSERN regions or ProTA frames, frame mask) -> video_embedding."""
    return ModelSpec("video_embed", video_encoder.inputs, (video_encoder.output("video_embedding"),))


def text_video_rerank_spec() -> ModelSpec:
    """BLS: text -> first-stage shortlist over the global video embeddings -> ProTA's pair scorer re-ranks
    it -> ids, scores (the token-level score) of the top k."""
    return ModelSpec(
        "text_video_rerank",
        inputs=(TensorSpec("text", "bytes", ("batch", 1)), TensorSpec("top_k", "int64", ("batch",))),
        outputs=(TensorSpec("ids", "int64", ("batch", "k")), TensorSpec("scores", "float32", ("batch", "k"))),
    )


def video_serving_specs(
    text_encoder: ModelSpec, video_encoder: ModelSpec, pair_scorer: ModelSpec | None = None
) -> dict[str, ModelSpec]:
    """Every served model of a text-video artifact from its graphs' specs: ViSERN's, and ProTA's first
    stage; with ProTA's `pair_scorer` also `video_pair_scorer` and the two-stage `text_video_rerank`."""
    embed_dim = text_encoder.output("text_embedding").shape[1]
    specs = [
        renamed(tokenizer_spec(), "video_tokenizer"),
        renamed(text_encoder, "video_text_encoder"),
        renamed(video_encoder, "video_encoder"),
        renamed(gallery_topk_spec(embed_dim), "video_gallery_topk"),
        text_video_search_spec(embed_dim),
        video_embed_spec(video_encoder),
    ]
    if pair_scorer is not None:
        specs += [renamed(pair_scorer, "video_pair_scorer"), text_video_rerank_spec()]
    return {s.name: s for s in specs}


# [start_s, end_s, score] windows per row, best first; `counts`: how many of a row's windows are real
MOMENT_OUTPUTS = (
    TensorSpec("moments", "float32", ("batch", "k", 3)),
    TensorSpec("counts", "int64", ("batch",)),
)
CLIP_TENSORS = ("clips", "clip_mask", "grid")  # the moment graph's inputs that come from the clip store


def moment_clips_spec(moment_model: ModelSpec) -> ModelSpec:
    """A video id per row -> that video's clip features (as the moment graph takes them) and its duration."""
    return ModelSpec(
        "moment_clips",
        inputs=(TensorSpec("video_id", "int64", ("batch",)),),
        outputs=(
            *(t for t in moment_model.inputs if t.name in CLIP_TENSORS),
            TensorSpec("durations", "float32", ("batch",)),
        ),
    )


def moment_postprocess_spec(moment_model: ModelSpec) -> ModelSpec:
    """The head's spans and logits -> the top-k [start_s, end_s, score] windows per row (after NMS).

    A row may keep fewer than k windows after NMS: `counts` says how many of its rows of `moments` are real
    (the rest are zeros)."""
    return ModelSpec(
        "moment_postprocess",
        inputs=(
            moment_model.output("spans"),
            moment_model.output("logits"),
            TensorSpec("durations", "float32", ("batch",)),
            TensorSpec("top_k", "int64", ("batch",)),
        ),
        outputs=MOMENT_OUTPUTS,
    )


def moment_search_spec() -> ModelSpec:
    """Ensemble: query text + video id -> tokenizer, clip store -> moment graph -> post-processing."""
    return ModelSpec(
        "moment_search",
        inputs=(
            TensorSpec("text", "bytes", ("batch", 1)),
            TensorSpec("video_id", "int64", ("batch",)),
            TensorSpec("top_k", "int64", ("batch",)),
        ),
        outputs=MOMENT_OUTPUTS,
    )


def moment_serving_specs(moment_model: ModelSpec) -> dict[str, ModelSpec]:
    """Every served model of a CDNet artifact from its graph's spec."""
    specs = [
        renamed(tokenizer_spec(), "moment_tokenizer"),
        moment_clips_spec(moment_model),
        renamed(moment_model, "moment_model"),
        moment_postprocess_spec(moment_model),
        moment_search_spec(),
    ]
    return {s.name: s for s in specs}
