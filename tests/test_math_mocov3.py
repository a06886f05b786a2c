"""The MoCo v3 chapter's statements: the 2 tau scale, the freshness of in-batch keys, and the injectivity
of a random patch projection."""

import math

import pytest
import sympy as sp
import torch
import torch.nn.functional as F

from contrastive.losses import mocov3_loss
from contrastive.models import VITS, build_backbone


@pytest.mark.parametrize("temperature", [0.1, 0.2, 1.0])
def test_with_the_two_tau_scale_every_similarity_gradient_lies_within_two_over_n(temperature):
    gen = torch.Generator().manual_seed(0)
    n = 8
    q = F.normalize(torch.randn(n, 16, generator=gen, dtype=torch.float64), dim=1)
    k = F.normalize(torch.randn(n, 16, generator=gen, dtype=torch.float64), dim=1)
    s = (q @ k.T).requires_grad_()
    direct = -2 * temperature * (torch.diagonal(s / temperature) - torch.logsumexp(s / temperature, 1)).mean()
    assert torch.allclose(mocov3_loss(q, k, temperature), direct, rtol=0, atol=1e-12)
    (grad,) = torch.autograd.grad(direct, s, retain_graph=True)
    closed = 2 / n * (torch.softmax(s.detach() / temperature, 1) - torch.eye(n, dtype=torch.float64))
    assert torch.allclose(grad, closed, atol=1e-12)
    assert grad.abs().max() < 2 / n
    # the unscaled InfoNCE gradient is 1 / (2 tau) times larger
    (plain,) = torch.autograd.grad(direct / (2 * temperature), s)
    assert torch.allclose(plain, closed / (2 * temperature), atol=1e-12)


def test_in_batch_keys_are_one_ema_step_old_while_a_queue_holds_keys_of_k_over_b_steps():
    m, K, B = sp.symbols("m K B", positive=True)
    replaced = 1 - m ** (K / B)
    assert float(replaced.subs({m: 0.99, K: 4096, B: 4096})) == pytest.approx(0.01, abs=1e-12)
    assert float(replaced.subs({m: 0.99, K: 65536, B: 4096})) == pytest.approx(1 - 0.99**16, abs=1e-12)
    assert float(replaced.subs({m: 0.999, K: 65536, B: 256})) == pytest.approx(1 - 0.999**256, abs=1e-12)
    # the InfoNCE ceiling log(K + 1) of a 65,536 queue against 4,096 in-batch candidates
    assert math.log(65537) - math.log(4096) == pytest.approx(math.log(16), abs=1e-4)


@pytest.mark.parametrize("name", VITS)
def test_a_random_patch_projection_is_injective_and_its_patches_are_recovered_exactly(name):
    torch.manual_seed(0)
    vit = build_backbone(name)
    E = vit.patch_embed.weight.detach().double().flatten(1)
    p = E.shape[1]
    assert p == 48 and E.shape[0] >= p
    assert torch.linalg.matrix_rank(E).item() == p
    patches = torch.rand(200, p, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.allclose((torch.linalg.pinv(E) @ (E @ patches.T)).T, patches, atol=1e-9)
    # a projection to fewer dimensions than a patch has cannot be injective
    assert torch.linalg.matrix_rank(E[: p // 2]).item() < p
