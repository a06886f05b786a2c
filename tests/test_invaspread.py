"""InvaSpread's package pieces: the loss against its definition, its limits, its stability, the method."""

import math

import pytest
import torch
import torch.nn.functional as F

from contrastive.losses import invaspread_loss
from contrastive.methods import METHODS, build_method
from contrastive.train import train


def reference(f, f_hat, tau, negatives_from="f"):
    """J / N written out with loops: P(i|x^_i) over the instances f_k, P(i|x_j) = exp(f_i.f_j/tau) / sum_k.

    negatives_from="f_hat" scores the spreading term with the augmented copies instead, P(i|x^_j):
    a plausible misreading of the paper, kept to show that it is rejected.
    """
    f, f_hat = F.normalize(f, dim=1).tolist(), F.normalize(f_hat, dim=1).tolist()
    n = len(f)
    dot = lambda a, b: sum(x * y for x, y in zip(a, b))  # noqa: E731

    def p(i, query):
        scores = [math.exp(dot(f[k], query) / tau) for k in range(n)]
        return scores[i] / sum(scores)

    negative_query = f if negatives_from == "f" else f_hat
    total = -sum(math.log(p(i, f_hat[i])) for i in range(n))
    total -= sum(math.log(1 - p(i, negative_query[j])) for i in range(n) for j in range(n) if j != i)
    return total / n


def test_loss_matches_the_double_loop_definition():
    gen = torch.Generator().manual_seed(0)
    f, f_hat = (torch.randn(6, 5, generator=gen, dtype=torch.float64) for _ in range(2))
    for tau in (0.05, 0.1, 0.5, 2.0):
        assert invaspread_loss(f, f_hat, tau).item() == pytest.approx(reference(f, f_hat, tau), rel=1e-12)
    # Scaling the inputs changes nothing: they are normalised inside.
    assert invaspread_loss(3 * f, 0.5 * f_hat, 0.1).item() == pytest.approx(
        reference(f, f_hat, 0.1), rel=1e-12
    )
    # The spreading term reads the images themselves, not their augmented copies: the other choice differs.
    wrong = reference(f, f_hat, 0.1, negatives_from="f_hat")
    assert abs(invaspread_loss(f, f_hat, 0.1).item() - wrong) > 1e-2


def test_loss_at_float32_matches_float64():
    gen = torch.Generator().manual_seed(1)
    f, f_hat = torch.randn(32, 16, generator=gen), torch.randn(32, 16, generator=gen)
    got = invaspread_loss(f, f_hat, 0.1)
    assert got.dtype == torch.float32
    assert got.item() == pytest.approx(invaspread_loss(f.double(), f_hat.double(), 0.1).item(), rel=1e-5)


def test_identical_orthogonal_views_follow_the_closed_form_and_vanish_as_tau_goes_to_zero():
    # f = f^ = scaled standard basis: P(i|x^_i) = e^(1/tau) / (e^(1/tau) + N - 1), P(i|x^_j) = 1 / (same).
    n = 4
    f = torch.eye(n, dtype=torch.float64) * torch.tensor([1.0, 2.0, 0.5, 3.0], dtype=torch.float64)[:, None]
    previous = math.inf
    for tau in (1.0, 0.5, 0.2, 0.1, 0.05, 0.02):
        denom = math.exp(1 / tau) + n - 1
        p_pos, p_neg = math.exp(1 / tau) / denom, 1 / denom
        expected = -math.log(p_pos) - (n - 1) * math.log1p(-p_neg)
        got = invaspread_loss(f, f, tau).item()
        assert got == pytest.approx(expected, rel=1e-10)
        assert got < previous
        previous = got
    assert previous < 1e-20  # J -> 0: at tau = 0.02 it is about 2 (N - 1) e^(-50)


def test_large_temperature_makes_every_probability_one_over_n():
    # tau -> infinity: P = 1/N everywhere, so J / N -> log N - (N - 1) log(1 - 1/N), whatever f is.
    gen = torch.Generator().manual_seed(2)
    n = 8
    f, f_hat = (torch.randn(n, 3, generator=gen, dtype=torch.float64) for _ in range(2))
    limit = math.log(n) - (n - 1) * math.log1p(-1 / n)
    gaps = [abs(invaspread_loss(f, f_hat, tau).item() - limit) for tau in (1e2, 1e4, 1e6)]
    assert gaps[0] < 0.1 and gaps[2] < 1e-5
    assert gaps[0] > gaps[1] > gaps[2]  # the gap shrinks like 1 / tau


def test_first_term_is_the_column_cross_entropy_and_the_second_reads_f_against_f():
    gen = torch.Generator().manual_seed(3)
    f, f_hat = (torch.randn(7, 4, generator=gen, dtype=torch.float64) for _ in range(2))
    tau, n = 0.3, 7
    f_n, f_hat_n = F.normalize(f, dim=1), F.normalize(f_hat, dim=1)
    logits = f_n @ f_hat_n.T / tau
    targets = torch.arange(n)
    first = n * F.cross_entropy(logits.T, targets)  # column j's softmax over the instances k, target j
    p = (f_n @ f_n.T / tau).softmax(0)  # P(i | x_j)
    off_diagonal = ~torch.eye(n, dtype=torch.bool)
    second = -torch.log1p(-p[off_diagonal]).sum()
    assert (n * invaspread_loss(f, f_hat, tau)).item() == pytest.approx((first + second).item(), rel=1e-12)
    assert p[off_diagonal].max() <= 0.5  # the k = j term dominates its column
    # The rows' cross-entropy (view one classified among view two) is a different number.
    rows = n * F.cross_entropy(logits, targets)
    assert abs((rows - first).item()) > 1e-3


def test_spreading_term_alone_is_minimised_by_spreading_the_instances():
    # With f^ = f the first term is fixed by the geometry of f; the second falls as the f move apart.
    n, tau = 6, 0.5
    bunched = F.normalize(
        torch.ones(n, n, dtype=torch.float64) + 0.05 * torch.eye(n, dtype=torch.float64), dim=1
    )
    spread = torch.eye(n, dtype=torch.float64)
    assert invaspread_loss(spread, spread, tau) < invaspread_loss(bunched, bunched, tau)


def test_loss_is_finite_with_finite_gradients_at_a_low_temperature():
    # f^_j = f_{j-1}: every augmented copy sits exactly on another instance.
    n, tau = 4, 0.02
    f = torch.eye(n).requires_grad_(True)
    f_hat = torch.eye(n).roll(1, dims=0)
    loss = invaspread_loss(f, f_hat, tau)
    loss.backward()
    # Exact: -log P(i|x^_i) = log(e^(1/tau) + N - 1), and P(i|x_j) = 1 / (same) for each of the N - 1 others.
    denom = math.exp(1 / tau) + n - 1
    expected = math.log(denom) - (n - 1) * math.log1p(-1 / denom)
    assert loss.item() == pytest.approx(expected, rel=1e-5)  # about 1 / tau = 50
    assert torch.isfinite(f.grad).all() and f.grad.abs().sum() > 0


def test_loss_refuses_bad_input():
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(5, 3\)"):
        invaspread_loss(torch.randn(4, 3), torch.randn(5, 3))
    with pytest.raises(ValueError, match=r"\(4,\)"):
        invaspread_loss(torch.randn(4), torch.randn(4))
    for tau in (0.0, -0.1):
        with pytest.raises(ValueError, match="temperature"):
            invaspread_loss(torch.randn(4, 3), torch.randn(4, 3), tau)
    # One image has no negatives: the loss is -log 1 = 0.
    assert invaspread_loss(torch.randn(1, 3), torch.randn(1, 3)).item() == pytest.approx(0.0, abs=1e-6)


def test_method_is_registered_with_a_batchnorm_head():
    assert METHODS["invaspread"].__name__ == "InvaSpread"
    method = build_method("invaspread", "convnet_tiny", num_images=10)
    assert isinstance(method.head[1], torch.nn.BatchNorm1d) and method.head[0].out_features == 128
    assert method.temperature == 0.1 and method.lr_scale == 0.2
    with pytest.raises(ValueError, match="no option"):
        build_method("invaspread", "convnet_tiny", num_images=10, tau=0.1)


def test_invaspread_trains_and_reports_the_positive_probability(tiny_data, tiny_profile):
    quiet = dict(data=tiny_data, progress=False, log=lambda *_: None, linear_probe=False)
    run = train("invaspread", tiny_profile, **quiet)
    for row in run.metrics:
        assert 0 < row["positive_probability"] <= 1
    assert run.metrics[-1]["loss"] < run.metrics[0]["loss"]


def test_evenly_spread_confusions_give_a_spreading_term_that_tends_to_one_minus_p0():
    # Chapter 4, exercise 1: -(N - 1) log(1 - (1 - P0)/(N - 1)) -> 1 - P0 as N grows, from above.
    p0 = 0.3
    terms = [-(n - 1) * math.log1p(-(1 - p0) / (n - 1)) for n in (10, 100, 10_000, 1_000_000)]
    assert all(a > b > 1 - p0 for a, b in zip(terms, terms[1:]))
    assert abs(terms[-1] - (1 - p0)) < 1e-6
