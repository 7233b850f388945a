"""Score the served ensembles on a split and compare them with the PyTorch model.

`served_outputs` sends every caption through `text_search` and every image through `image_embed`;
`served_metrics` turns that into Recall@K: text->image from the ids the served search returned, image->text
from the served image embeddings against the served text embeddings. `check_against_reference` is what
`xmr check` runs: embeddings within tolerance and rankings equal up to exact ties.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from xmr.clients.triton_client import XmrClient
from xmr.models.data.base import RetrievalSplit
from xmr.models.evaluate.retrieval import KS, retrieval_metrics, t2i_metrics_from_topk


@dataclass
class ServedOutputs:
    ids: np.ndarray  # (N_cap, k) top-k gallery ids per caption
    scores: np.ndarray  # (N_cap, k)
    text_embedding: np.ndarray  # (N_cap, D)
    image_embedding: np.ndarray  # (N_img, D)


def served_outputs(
    client: XmrClient, split: RetrievalSplit, k: int = max(KS), batch_size: int = 64, images: bool = True
) -> ServedOutputs:
    texts = split.flat_captions()
    parts = [
        client.text_search(texts[i : i + batch_size], k)
        for i in tqdm(range(0, len(texts), batch_size), desc="served text_search", leave=False, disable=None)
    ]
    img = (
        np.concatenate(
            [
                client.image_embed(split.images[i : i + batch_size])
                for i in tqdm(
                    range(0, len(split.images), batch_size),
                    desc="served image_embed",
                    leave=False,
                    disable=None,
                )
            ]
        )
        if images
        else np.zeros((0, parts[0].text_embedding.shape[1]), np.float32)
    )
    return ServedOutputs(
        np.concatenate([p.ids for p in parts]),
        np.concatenate([p.scores for p in parts]),
        np.concatenate([p.text_embedding for p in parts]),
        img,
    )


def served_metrics(out: ServedOutputs, split: RetrievalSplit) -> dict[str, float]:
    """Recall@K both directions (and rSum) as the served models give them."""
    cap_to_img = split.caption_image_index()
    metrics = retrieval_metrics(out.image_embedding @ out.text_embedding.T, cap_to_img)
    metrics.update(t2i_metrics_from_topk(out.ids, cap_to_img))  # text->image from the served search itself
    metrics["rsum"] = sum(v for key, v in metrics.items() if "_R@" in key)
    return metrics


def rankings_agree(
    served_ids: np.ndarray,
    served_scores: np.ndarray,
    reference_queries: np.ndarray,
    gallery: np.ndarray,
    tol: float,
) -> np.ndarray:
    """Per row: True when the served top-k equals the reference ranking up to ties within `tol`.

    The reference score of the item served at rank j must equal the reference's j-th best score: a swap is
    accepted only between items the reference itself cannot tell apart.
    """
    k = served_ids.shape[1]
    ref_scores = reference_queries @ gallery.T  # (B, N)
    ref_topk = -np.sort(-ref_scores, axis=1)[:, :k]  # (B, k)
    served_ref = np.take_along_axis(ref_scores, served_ids, axis=1)
    return (np.abs(served_ref - ref_topk) <= tol).all(axis=1) & (np.abs(served_scores - ref_topk) <= tol).all(
        axis=1
    )


@dataclass
class CheckReport:
    max_abs_err_text: float
    max_abs_err_image: float
    rows_agreeing: int
    rows: int
    tol: float

    @property
    def ok(self) -> bool:
        return (
            self.max_abs_err_text <= self.tol
            and self.max_abs_err_image <= self.tol
            and self.rows_agreeing == self.rows
        )


def check_against_reference(
    client: XmrClient,
    texts: list[str],
    images: np.ndarray,
    torch_text: np.ndarray,
    torch_image: np.ndarray,
    gallery: np.ndarray,
    k: int = 10,
    tol: float = 1e-4,
) -> CheckReport:
    """Send fixed inputs; compare served embeddings and rankings with the PyTorch reference."""
    result = client.text_search(texts, k)
    served_image = client.image_embed(images)
    agree = rankings_agree(result.ids, result.scores, torch_text, gallery, tol)
    return CheckReport(
        float(np.abs(result.text_embedding - torch_text).max()),
        float(np.abs(served_image - torch_image).max()),
        int(agree.sum()),
        len(agree),
        tol,
    )


def search_fresh_server(
    artifact: Path,
    repository: Path,
    texts: list[str],
    reference_text: np.ndarray,
    k: int = 10,
    tol: float = 1e-4,
) -> tuple[float, np.ndarray]:
    """One round trip through a server of its own: write `artifact`'s CPU repository to `repository`, start
    tritonserver on it, send `texts` through `text_search`, stop it. Returns the max abs error of the served
    text embeddings against `reference_text` and, per text, whether the served top-k is the reference's
    ranking of the artifact's gallery (`rankings_agree`)."""
    from xmr.clients.server import TritonServer
    from xmr.export.repository import build_repository

    server = TritonServer(build_repository(artifact, repository, "cpu")).start()
    try:
        result = XmrClient(server.grpc_url).text_search(texts, k)
    finally:
        server.stop()
    gallery = np.load(Path(artifact) / "gallery.npy")
    error = float(np.abs(result.text_embedding - reference_text).max())
    return error, rankings_agree(result.ids, result.scores, reference_text, gallery, tol)
