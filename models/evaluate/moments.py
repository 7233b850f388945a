"""Score a moment split with the PyTorch CDNet: predictions through the shared `postprocess`, then the
moment metrics; and the random-span baseline every figure is read against."""

from __future__ import annotations

import numpy as np
import torch

from xmr.models.data.video import VideoFeatures
from xmr.models.evaluate.moment_metrics import moment_metrics, random_span_baseline
from xmr.models.moments.cdnet import CDNet
from xmr.models.moments.items import MomentItems, batch_inputs, moment_items
from xmr.models.moments.postprocess import postprocess
from xmr.models.tokenizer import TextLimits


@torch.no_grad()
def predict(model: CDNet, data: VideoFeatures, items: MomentItems, tokenizer, batch_size: int = 64):
    """Predictions [start, end, score] per query, best first (the server's post-processing)."""
    model.eval()
    limits = TextLimits(max_tokens=model.cfg.max_tokens)
    predictions = []
    for i in range(0, len(items.texts), batch_size):
        idx = np.arange(i, min(i + batch_size, len(items.texts)))
        clips, mask, ids, lengths, grid = batch_inputs(model, data, items, idx, tokenizer, limits)
        out = model(clips, mask, ids, lengths, grid)
        predictions += postprocess(out["spans"], out["logits"], np.full(len(idx), items.duration))
    return predictions


def evaluate_moments(model: CDNet, tokenizer, data: VideoFeatures) -> dict[str, float]:
    items = moment_items(data)
    return moment_metrics(predict(model, data, items, tokenizer), [[tuple(w)] for w in items.windows])


def random_baseline(data: VideoFeatures, n_per_query: int, seed: int = 0) -> dict[str, float]:
    items = moment_items(data)
    predictions = random_span_baseline(np.full(len(items.texts), items.duration), n_per_query, seed)
    return moment_metrics(predictions, [[tuple(w)] for w in items.windows])
