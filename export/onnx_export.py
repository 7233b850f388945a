"""Export a trained run to ONNX, one graph per tower, and prove the graphs retrieve what PyTorch retrieved.

`export_run(run, out)` writes into `out` (replaced atomically):
- `text_encoder.onnx`, `image_encoder.onnx`: torch.onnx's dynamo exporter on a `Tower` of the model (one
  method, inputs by position), tensor names and dynamic dims from the I/O spec (`iospec.py`), checked with
  `onnx.checker` (full check, with shape inference);
- `tokenizer.json`: the run's tokenizer, which the served tokenizer model loads;
- `gallery.npy`, `gallery_ids.npy`: the evaluation split's images embedded by the ONNX image tower, the
  gallery the served `gallery_topk` searches;
- `manifest.json`: model config, preprocessing facts, every served model's I/O spec, sha256 of each file,
  versions, and parity against PyTorch on the evaluation split: max abs error and min cosine of the
  embeddings, and Recall@1/5/10 (both directions) of the ONNX Runtime embeddings beside PyTorch's.
"""

from __future__ import annotations

import inspect
import logging
import shutil
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn
from tqdm.auto import tqdm

from xmr.export import scoring
from xmr.export.iospec import ModelSpec, image_text_specs
from xmr.export.manifest import Manifest, file_facts, versions
from xmr.export.parity import tensor_parity
from xmr.export.repository import serving_facts
from xmr.export.runners import OnnxRunner
from xmr.export.scoring import run_of
from xmr.models.checkpoint import TOKENIZER, atomic_dir, load_run
from xmr.models.data import load_split
from xmr.models.data.base import RetrievalSplit
from xmr.models.evaluate.image_text import embed_images, embed_texts
from xmr.models.evaluate.retrieval import retrieval_metrics
from xmr.models.image_text.inputs import image_inputs
from xmr.models.tokenizer import TextLimits, encode_batch

OPSET = 18


class Tower(nn.Module):
    """One part of a model as exported: `forward(*inputs)` calls `model.<method>(*inputs)`.

    `outputs` picks and orders what the method returns: keys of a dict or fields of a named tuple (the
    graph's outputs, in the order of its I/O spec); empty, the result is returned as is. The inputs go by
    position, so one class serves every tower: `Tower(model, "encode_text")`,
    `Tower(prota, "encode_video", ("embedding", "mu", "sigma"))`, `Tower(cdnet, "forward", ("spans", ...))`.
    """

    def __init__(self, model: nn.Module, method: str = "forward", outputs: tuple[str, ...] = ()):
        super().__init__()
        self.model, self.method, self.outputs = model, method, tuple(outputs)

    def forward(self, *inputs: torch.Tensor):
        fn = self.model if self.method == "forward" else getattr(self.model, self.method)
        out = fn(*inputs)
        if not self.outputs:
            return out
        if isinstance(out, dict):
            return tuple(out[name] for name in self.outputs)
        return tuple(getattr(out, name) for name in self.outputs)


def export_onnx(
    module: torch.nn.Module,
    example: tuple[torch.Tensor, ...],
    spec: ModelSpec,
    path: Path,
    custom_ops: str = "standard",
) -> None:
    """Export `module` with the names and dynamic dims of `spec`, then run the full ONNX checker.

    `module` takes the spec's inputs by position (a `Tower`, or any module whose forward has them in spec
    order); the dynamic dims go to the exporter by position too, one entry per input.
    `custom_ops="plugin"` selects the custom-op call form in the model's layers and translates each into
    one node of the `xmr` ONNX domain; "standard" lets the exporter decompose them into standard ops.
    """
    import onnx

    from xmr.models.ops import use_op_form
    from xmr.models.ops.onnx_domain import register_schemas, translation_table

    dims: dict[str, torch.export.Dim] = {}

    def dim(name: str) -> torch.export.Dim:
        return dims.setdefault(name, torch.export.Dim(name, min=1, max=4096))

    if len(example) != len(spec.inputs):
        raise ValueError(f"{len(example)} example inputs for the {len(spec.inputs)} inputs of {spec.name}")
    dynamic = tuple({i: dim(d) for i, d in t.onnx_dynamic_axes().items()} for t in spec.inputs)
    use_op_form(module, custom_ops)
    module.eval()
    try:
        quiet_exporter()
        with warnings.catch_warnings():
            # torch.onnx's own notes, nothing a user can act on: a deprecation inside torch, and dynamic
            # dims of one spec name (e.g. "batch" on every input) being merged, which is what we ask for
            warnings.filterwarnings("ignore", message=".*LeafSpec.*", category=FutureWarning)
            warnings.filterwarnings(
                "ignore", message=".*The axis name.*will not be used.*", category=UserWarning
            )
            torch.onnx.export(
                module,
                example,
                str(path),
                input_names=spec.input_names,
                output_names=spec.output_names,
                dynamic_shapes=by_position(module, dynamic),
                dynamo=True,
                opset_version=OPSET,
                external_data=False,
                verbose=False,
                custom_translation_table=translation_table() if custom_ops == "plugin" else None,
            )
    finally:
        use_op_form(module, "standard")
    register_schemas()  # the checker must know the xmr domain's ops
    onnx.checker.check_model(str(path), full_check=True)


def quiet_exporter() -> None:
    """Silence torch.onnx's registry notes about optional libraries (torchvision ops it skips)."""
    logging.getLogger("torch.onnx._internal.exporter._registration").setLevel(logging.ERROR)


def by_position(module: nn.Module, per_input: tuple) -> tuple:
    """One dynamic-shapes entry per input -> the tuple torch.export matches to `module.forward`'s parameters.

    Only the kinds of the parameters count, not their names: each positional parameter takes one entry, and
    a `*inputs` parameter (`Tower.forward`) takes the remaining entries as one tuple.
    """
    kinds = [p.kind for p in inspect.signature(module.forward).parameters.values()]
    if inspect.Parameter.VAR_POSITIONAL not in kinds:
        return per_input
    n = kinds.index(inspect.Parameter.VAR_POSITIONAL)
    return (*per_input[:n], per_input[n:])


def graphs_manifest(
    folder: Path,
    run: Path,
    model_name: str,
    model: nn.Module,
    specs: dict[str, ModelSpec],
    custom_ops: str,
    preprocessing: dict,
    parity: dict,
) -> Manifest:
    """The manifest of an export in a custom-op form: `<name>.onnx` per spec and `tokenizer.json` in
    `folder`, with the op types of each graph's `xmr` nodes."""
    import onnx

    from xmr.models.ops.onnx_domain import xmr_nodes

    files = [f"{name}.onnx" for name in specs] + ["tokenizer.json"]
    return Manifest(
        model=model_name,
        model_config=model.cfg.to_dict(),
        run=str(run),
        custom_ops=custom_ops,
        xmr_nodes={
            name: [n.op_type for n in xmr_nodes(onnx.load(folder / f"{name}.onnx"))] for name in specs
        },
        preprocessing=preprocessing,
        specs={name: spec.to_dict() for name, spec in specs.items()},
        files=file_facts(folder, files),
        versions=versions(),
        parity=parity,
    )


def export_run(
    run: Path, out: Path, split: RetrievalSplit | None = None, gallery_split: str = "test"
) -> dict:
    """Export `run` to `out`; returns the manifest. `split` overrides the evaluation/gallery split."""
    model, tokenizer, config = load_run(Path(run))
    cfg = model.cfg
    if split is None:
        train_cfg = config["train_config"]
        split = load_split(train_cfg["data"], gallery_split, root=train_cfg.get("data_root"))
        if train_cfg.get("n_eval"):
            split = split.subset(train_cfg["n_eval"])
    specs = image_text_specs(cfg.embed_dim, cfg.image_size, cfg.region_dim)
    limits = TextLimits(max_tokens=cfg.max_tokens)
    steps = tqdm(total=5, desc="export", unit="step", disable=None)
    with atomic_dir(Path(out)) as tmp:
        ids, lengths = encode_batch(tokenizer, split.flat_captions()[:4], limits)
        export_onnx(
            Tower(model, "encode_text"),
            (torch.from_numpy(ids), torch.from_numpy(lengths)),
            specs["text_encoder"],
            tmp / "text_encoder.onnx",
        )
        steps.update()
        export_onnx(
            Tower(model, "encode_image"),
            (image_inputs(split.images[:2], cfg),),
            specs["image_encoder"],
            tmp / "image_encoder.onnx",
        )
        steps.update()
        shutil.copy2(Path(run) / TOKENIZER, tmp / "tokenizer.json")

        texts, cap_to_img = split.flat_captions(), split.caption_image_index()
        torch_img, torch_txt = embed_images(model, split.images), embed_texts(model, tokenizer, texts)
        steps.update()
        graphs = run_of(
            {g: OnnxRunner(tmp / f"{g}.onnx", specs[g]) for g in ("text_encoder", "image_encoder")}
        )
        onnx_img = scoring.embed_images(graphs, specs["image_encoder"], split.images, model)
        onnx_txt = scoring.embed_texts(graphs, tokenizer, texts, limits)
        steps.update()
        np.save(tmp / "gallery.npy", onnx_img.astype(np.float32))
        np.save(tmp / "gallery_ids.npy", np.arange(len(onnx_img), dtype=np.int64))
        parity = {
            "split": f"{split.name}/{split.split}",
            "n_images": len(split.images),
            "n_captions": len(texts),
            "image_encoder": tensor_parity(torch_img, onnx_img),
            "text_encoder": tensor_parity(torch_txt, onnx_txt),
            "recall": {
                "pytorch": retrieval_metrics(torch_img @ torch_txt.T, cap_to_img),
                "onnxruntime": retrieval_metrics(onnx_img @ onnx_txt.T, cap_to_img),
            },
        }
        files = [
            "text_encoder.onnx",
            "image_encoder.onnx",
            "tokenizer.json",
            "gallery.npy",
            "gallery_ids.npy",
        ]
        manifest = Manifest(
            model=config["model"],
            model_config=cfg.to_dict(),
            run=str(run),
            **serving_facts(
                cfg.embed_dim,
                cfg.image_size,
                cfg.region_dim,
                cfg.pixel_mean,
                cfg.pixel_std,
                limits.max_tokens,
                limits.max_bytes,
            ),
            gallery={
                "split": f"{split.name}/{split.split}",
                "size": len(onnx_img),
                "ids": "row index in the split",
            },
            files=file_facts(tmp, files),
            versions=versions(),
            opset=OPSET,
            parity=parity,
        )
        manifest.write(tmp)
        steps.update()
    steps.close()
    return manifest.to_dict()
