"""gRPC and HTTP clients for the served ensembles (`text_search`, `image_embed`, `text_video_search`,
`video_embed`, `moment_search`) and ProTA's two-stage `text_video_rerank`.

Tensor names and dtypes come from the I/O specs in `xmr.export.iospec`, the same ones that wrote the
server's `config.pbtxt`. Server-side errors (bad text, wrong dtype, unknown model) surface as
`ServerError` with the server's message, which names the input that was wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xmr.clients.server import ServerError
from xmr.export.iospec import (
    ModelSpec,
    TensorSpec,
    image_embed_spec,
    moment_search_spec,
    text_search_spec,
    text_video_rerank_spec,
    text_video_search_spec,
    video_embed_spec,
    visern_video_encoder_spec,
)
from xmr.models.errors import InputError

PROTOCOLS = ("grpc", "http")
DEFAULT_URLS = {"grpc": "127.0.0.1:8001", "http": "127.0.0.1:8000"}
# Names and dtypes are all a client needs from a spec; the embedding size is the server's business.
TEXT_SEARCH: ModelSpec = text_search_spec(embed_dim=-1)
IMAGE_EMBED: ModelSpec = image_embed_spec(embed_dim=-1, image_size=-1)
TEXT_VIDEO_SEARCH: ModelSpec = text_video_search_spec(embed_dim=-1)
TEXT_VIDEO_RERANK: ModelSpec = text_video_rerank_spec()
MOMENT_SEARCH: ModelSpec = moment_search_spec()
# ViSERN's spec; a ProTA server takes `frames` (B, F, D) instead of `regions` (B, F, K, D): same dtypes
VIDEO_EMBED: ModelSpec = video_embed_spec(visern_video_encoder_spec(-1, -1, -1))
FRAMES = TensorSpec("frames", "float32", ("batch", "frames", -1))


@dataclass
class SearchResult:
    ids: np.ndarray  # (B, k) int64 gallery ids, best first
    scores: np.ndarray  # (B, k) float32 cosine similarities (text_video_rerank: its re-ranking score)
    text_embedding: np.ndarray | None  # (B, D) float32, the served text tower's output (not re-ranked)


class XmrClient:
    def __init__(self, url: str | None = None, protocol: str = "grpc", timeout_s: float = 60.0):
        if protocol not in PROTOCOLS:
            raise InputError(f"unknown protocol {protocol!r}; valid: {', '.join(PROTOCOLS)}")
        self.protocol = protocol
        self.url = url or DEFAULT_URLS[protocol]
        self.timeout_s = timeout_s
        if protocol == "grpc":
            import tritonclient.grpc as tc
        else:
            import tritonclient.http as tc
        self._tc = tc
        self._client = (
            tc.InferenceServerClient(self.url, network_timeout=timeout_s)
            if protocol == "http"
            else tc.InferenceServerClient(self.url)
        )

    def _input(self, spec: ModelSpec, name: str, array: np.ndarray):
        t = spec.input(name)
        if array.dtype != t.numpy_dtype:
            raise InputError(f"{spec.name} input {name!r} has dtype {array.dtype}; expected {t.dtype}")
        x = self._tc.InferInput(name, list(array.shape), t.client_dtype)
        x.set_data_from_numpy(array)
        return x

    def _infer(self, model: str, inputs: list, outputs: list[str]):
        from tritonclient.utils import InferenceServerException

        requested = [self._tc.InferRequestedOutput(o) for o in outputs]
        kwargs = {"client_timeout": self.timeout_s} if self.protocol == "grpc" else {}
        try:
            return self._client.infer(model, inputs, outputs=requested, **kwargs)
        except InferenceServerException as e:
            raise ServerError(f"{model} at {self.url} ({self.protocol}): {e.message()}") from e
        except OSError as e:  # connection refused etc. (HTTP)
            raise ServerError(f"cannot reach the server at {self.url} ({self.protocol}): {e}") from e

    def is_ready(self) -> bool:
        try:
            return bool(self._client.is_server_ready())
        except Exception:  # noqa: BLE001 - any failure to answer means "not ready"
            return False

    def _text_query(self, spec: ModelSpec, texts: list[str] | str, k: int):
        """One text-and-top_k request to `spec`'s model (a row per text), every output asked for."""
        if isinstance(texts, str):
            texts = [texts]
        text = np.array([t.encode("utf-8") for t in texts], dtype=object).reshape(-1, 1)
        top_k = np.full((len(texts), 1), k, dtype=np.int64)
        inputs = [self._input(spec, "text", text), self._input(spec, "top_k", top_k)]
        return self._infer(spec.name, inputs, spec.output_names)

    def text_search(self, texts: list[str], k: int = 5) -> SearchResult:
        """Top-k gallery ids and scores for each text, plus the served text embeddings."""
        result = self._text_query(TEXT_SEARCH, texts, k)
        return SearchResult(
            result.as_numpy("ids"), result.as_numpy("scores"), result.as_numpy("text_embedding")
        )

    def image_embed(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) images -> (B, D) embeddings from the served image tower."""
        images = np.asarray(images)
        result = self._infer("image_embed", [self._input(IMAGE_EMBED, "image", images)], ["image_embedding"])
        return result.as_numpy("image_embedding")

    def text_video_search(self, texts: list[str], k: int = 5) -> SearchResult:
        """Top-k video ids and scores for each text from `text_video_search`, plus the served text
        embeddings (the video model's text tower)."""
        result = self._text_query(TEXT_VIDEO_SEARCH, texts, k)
        return SearchResult(
            result.as_numpy("ids"), result.as_numpy("scores"), result.as_numpy("text_embedding")
        )

    def text_video_rerank(self, texts: list[str], k: int = 5) -> SearchResult:
        """ProTA's two-stage search: the first stage's shortlist re-ranked by the pair scorer -> top-k video
        ids and their re-ranking scores for each text (k is cut to the served shortlist)."""
        result = self._text_query(TEXT_VIDEO_RERANK, texts, k)
        return SearchResult(result.as_numpy("ids"), result.as_numpy("scores"), None)

    def video_embed(self, video: np.ndarray, frame_mask: np.ndarray) -> np.ndarray:
        """(B, D) embeddings from the served video tower: ViSERN's region features (B, F, K, D) or ProTA's
        frame features (B, F, D) (told apart by their rank), with the frame mask (B, F) bool."""
        video = np.asarray(video)
        name = "regions" if video.ndim == 4 else "frames"
        spec = (
            VIDEO_EMBED
            if name == "regions"
            else ModelSpec("video_embed", (FRAMES, VIDEO_EMBED.inputs[1]), ())
        )
        result = self._infer(
            "video_embed",
            [self._input(spec, name, video), self._input(spec, "frame_mask", np.asarray(frame_mask))],
            ["video_embedding"],
        )
        return result.as_numpy("video_embedding")

    def moment_search(self, texts: list[str], video_ids, k: int = 5) -> list[np.ndarray]:
        """For each (query text, video id): that video's top-k moments from `moment_search`, an array (n, 3)
        of [start_s, end_s, score], best first (n <= k: NMS may keep fewer)."""
        if isinstance(texts, str):
            texts = [texts]
        text = np.array([t.encode("utf-8") for t in texts], dtype=object).reshape(-1, 1)
        ids = np.asarray(video_ids, dtype=np.int64).reshape(-1, 1)
        if len(ids) != len(texts):
            raise InputError(f"{len(texts)} query texts but {len(ids)} video ids; expected one id per text")
        top_k = np.full((len(texts), 1), k, dtype=np.int64)
        spec = MOMENT_SEARCH
        result = self._infer(
            spec.name,
            [
                self._input(spec, "text", text),
                self._input(spec, "video_id", ids),
                self._input(spec, "top_k", top_k),
            ],
            spec.output_names,
        )
        moments, counts = result.as_numpy("moments"), result.as_numpy("counts").reshape(-1)
        return [moments[i, : int(c)] for i, c in enumerate(counts)]

    def raw_infer(self, model: str, inputs: dict[str, tuple[np.ndarray, str]], outputs: list[str]) -> dict:
        """Send arbitrary tensors {name: (array, triton dtype)} (tests use it to send wrong dtypes)."""
        infer_inputs = []
        for name, (array, dtype) in inputs.items():
            x = self._tc.InferInput(name, list(array.shape), dtype)
            x.set_data_from_numpy(array)
            infer_inputs.append(x)
        result = self._infer(model, infer_inputs, outputs)
        return {o: result.as_numpy(o) for o in outputs}

    def close(self) -> None:
        self._client.close()
