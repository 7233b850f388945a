"""Embed a split with the PyTorch model and score it: the reference every other backend is compared to."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import torch
from tokenizers import Tokenizer
from tqdm.auto import tqdm

from xmr.models.data.base import RetrievalSplit
from xmr.models.evaluate.retrieval import retrieval_metrics
from xmr.models.image_text.inputs import image_inputs
from xmr.models.image_text.rvse import RVSE
from xmr.models.tokenizer import TextLimits, encode_batch


def batched(fn: Callable[[slice], np.ndarray], n: int, batch_size: int, desc: str) -> np.ndarray:
    chunks = [
        fn(slice(i, i + batch_size))
        for i in tqdm(range(0, n, batch_size), desc=desc, leave=False, disable=None)
    ]
    return np.concatenate(chunks)


@torch.no_grad()
def embed_images(model: RVSE, images: np.ndarray, batch_size: int = 256) -> np.ndarray:
    model.eval()
    return batched(
        lambda s: model.encode_image(image_inputs(images[s], model.cfg)).numpy(),
        len(images),
        batch_size,
        "embed images",
    )


@torch.no_grad()
def embed_texts(model: RVSE, tokenizer: Tokenizer, texts: list[str], batch_size: int = 512) -> np.ndarray:
    model.eval()
    limits = TextLimits(max_tokens=model.cfg.max_tokens)

    def one(s: slice) -> np.ndarray:
        ids, lengths = encode_batch(tokenizer, texts[s], limits)
        return model.encode_text(torch.from_numpy(ids), torch.from_numpy(lengths)).numpy()

    return batched(one, len(texts), batch_size, "embed texts")


def evaluate(model: RVSE, tokenizer: Tokenizer, split: RetrievalSplit) -> dict[str, float]:
    """Recall@1/5/10 both directions, rSum, ranks on a split, from the PyTorch model."""
    img = embed_images(model, split.images)
    txt = embed_texts(model, tokenizer, split.flat_captions())
    return retrieval_metrics(img @ txt.T, split.caption_image_index())
