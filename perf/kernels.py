"""The custom ops' Triton kernels vs torch eager (the reference) vs torch.compile of the reference, on a GPU.

    python -m xmr.perf.kernels [--out perf/figures] [--repeats 50]

Cases (float32 unless said): deform_sample 1-D B=32 T=75 Q=75 G=8 C=32 P=4 and B=256 T=128 Q=128;
deform_sample trilinear over a 7 x 7 grid, B=32 T=75 Q=75; random_walk_gcn (softmax) over N=4096 graphs of
K=36 regions, C=1024, in float32 and float16, with torch's scaled_dot_product_attention in float16 as one
more baseline (the softmax op is masked SDPA). Each case runs the Triton kernel (`*_triton`, the function
the custom ops call on CUDA), the torch reference eagerly, and `torch.compile` of the reference.

Timing: after a warm-up (which also compiles), `--repeats` calls, each between two CUDA events with the L2
cache flushed before it (outside the events); the figure is the median, in ms. Bandwidth: the bytes that
must move (every input read once, the output written once; for deform_sample's `value`, at most the rows
at the sample corners, B*Q*G*P*corners rows of C, since the other cells need not be read) over the
median time, in GB/s, and as a fraction of the GPU's peak memory bandwidth where its name is in
`PEAK_BANDWIDTH_GBS`. Before timing, each implementation's output is compared with the eager reference's
(max abs error, in the table).

On a machine where the project is not installed (a lent GPU box with torch and triton only), run it from
the repository root through a package shim (the top-level folders are mapped to `xmr.*` by pyproject):

    mkdir -p /tmp/shim/xmr && for d in models export clients perf; do ln -sfn "$PWD/$d" /tmp/shim/xmr/$d; done
    PYTHONPATH=/tmp/shim python -m xmr.perf.kernels --out perf/figures --repeats 50

Writes OUT/kernels.csv, OUT/kernels.md (the table, with the GPU name and the torch and triton versions)
and OUT/kernels.png (grouped bars, where matplotlib is installed). Without a CUDA device it exits with
status 1 and one line saying so.
"""

from __future__ import annotations

import argparse
import csv
import statistics
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

NO_CUDA = "no CUDA device: the kernel benchmark needs a GPU"

# peak memory bandwidth by device name (the vendor's datasheet), GB/s; the first substring that occurs in
# torch.cuda.get_device_name() wins, so the more specific names come first
PEAK_BANDWIDTH_GBS = (
    ("H200", 4800.0),
    ("H100 NVL", 3900.0),
    ("H100 PCIe", 2000.0),
    ("H100", 3350.0),  # H100 SXM ("NVIDIA H100 80GB HBM3")
    ("GH200", 4000.0),
    ("A100-SXM4-80GB", 2039.0),
    ("A100 80GB PCIe", 1935.0),
    ("A100", 1555.0),  # the 40 GB parts
    ("L40S", 864.0),
    ("L40", 864.0),
    ("L4", 300.0),
    ("A10G", 600.0),
    ("A10", 600.0),
    ("V100", 900.0),
    ("T4", 320.0),
    ("RTX 4090", 1008.0),
)


def peak_bandwidth_gbs(device_name: str) -> float | None:
    """The peak memory bandwidth of the GPU called `device_name`, GB/s, or None if it is not in the table."""
    for key, gbs in PEAK_BANDWIDTH_GBS:
        if key in device_name:
            return gbs
    return None


def deform_sample_bytes(value, mask, positions, weights) -> int:
    """Bytes that must move for one deform_sample: inputs read once, output (B, Q, G, C) written once.

    `value` counts at most the rows the corners can touch (B*Q*G*P*corners rows of C channels): for a
    large grid the cells no point samples need not be read at all.
    """
    b, q, g, p = weights.shape
    c = value.shape[-1]
    corners = 8 if value.dim() == 6 else 2
    value_elems = min(value.numel(), b * q * g * p * corners * c)
    out_elems = b * q * g * c
    return (
        value_elems * value.element_size()
        + mask.numel() * mask.element_size()
        + positions.numel() * positions.element_size()
        + weights.numel() * weights.element_size()
        + out_elems * value.element_size()
    )


def random_walk_gcn_bytes(phi, psi, g, mask) -> int:
    """Bytes that must move for one random_walk_gcn: phi, psi, g, mask read once, out (as g) written."""
    inputs = sum(x.numel() * x.element_size() for x in (phi, psi, g, mask))
    return inputs + g.numel() * g.element_size()


@dataclass
class Case:
    name: str
    dtype: torch.dtype
    inputs: tuple  # on the GPU
    implementations: dict  # name -> callable(*inputs)
    bytes_moved: int


def _deform_inputs(b, t, q, grid, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    g, c, p = 8, 32, 4
    spatial = (7, 7) if grid else ()
    value = torch.randn(b, t, *spatial, g, c, generator=gen, device=device, dtype=dtype)
    mask = torch.rand(b, t, generator=gen, device=device) < 0.9
    point = (3,) if grid else ()
    sizes = torch.tensor([t, *spatial], device=device, dtype=dtype)  # (T[, H, W]): positions per axis
    positions = torch.rand(b, q, g, p, *point, generator=gen, device=device, dtype=dtype)
    positions = positions * (sizes + 1) - 1 if grid else positions * (t + 1) - 1  # a little out of range
    weights = torch.softmax(torch.randn(b, q, g, p, generator=gen, device=device, dtype=dtype), -1)
    return value, mask, positions, weights


def _gcn_inputs(n, k, c, dtype, device, seed=0):
    gen = torch.Generator(device=device).manual_seed(seed)
    phi, psi, g = (torch.randn(n, k, c, generator=gen, device=device, dtype=dtype) for _ in range(3))
    mask = torch.rand(n, k, generator=gen, device=device) < 0.8
    mask[:, 0] = True
    return phi, psi, g, mask


def cases(device) -> list[Case]:
    from xmr.models.ops.deform_sample.reference import deform_sample_reference
    from xmr.models.ops.deform_sample.triton import deform_sample_triton
    from xmr.models.ops.random_walk_gcn.reference import random_walk_gcn_reference
    from xmr.models.ops.random_walk_gcn.triton import random_walk_gcn_triton

    deform = {
        "triton": deform_sample_triton,
        "torch eager": deform_sample_reference,
        "torch.compile": torch.compile(deform_sample_reference),
    }
    out = []
    for name, (b, t, q, grid) in {
        "deform_sample 1-D B=32 T=75 Q=75": (32, 75, 75, False),
        "deform_sample 1-D B=256 T=128 Q=128": (256, 128, 128, False),
        "deform_sample 7x7 B=32 T=75 Q=75": (32, 75, 75, True),
    }.items():
        inputs = _deform_inputs(b, t, q, grid, torch.float32, device)
        out.append(Case(name, torch.float32, inputs, deform, deform_sample_bytes(*inputs)))

    def gcn_compiled(phi, psi, g, mask):
        return random_walk_gcn_reference(phi, psi, g, mask, "softmax")

    compiled = torch.compile(gcn_compiled)
    for dtype in (torch.float32, torch.float16):
        inputs = _gcn_inputs(4096, 36, 1024, dtype, device)
        impls = {
            "triton": lambda *x: random_walk_gcn_triton(*x, "softmax"),
            "torch eager": lambda *x: random_walk_gcn_reference(*x, "softmax"),
            "torch.compile": compiled,
        }
        if dtype == torch.float16:
            impls["torch SDPA"] = lambda phi, psi, g, mask: torch.nn.functional.scaled_dot_product_attention(
                phi, psi, g, attn_mask=mask.unsqueeze(1)
            )
        out.append(
            Case("random_walk_gcn N=4096 K=36 C=1024", dtype, inputs, impls, random_walk_gcn_bytes(*inputs))
        )
    return out


def time_ms(fn, inputs, repeats: int, warmup: int = 5, flush: torch.Tensor | None = None) -> float:
    """Median time of fn(*inputs) on the GPU, ms: CUDA events around each call, L2 flushed before each."""
    if flush is None:
        flush = torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")  # larger than any L2
    for _ in range(warmup):
        fn(*inputs)
    torch.cuda.synchronize()
    events = [
        (torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(repeats)
    ]
    for start, end in events:
        flush.zero_()
        start.record()
        fn(*inputs)
        end.record()
    torch.cuda.synchronize()
    return statistics.median(start.elapsed_time(end) for start, end in events)


def max_error(got: torch.Tensor, want: torch.Tensor, mask: torch.Tensor | None = None) -> float:
    diff = (got.float() - want.float()).abs()
    if mask is not None:  # SDPA leaves padded rows unmasked; compare the valid rows only
        diff = diff * mask.unsqueeze(-1)
    return float(diff.max())


def _progress(items, desc: str):
    """tqdm where it is installed (a bare GPU machine may lack it), the items themselves otherwise."""
    try:
        from tqdm import tqdm
    except ImportError:
        return items
    return tqdm(items, desc=desc, disable=None)


def run(repeats: int) -> list[dict]:
    name = torch.cuda.get_device_name()
    peak = peak_bandwidth_gbs(name)
    rows, flush = [], torch.empty(256 * 2**20, dtype=torch.uint8, device="cuda")
    for case in _progress(cases("cuda"), "kernels"):
        want = case.implementations["torch eager"](*case.inputs)
        for impl, fn in case.implementations.items():
            mask = case.inputs[3] if impl == "torch SDPA" else None
            error = max_error(fn(*case.inputs), want, mask)
            ms = time_ms(fn, case.inputs, repeats, flush=flush)
            gbs = case.bytes_moved / (ms * 1e-3) / 1e9
            rows.append(
                {
                    "case": case.name,
                    "dtype": str(case.dtype).removeprefix("torch."),
                    "implementation": impl,
                    "median_ms": round(ms, 4),
                    "bytes_moved": case.bytes_moved,
                    "achieved_GBps": round(gbs, 1),
                    "fraction_of_peak": "" if peak is None else round(gbs / peak, 3),
                    "max_abs_error_vs_eager": f"{error:.2e}",
                }
            )
        compiled = next(
            r["median_ms"]
            for r in rows[-len(case.implementations) :]
            if r["implementation"] == "torch.compile"
        )
        for r in rows[-len(case.implementations) :]:
            r["time_vs_compile"] = round(r["median_ms"] / compiled, 3)
    return rows


def write_reports(rows: list[dict], out: Path) -> None:
    import triton

    out.mkdir(parents=True, exist_ok=True)
    columns = list(rows[0])
    with open(out / "kernels.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, columns)
        writer.writeheader()
        writer.writerows(rows)
    name = torch.cuda.get_device_name()
    peak = peak_bandwidth_gbs(name)
    lines = [
        f"GPU: {name} (peak memory bandwidth {f'{peak:.0f} GB/s' if peak else 'not in the table'}), "
        f"torch {torch.__version__}, triton {triton.__version__}; median of CUDA-event timings, L2 flushed.",
        "",
        "| " + " | ".join(columns) + " |",
        "|---" * len(columns) + "|",
        *("| " + " | ".join(str(r[c]) for c in columns) + " |" for r in rows),
    ]
    (out / "kernels.md").write_text("\n".join(lines) + "\n")
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no kernels.png", file=sys.stderr)
        return
    groups = list(dict.fromkeys(f"{r['case']}\n{r['dtype']}" for r in rows))
    impls = list(dict.fromkeys(r["implementation"] for r in rows))
    width = 0.8 / len(impls)
    fig, ax = plt.subplots(figsize=(2.2 * len(groups) + 2, 4.5))
    for i, impl in enumerate(impls):
        xs, ys = [], []
        for j, group in enumerate(groups):
            for r in rows:
                if f"{r['case']}\n{r['dtype']}" == group and r["implementation"] == impl:
                    xs.append(j + (i - (len(impls) - 1) / 2) * width)
                    ys.append(r["median_ms"])
        ax.bar(xs, ys, width, label=impl)
    ax.set_xticks(
        range(len(groups)), [g.replace(" B=", "\nB=").replace(" N=", "\nN=") for g in groups], fontsize=7
    )
    ax.set_yscale("log")
    ax.set_ylabel("median time (ms, log scale)")
    ax.set_title(f"custom-op kernels on {name}", fontsize=9)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "kernels.png", dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m xmr.perf.kernels", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path("perf/figures"), help="folder for the reports")
    parser.add_argument("--repeats", type=int, default=50, help="timed calls per implementation")
    args = parser.parse_args(argv)
    if not torch.cuda.is_available():
        raise SystemExit(NO_CUDA)
    try:
        import triton  # noqa: F401
    except ImportError:
        raise SystemExit(
            "triton is not installed: the kernel benchmark needs it (pip install triton)"
        ) from None
    rows = run(args.repeats)
    write_reports(rows, args.out)
    for r in rows:
        print(
            f"{r['case']:40s} {r['dtype']:8s} {r['implementation']:14s} {r['median_ms']:9.4f} ms "
            f"{r['achieved_GBps']:8.1f} GB/s  x{r['time_vs_compile']} of torch.compile"
        )
    print(f"wrote {args.out / 'kernels.csv'}, kernels.md, kernels.png")


if __name__ == "__main__":
    main()
