"""How much the recall gate's R@1 moves under embedding errors far smaller than INT8's.

    python -m xmr.perf.recall_noise artifacts/rvse-minilm --out perf/figures

`xmr optimize` gates an optimised artifact on the drop of test R@1 against its FP32 graphs. This script
measures what that gate can see on an image-text artifact, with no quantization at all: the FP32 text
embeddings of the test captions are perturbed by a random error of a chosen size (each unit vector rotated
by the angle whose cosine is `1 - error`, in a random direction orthogonal to it, so that `1 - cos` to the
FP32 vector is exactly `error`, the figure `xmr optimize` reports as the embedding's error), and both
directions' R@1 are recomputed against the FP32 image embeddings. Two ways of drawing the error:

- `independent`: every caption its own error, as a batch-dependent computation gives them (ONNX Runtime's
  dynamic INT8 scales each activation by the range of the whole batch, so the same text in two batches
  comes out slightly different);
- `same text, same error`: captions with identical text share one error, as any computation that is a
  function of the text alone gives them.

The split's captions are templated sentences about simple scenes, so some texts describe several images
word for word (counted in the output). FP32 embeds identical texts identically, the metric breaks ties
optimistically (`xmr.models.evaluate.retrieval`: only strictly higher scores rank above), so such a
caption counts as rank 1 for every image it describes; any error that differs between the copies breaks the
tie and takes the hit from all but one image. Image-to-text R@1, the best of an image's five captions
against all 5,000, is where that shows. Every level is drawn `--seeds` times (mean and standard deviation).

Then the same question for a real INT8 tower, whose errors are not random: the text tower converted by ONNX
Runtime's dynamic quantization with nothing kept in FP32 (`quantize_dynamic`: per-channel INT8 weights,
per-tensor inputs, no SmoothQuant, no fusion; `xmr optimize --precision int8 --activations per-tensor`
makes this form after fusing the attention), the same test captions embedded under different batchings: as the
gate embeds them (512 consecutive captions per call), each distinct text once (512 per call), shuffled into
calls of 64 (`--seeds` shuffles), and one caption per call (what a lone query gets). Dynamic INT8 scales each
activation by the range of the whole call, so a caption's vector depends on the captions it is batched with;
FP32 does not (identical texts come out bit-identical in any batch).

Writes `recall_noise.csv` (one row per level, mode and seed), `recall_noise_batching.csv` (one row per
batching) and `recall_noise.md` (the README's tables).
"""

from __future__ import annotations

import argparse
import csv
import sys
import tempfile
from collections import defaultdict
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from xmr.export.manifest import read_manifest
from xmr.export.optimize import quiet_converters
from xmr.export.runners import OnnxRunner
from xmr.export.scoring import ArtifactTask, embed_images, embed_texts, run_of
from xmr.models.errors import InputError
from xmr.models.evaluate.retrieval import retrieval_metrics
from xmr.models.tokenizer import TextLimits

ERRORS = (1e-4, 3e-4, 1e-3, 3e-3, 1e-2)
MODES = ("independent", "same text, same error")


def perturb(vectors: np.ndarray, error: float, rng: np.random.Generator, groups: np.ndarray | None = None):
    """Unit `vectors` (N, D) rotated so that 1 - cos to each is exactly `error`, in random directions;
    rows with equal `groups` labels get the same direction (their vectors must then be equal)."""
    if not 0 <= error < 1:
        raise InputError(f"error {error}: expected 0 <= 1 - cos < 1")
    direction = rng.standard_normal(vectors.shape)
    if groups is not None:
        direction = direction[groups]
    direction -= (direction * vectors).sum(1, keepdims=True) * vectors  # orthogonal to each vector
    direction /= np.linalg.norm(direction, axis=1, keepdims=True)
    return (1 - error) * vectors + np.sqrt(1 - (1 - error) ** 2) * direction


def text_groups(texts: list[str]) -> np.ndarray:
    """(N,) the index of each text's first occurrence: equal labels for identical texts."""
    first: dict[str, int] = {}
    return np.array([first.setdefault(t, i) for i, t in enumerate(texts)])


def batchings(captions: list[str], seeds: int) -> dict[str, tuple[list[int], int]]:
    """name -> (the caption indices to embed, in order; captions per call). Distinct texts: each text once."""
    distinct = sorted(set(text_groups(captions).tolist()))  # each text's first caption
    out = {"as evaluated: 512 consecutive captions per call": (list(range(len(captions))), 512)}
    out["each distinct text once, 512 per call"] = (distinct, 512)
    for seed in range(seeds):
        order = np.random.default_rng(seed).permutation(len(captions)).tolist()
        out[f"shuffled (seed {seed}), 64 per call"] = (order, 64)
    out["one caption per call"] = (list(range(len(captions))), 1)
    return out


def batching_rows(
    artifact: Path, task: ArtifactTask, captions, images, owners, base, seeds: int, threads: int
):
    """Test R@1 drop of the dynamic-INT8 text tower against FP32 under each of `batchings`."""
    from xmr.perf.int8_outliers import quantize

    limits = TextLimits(task.model.cfg.max_tokens)
    groups = text_groups(captions)
    rows = []
    with tempfile.TemporaryDirectory(prefix="xmr-noise-") as tmp, quiet_converters():
        path = quantize(artifact / "text_encoder.onnx", Path(tmp) / "int8.onnx", [])
        run = run_of({"text_encoder": OnnxRunner(path, task.specs["text_encoder"], threads)})
        for name, (order, size) in tqdm(batchings(captions, seeds).items(), desc="batchings", disable=None):
            vectors = embed_texts(run, task.tokenizer, [captions[i] for i in order], limits, batch_size=size)
            texts = np.empty((len(captions), vectors.shape[1]), dtype=vectors.dtype)
            texts[order] = vectors  # a caption embedded once per text: its copies take that vector
            texts = texts[groups] if len(order) < len(captions) else texts
            got = retrieval_metrics(images @ texts.T, owners)
            rows.append({
                "batching": name,
                "i2t_R@1_drop": round(base["i2t_R@1"] - got["i2t_R@1"], 3),
                "t2i_R@1_drop": round(base["t2i_R@1"] - got["t2i_R@1"], 3),
            })  # fmt: skip
    return rows


def measure(
    artifact: Path, errors: list[float], seeds: int, threads: int
) -> tuple[list[dict], list[dict], dict]:
    manifest = read_manifest(artifact)
    task = ArtifactTask.of(manifest)
    if task.family != "image_text":
        raise InputError(f"{artifact} is a {task.family} artifact; expected an image-text one")
    test = task.split("test")
    runners = {g: OnnxRunner(artifact / f"{g}.onnx", task.specs[g], threads) for g in task.specs}
    images = embed_images(run_of(runners), task.specs["image_encoder"], test.images, task.model)
    captions = test.flat_captions()
    texts = embed_texts(run_of(runners), task.tokenizer, captions, TextLimits(task.model.cfg.max_tokens))
    owners = test.caption_image_index()
    base = retrieval_metrics(images @ texts.T, owners)
    groups = text_groups(captions)
    owners_of = defaultdict(set)
    for caption, image in zip(captions, owners, strict=True):
        owners_of[caption].add(int(image))
    shared = {c for c, images in owners_of.items() if len(images) > 1}  # texts describing several images
    facts = {
        "artifact": artifact.name,
        "captions": len(captions),
        "distinct_texts": len(set(captions)),
        "captions_describing_several_images": sum(c in shared for c in captions),
        "images_with_such_a_caption": len(set().union(*(owners_of[c] for c in shared))),
        "fp32": {k: base[k] for k in ("i2t_R@1", "t2i_R@1")},
    }
    rows = []
    for error in errors:
        for mode in MODES:
            for seed in range(seeds):
                rng = np.random.default_rng(seed)
                noisy = perturb(texts, error, rng, groups if mode != "independent" else None)
                got = retrieval_metrics(images @ noisy.T, owners)
                rows.append({
                    "error": error,
                    "mode": mode,
                    "seed": seed,
                    "i2t_R@1_drop": round(base["i2t_R@1"] - got["i2t_R@1"], 3),
                    "t2i_R@1_drop": round(base["t2i_R@1"] - got["t2i_R@1"], 3),
                })  # fmt: skip
    batched = batching_rows(artifact, task, captions, images, owners, base, seeds, threads)
    return rows, batched, facts


def markdown(rows: list[dict], batched: list[dict], facts: dict) -> str:
    lines = [
        f"{facts['artifact']}, test split: {facts['captions']} captions, {facts['distinct_texts']} distinct "
        f"texts; {facts['captions_describing_several_images']} captions have a text that also describes "
        f"another image ({facts['images_with_such_a_caption']} images). FP32 i2t R@1 "
        f"{facts['fp32']['i2t_R@1']:.2f}, t2i R@1 {facts['fp32']['t2i_R@1']:.2f}. Drop in points, mean "
        f"± std over {len({r['seed'] for r in rows})} draws.",
        "",
        "| text error (1 - cos) | errors drawn | i2t R@1 drop | t2i R@1 drop |",
        "|---|---|---|---|",
    ]
    for error in dict.fromkeys(r["error"] for r in rows):
        for mode in MODES:
            group = [r for r in rows if r["error"] == error and r["mode"] == mode]
            i2t, t2i = (np.array([r[k] for r in group]) for k in ("i2t_R@1_drop", "t2i_R@1_drop"))
            cells = [f"{d.mean():.2f} ± {d.std():.2f}" for d in (i2t, t2i)]
            lines.append(f"| {error:.0e} | {mode} | {' | '.join(cells)} |")
    lines += [
        "",
        "The dynamic-INT8 text tower (nothing kept in FP32), the same captions batched differently:",
        "",
        "| batching | i2t R@1 drop | t2i R@1 drop |",
        "|---|---|---|",
        *(f"| {r['batching']} | {r['i2t_R@1_drop']:.2f} | {r['t2i_R@1_drop']:.2f} |" for r in batched),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m xmr.perf.recall_noise", description=__doc__.split("\n")[0]
    )
    parser.add_argument("artifact", type=Path, help="an exported image-text artifact folder")
    parser.add_argument("--out", type=Path, default=Path("perf/figures"))
    parser.add_argument("--errors", type=float, nargs="+", default=list(ERRORS), help="1 - cos levels")
    parser.add_argument("--seeds", type=int, default=5, help="draws per level and mode")
    parser.add_argument("--threads", type=int, default=0, help="ONNX Runtime threads (0: one per core)")
    args = parser.parse_args(argv)
    try:
        rows, batched, facts = measure(args.artifact, args.errors, args.seeds, args.threads)
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    args.out.mkdir(parents=True, exist_ok=True)
    for name, table_rows in (("recall_noise.csv", rows), ("recall_noise_batching.csv", batched)):
        with open(args.out / name, "w", newline="") as f:
            writer = csv.DictWriter(f, list(table_rows[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(table_rows)
    table = markdown(rows, batched, facts)
    (args.out / "recall_noise.md").write_text(table)
    print(table)
    print(f"wrote {args.out}/recall_noise.csv, recall_noise_batching.csv, recall_noise.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
