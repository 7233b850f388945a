import numpy as np
import pytest
import torch

from xmr.models.errors import InputError
from xmr.models.image_text.preprocess import preprocess_images
from xmr.models.image_text.rvse import RVSE, RVSEConfig


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return RVSE(RVSEConfig(vocab_size=50)).eval()


def test_tower_shapes_and_unit_norm(model):
    with torch.no_grad():
        img = model.encode_image(torch.randn(3, 3, 64, 64))
        txt = model.encode_text(torch.randint(2, 50, (4, 9)), torch.tensor([9, 5, 1, 3]))
    assert img.shape == (3, 256) and txt.shape == (4, 256)
    assert torch.allclose(img.norm(dim=1), torch.ones(3), atol=1e-5)
    assert torch.allclose(txt.norm(dim=1), torch.ones(4), atol=1e-5)


def test_text_embedding_independent_of_padding(model):
    """The served batcher pads requests together: padding must not change a caption's embedding."""
    ids = torch.tensor([[5, 6, 7, 0, 0, 0, 0, 0]])
    with torch.no_grad():
        alone = model.encode_text(ids[:, :3], torch.tensor([3]))
        padded = model.encode_text(ids, torch.tensor([3]))
        batched = model.encode_text(torch.cat([ids, torch.randint(2, 50, (1, 8))]), torch.tensor([3, 8]))[:1]
    assert torch.allclose(alone, padded, atol=1e-6) and torch.allclose(alone, batched, atol=1e-6)


def test_region_feature_model_and_meanmax_pooling():
    m = RVSE(RVSEConfig(vocab_size=10, region_dim=32, pooling="meanmax")).eval()
    assert m.image.backbone is None
    with torch.no_grad():
        out = m.encode_image(torch.randn(2, 36, 32))
    assert out.shape == (2, 256)


def test_residual_branch_starts_at_zero(model):
    x = torch.randn(2, 5, 128)
    emb = model.image.embed
    assert torch.allclose(emb(x), emb.proj(x))


def test_config_round_trip():
    cfg = RVSEConfig(vocab_size=12, backbone_channels=(8, 16))
    assert RVSEConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="vocab_size must be set"):
        RVSE(RVSEConfig())


def test_preprocess_values_and_errors():
    images = np.zeros((1, 2, 2, 3), np.uint8)
    images[0, 0, 0] = [255, 0, 51]
    out = preprocess_images(images, mean=(0.5, 0.0, 0.0), std=(0.5, 1.0, 0.2))
    assert out.shape == (1, 3, 2, 2) and out.dtype == np.float32
    assert out[0, :, 0, 0] == pytest.approx([1.0, 0.0, 1.0])
    assert out[0, 0, 1, 1] == pytest.approx(-1.0)
    with pytest.raises(InputError, match="dtype float32; expected uint8"):
        preprocess_images(images.astype(np.float32), (0, 0, 0), (1, 1, 1))
    with pytest.raises(InputError, match="expected \\(B, H, W, 3\\)"):
        preprocess_images(np.zeros((2, 2, 3), np.uint8), (0, 0, 0), (1, 1, 1))
