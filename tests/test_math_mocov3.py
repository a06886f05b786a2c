"""The MoCo v3 chapter's statements: the loss with its 2 tau scale and the method's symmetric sum with keys
that receive no gradient, the age of queue and in-batch keys, the parameter count of the ViTs, and the
injectivity of a random patch projection when D >= p (and its failure for ViT-S/16's 16 x 16 patches).
Every check is paired with a named wrong alternative that the same check rejects."""

import pytest
import torch
import torch.nn.functional as F
from conftest import Keep

from contrastive.losses import mocov3_loss
from contrastive.methods import build_method, mocov3
from contrastive.methods.momentum import ema_update
from contrastive.models import BACKBONES, VITS, ViT, build_backbone, count_parameters


def ctr_loop(q, k, tau):
    """ctr(q, k) = -2 tau / N sum_i log exp(s_ii / tau) / sum_j exp(s_ij / tau), one query at a time."""
    q, k = F.normalize(q, dim=1), F.normalize(k, dim=1)
    total = 0
    for i in range(len(q)):
        s = [q[i] @ k[j] for j in range(len(k))]
        total = total + s[i] / tau - torch.log(sum(torch.exp(s_ij / tau) for s_ij in s))
    return -2 * tau * total / len(q)


def query_grad(q, k, tau, axis=1):
    """d ctr / d q: the theorem's 2 (P - I) / N on s_ij = q^_i . k^_j, through q^ = q / |q|."""
    q_hat, k_hat = F.normalize(q, dim=1), F.normalize(k, dim=1)
    d_s = 2 / len(q) * (torch.softmax(q_hat @ k_hat.T / tau, axis) - torch.eye(len(q), dtype=q.dtype))
    d_q_hat = d_s @ k_hat
    return (d_q_hat - (d_q_hat * q_hat).sum(1, keepdim=True) * q_hat) / q.norm(dim=1, keepdim=True)


def pair(n=8, d=16, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=gen, dtype=torch.float64), torch.randn(
        n, d, generator=gen, dtype=torch.float64
    )


@pytest.mark.parametrize("temperature", [0.1, 0.2, 1.0])
def test_mocov3_loss_is_the_formula_written_out_and_not_without_two_tau_or_over_the_other_axis(temperature):
    q, k = pair()
    package = mocov3_loss(q, k, temperature)
    assert torch.allclose(package, ctr_loop(q, k, temperature), rtol=0, atol=1e-12)
    # wrong alternatives: the 2 tau factor dropped; the softmax over the queries for each key
    assert not torch.allclose(package, ctr_loop(q, k, temperature) / (2 * temperature), atol=1e-6)
    assert not torch.allclose(package, ctr_loop(k, q, temperature), atol=1e-6)


@pytest.mark.parametrize("temperature", [0.1, 0.2, 1.0])
def test_with_the_two_tau_scale_every_similarity_gradient_is_two_p_minus_i_over_n(temperature):
    q, k = (F.normalize(t, dim=1) for t in pair())
    n = len(q)
    s = (q @ k.T).requires_grad_()
    direct = -2 * temperature * (torch.diagonal(s / temperature) - torch.logsumexp(s / temperature, 1)).mean()
    assert torch.allclose(mocov3_loss(q, k, temperature), direct, rtol=0, atol=1e-12)
    (grad,) = torch.autograd.grad(direct, s)
    eye = torch.eye(n, dtype=torch.float64)
    closed = 2 / n * (torch.softmax(s.detach() / temperature, 1) - eye)
    assert torch.allclose(grad, closed, atol=1e-12)
    assert grad.abs().max() < 2 / n
    # wrong alternatives: the unscaled gradient (P - I) / (N tau); the softmax over columns
    assert not torch.allclose(grad, closed / (2 * temperature), atol=1e-6)
    assert not torch.allclose(grad, 2 / n * (torch.softmax(s.detach() / temperature, 0) - eye), atol=1e-6)
    # at tau = 0.1 the unscaled gradient would exceed the bound 2/N, five times the scaled one
    if temperature == 0.1:
        assert (grad / (2 * temperature)).abs().max() > 2 / n


def test_the_method_loss_is_the_symmetric_sum_its_query_gradient_the_theorems_and_keys_get_no_gradient():
    torch.manual_seed(0)
    model, keep = build_method("mocov3", "convnet_tiny", 0).double(), Keep()
    x1, x2 = torch.randn(2, 8, 3, 32, 32, dtype=torch.float64)
    model.momentum_encoder.requires_grad_(True)  # only the stop-gradient can now keep the gradient out
    hook = model.predictor.register_forward_hook(keep)
    loss = model.loss(x1, x2)
    loss.backward()
    hook.remove()
    q1, q2 = keep.outputs
    with torch.no_grad():
        k1, k2 = mocov3._project(*model.momentum_encoder, x1, x2)
    tau = model.temperature
    assert torch.allclose(loss, ctr_loop(q1, k2, tau) + ctr_loop(q2, k1, tau), rtol=0, atol=1e-12)
    for q, k in ((q1, k2), (q2, k1)):
        assert torch.allclose(q.grad, query_grad(q.detach(), k, tau), rtol=0, atol=1e-12)
    assert all(p.grad is None for p in model.momentum_encoder.parameters())
    # wrong alternatives: each query against its own view's keys; one direction counted twice; the
    # 2 tau factor dropped; the softmax over the other axis
    assert not torch.allclose(loss, ctr_loop(q1, k1, tau) + ctr_loop(q2, k2, tau), atol=1e-6)
    assert not torch.allclose(loss, 2 * ctr_loop(q1, k2, tau), atol=1e-6)
    assert not torch.allclose(q1.grad, query_grad(q1.detach(), k2, tau) / (2 * tau), atol=1e-6)
    assert not torch.allclose(q1.grad, query_grad(q1.detach(), k2, tau, axis=0), atol=1e-6)
    # wrong alternative: keys not stopped; computed with gradients on, the momentum encoder gets a gradient
    model.zero_grad(set_to_none=True)
    z1, z2 = mocov3._project(model.encoder, model.projector, x1, x2)
    k1, k2 = mocov3._project(*model.momentum_encoder, x1, x2)
    (mocov3_loss(model.predictor(z1), k2, tau) + mocov3_loss(model.predictor(z2), k1, tau)).backward()
    assert any(p.grad is not None and p.grad.abs().max() > 0 for p in model.momentum_encoder.parameters())


def test_a_queues_keys_are_one_to_k_over_b_steps_old():
    queue_size, batch = 64, 8
    moco = build_method("moco", "convnet_tiny", 0, queue_size=queue_size)
    ages = []
    for step in range(3 * queue_size // batch):
        if step >= queue_size // batch:  # every entry is a real key, labelled by the step that wrote it
            ages.append(step - moco.queue[:, 0])
        moco._enqueue(torch.full((batch, moco.queue.shape[1]), float(step)))
    ages = torch.stack(ages)
    assert ages.max().item() == queue_size // batch and ages.min().item() == 1
    assert ages.max().item() not in (queue_size // batch - 1, queue_size // batch + 1)


@pytest.mark.parametrize("age", [0, 1, 16, 256])
def test_an_encoder_age_steps_later_has_replaced_a_share_one_minus_m_to_the_age_and_in_batch_keys_none(age):
    m = 0.99 if age < 256 else 0.999
    weights = F.one_hot(torch.tensor(0), age + 1).double()  # coordinate 0: the encoder that made the key
    for j in range(age):
        ema_update([weights], [F.one_hot(torch.tensor(j + 1), age + 1).double()], m)
    replaced = 1 - weights[0].item()
    assert replaced == pytest.approx(1 - m**age, abs=1e-12)
    # wrong alternative: one EMA step too many, which gives in-batch keys (age 0) a staleness of 1 - m = 1%
    assert abs(replaced - (1 - m ** (age + 1))) > 1e-4
    if age == 0:
        assert replaced == 0


@pytest.mark.parametrize("name", VITS)
def test_the_vit_parameter_count_is_the_count_by_hand(name):
    config = BACKBONES[name][1]
    dim, depth, hidden = config["dim"], config["depth"], round(config["mlp_ratio"] * config["dim"])
    block = 2 * dim + (3 * dim * dim + 3 * dim) + (dim * dim + dim) + 2 * dim + (dim * hidden + hidden)
    block += hidden * dim + dim
    positions = (1 + 8 * 8) * dim
    by_hand = 48 * dim + dim + dim + positions + depth * block + 2 * dim
    counted = count_parameters(build_backbone(name))
    assert counted == by_hand
    assert counted != by_hand - positions  # wrong alternative: no position embeddings


def injective(E, patches):
    rank = torch.linalg.matrix_rank(E).item()
    recovered = (torch.linalg.pinv(E) @ (E @ patches.T)).T
    return rank == E.shape[1] and torch.allclose(recovered, patches, atol=1e-9)


@pytest.mark.parametrize("name", VITS)
def test_a_random_patch_projection_is_injective_and_its_patches_are_recovered_exactly(name):
    torch.manual_seed(0)
    vit = build_backbone(name)
    E = vit.patch_embed.weight.detach().double().flatten(1)
    p = E.shape[1]
    assert p == 48 and E.shape[0] >= p
    patches = torch.rand(200, p, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert injective(E, patches)
    # a projection to fewer dimensions than a patch has cannot be injective
    assert not injective(E[: p // 2], patches)


def test_vit_s16s_patch_projection_has_p_768_above_d_384_and_is_not_injective():
    torch.manual_seed(0)
    E = (
        ViT(dim=384, depth=0, heads=6, patch_size=16, image_size=32)
        .patch_embed.weight.detach()
        .double()
        .flatten(1)
    )
    assert E.shape == (384, 3 * 16 * 16)
    patches = torch.rand(100, 768, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert torch.linalg.matrix_rank(E).item() == 384 and not injective(E, patches)
    null = torch.linalg.svd(E).Vh[-1]  # patches x and x + null get the same token
    assert (E @ null).abs().max() < 1e-12 and null.norm() == pytest.approx(1)
    # the same check passes for ViT-B/16, D = p = 768
    E_b = ViT(dim=768, depth=0, heads=12, patch_size=16, image_size=32).patch_embed.weight.detach().double()
    assert injective(E_b.flatten(1), patches)
