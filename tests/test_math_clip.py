"""The CLIP chapter's statements: two InfoNCE directions, symmetry, the scale's gradient, log N bounds."""

import math

import pytest
import sympy as sp
import torch
import torch.nn.functional as F

from contrastive.losses import clip_loss, multiview_info_nce
from contrastive.methods import build_method


def pairs(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return (
        torch.randn(n, d, generator=gen, dtype=torch.float64),
        torch.randn(n, d, generator=gen, dtype=torch.float64),
    )


def similarities(image: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
    return F.normalize(image, dim=1) @ F.normalize(text, dim=1).T


# ----------------------------------------------------------------------------------------------------------
# 1. The loss is the mean of two InfoNCE losses, one per direction, and symmetric in its arguments
# ----------------------------------------------------------------------------------------------------------


def test_clip_loss_is_the_mean_of_the_image_to_text_and_text_to_image_info_nce():
    image, text = pairs(8, 5, 0)
    s = 7.0
    logits = s * similarities(image, text)
    image_to_text = (torch.logsumexp(logits, 1) - logits.diagonal()).mean()  # each image picks its caption
    text_to_image = (torch.logsumexp(logits, 0) - logits.diagonal()).mean()  # each caption picks its image
    assert torch.allclose(clip_loss(image, text, s), (image_to_text + text_to_image) / 2, atol=1e-12)
    # The two directions differ in general: the mean is not one direction counted twice.
    assert abs(image_to_text - text_to_image) > 1e-3


def test_clip_loss_is_half_the_two_view_cmc_loss_at_temperature_one_over_the_scale():
    image, text = pairs(6, 4, 1)
    for s in (1.0, 14.3, 100.0):
        cmc = multiview_info_nce([image, text], temperature=1 / s)  # computed in float32
        assert clip_loss(image, text, s).item() == pytest.approx(cmc.item() / 2, rel=1e-5)


def test_clip_loss_is_symmetric_in_image_and_text():
    image, text = pairs(8, 6, 2)
    for s in (0.5, 10.0, 100.0):
        assert torch.allclose(clip_loss(image, text, s), clip_loss(text, image, s), atol=1e-12)
    # ... but not under a shuffle of one side: the pairing is what the loss reads.
    assert not torch.allclose(clip_loss(image, text, 10.0), clip_loss(image, text.flip(0), 10.0))


# ----------------------------------------------------------------------------------------------------------
# 2. The gradient of the logit scale: expected similarity under the softmax minus the positive's
# ----------------------------------------------------------------------------------------------------------


def closed_form_scale_gradient(sims: torch.Tensor, s: float) -> torch.Tensor:
    """dL/ds = 1/2 [mean_i (sum_j P_ij S_ij - S_ii) + mean_j (sum_i Q_ij S_ij - S_jj)],
    P the row softmax and Q the column softmax of s S."""
    p, q = (s * sims).softmax(1), (s * sims).softmax(0)
    positive = sims.diagonal()
    image_to_text = ((p * sims).sum(1) - positive).mean()
    text_to_image = ((q * sims).sum(0) - positive).mean()
    return (image_to_text + text_to_image) / 2


def test_scale_gradient_closed_form_holds_symbolically_for_two_pairs():
    s = sp.Symbol("s", positive=True)
    S = sp.Matrix(2, 2, lambda i, j: sp.Symbol(f"S{i}{j}", real=True))
    rows = [-s * S[i, i] + sp.log(sum(sp.exp(s * S[i, j]) for j in range(2))) for i in range(2)]
    cols = [-s * S[j, j] + sp.log(sum(sp.exp(s * S[i, j]) for i in range(2))) for j in range(2)]
    loss = (sum(rows) / 2 + sum(cols) / 2) / 2

    def expected(i, j, over):  # softmax weight of entry (i, j) in its row (over="row") or column
        others = (
            [sp.exp(s * S[i, k]) for k in range(2)]
            if over == "row"
            else [sp.exp(s * S[k, j]) for k in range(2)]
        )
        return sp.exp(s * S[i, j]) / sum(others)

    row_term = sum(sum(expected(i, j, "row") * S[i, j] for j in range(2)) - S[i, i] for i in range(2)) / 2
    col_term = sum(sum(expected(i, j, "col") * S[i, j] for i in range(2)) - S[j, j] for j in range(2)) / 2
    assert sp.simplify(sp.diff(loss, s) - (row_term + col_term) / 2) == 0


@pytest.mark.parametrize("s", [0.5, 14.285, 100.0])
def test_scale_gradient_matches_autograd_for_eight_pairs(s):
    image, text = pairs(8, 16, 3)
    scale = torch.tensor(s, dtype=torch.float64, requires_grad=True)
    (grad,) = torch.autograd.grad(clip_loss(image, text, scale), scale)
    assert torch.allclose(grad, closed_form_scale_gradient(similarities(image, text), s), atol=1e-12)


def test_scale_grows_while_positives_win_and_shrinks_when_they_lose():
    # dL/ds = E_P[S] - S_pos is negative when every positive is its row's and column's largest
    # similarity (gradient descent raises s: the temperature falls), positive when every positive
    # is the smallest.
    basis = torch.eye(4, dtype=torch.float64)
    noisy = basis + 0.1 * torch.ones(4, 4, dtype=torch.float64)
    for text, sign in ((noisy, -1), (-noisy, 1)):
        scale = torch.tensor(5.0, dtype=torch.float64, requires_grad=True)
        (grad,) = torch.autograd.grad(clip_loss(basis, text, scale), scale)
        assert torch.sign(grad) == sign


# ----------------------------------------------------------------------------------------------------------
# 3. log N - L: the InfoNCE bound on the mutual information, on toys where L is known
# ----------------------------------------------------------------------------------------------------------


def test_identical_embeddings_give_log_n_whatever_the_scale():
    # Every caption equally similar to every image: the softmax is uniform, the bound log N - L is 0.
    image = torch.ones(8, 3, dtype=torch.float64)
    for s in (1.0, 50.0):
        assert clip_loss(image, image.clone(), s).item() == pytest.approx(math.log(8), abs=1e-12)


def test_perfectly_aligned_pairs_approach_the_bound_log_n():
    # Orthonormal pairs, text_i = image_i: S = I, L = log(1 + (N - 1) e^{-s}) -> 0, so log N - L -> log N.
    n = 8
    image = torch.eye(n, dtype=torch.float64)
    for s in (1.0, 10.0, 100.0):
        loss = clip_loss(image, image.clone(), s).item()
        assert loss == pytest.approx(math.log(1 + (n - 1) * math.exp(-s)), rel=1e-10)
        assert 0 < math.log(n) - loss <= math.log(n)
    assert math.log(n) - clip_loss(image, image.clone(), 100.0).item() == pytest.approx(
        math.log(n), abs=1e-12
    )


def test_anti_aligned_pairs_make_the_bound_vacuous():
    # text_i = -image_i: S_ii = -1 and S_ij = 0, L = s + log(e^{-s} + N - 1) > log N, so log N - L < 0.
    n = 8
    image = torch.eye(n, dtype=torch.float64)
    for s in (1.0, 10.0):
        loss = clip_loss(image, -image, s).item()
        assert loss == pytest.approx(s + math.log(math.exp(-s) + n - 1), rel=1e-10)
        assert math.log(n) - loss < 0


# ----------------------------------------------------------------------------------------------------------
# 4. The package's objective pinned: value and gradient of clip_loss and of CLIP's learned log-scale
# ----------------------------------------------------------------------------------------------------------


def test_clip_loss_is_neither_one_direction_nor_their_sum_nor_unnormalised_nor_at_temperature_s():
    image, text = pairs(8, 16, 4)
    s, n = 14.0, 8
    sims = similarities(image, text)
    rows = sum(-s * sims[i, i] + torch.logsumexp(s * sims[i], 0) for i in range(n)) / n
    cols = sum(-s * sims[j, j] + torch.logsumexp(s * sims[:, j], 0) for j in range(n)) / n
    loss = clip_loss(image, text, s)
    assert torch.allclose(loss, (rows + cols) / 2, rtol=0, atol=1e-12)
    raw, targets = image @ text.T, torch.arange(n)
    unnormalised = (F.cross_entropy(s * raw, targets) + F.cross_entropy(s * raw.T, targets)) / 2
    for wrong in (rows, cols, rows + cols, unnormalised, clip_loss(image, text, 1 / s)):
        assert not torch.allclose(loss, wrong, rtol=0, atol=1e-3)


def test_embedding_gradient_is_g_v_and_g_transpose_u_through_the_normalisation():
    image, text = pairs(8, 16, 5)
    s, n = 14.0, 8
    x_image, x_text = image.clone().requires_grad_(True), text.clone().requires_grad_(True)
    g_image, g_text = torch.autograd.grad(clip_loss(x_image, x_text, s), (x_image, x_text))
    u, v = F.normalize(image, dim=1), F.normalize(text, dim=1)
    sims = u @ v.T
    p, q, eye = (s * sims).softmax(1), (s * sims).softmax(0), torch.eye(n, dtype=torch.float64)

    def tangential(x, unit, g):
        return (g - (g * unit).sum(1, keepdim=True) * unit) / x.norm(dim=1, keepdim=True)

    def pinned(g_matrix, through_normalisation=True):
        gu, gv = g_matrix @ v, g_matrix.T @ u
        if through_normalisation:
            gu, gv = tangential(image, u, gu), tangential(text, v, gv)
        return torch.allclose(g_image, gu, rtol=0, atol=1e-12) and torch.allclose(
            g_text, gv, rtol=0, atol=1e-12
        )

    right = s / (2 * n) * (p + q - 2 * eye)
    assert pinned(right)
    assert not pinned(s / (2 * n) * (p + p.T - 2 * eye))  # the other axis: P^T in place of Q
    assert not pinned(s / n * (p - eye))  # one direction counted twice
    assert not pinned(right, through_normalisation=False)  # the normalisation's Jacobian left out


def test_the_scale_derivative_is_not_the_row_term_alone():
    s = sp.Symbol("s", positive=True)
    S = sp.Matrix(2, 2, lambda i, j: sp.Symbol(f"S{i}{j}", real=True))
    rows = [-s * S[i, i] + sp.log(sum(sp.exp(s * S[i, j]) for j in range(2))) for i in range(2)]
    cols = [-s * S[j, j] + sp.log(sum(sp.exp(s * S[i, j]) for i in range(2))) for j in range(2)]
    loss = (sum(rows) / 2 + sum(cols) / 2) / 2
    row_only = sum(sp.diff(r, s) for r in rows) / 2
    assert sp.simplify(sp.diff(loss, s) - row_only) != 0


def test_when_no_positive_wins_the_sign_of_the_scale_gradient_depends_on_the_scale():
    # each positive (0.5) loses to one other entry of its row and column (0.6); the rest are -0.5
    sims = torch.full((8, 8), -0.5, dtype=torch.float64)
    sims.fill_diagonal_(0.5)
    sims[torch.arange(8), (torch.arange(8) + 1) % 8] = 0.6
    assert (sims.argmax(1) != torch.arange(8)).all() and (sims.argmax(0) != torch.arange(8)).all()
    assert closed_form_scale_gradient(sims, 1.0) < 0 < closed_form_scale_gradient(sims, 15.0)


def test_the_learned_log_scale_gets_s_times_the_scale_gradient_below_the_cap_and_none_above():
    image, text = pairs(8, 16, 6)
    torch.manual_seed(0)
    model = build_method("clip", "convnet_tiny", 8).double()
    for log_scale in (math.log(1 / 0.07), math.log(50.0), math.log(150.0)):
        with torch.no_grad():
            model.log_logit_scale.fill_(log_scale)
        scale = model.logit_scale()
        (grad,) = torch.autograd.grad(clip_loss(image, text, scale), model.log_logit_scale)
        by_s = closed_form_scale_gradient(similarities(image, text), scale.item()).item()
        if log_scale < math.log(100):
            assert grad.item() == pytest.approx(scale.item() * by_s, abs=1e-12)
            assert abs(grad.item() - by_s) > 1e-3  # wrong: the factor s of the chain rule dropped
        else:
            assert scale.item() == pytest.approx(100.0) and grad.item() == 0.0
    model.on_step_end(0, 1)
    assert (
        model.log_logit_scale.item() == model.log_scale_cap.item() == pytest.approx(math.log(100), abs=1e-6)
    )
