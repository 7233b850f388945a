"""`python -m xmr.perf.recall_noise`: the perturbation has exactly the requested size, identical texts can
share it, and on a toy split it shows why: an exact tie between identical captions of two images counts
for both, and any difference between the copies takes one of the hits away."""

from __future__ import annotations

import numpy as np
import pytest

from xmr.models.errors import InputError
from xmr.models.evaluate.retrieval import retrieval_metrics
from xmr.perf.recall_noise import batchings, perturb, text_groups


def unit(rows: np.ndarray) -> np.ndarray:
    return rows / np.linalg.norm(rows, axis=1, keepdims=True)


def test_perturb_moves_each_vector_by_exactly_the_error_and_keeps_it_unit():
    vectors = unit(np.random.default_rng(0).standard_normal((50, 16)))
    for error in (0.0, 1e-4, 1e-2, 0.5):
        moved = perturb(vectors, error, np.random.default_rng(1))
        np.testing.assert_allclose(np.linalg.norm(moved, axis=1), 1.0, atol=1e-12)
        np.testing.assert_allclose(1 - (moved * vectors).sum(1), error, atol=1e-12)
    with pytest.raises(InputError, match="1 - cos"):
        perturb(vectors, 1.0, np.random.default_rng(0))


def test_identical_texts_share_their_error_only_when_grouped():
    texts = ["a red circle", "a blue square", "a red circle", "two stars"]
    groups = text_groups(texts)
    assert groups.tolist() == [0, 1, 0, 3]
    vectors = unit(np.random.default_rng(0).standard_normal((4, 8)))
    vectors[2] = vectors[0]  # identical texts embed identically, as FP32 does
    shared = perturb(vectors, 1e-3, np.random.default_rng(2), groups)
    np.testing.assert_array_equal(shared[0], shared[2])
    independent = perturb(vectors, 1e-3, np.random.default_rng(2))
    assert not np.array_equal(independent[0], independent[2])


def test_a_tiny_difference_between_identical_captions_costs_one_image_its_hit():
    # two images, one caption each, the same text: in FP32 a tie, which the metric credits to both
    images = unit(np.array([[1.0, 0.2, 0.0], [1.0, -0.2, 0.0]]))
    tied = np.array([[1.0, 0.0, 0.0], [1.0, 0.0, 0.0]])
    owners = np.array([0, 1])
    assert retrieval_metrics(images @ tied.T, owners)["i2t_R@1"] == 100.0
    # image 1's copy tilted by one part in a million, away from both images: both now prefer image 0's
    error = 1e-6
    apart = tied.copy()
    apart[1] = [1 - error, 0.0, np.sqrt(1 - (1 - error) ** 2)]
    assert retrieval_metrics(images @ apart.T, owners)["i2t_R@1"] == 50.0
    # the same error on both copies keeps the tie
    both = np.repeat(apart[1:], 2, axis=0)
    assert retrieval_metrics(images @ both.T, owners)["i2t_R@1"] == 100.0


def test_batchings_embed_every_caption_or_each_distinct_text_once():
    captions = ["a", "b", "a", "c", "b", "d"]
    ways = batchings(captions, seeds=2)
    assert ways["as evaluated: 512 consecutive captions per call"] == (list(range(6)), 512)
    assert ways["each distinct text once, 512 per call"] == ([0, 1, 3, 5], 512)
    for seed in range(2):
        order, size = ways[f"shuffled (seed {seed}), 64 per call"]
        assert sorted(order) == list(range(6)) and size == 64
    assert ways["one caption per call"] == (list(range(6)), 1)
