"""What the report scripts share: their command line, their markdown tables (the README's figures), and the
name of the CPU they measured on."""

from __future__ import annotations

import argparse
import platform
from collections.abc import Sequence
from pathlib import Path


def report_parser(module: str, doc: str, out: str, epochs: int) -> argparse.ArgumentParser:
    """`python -m xmr.perf.MODULE --out DIR --epochs N`, described by the first line of its docstring."""
    parser = argparse.ArgumentParser(prog=f"python -m xmr.perf.{module}", description=doc.split("\n")[0])
    parser.add_argument("--out", type=Path, default=Path(out))
    parser.add_argument("--epochs", type=int, default=epochs)
    return parser


def header(labels: Sequence[str], columns: Sequence[str]) -> list[str]:
    """The header and separator lines of a table whose rows start with `labels`."""
    return ["| " + " | ".join([*labels, *columns]) + " |", "|---" * (len(labels) + len(columns)) + "|"]


def row(labels: Sequence[str], metrics: dict, columns: Sequence[str]) -> str:
    """One table row: the labels, then each metric of `columns` with one decimal."""
    return "| " + " | ".join([*labels, *(f"{metrics[c]:.1f}" for c in columns)]) + " |"


def cpu_model() -> str:
    """The CPU's model name (Linux's /proc/cpuinfo), else what the platform module knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"
