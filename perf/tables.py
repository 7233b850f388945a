"""What the report scripts share: their command line and their markdown tables (the README's figures)."""

from __future__ import annotations

import argparse
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
