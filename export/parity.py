"""How closely an exported graph reproduces PyTorch: tensor errors per output, accumulated batch by batch.

Every export writes these figures into its manifest's `parity`: max abs error and min cosine of each output
(`ParityStats`, fed by `BackendParity`, which runs PyTorch and the exported graph side by side), next to
task metrics (recall, moment metrics) computed from both backends' outputs.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from xmr.export.runners import Runner


def tensor_parity(reference: np.ndarray, candidate: np.ndarray) -> dict[str, float]:
    """Max abs error and min/mean row cosine between two (N, D) embedding matrices."""
    cos = (reference * candidate).sum(1) / (
        np.linalg.norm(reference, axis=1) * np.linalg.norm(candidate, axis=1)
    )
    return {
        "max_abs_err": float(np.abs(reference - candidate).max()),
        "min_cosine": float(cos.min()),
        "mean_cosine": float(cos.mean()),
    }


class ParityStats:
    """Running max abs error and min cosine of every output of every exported graph, batch by batch.

    Each output is compared row by row (its leading dim; a 1-D output is one row). `stats` is
    {graph: {output: {"max_abs_err", "min_cosine"}}}, the manifest's per-output parity.
    """

    def __init__(self):
        self.stats: dict[str, dict[str, dict[str, float]]] = {}

    def add(self, graph: str, want: dict[str, np.ndarray], got: dict[str, np.ndarray]) -> None:
        """Fold one batch in: `want` (the reference backend's outputs) against `got`, by output name."""
        for name in got:
            p = (
                tensor_parity(want[name].reshape(len(want[name]), -1), got[name].reshape(len(got[name]), -1))
                if want[name].ndim > 1
                else tensor_parity(want[name][None], got[name][None])
            )
            s = self.stats.setdefault(graph, {}).setdefault(name, {"max_abs_err": 0.0, "min_cosine": 1.0})
            s["max_abs_err"] = max(s["max_abs_err"], p["max_abs_err"])
            s["min_cosine"] = min(s["min_cosine"], p["min_cosine"])


class BackendParity:
    """Runs each graph in a reference backend and a candidate backend on the same feeds (the `Runner`
    interface of `runners.py`) and folds every batch's errors into `stats` (a `ParityStats`)."""

    def __init__(self, reference: Mapping[str, Runner], candidate: Mapping[str, Runner]):
        self.reference, self.candidate, self.stats = reference, candidate, ParityStats()

    def run(self, graph: str, feeds: dict[str, np.ndarray]) -> tuple[dict, dict]:
        """(reference outputs, candidate outputs) of `graph` on `feeds`."""
        want, got = self.reference[graph].run(feeds), self.candidate[graph].run(feeds)
        self.stats.add(graph, want, got)
        return want, got
