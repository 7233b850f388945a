"""Export a text-video run (ViSERN or ProTA) to ONNX in either custom-op form, with parity vs PyTorch.

`export_video_run(run, out, custom_ops)` writes into `out` (replaced atomically):
- ViSERN: `text_encoder.onnx`, `video_encoder.onnx`; ProTA: also `pair_scorer.onnx` (token-level
  re-ranking of a shortlist for one query);
- `gallery.npy` (N, D) and `gallery_ids.npy` (N,): the evaluation split's videos embedded by the exported
  video tower (the videos the parity covered: the whole split in the standard form), ids = row index in the
  split; the gallery the served `text_video_search` searches (`video_gallery_topk`, FAISS); ProTA also
  `gallery_mu.npy`, `gallery_sigma.npy` (N, M, D) and `gallery_mask.npy` (N, M): the same videos' token
  Gaussians, the store the served `text_video_rerank` (export/bls_rerank.py) re-ranks a shortlist from;
- `tokenizer.json` and `manifest.json`: I/O specs, sha256 of each file, versions, the custom-op form, the
  `xmr`-domain nodes per graph, and parity on the evaluation split: max abs error and min cosine of every
  output, and Recall@1/5/10, median and mean rank (both directions) of the ONNX outputs beside PyTorch's.

Which runtime checks the graphs: the `standard` form (standard ONNX ops only) runs in ONNX Runtime; the
`plugin` form holds `xmr::RandomWalkGCN` nodes that no stock runtime implements, so it runs in
`onnx.reference.ReferenceEvaluator` with the numpy implementations of `models/ops/onnx_domain.py` (slow:
the manifest says how many videos it covered); `runners.runner_for` picks the runner by form. ProTA has no
custom op: both forms give the same graphs.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from xmr.export.bls_rerank import GALLERY_FILES, write_gallery
from xmr.export.iospec import (
    ModelSpec,
    prota_pair_scorer_spec,
    prota_video_encoder_spec,
    video_text_encoder_spec,
    visern_video_encoder_spec,
)
from xmr.export.manifest import file_facts
from xmr.export.onnx_export import Tower, export_onnx, graphs_manifest
from xmr.export.parity import BackendParity
from xmr.export.runners import TorchRunner, runner_for
from xmr.export.scoring import video_similarity
from xmr.models.checkpoint import TOKENIZER, atomic_dir, load_run
from xmr.models.data.video import VideoData, VideoFeatures
from xmr.models.errors import InputError
from xmr.models.evaluate.retrieval import retrieval_metrics
from xmr.models.evaluate.video import similarity
from xmr.models.tokenizer import TextLimits, encode_batch
from xmr.models.video.inputs import video_inputs
from xmr.models.video.prota import ProTA
from xmr.models.video.two_stage import VideoGallery
from xmr.models.video.visern import ViSERN

CUSTOM_OPS = ("standard", "plugin")


def specs_for(model, regions_per_frame: int) -> dict[str, ModelSpec]:
    """The exported graphs' I/O specs; ViSERN's video input has the data's K regions per frame."""
    cfg = model.cfg
    if isinstance(model, ViSERN):
        return {
            "text_encoder": video_text_encoder_spec(cfg.embed_dim),
            "video_encoder": visern_video_encoder_spec(cfg.embed_dim, regions_per_frame, cfg.region_dim),
        }
    return {
        "text_encoder": video_text_encoder_spec(cfg.embed_dim, tokens=True),
        "video_encoder": prota_video_encoder_spec(cfg.embed_dim, cfg.frame_dim),
        "pair_scorer": prota_pair_scorer_spec(cfg.embed_dim),
    }


def modules_for(model) -> dict[str, torch.nn.Module]:
    """The exported parts, taking the inputs of `specs_for`'s specs by position."""
    if isinstance(model, ViSERN):
        return {"text_encoder": Tower(model, "encode_text"), "video_encoder": Tower(model, "encode_video")}
    return {
        "text_encoder": Tower(model, "encode_text", ("embedding", "mu", "sigma")),
        "video_encoder": Tower(model, "encode_video", ("embedding", "mu", "sigma")),
        "pair_scorer": Tower(model, "rerank"),
    }


def export_video_run(
    run: Path,
    out: Path,
    custom_ops: str = "standard",
    split: VideoFeatures | None = None,
    parity_videos: int | None = None,
) -> dict:
    """Export `run`; parity on the test split (or `split`), the first `parity_videos` videos of it if set
    (default: all for the standard form, 48 for the reference-evaluated plugin form)."""
    if custom_ops not in CUSTOM_OPS:
        raise InputError(f"--custom-ops {custom_ops!r}; valid: {', '.join(CUSTOM_OPS)}")
    model, tokenizer, config = load_run(Path(run))
    if not isinstance(model, ViSERN | ProTA):
        raise InputError(f"{run} holds a {config['model']!r} model; video export takes visern or prota")
    if split is None:
        split = VideoData.of(config["train_config"]).splits()["test"]
    n = parity_videos or (len(split) if custom_ops == "standard" else min(48, len(split)))
    split = split.subset(n)
    limits = TextLimits(max_tokens=model.cfg.max_tokens)
    specs, modules = specs_for(model, split.regions.shape[2]), modules_for(model)
    torch_runners = {name: TorchRunner(modules[name], spec) for name, spec in specs.items()}
    texts = split.flat_captions()
    steps = tqdm(
        total=len(specs) + 2, desc=f"export {config['model']} ({custom_ops})", unit="step", disable=None
    )
    with atomic_dir(Path(out)) as tmp:
        ids, lengths = encode_batch(tokenizer, texts[:3], limits)
        video, mask = (x.numpy() for x in video_inputs(model, split, np.arange(2)))
        examples = {
            "text_encoder": {"input_ids": ids, "lengths": lengths},
            "video_encoder": dict(zip(specs["video_encoder"].input_names, (video, mask), strict=True)),
        }
        if "pair_scorer" in specs:
            t = torch_runners["text_encoder"].run({"input_ids": ids[:1], "lengths": lengths[:1]})
            v = torch_runners["video_encoder"].run(examples["video_encoder"])
            examples["pair_scorer"] = {
                "text_mu": t["text_mu"],
                "text_sigma": t["text_sigma"],
                "lengths": lengths[:1],
                "video_mu": v["video_mu"],
                "video_sigma": v["video_sigma"],
                "frame_mask": mask,
            }
        for name, spec in specs.items():
            example = tuple(torch.from_numpy(examples[name][n_]) for n_ in spec.input_names)
            export_onnx(modules[name], example, spec, tmp / f"{name}.onnx", custom_ops)
            steps.update()
        shutil.copy2(Path(run) / TOKENIZER, tmp / "tokenizer.json")

        # threads=0: ONNX Runtime's default, every core
        runners = {
            name: runner_for(tmp / f"{name}.onnx", spec, custom_ops, threads=0)
            for name, spec in specs.items()
        }
        backends = BackendParity(torch_runners, runners)
        gallery = []  # the exported video tower's outputs, batch by batch, in split order

        def onnx_run(graph: str, feeds: dict) -> dict:
            out = backends.run(graph, feeds)[1]
            if graph == "video_encoder":
                gallery.append(out)
            return out

        onnx_sim = video_similarity(onnx_run, model, tokenizer, specs, split)
        videos = {k: np.concatenate([g[k] for g in gallery]).astype(np.float32) for k in gallery[0]}
        video_ids = np.arange(len(split), dtype=np.int64)
        np.save(tmp / "gallery.npy", videos["video_embedding"])
        np.save(tmp / "gallery_ids.npy", video_ids)
        gallery_files = ["gallery.npy", "gallery_ids.npy"]
        if "pair_scorer" in specs:  # the token store `text_video_rerank` re-ranks a shortlist from
            mask = split.mask.astype(bool)
            tokens = VideoGallery(
                videos["video_embedding"], videos["video_mu"], videos["video_sigma"], mask, video_ids
            )
            write_gallery(tmp, tokens)
            gallery_files += [f"{name}.npy" for name in GALLERY_FILES[1:]]
        parity = backends.stats.stats
        steps.update()
        torch_sim = similarity(model, tokenizer, split)
        cap_to_video = split.caption_video_index()
        parity["recall"] = {
            "pytorch": retrieval_metrics(torch_sim, cap_to_video),
            "onnx": retrieval_metrics(onnx_sim, cap_to_video),
        }
        parity["runtime"] = runners["text_encoder"].backend
        parity["split"] = f"{split.name}/{split.split}"
        parity["n_videos"], parity["n_captions"] = len(split), len(texts)
        preprocessing = {
            "features": "backbone regions (B, F, K, D), see models/data/video.py",
            "max_tokens": limits.max_tokens,
            "max_bytes": limits.max_bytes,
            "tokenizer": "tokenizer.json",
        }
        manifest = graphs_manifest(tmp, run, config["model"], model, specs, custom_ops, preprocessing, parity)
        manifest.files |= file_facts(tmp, gallery_files)
        manifest.gallery = {
            "split": f"{split.name}/{split.split}",
            "size": len(split),
            "ids": "row index in the split",
            "tower": "video_encoder.onnx",
        }
        manifest.write(tmp)
        steps.update()
    steps.close()
    return manifest.to_dict()
