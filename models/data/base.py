"""The one in-memory form every retrieval dataset is loaded into.

Images and captions stay aligned by position: image ``i`` is described by ``captions[i]``, and the
flat caption list used for text-to-image evaluation keeps caption ``j`` of image ``i`` at
``i * captions_per_image + j`` (the VSE++/SCAN convention).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from xmr.models.errors import InputError


@dataclass
class RetrievalSplit:
    """One split of an image-caption retrieval dataset."""

    name: str  # dataset name, e.g. "shapes"
    split: str  # "train" | "val" | "test" (precomputed folders may also use "dev", "testall")
    images: np.ndarray  # (N, H, W, 3) uint8 for kind == "pixels"; (N, R, D) float32 for kind == "regions"
    captions: list[list[str]]  # N lists of captions_per_image captions; captions[i] describes images[i]
    kind: str  # "pixels" | "regions"

    @property
    def captions_per_image(self) -> int:
        return len(self.captions[0]) if self.captions else 0

    def __len__(self) -> int:
        return len(self.captions)

    def flat_captions(self) -> list[str]:
        """All captions, caption ``j`` of image ``i`` at index ``i * captions_per_image + j``."""
        return [c for caps in self.captions for c in caps]

    def subset(self, n: int) -> RetrievalSplit:
        """The first ``n`` images with their captions (quick runs, tests)."""
        return RetrievalSplit(self.name, self.split, self.images[:n], self.captions[:n], self.kind)

    def caption_image_index(self) -> np.ndarray:
        """(N * captions_per_image,) int64: the image index each flat caption describes."""
        return np.repeat(np.arange(len(self.captions), dtype=np.int64), self.captions_per_image)


def config_with(config_cls, overrides: dict, dataset: str):
    """`config_cls(**overrides)`, or an InputError naming the unknown options and the valid ones."""
    fields = {f.name for f in dataclasses.fields(config_cls)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise InputError(
            f"unknown {dataset} option(s) {unknown}; expected {config_cls.__name__} fields {sorted(fields)}"
        )
    return config_cls(**overrides)
