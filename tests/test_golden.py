"""Golden-output regression fixture for the RVSE++ family: a seeded model on fixed inputs must keep
producing the stored embeddings. A change here means the model's numerics changed: if intended,
regenerate with `XMR_REGEN_GOLDEN=1 pytest tests/test_golden.py` and say why in the commit."""

import os
from pathlib import Path

import numpy as np
import torch

from xmr.models.image_text.rvse import RVSE, RVSEConfig

GOLDEN = Path(__file__).parent / "golden" / "rvse.npz"


def golden_outputs() -> dict[str, np.ndarray]:
    torch.manual_seed(1234)
    model = RVSE(RVSEConfig(vocab_size=40, embed_dim=32, backbone_channels=(8, 16), word_dim=32)).eval()
    g = torch.Generator().manual_seed(5678)
    pixels = torch.randn(2, 3, 32, 32, generator=g)
    ids = torch.randint(2, 40, (3, 6), generator=g)
    lengths = torch.tensor([6, 3, 1])
    with torch.no_grad():
        return {
            "pixels": pixels.numpy(),
            "input_ids": ids.numpy(),
            "lengths": lengths.numpy(),
            "image_embedding": model.encode_image(pixels).numpy(),
            "text_embedding": model.encode_text(ids, lengths).numpy(),
        }


def test_rvse_golden_outputs():
    got = golden_outputs()
    if os.environ.get("XMR_REGEN_GOLDEN"):
        GOLDEN.parent.mkdir(exist_ok=True)
        np.savez(GOLDEN, **got)
    want = np.load(GOLDEN)
    for key in ("pixels", "input_ids", "lengths"):
        assert np.array_equal(got[key], want[key]), f"the fixed {key} changed: the seeding changed"
    np.testing.assert_allclose(got["image_embedding"], want["image_embedding"], atol=1e-5)
    np.testing.assert_allclose(got["text_embedding"], want["text_embedding"], atol=1e-5)
