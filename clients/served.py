"""Score the served ensembles on a split and compare them with the PyTorch model.

`served_outputs` sends every caption through `text_search` and every image through `image_embed`;
`served_metrics` turns that into Recall@K: text->image from the ids the served search returned, image->text
from the served image embeddings against the served text embeddings. `check_against_reference` is what
`xmr check` runs: embeddings within tolerance and rankings equal up to exact ties.

The other families are checked the same way against their PyTorch model (`check_artifact` picks the check
by the artifact's family): `check_video` sends test captions through `text_video_search` and test videos
through `video_embed` (ids and scores against the artifact's gallery, text-to-video R@K of the served ids
beside the in-process ones); `check_moments` sends test moment queries through `moment_search` and compares
the windows with the PyTorch model's through the same post-processing (`postprocess`, the repository's NMS).
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


# ----------------------------------------------------------------------------- every family


@dataclass
class FamilyCheck:
    """What `xmr check` prints for one artifact (`lines`) and whether the served models match PyTorch."""

    family: str
    ok: bool
    lines: list[str]


def check_image_text(client: XmrClient, artifacts: Path, n: int = 32, tol: float = 1e-4) -> FamilyCheck:
    """`check_against_reference` on the first `n` test captions and images of the artifact's run."""
    from xmr.export.manifest import read_manifest
    from xmr.models.checkpoint import load_run
    from xmr.models.data import load_split
    from xmr.models.evaluate.image_text import embed_images, embed_texts

    model, tokenizer, config = load_run(Path(read_manifest(artifacts)["run"]))
    tc = config["train_config"]
    data = load_split(tc["data"], "test", root=tc.get("data_root"))
    texts, images = data.flat_captions()[:n], data.images[:n]
    report = check_against_reference(
        client,
        texts,
        images,
        embed_texts(model, tokenizer, texts),
        embed_images(model, images),
        np.load(Path(artifacts) / "gallery.npy"),
        tol=tol,
    )
    line = (
        f"text embeddings: max abs err {report.max_abs_err_text:.2e}; image embeddings: "
        f"{report.max_abs_err_image:.2e}; rankings equal (up to ties): "
        f"{report.rows_agreeing}/{report.rows}; tolerance {tol:g}"
    )
    return FamilyCheck("image_text", report.ok, [line])


def _recall(ids: np.ndarray, targets: np.ndarray, ks=KS) -> dict[str, float]:
    """Text-to-video R@K (percent) of top-k ids (N, k) against each caption's video."""
    return {f"t2v_R@{k}": v for k, v in zip(ks, _hits(ids, targets, ks), strict=True)}


def _recall_line(served: dict[str, float], reference: dict[str, float]) -> str:
    """ "t2v_R@1 80.0/80.0, ...": each served R@K beside the in-process one."""
    return ", ".join(f"{key} {served[key]:.1f}/{reference[key]:.1f}" for key in served)


def _hits(ids: np.ndarray, targets: np.ndarray, ks) -> list[float]:
    return [100.0 * float((ids[:, :k] == targets[:, None]).any(axis=1).mean()) for k in ks]


@dataclass
class VideoCheckReport:
    max_abs_err_text: float
    max_abs_err_video: float
    rows_agreeing: int
    rows: int
    served_recall: dict[str, float]  # t2v R@K of the served top-k ids
    reference_recall: dict[str, float]  # of the PyTorch text embeddings against the artifact's gallery
    tol: float

    @property
    def ok(self) -> bool:
        return (
            self.max_abs_err_text <= self.tol
            and self.max_abs_err_video <= self.tol
            and self.rows_agreeing == self.rows
            and self.served_recall == self.reference_recall
        )


def check_video(client: XmrClient, artifacts: Path, n: int = 32, tol: float = 1e-4) -> VideoCheckReport:
    """The first `n` test captions through `text_video_search` and the first `n` test videos through
    `video_embed`, against the PyTorch towers (ProTA: its first stage, the global embeddings)."""
    from xmr.export.manifest import read_manifest
    from xmr.export.scoring import ArtifactTask
    from xmr.models.tokenizer import TextLimits, encode_batch
    from xmr.models.video.inputs import video_inputs

    task = ArtifactTask.of(read_manifest(artifacts))
    gallery = np.load(Path(artifacts) / "gallery.npy")
    split = task.split("test", len(gallery))
    texts = split.flat_captions()[:n]
    targets = split.caption_video_index()[:n]
    runners = task.torch_runners()
    ids, lengths = encode_batch(task.tokenizer, texts, TextLimits(max_tokens=task.model.cfg.max_tokens))
    torch_text = runners["text_encoder"].run({"input_ids": ids, "lengths": lengths})["text_embedding"]
    idx = np.arange(min(n, len(split)))
    video, mask = (x.numpy() for x in video_inputs(task.model, split, idx))
    names = task.specs["video_encoder"].input_names
    torch_video = runners["video_encoder"].run(dict(zip(names, (video, mask), strict=True)))[
        "video_embedding"
    ]

    k = min(max(KS), len(gallery))
    served = client.text_video_search(texts, k)
    served_video = client.video_embed(video, mask)
    reference_ids = np.argsort(-(torch_text @ gallery.T), axis=1, kind="stable")[:, :k]
    agree = rankings_agree(served.ids, served.scores, torch_text, gallery, tol)
    ks = [x for x in KS if x <= k]
    return VideoCheckReport(
        float(np.abs(served.text_embedding - torch_text).max()),
        float(np.abs(served_video - torch_video).max()),
        int(agree.sum()),
        len(agree),
        _recall(served.ids, targets, ks),
        _recall(reference_ids, targets, ks),
        tol,
    )


@dataclass
class RerankCheckReport:
    rows_agreeing: int  # queries whose served top-k ids equal the reference's (up to ties within tol)
    rows: int
    max_abs_err: float  # over the re-ranking scores of every query
    served_recall: dict[str, float]
    reference_recall: dict[str, float]
    tol: float

    @property
    def ok(self) -> bool:
        return self.rows_agreeing == self.rows and self.max_abs_err <= self.tol


def ranks_agree(served_ids: np.ndarray, ref_ids: np.ndarray, ref_scores: np.ndarray, tol: float) -> bool:
    """Equal rankings, except that two items whose reference scores are within `tol` may swap places."""
    if served_ids.shape != ref_ids.shape:
        return False
    tied = np.zeros(len(ref_ids), bool)
    close = np.abs(np.diff(ref_scores)) <= tol
    tied[:-1] |= close
    tied[1:] |= close
    return bool(((served_ids == ref_ids) | tied).all())


def check_rerank(client: XmrClient, artifacts: Path, n: int = 32, tol: float = 1e-4) -> RerankCheckReport:
    """The first `n` test captions through the served `text_video_rerank` against the same two stages in
    process: the PyTorch text tower and pair scorer, FAISS over the artifact's global gallery, the
    artifact's token store, the served shortlist size and fusion weight (`repository.MODELS`)."""
    from xmr.export.bls_rerank import load_gallery
    from xmr.export.manifest import read_manifest
    from xmr.export.repository import MODELS
    from xmr.export.scoring import ArtifactTask, run_of
    from xmr.models.tokenizer import TextLimits, encode_batch
    from xmr.models.video.two_stage import VideoGallery, encode_queries, faiss_first_stage, two_stage_search

    params = MODELS["text_video_rerank"].parameters
    size, fuse = int(params["shortlist"]), float(params["fuse"])
    task = ArtifactTask.of(read_manifest(artifacts))
    tokens = load_gallery(Path(artifacts))  # the token store the served model loads, + the global gallery
    embeddings = np.load(Path(artifacts) / "gallery.npy")
    gallery = VideoGallery(embeddings, tokens.mu, tokens.sigma, tokens.mask, tokens.ids)
    split = task.split("test", len(gallery))
    texts = split.flat_captions()[:n]
    targets = split.caption_video_index()[:n]
    run = run_of(task.torch_runners())
    tokens, lengths = encode_batch(task.tokenizer, texts, TextLimits(max_tokens=task.model.cfg.max_tokens))
    first = faiss_first_stage(gallery)
    k = min(max(KS), size)
    reference = [
        two_stage_search(run, first, gallery, q, k, size, fuse) for q in encode_queries(run, tokens, lengths)
    ]
    served = client.text_video_rerank(texts, k)
    agree = [ranks_agree(served.ids[i], r[0], r[1], tol) for i, r in enumerate(reference)]
    ref_scores = np.stack([r[1] for r in reference])
    ks = [x for x in KS if x <= k]
    return RerankCheckReport(
        int(sum(agree)),
        len(agree),
        float(np.abs(served.scores - ref_scores).max()),
        _recall(served.ids, targets, ks),
        _recall(np.stack([r[0] for r in reference]), targets, ks),
        tol,
    )


@dataclass
class MomentCheckReport:
    rows_agreeing: int  # queries whose served windows equal the reference's (count, values within tol)
    rows: int
    max_abs_err: float  # over every [start_s, end_s, score] value of the queries with equal counts
    min_iou: float  # the lowest temporal IoU of a served window with the reference window of its rank
    tol: float

    @property
    def ok(self) -> bool:
        return self.rows_agreeing == self.rows


def moment_reference(artifacts: Path, n: int = 32, k: int = 5):
    """(texts, video ids, PyTorch windows per query) of the first `n` test moment queries: the PyTorch
    CDNet on the exported split's clips through `postprocess` with the served NMS threshold."""
    from xmr.export.manifest import read_manifest
    from xmr.export.repository import MODELS
    from xmr.export.scoring import ArtifactTask
    from xmr.models.moments.items import batch_inputs, moment_items
    from xmr.models.moments.postprocess import postprocess
    from xmr.models.tokenizer import TextLimits

    task = ArtifactTask.of(read_manifest(artifacts))
    split = task.split("test")
    items = moment_items(split)
    n = min(n, len(items.texts))
    nms = MODELS["moment_postprocess"].parameters.get("nms_iou", "none")
    nms_iou = None if nms == "none" else float(nms)
    runner = task.torch_runners()["moment_model"]
    limits = TextLimits(max_tokens=task.model.cfg.max_tokens)
    names = task.specs["moment_model"].input_names
    windows = []
    for start in range(0, n, 16):
        idx = np.arange(start, min(start + 16, n))
        inputs = [
            t for t in batch_inputs(task.model, split, items, idx, task.tokenizer, limits) if t is not None
        ]
        out = runner.run({name: t.numpy() for name, t in zip(names, inputs, strict=True)})
        durations = np.full(len(idx), items.duration)
        windows += postprocess(out["spans"], out["logits"], durations, top_k=k, nms_iou=nms_iou)
    return items.texts[:n], items.video[:n].astype(np.int64), windows


def compare_moments(served: list[np.ndarray], reference: list[np.ndarray], tol: float) -> MomentCheckReport:
    """Served windows against the reference's, query by query: equal counts, values within `tol`."""
    from xmr.models.moments.spans import temporal_iou_np

    agreeing, err, min_iou = 0, 0.0, 1.0
    for got, want in zip(served, reference, strict=True):
        if got.shape != want.shape:
            continue
        row_err = float(np.abs(got - want).max()) if len(want) else 0.0
        err = max(err, row_err)
        for a, b in zip(got, want, strict=True):
            if b[1] > b[0]:
                min_iou = min(min_iou, float(temporal_iou_np(a[None, :2], b[None, :2]).max()))
        agreeing += row_err <= tol
    return MomentCheckReport(agreeing, len(reference), err, min_iou, tol)


def check_moments(client: XmrClient, artifacts: Path, n: int = 32, k: int = 5, tol: float = 1e-3):
    """The first `n` test moment queries through `moment_search` against the PyTorch CDNet; `tol` in
    seconds and score units (the graphs agree to about 1e-6; spans are scaled by the duration)."""
    texts, video_ids, reference = moment_reference(artifacts, n, k)
    return compare_moments(client.moment_search(texts, video_ids, k), reference, tol)


def check_artifact(client: XmrClient, artifacts: Path, n: int = 32, tol: float = 1e-4) -> FamilyCheck:
    """The check of the artifact's family (image-text, text-video, moments) against its PyTorch model."""
    from xmr.export.manifest import read_manifest
    from xmr.export.repository import family

    kind = family(read_manifest(artifacts))
    if kind == "image_text":
        return check_image_text(client, artifacts, n, tol)
    if kind == "video":
        r = check_video(client, artifacts, n, tol)
        lines = [
            f"text embeddings: max abs err {r.max_abs_err_text:.2e}; video embeddings: "
            f"{r.max_abs_err_video:.2e}; rankings equal (up to ties): {r.rows_agreeing}/{r.rows}; "
            f"tolerance {tol:g}",
            f"served / in-process: {_recall_line(r.served_recall, r.reference_recall)}",
        ]
        ok = r.ok
        if (Path(artifacts) / "gallery_mu.npy").is_file():  # ProTA's token store: text_video_rerank is served
            rr = check_rerank(client, artifacts, n, tol)
            lines.append(
                f"re-ranked (text_video_rerank): rankings equal (up to ties): {rr.rows_agreeing}/{rr.rows}; "
                f"scores max abs err {rr.max_abs_err:.2e}; served / in-process: "
                + _recall_line(rr.served_recall, rr.reference_recall)
            )
            ok &= rr.ok
        return FamilyCheck("video", ok, lines)
    r = check_moments(client, artifacts, n, tol=max(tol, 1e-3))
    line = (
        f"windows equal: {r.rows_agreeing}/{r.rows} queries; max abs err {r.max_abs_err:.2e} "
        f"(s and score); min IoU {r.min_iou:.6f}; tolerance {r.tol:g}"
    )
    return FamilyCheck("moments", r.ok, [line])
