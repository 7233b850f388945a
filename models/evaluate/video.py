"""Score a video split with the PyTorch text-video model: the reference the exported graphs match."""

from __future__ import annotations

import numpy as np
import torch

from xmr.models.data.video import VideoFeatures
from xmr.models.evaluate.retrieval import retrieval_metrics
from xmr.models.tokenizer import TextLimits, encode_batch
from xmr.models.video.inputs import video_inputs
from xmr.models.video.visern import ViSERN


@torch.no_grad()
def similarity(model, tokenizer, data: VideoFeatures, batch_size: int = 64) -> np.ndarray:
    """(N_video, N_caption) scores of the PyTorch model: cosine of the global embeddings for ViSERN, the
    full token-level pair score for ProTA."""
    model.eval()
    limits = TextLimits(max_tokens=model.cfg.max_tokens)
    texts = data.flat_captions()
    videos = [
        model.encode_video(*video_inputs(model, data, np.arange(i, min(i + batch_size, len(data)))))
        for i in range(0, len(data), batch_size)
    ]
    captions = [
        model.encode_text(*map(torch.from_numpy, encode_batch(tokenizer, texts[i : i + batch_size], limits)))
        for i in range(0, len(texts), batch_size)
    ]
    if isinstance(model, ViSERN):
        return (torch.cat(videos) @ torch.cat(captions).T).numpy()
    rows = [torch.cat([model.pair_scores(t, v) for v in videos], dim=1) for t in captions]  # (Bt, N_video)
    return torch.cat(rows).T.numpy()


def evaluate_video(model, tokenizer, data: VideoFeatures) -> dict[str, float]:
    """Recall@1/5/10, median and mean rank, both directions."""
    return retrieval_metrics(similarity(model, tokenizer, data), data.caption_video_index())
