"""Score an exported artifact's graphs on a split, whatever runs them: the task metrics of every family.

Every consumer of an artifact asks the same question, "what does this set of graphs retrieve?": the export
(ONNX Runtime vs PyTorch), `xmr optimize` (FP16 / INT8 graphs vs FP32, on the dev split to choose which
nodes stay in higher precision, on the test split for the manifest), and the precision benchmark. Here the
graphs are reached through one callable, `run(graph, feeds) -> outputs` (a `Runner.run` by graph name,
`BackendParity.run`, or a recorder around either), so a scorer never knows which backend it drives.

`ArtifactTask.of(manifest)` rebuilds what an artifact was exported from (the run's model and tokenizer,
the specs, the PyTorch `Tower` of each graph) and scores it with its family's task metric:
- image-text (RVSE++): Recall@1/5/10 both directions, rSum, ranks (`retrieval_metrics`);
- text-video (ViSERN, ProTA): the same, over videos (ProTA's pair scorer re-ranks the whole gallery);
- video moments (CDNet): R1@IoU 0.5/0.7, mAP, mIoU of the post-processed spans (`moment_metrics`).
`gate` names the metrics whose drop an optimisation must keep within bounds (the R@1 of each direction,
or R1@0.5).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from xmr.export.iospec import ModelSpec
from xmr.export.runners import Feeds, Runner, TorchRunner
from xmr.models.errors import InputError
from xmr.models.evaluate.moment_metrics import moment_metrics
from xmr.models.evaluate.retrieval import retrieval_metrics
from xmr.models.tokenizer import TextLimits, encode_batch

Run = Callable[[str, Feeds], Feeds]  # (graph name, feeds) -> outputs by name


def run_of(runners: dict[str, Runner]) -> Run:
    """The `Run` of a set of runners, one per graph."""
    return lambda graph, feeds: runners[graph].run(feeds)


def batches(n: int, size: int):
    for i in range(0, n, size):
        yield np.arange(i, min(i + size, n))


# ----------------------------------------------------------------------------- image-text


def embed_texts(
    run: Run, tokenizer, texts: list[str], limits: TextLimits, batch_size: int = 512
) -> np.ndarray:
    chunks = []
    for idx in tqdm(list(batches(len(texts), batch_size)), desc="texts", leave=False, disable=None):
        ids, lengths = encode_batch(tokenizer, [texts[i] for i in idx], limits)
        chunks.append(run("text_encoder", {"input_ids": ids, "lengths": lengths})["text_embedding"])
    return np.concatenate(chunks)


def embed_images(run: Run, spec: ModelSpec, images: np.ndarray, model, batch_size: int = 256) -> np.ndarray:
    """The image tower's embeddings of `images`; `spec` is its I/O spec (pixels or region features)."""
    from xmr.models.image_text.inputs import image_inputs

    name = spec.inputs[0].name
    chunks = [
        run("image_encoder", {name: image_inputs(images[idx], model.cfg).numpy()})["image_embedding"]
        for idx in tqdm(list(batches(len(images), batch_size)), desc="images", leave=False, disable=None)
    ]
    return np.concatenate(chunks)


def score_image_text(run: Run, model, tokenizer, specs: dict[str, ModelSpec], split) -> dict[str, float]:
    limits = TextLimits(max_tokens=model.cfg.max_tokens)
    img = embed_images(run, specs["image_encoder"], split.images, model)
    txt = embed_texts(run, tokenizer, split.flat_captions(), limits)
    return retrieval_metrics(img @ txt.T, split.caption_image_index())


# ----------------------------------------------------------------------------- text-video


def video_similarity(run: Run, model, tokenizer, specs: dict[str, ModelSpec], split, batch_size: int = 32):
    """The (N_video, N_caption) scores of the exported video graphs: embeddings' dot products (ViSERN), or
    every caption re-ranking the whole gallery with the pair scorer (ProTA)."""

    limits = TextLimits(max_tokens=model.cfg.max_tokens)
    texts = split.flat_captions()
    text_rows = []  # per caption: its outputs with padding cut off
    for idx in tqdm(list(batches(len(texts), batch_size)), desc="texts", leave=False, disable=None):
        ids, lengths = encode_batch(tokenizer, [texts[i] for i in idx], limits)
        out = run("text_encoder", {"input_ids": ids, "lengths": lengths})
        text_rows += [
            {k: v[i : i + 1, : lengths[i]] if v.ndim == 3 else v[i : i + 1] for k, v in out.items()}
            for i in range(len(idx))
        ]
    videos = video_outputs(run, model, specs["video_encoder"], split, batch_size)
    if "pair_scorer" not in specs:
        return videos["video_embedding"] @ np.concatenate([t["text_embedding"] for t in text_rows]).T
    mask = np.ascontiguousarray(split.mask.astype(bool))
    columns = [
        run(
            "pair_scorer",
            {
                "text_mu": t["text_mu"],
                "text_sigma": t["text_sigma"],
                "lengths": np.array([t["text_mu"].shape[1]], np.int64),
                "video_mu": videos["video_mu"],
                "video_sigma": videos["video_sigma"],
                "frame_mask": mask,
            },
        )["scores"]
        for t in tqdm(text_rows, desc="pair scorer", leave=False, disable=None)
    ]
    return np.stack(columns, axis=1)


def video_outputs(run: Run, model, spec: ModelSpec, split, batch_size: int = 32) -> dict[str, np.ndarray]:
    """Every output of the video tower for every video of `split`, in split order."""
    from xmr.models.video.inputs import video_inputs

    chunks = [
        run(
            "video_encoder",
            dict(zip(spec.input_names, (x.numpy() for x in video_inputs(model, split, idx)), strict=True)),
        )  # fmt: skip
        for idx in tqdm(list(batches(len(split), batch_size)), desc="videos", leave=False, disable=None)
    ]
    return {k: np.concatenate([c[k] for c in chunks]) for k in chunks[0]}


def embed_videos(run: Run, model, spec: ModelSpec, split, batch_size: int = 32) -> np.ndarray:
    """The video tower's global embeddings of every video of `split`, in split order (the served gallery)."""
    return video_outputs(run, model, spec, split, batch_size)["video_embedding"]


def score_video(run: Run, model, tokenizer, specs: dict[str, ModelSpec], split) -> dict[str, float]:
    sim = video_similarity(run, model, tokenizer, specs, split)
    return retrieval_metrics(sim, split.caption_video_index())


# ----------------------------------------------------------------------------- video moments


def moment_feeds(model, tokenizer, spec: ModelSpec, split, n: int | None = None):
    """The moment graph's inputs for the first `n` queries of `split` and their ground truth:
    (an iterator of (feeds, clip durations in s), 16 queries a batch, made as they are consumed;
    ground-truth windows per query)."""
    from xmr.models.moments.items import batch_inputs, moment_items

    items = moment_items(split)
    n = len(items.texts) if n is None else min(n, len(items.texts))
    limits = TextLimits(max_tokens=model.cfg.max_tokens)

    def feeds():
        for idx in tqdm(list(batches(n, 16)), desc="queries", leave=False, disable=None):
            inputs = [t for t in batch_inputs(model, split, items, idx, tokenizer, limits) if t is not None]
            named = {name: t.numpy() for name, t in zip(spec.input_names, inputs, strict=True)}
            yield named, np.full(len(idx), items.duration)

    return feeds(), [[tuple(w)] for w in items.windows[:n]]


def moment_predictions(run: Run, model, tokenizer, spec: ModelSpec, split, n: int | None = None):
    """(predicted spans per query, ground-truth windows per query) of the first `n` test queries."""
    from xmr.models.moments.postprocess import postprocess

    feeds, truth = moment_feeds(model, tokenizer, spec, split, n)
    predictions = []
    for named, durations in feeds:
        out = run("moment_model", named)
        predictions += postprocess(out["spans"], out["logits"], durations)
    return predictions, truth


def score_moments(run: Run, model, tokenizer, specs: dict[str, ModelSpec], split, n=None) -> dict[str, float]:
    predictions, truth = moment_predictions(run, model, tokenizer, specs["moment_model"], split, n)
    return moment_metrics(predictions, truth)


# ----------------------------------------------------------------------------- one artifact


@dataclass
class ArtifactTask:
    """What an artifact was exported from, and how its graphs are scored.

    `specs` and `modules` are by graph name (the artifact's `<graph>.onnx`); `modules[g]` is the PyTorch
    `Tower` that `g` was exported from, so `torch_runners()` is the reference of every parity figure.
    """

    family: str  # "image_text" | "video" | "moments"
    model: torch.nn.Module
    tokenizer: object
    config: dict  # the run's config.json
    specs: dict[str, ModelSpec]
    modules: dict[str, torch.nn.Module]
    gate: tuple[str, ...]  # the metrics an optimisation may not drop by more than its gate

    @classmethod
    def of(cls, manifest: dict) -> ArtifactTask:
        from xmr.export.onnx_export import Tower
        from xmr.models.checkpoint import load_run

        run = Path(manifest["run"])
        model, tokenizer, config = load_run(run)
        specs = {name: ModelSpec.from_dict(d) for name, d in manifest["specs"].items()}
        kind = config["model"]
        if kind == "rvse":
            specs = {g: specs[g] for g in ("text_encoder", "image_encoder")}  # not the served-only models
            modules = {
                "text_encoder": Tower(model, "encode_text"),
                "image_encoder": Tower(model, "encode_image"),
            }
            return cls("image_text", model, tokenizer, config, specs, modules, ("i2t_R@1", "t2i_R@1"))
        if kind in ("visern", "prota"):
            from xmr.export.video_export import modules_for

            return cls("video", model, tokenizer, config, specs, modules_for(model), ("i2t_R@1", "t2i_R@1"))
        if kind == "cdnet":
            modules = {"moment_model": Tower(model, "forward", tuple(specs["moment_model"].output_names))}
            return cls("moments", model, tokenizer, config, specs, modules, ("R1@0.5",))
        raise InputError(f"run {run} holds a {kind!r} model; valid: rvse, visern, prota, cdnet")

    def split(self, name: str, n: int | None = None):
        """The run's `name` split ("train" | "val" | "test"), cut to its first `n` items (images, videos)."""
        tc = self.config["train_config"]
        if self.family == "image_text":
            from xmr.models.data import load_split

            split = load_split(tc["data"], name, root=tc.get("data_root"))
            if name != "train" and tc.get("n_eval"):
                split = split.subset(tc["n_eval"])
        else:
            from xmr.models.data.video import VideoData

            split = VideoData.of(tc).splits()[name]
        return split.subset(min(n, len(split))) if n else split

    def score(self, run: Run, split) -> dict[str, float]:
        """The family's task metrics of the graphs behind `run` on `split`."""
        scorer = {"image_text": score_image_text, "video": score_video, "moments": score_moments}[self.family]
        return scorer(run, self.model, self.tokenizer, self.specs, split)

    def torch_runners(self) -> dict[str, TorchRunner]:
        return {g: TorchRunner(self.modules[g], spec) for g, spec in self.specs.items()}
