import pytest
import torch

from xmr.models.losses import LOSSES, TripletHN, make_loss


def naive_triplet(sim: torch.Tensor, margin: float, hardest: bool) -> torch.Tensor:
    """Per-anchor loop reference: rows as anchors, then columns; diagonal positives."""
    total = 0.0
    for s in (sim, sim.T):
        per_anchor = []
        for i in range(s.shape[0]):
            hinges = [max(0.0, margin - float(s[i, i]) + float(s[i, j])) for j in range(s.shape[1]) if j != i]
            per_anchor.append(max(hinges) if hardest else sum(hinges))
        total += sum(per_anchor) / len(per_anchor)
    return torch.tensor(total)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("hardest", [True, False])
def test_triplet_matches_naive_loop(dtype, hardest):
    g = torch.Generator().manual_seed(0)
    sim = torch.rand(7, 7, generator=g, dtype=dtype) * 2 - 1
    got = TripletHN(margin=0.2, hardest=hardest)(sim)
    assert torch.allclose(got, naive_triplet(sim, 0.2, hardest).to(dtype), atol=1e-6)


def test_triplet_reductions_and_zero_loss_when_separated():
    sim = torch.eye(4) * 2 - 1  # positives at 1, negatives at -1: every hinge is zero
    assert TripletHN()(sim) == 0
    per_anchor = TripletHN(reduction="none")(torch.rand(5, 5))
    assert per_anchor.shape == (10,)  # rows then columns
    sim = torch.rand(5, 5)
    assert torch.allclose(TripletHN(reduction="sum")(sim), TripletHN(reduction="none")(sim).sum())


def test_triplet_gradient_flows_only_through_hardest_negative():
    sim = torch.tensor([[0.9, 0.8, 0.1], [0.2, 0.9, 0.3], [0.1, 0.0, 0.9]], requires_grad=True)
    TripletHN(margin=0.2)(sim).backward()
    assert sim.grad[0, 2] == 0  # row 0's hardest negative is column 1 and column 2's is row 1
    assert sim.grad[0, 1] > 0


def test_pos_mask_checked_and_registry_errors():
    with pytest.raises(ValueError, match="pos_mask is"):
        TripletHN()(torch.rand(3, 3), torch.eye(4, dtype=torch.bool))
    with pytest.raises(ValueError, match="non-square sim needs an explicit pos_mask"):
        TripletHN()(torch.rand(3, 4))
    with pytest.raises(ValueError, match="unknown loss 'nope'; valid: triplet_hn"):
        make_loss("nope")
    assert set(LOSSES) >= {"triplet_hn"}
