"""Where INT8 loses the MiniLM text tower's accuracy and its time: outlier tokens and unfused attention.

    python -m xmr.perf.int8_outliers artifacts/rvse-minilm --out perf/figures

ONNX Runtime's dynamic INT8 (`xmr optimize --precision int8 --activations per-tensor`) quantizes each
MatMul's input with one scale per tensor, computed from the whole batch. This script measures, for the
text tower:

1. the range that scale must cover at every MatMul reading a (batch, tokens, channels) activation, over
   64 dev captions: the largest |value| over all tokens, and over all tokens but the first ([CLS]);
2. six versions of the tower on the same inputs, none with SmoothQuant or nodes kept in FP32: FP32; FP32
   with onnxscript's ONNX Runtime fusions (attention, residual + LayerNorm, bias + GELU:
   `xmr.export.ort_int8.fuse_for_ort`); dynamic INT8 (per-channel weights, per-tensor inputs); dynamic
   INT8 with the first token's rows of every such MatMul split off and computed in FP32 (Slice -> FP32
   MatMul for token 0, INT8 MatMul for the rest -> Concat), so the per-tensor scale no longer has to cover
   the outlier token (the idea of "PrefixQuant: Eliminating Outliers by Prefixed Tokens for Large Language
   Models Quantization", applied here to an encoder's [CLS] token); INT8 with per-token input scales
   (`xmr.export.ort_int8.per_token_int8`); and the same on the fused graph, which is what
   `xmr optimize --precision int8` makes before SmoothQuant and its search. For each: the text embedding's
   error against FP32 (1 - mean cosine, dev captions), the test split's R@1 drop in both directions against
   FP32 (image tower FP32), the throughput at batch 64 relative to FP32, timed alternately with FP32
   (`--repeats` each) so that load on the machine weighs on both, the batch dependence and the time per
   op type (ONNX Runtime's profiler).

Writes `int8_outliers.csv` (the variants), `int8_outliers_ranges.csv` (per MatMul input),
`int8_outliers_ops.csv` (per variant and op type) and `int8_outliers.md` (the README's table, with the
machine). The split graph is an experiment, kept as a script so that its figures can be re-checked.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import tempfile
from pathlib import Path

import numpy as np
import onnx
from onnx import helper, numpy_helper

from xmr.export.manifest import read_manifest
from xmr.export.ort_int8 import fuse_for_ort, int8_matmuls, per_token_int8
from xmr.export.runners import OnnxRunner
from xmr.export.scoring import ArtifactTask, embed_images, embed_texts, run_of
from xmr.export.smoothquant import activation_values
from xmr.models.evaluate.retrieval import retrieval_metrics
from xmr.models.tokenizer import TextLimits, encode_batch
from xmr.perf.int8_frontier import paired_speedup
from xmr.perf.precision import tower_inputs
from xmr.perf.tables import cpu_model

TOWER = "text_encoder"


def token_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """The MatMuls with a constant 2-D weight whose input is (batch, tokens, channels)."""
    rank = {v.name: len(v.type.tensor_type.shape.dim) for v in [*model.graph.value_info, *model.graph.input]}
    return [n for n in int8_matmuls(model) if n.op_type == "MatMul" and rank.get(n.input[0]) == 3]


def split_first_token(model: onnx.ModelProto) -> tuple[onnx.ModelProto, list[str]]:
    """Every token MatMul `Y = X W` as `Concat(X[:, :1] W, X[:, 1:] W)`, the second keeping the node's
    name (so the quantizer converts it) and the first named `<node>/first` (to be kept FP32)."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    g = model.graph
    consts = {"first_0": [0], "first_1": [1], "first_end": [np.iinfo(np.int64).max]}
    g.initializer.extend(numpy_helper.from_array(np.array(v, np.int64), k) for k, v in consts.items())
    split = {n.name for n in token_matmuls(model)}
    nodes, kept = [], []
    for n in g.node:
        if n.name not in split:
            nodes.append(n)
            continue
        x, w, y, p = n.input[0], n.input[1], n.output[0], n.name
        nodes += [
            helper.make_node("Slice", [x, "first_0", "first_1", "first_1"], [f"{p}/x0"], name=f"{p}/slice0"),
            helper.make_node(
                "Slice", [x, "first_1", "first_end", "first_1"], [f"{p}/x1"], name=f"{p}/slice1"
            ),
            helper.make_node("MatMul", [f"{p}/x0", w], [f"{p}/y0"], name=f"{p}/first"),
            helper.make_node("MatMul", [f"{p}/x1", w], [f"{p}/y1"], name=p),
            helper.make_node("Concat", [f"{p}/y0", f"{p}/y1"], [y], name=f"{p}/concat", axis=1),
        ]
        kept.append(f"{p}/first")
    del g.node[:]
    g.node.extend(nodes)
    return model, kept


def batch_dependence(runner: OnnxRunner, feeds: dict) -> float:
    """Largest |difference| between each caption's vector embedded with its batch and embedded alone, the
    lone caption without padding (as a single served query arrives). `xmr.export.optimize.batch_dependence`
    measures the same for any graph but keeps each item's padding, which dynamic INT8's per-batch range
    also sees; the two are kept apart so that this table's figures stay what they measured."""
    together = runner.run(feeds)["text_embedding"]
    alone = [
        runner.run({"input_ids": feeds["input_ids"][i : i + 1, : feeds["lengths"][i]],
                    "lengths": feeds["lengths"][i : i + 1]})["text_embedding"][0]
        for i in range(len(together))
    ]  # fmt: skip
    return float(np.abs(together - np.stack(alone)).max())


def op_times(path: Path, feeds: dict, threads: int, runs: int = 10) -> dict[str, float]:
    """ms per run spent in each op type, largest first: ONNX Runtime's profiler records from the session's
    start, so the average is over all 3 + `runs` runs, the 3 warm-up runs included."""
    import json

    import onnxruntime as ort

    with tempfile.TemporaryDirectory(prefix="xmr-profile-") as tmp:
        opts = ort.SessionOptions()
        opts.intra_op_num_threads, opts.inter_op_num_threads = threads, 1
        opts.enable_profiling, opts.profile_file_prefix = True, str(Path(tmp) / "profile")
        session = ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"])
        for _ in range(3 + runs):
            session.run(None, feeds)
        events = json.loads(Path(session.end_profiling()).read_text())
    totals: dict[str, float] = {}
    for e in events:
        if e.get("cat") == "Node" and e["name"].endswith("_kernel_time"):
            totals[e["args"]["op_name"]] = totals.get(e["args"]["op_name"], 0.0) + e["dur"]
    total_runs = 3 + runs
    return {op: us / total_runs / 1e3 for op, us in sorted(totals.items(), key=lambda kv: -kv[1])}


def activation_ranges(path: Path, feeds: dict) -> list[dict]:
    """Per token MatMul input: max |x| over every token and over every token but the first."""
    inputs = sorted({n.input[0] for n in token_matmuls(onnx.load(path))})
    (values,) = activation_values(path, inputs, [feeds])
    return [
        {
            "activation": name,
            "absmax_all_tokens": round(float(np.abs(x).max()), 2),
            "absmax_without_first": round(float(np.abs(x[:, 1:]).max()), 2),
        }
        for name, x in values.items()
    ]


def quantize(source: Path, dest: Path, exclude: list[str]) -> Path:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(source, dest, op_types_to_quantize=["MatMul", "Gemm"], per_channel=True,
                     weight_type=QuantType.QInt8, nodes_to_exclude=exclude)  # fmt: skip
    return dest


def measure(
    artifact: Path, threads: int, repeats: int, dev_items: int
) -> tuple[list[dict], list[dict], list[dict]]:
    logging.getLogger().setLevel(logging.ERROR)  # the quantizer's advice about pre-processing
    task = ArtifactTask.of(read_manifest(artifact))
    spec = task.specs[TOWER]
    limits = TextLimits(max_tokens=task.model.cfg.max_tokens)
    dev_caps = task.split("val").flat_captions()[: dev_items * 5]
    ids, lengths = encode_batch(task.tokenizer, dev_caps[:64], limits)
    ranges = activation_ranges(artifact / f"{TOWER}.onnx", {"input_ids": ids, "lengths": lengths})
    test = task.split("test")
    image_runner = OnnxRunner(artifact / "image_encoder.onnx", task.specs["image_encoder"], threads)
    images = embed_images(
        run_of({"image_encoder": image_runner}), task.specs["image_encoder"], test.images, task.model
    )
    speed_feeds = tower_inputs(task, TOWER, 64)
    rows, ops = [], []
    with tempfile.TemporaryDirectory(prefix="xmr-outliers-") as tmp:
        tmp = Path(tmp)
        fp32_path = artifact / f"{TOWER}.onnx"
        split, kept = split_first_token(onnx.load(fp32_path))
        onnx.save(split, tmp / "split.onnx")
        onnx.save(per_token_int8(onnx.load(fp32_path)), tmp / "per_token.onnx")
        fuse_for_ort(fp32_path, tmp / "fused.onnx")
        onnx.save(per_token_int8(onnx.load(tmp / "fused.onnx")), tmp / "fused_per_token.onnx")
        variants = {
            "FP32": fp32_path,
            "FP32, attention fused": tmp / "fused.onnx",
            "dynamic INT8": quantize(fp32_path, tmp / "int8.onnx", []),
            "dynamic INT8, first token FP32": quantize(tmp / "split.onnx", tmp / "split_int8.onnx", kept),
            "INT8, per-token scales": tmp / "per_token.onnx",
            "INT8, per-token scales, attention fused": tmp / "fused_per_token.onnx",
        }
        runners = {k: OnnxRunner(p, spec, threads) for k, p in variants.items()}

        def texts(runner, captions):
            return embed_texts(run_of({TOWER: runner}), task.tokenizer, captions, limits)

        ref_dev = texts(runners["FP32"], dev_caps)
        ref = retrieval_metrics(
            images @ texts(runners["FP32"], test.flat_captions()).T, test.caption_image_index()
        )
        for name, runner in runners.items():
            dev = texts(runner, dev_caps)
            cos = (dev * ref_dev).sum(1) / (np.linalg.norm(dev, axis=1) * np.linalg.norm(ref_dev, axis=1))
            got = retrieval_metrics(
                images @ texts(runner, test.flat_captions()).T, test.caption_image_index()
            )
            speed = 1.0 if name == "FP32" else paired_speedup(runners["FP32"], runner, speed_feeds, repeats)
            ops += [
                {"variant": name, "op_type": op, "ms_per_run": round(ms, 3)}
                for op, ms in op_times(variants[name], speed_feeds, threads).items()
            ]
            rows.append(
                {
                    "variant": name,
                    "text_error": float(1 - cos.mean()),
                    "i2t_R@1_drop": round(ref["i2t_R@1"] - got["i2t_R@1"], 2),
                    "t2i_R@1_drop": round(ref["t2i_R@1"] - got["t2i_R@1"], 2),
                    "speedup_b64": round(speed, 2),
                    "batch_dependence": batch_dependence(runner, {"input_ids": ids, "lengths": lengths}),
                    "size_mb": round(os.path.getsize(variants[name]) / 2**20, 1),
                }
            )
    return rows, ranges, ops


def write(out: Path, rows: list[dict], ranges: list[dict], ops: list[dict], threads: int) -> None:
    import onnxruntime as ort

    out.mkdir(parents=True, exist_ok=True)
    files = (
        ("int8_outliers.csv", rows),
        ("int8_outliers_ranges.csv", ranges),
        ("int8_outliers_ops.csv", ops),
    )
    for name, table in files:
        with open(out / name, "w", newline="") as f:
            writer = csv.DictWriter(f, list(table[0]), lineterminator="\n")
            writer.writeheader()
            writer.writerows(table)
    ratio = [r["absmax_all_tokens"] / r["absmax_without_first"] for r in ranges]
    lines = [
        f"CPU: {cpu_model()}, {os.cpu_count()} logical cores; ONNX Runtime {ort.__version__}, "
        f"{threads} intra-op threads; text tower at batch 64, speed-up against FP32 timed alternately "
        "in the same run.",
        "",
        f"Range of the {len(ranges)} token MatMul inputs over 64 dev captions: the largest |x| is "
        f"{np.median(ratio):.1f}x (median; {min(ratio):.1f}-{max(ratio):.1f}x) the largest without the first "
        "token.",
        "",
        "Batch dependence: the largest |difference| between a caption's vector embedded among 64 dev "
        "captions and embedded alone.",
        "",
        "| variant | text error (1 - cos) | test i2t R@1 drop | test t2i R@1 drop | x FP32 (batch 64) "
        "| batch dependence | MB |",
        "|---|---|---|---|---|---|---|",
        *(
            f"| {r['variant']} | {r['text_error']:.1e} | {r['i2t_R@1_drop']:.2f} | {r['t2i_R@1_drop']:.2f} | "
            f"{r['speedup_b64']:.2f} | {r['batch_dependence']:.1e} | {r['size_mb']} |"
            for r in rows
        ),
    ]
    lines += [
        "",
        "Where each variant's time goes at batch 64 (ONNX Runtime's profiler, ms per run by op type, the "
        "six largest; every op in `int8_outliers_ops.csv`):",
        "",
        "| variant | total ms | largest op types (ms) |",
        "|---|---|---|",
    ]
    for variant in dict.fromkeys(o["variant"] for o in ops):
        mine = [o for o in ops if o["variant"] == variant]
        top = ", ".join(f"{o['op_type']} {o['ms_per_run']:.1f}" for o in mine[:6])
        lines.append(f"| {variant} | {sum(o['ms_per_run'] for o in mine):.1f} | {top} |")
    (out / "int8_outliers.md").write_text("\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m xmr.perf.int8_outliers", description=__doc__.splitlines()[0]
    )
    parser.add_argument("artifact", type=Path, help="an image-text artifact (e.g. the MiniLM one)")
    parser.add_argument("--out", type=Path, default=Path("perf/figures"))
    parser.add_argument("--threads", type=int, default=2, help="ONNX Runtime intra-op threads")
    parser.add_argument("--repeats", type=int, default=15, help="timed runs of each graph")
    parser.add_argument("--dev-items", type=int, default=200, help="val images whose captions measure error")
    args = parser.parse_args(argv)
    rows, ranges, ops = measure(args.artifact, args.threads, args.repeats, args.dev_items)
    write(args.out, rows, ranges, ops, args.threads)
    print((args.out / "int8_outliers.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
