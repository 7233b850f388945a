"""gRPC and HTTP clients for the served ensembles (`text_search`, `image_embed`).

Tensor names and dtypes come from the I/O specs in `xmr.export.iospec`, the same ones that wrote the
server's `config.pbtxt`. Server-side errors (bad text, wrong dtype, unknown model) surface as
`ServerError` with the server's message, which names the input that was wrong.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from xmr.clients.server import ServerError
from xmr.export.iospec import ModelSpec, image_embed_spec, text_search_spec
from xmr.models.errors import InputError

PROTOCOLS = ("grpc", "http")
DEFAULT_URLS = {"grpc": "127.0.0.1:8001", "http": "127.0.0.1:8000"}
# Names and dtypes are all a client needs from a spec; the embedding size is the server's business.
TEXT_SEARCH: ModelSpec = text_search_spec(embed_dim=-1)
IMAGE_EMBED: ModelSpec = image_embed_spec(embed_dim=-1, image_size=-1)


@dataclass
class SearchResult:
    ids: np.ndarray  # (B, k) int64 gallery ids, best first
    scores: np.ndarray  # (B, k) float32 cosine similarities
    text_embedding: np.ndarray  # (B, D) float32, the served text tower's output


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

    def text_search(self, texts: list[str], k: int = 5) -> SearchResult:
        """Top-k gallery ids and scores for each text, plus the served text embeddings."""
        if isinstance(texts, str):
            texts = [texts]
        text = np.array([t.encode("utf-8") for t in texts], dtype=object).reshape(-1, 1)
        top_k = np.full((len(texts), 1), k, dtype=np.int32)
        result = self._infer(
            "text_search",
            [self._input(TEXT_SEARCH, "text", text), self._input(TEXT_SEARCH, "top_k", top_k)],
            TEXT_SEARCH.output_names,
        )
        return SearchResult(
            result.as_numpy("ids"), result.as_numpy("scores"), result.as_numpy("text_embedding")
        )

    def image_embed(self, images: np.ndarray) -> np.ndarray:
        """uint8 (B, H, W, 3) images -> (B, D) embeddings from the served image tower."""
        images = np.asarray(images)
        result = self._infer("image_embed", [self._input(IMAGE_EMBED, "image", images)], ["image_embedding"])
        return result.as_numpy("image_embedding")

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
