import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from contrastive import losses


def nt_xent_reference(z1, z2, temperature):
    """NT-Xent written anchor by anchor, straight from the SimCLR paper's definition."""
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    n2 = len(z)
    total = 0.0
    for i in range(n2):
        j = (i + n2 // 2) % n2
        sims = [(z[i] @ z[k]) / temperature for k in range(n2) if k != i]
        total = total - (z[i] @ z[j] / temperature - torch.logsumexp(torch.stack(sims), 0))
    return total / n2


@settings(max_examples=20, deadline=None)
@given(n=st.integers(2, 6), d=st.integers(2, 8), temperature=st.floats(0.05, 2.0), seed=st.integers(0, 999))
def test_nt_xent_equals_the_anchor_by_anchor_definition(n, d, temperature, seed):
    gen = torch.Generator().manual_seed(seed)
    z1, z2 = (
        torch.randn(n, d, generator=gen, dtype=torch.float64),
        torch.randn(n, d, generator=gen, dtype=torch.float64),
    )
    assert torch.allclose(
        losses.nt_xent(z1, z2, temperature).double(), nt_xent_reference(z1, z2, temperature), atol=1e-5
    )


def test_nt_xent_is_invariant_to_the_scale_of_each_embedding():
    z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    scale = torch.rand(8, 1) * 10 + 0.1
    assert torch.allclose(losses.nt_xent(z1, z2), losses.nt_xent(z1 * scale, z2 * scale), atol=1e-5)


def test_nt_xent_with_identical_orthogonal_views_approaches_zero_at_low_temperature():
    z = torch.eye(4)
    assert losses.nt_xent(z, z, temperature=0.05).item() < 1e-6
    # and with every view equal the loss is log(2N - 1): the positive is no more likely than a negative
    same = torch.ones(4, 3)
    assert math.isclose(losses.nt_xent(same, same).item(), math.log(7), rel_tol=1e-5)


def test_nt_xent_rejects_bad_temperature_and_shapes():
    with pytest.raises(ValueError, match="temperature"):
        losses.nt_xent(torch.randn(4, 3), torch.randn(4, 3), temperature=0.0)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        losses.nt_xent(torch.randn(4, 3), torch.randn(5, 3))


def test_triplet_loss_gradient_matches_closed_form():
    gen = torch.Generator().manual_seed(0)
    a, p, n = (torch.randn(32, 5, generator=gen, dtype=torch.float64, requires_grad=True) for _ in range(3))
    losses.triplet_loss(a, p, n, margin=0.3).backward()
    active = ((a - p).pow(2).sum(1) - (a - n).pow(2).sum(1) + 0.3 > 0).double().unsqueeze(1) / 32
    assert 0 < active.sum() * 32 < 32  # both regions are exercised
    with torch.no_grad():
        assert torch.allclose(a.grad, active * 2 * (n - p))
        assert torch.allclose(p.grad, active * 2 * (p - a))
        assert torch.allclose(n.grad, active * 2 * (a - n))


def test_triplet_loss_on_the_sphere_uses_dot_products_only():
    gen = torch.Generator().manual_seed(1)
    a, p, n = (F.normalize(torch.randn(64, 7, generator=gen, dtype=torch.float64), dim=1) for _ in range(3))
    expected = torch.relu(2 * (a * n).sum(1) - 2 * (a * p).sum(1) + 0.5).mean()
    assert torch.allclose(losses.triplet_loss(a, p, n, margin=0.5), expected)


@settings(max_examples=30, deadline=None)
@given(k=st.integers(1, 20), temperature=st.floats(1e-3, 10.0), seed=st.integers(0, 999))
def test_smooth_max_lies_between_max_and_max_plus_tau_log_k(k, temperature, seed):
    s = torch.rand(k, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 4 - 2
    m = losses.smooth_max(s, temperature)
    assert s.max() - 1e-9 <= m <= s.max() + temperature * math.log(k) + 1e-9


def test_smooth_max_gradient_is_the_softmax():
    s = torch.randn(6, dtype=torch.float64, requires_grad=True)
    losses.smooth_max(s, 0.3).backward()
    assert torch.allclose(s.grad, torch.softmax(s.detach() / 0.3, 0))


def info_nce_reference(q, k_pos, negatives, temperature):
    total = 0.0
    for i in range(len(q)):
        scores = torch.cat([(q[i] @ k_pos[i]).view(1), negatives @ q[i]]) / temperature
        total = total - (scores[0] - torch.logsumexp(scores, 0))
    return total / len(q)


@settings(max_examples=20, deadline=None)
@given(
    n=st.integers(1, 6),
    k=st.integers(1, 9),
    d=st.integers(1, 8),
    temperature=st.floats(0.05, 2.0),
    seed=st.integers(0, 999),
)
def test_info_nce_equals_the_query_by_query_definition(n, k, d, temperature, seed):
    gen = torch.Generator().manual_seed(seed)
    q, pos, neg = (
        torch.randn(*shape, generator=gen, dtype=torch.float64) for shape in ((n, d), (n, d), (k, d))
    )
    expected = info_nce_reference(q, pos, neg, temperature)
    assert torch.allclose(losses.info_nce(q, pos, neg, temperature).double(), expected, atol=1e-5)


def test_info_nce_gradient_with_respect_to_the_query_is_expected_key_minus_positive_over_tau():
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(3, 5, generator=gen, dtype=torch.float64, requires_grad=True)
    pos, neg = (
        torch.randn(3, 5, generator=gen, dtype=torch.float64),
        torch.randn(7, 5, generator=gen, dtype=torch.float64),
    )
    losses.info_nce(q, pos, neg, 0.2).backward()
    with torch.no_grad():
        for i in range(3):
            keys = torch.cat([pos[i : i + 1], neg])
            p = torch.softmax(keys @ q[i] / 0.2, 0)
            assert torch.allclose(q.grad[i], (p @ keys - pos[i]) / 0.2 / 3)


def test_info_nce_never_exceeds_log_of_the_number_of_candidates_when_the_positive_wins():
    """With the positive scoring highest, the loss is at most log(K + 1)."""
    q = torch.eye(4)
    neg = torch.zeros(9, 4)
    assert losses.info_nce(q, q, neg, 1.0).item() <= torch.log(torch.tensor(10.0)).item()
    assert losses.info_nce(q, torch.zeros(4, 4), neg, 1.0).item() == pytest.approx(
        float(torch.log(torch.tensor(10.0)))
    )


def test_info_nce_rejects_bad_shapes():
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        losses.info_nce(torch.randn(4, 3), torch.randn(5, 3), torch.randn(2, 3), 0.1)
    with pytest.raises(ValueError, match=r"negatives must be"):
        losses.info_nce(torch.randn(4, 3), torch.randn(4, 3), torch.randn(2, 5), 0.1)
