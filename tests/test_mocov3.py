"""MoCo v3: the 2 tau-scaled in-batch InfoNCE, the momentum encoder's EMA, the frozen patch projection,
the gradient-norm records and training through the common loop."""

import math

import pytest
import torch
from conftest import QUIET, random_images, random_views, step_on

from contrastive.losses import mocov3_loss
from contrastive.methods import Spec, build_method
from contrastive.methods.mocov3 import MoCoV3
from contrastive.methods.momentum import cosine_momentum
from contrastive.models import ViT
from contrastive.train import adamw, train


def _method(seed=0, backbone="convnet_tiny", **options):
    torch.manual_seed(seed)
    return build_method("mocov3", backbone, 0, **options)


def _base_parameters(model):
    """The base encoder's ViT and projector parameters, in the momentum encoder's order."""
    return [*model.encoder.parameters(), *model.projector.parameters()]


def _perturb_base(model, seed=2):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in _base_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


# ---- the loss ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("temperature", [0.2, 1.0])
def test_mocov3_loss_is_two_tau_times_the_in_batch_cross_entropy_of_normalised_rows(temperature):
    gen = torch.Generator().manual_seed(0)
    q, k = torch.randn(6, 5, generator=gen, dtype=torch.float64), torch.randn(6, 5, generator=gen).double()
    terms = []
    for i in range(6):
        s = [(q[i] @ k[j]) / (q[i].norm() * k[j].norm()) / temperature for j in range(6)]
        terms.append(-(s[i] - torch.logsumexp(torch.stack(s), 0)))
    direct = 2 * temperature * sum(terms) / 6
    assert torch.allclose(mocov3_loss(q, k, temperature), direct, rtol=0, atol=1e-12)
    # without the 2 tau scale it is another number (except at tau = 1/2)
    assert not torch.allclose(mocov3_loss(q, k, temperature), direct / (2 * temperature), atol=1e-3)
    # a query's own key is the positive: swapping two keys changes the loss
    assert not torch.allclose(mocov3_loss(q, k[[1, 0, 2, 3, 4, 5]], temperature), direct, atol=1e-3)


def test_the_two_tau_scale_makes_the_gradient_on_each_similarity_two_times_p_minus_y_over_n():
    # d/ds_ij of 2 tau CE(s / tau) = 2 (softmax(s_i / tau)_j - [i = j]) / N: no 1 / tau left
    q = torch.eye(4, dtype=torch.float64).requires_grad_()  # unit rows with k = I: s = q k^T = q
    for temperature in (0.1, 0.5):
        (grad,) = torch.autograd.grad(mocov3_loss(q, torch.eye(4, dtype=torch.float64), temperature), q)
        p = torch.softmax(torch.eye(4, dtype=torch.float64) / temperature, 1)
        expected = 2 * (p - torch.eye(4, dtype=torch.float64)) / 4
        # the normalisation removes the radial part of the gradient on each unit row
        expected = expected - (expected * q.detach()).sum(1, keepdim=True) * q.detach()
        assert torch.allclose(grad, expected, atol=1e-12)


def test_the_method_loss_is_ctr_q1_k2_plus_ctr_q2_k1_with_keys_from_the_momentum_encoder():
    model = _method()
    _perturb_base(model)  # so that base and momentum encoders differ
    x1, x2 = random_views()
    loss = model.loss(x1, x2)
    with torch.no_grad():
        q1, q2 = (model.predictor(model.projector(model.encoder(x))) for x in (x1, x2))
        k1, k2 = (model.momentum_encoder(x) for x in (x1, x2))
        forward, backward = mocov3_loss(q1, k2, 0.2), mocov3_loss(q2, k1, 0.2)
    assert torch.allclose(loss, forward + backward, atol=1e-5)
    assert not torch.allclose(loss, forward, atol=1e-3)  # one direction alone is not the loss
    with torch.no_grad():  # keys from the base encoder would give another loss
        b1, b2 = (model.projector(model.encoder(x)) for x in (x1, x2))
    assert not torch.allclose(loss, mocov3_loss(q1, b2, 0.2) + mocov3_loss(q2, b1, 0.2), atol=1e-3)
    assert torch.allclose(loss, model.loss(x2, x1), atol=1e-5)  # symmetric in the views


def test_the_heads_follow_the_paper_with_bn_in_every_layer_and_no_queue():
    model = _method()
    linears = [m for m in model.projector if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3 and isinstance(model.projector[-1], torch.nn.BatchNorm1d)
    assert [m.out_features for m in model.predictor if isinstance(m, torch.nn.Linear)] == [512, 128]
    assert not [name for name, _ in model.named_buffers() if "queue" in name]


# ---- the momentum encoder ------------------------------------------------------------------------------


def test_the_momentum_encoder_is_a_copy_of_vit_and_projector_that_gets_no_gradient():
    model = _method()
    base, keys = _base_parameters(model), list(model.momentum_encoder.parameters())
    assert len(base) == len(keys) and all(torch.equal(a, b) for a, b in zip(base, keys))
    assert not any(p.requires_grad for p in keys)
    step_on(model, random_images()).backward()
    assert all(p.grad is None for p in keys)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in base)


def test_the_momentum_update_is_m_theta_k_plus_one_minus_m_theta_q_with_m_from_the_cosine_schedule():
    model = _method(tau_base=0.9)
    _perturb_base(model)
    before = [p.clone() for p in model.momentum_encoder.parameters()]
    theta = [p.clone() for p in _base_parameters(model)]
    model.on_step_end(3, 10)
    m = 1 - 0.1 * (math.cos(math.pi * 3 / 10) + 1) / 2
    assert m == pytest.approx(cosine_momentum(3, 10, 0.9), abs=1e-15)
    triples = list(zip(before, model.momentum_encoder.parameters(), theta))
    assert all(torch.allclose(b, m * a + (1 - m) * t, rtol=0, atol=1e-6) for a, b, t in triples)
    assert not all(torch.allclose(b, 0.9 * a + 0.1 * t, atol=1e-4) for a, b, t in triples)
    assert model.epoch_metrics()["momentum"] == pytest.approx(m, abs=1e-15)


# ---- the ViT and its patch projection ------------------------------------------------------------------


@pytest.mark.parametrize(
    "backbone, vit, dim",
    [
        ("convnet_tiny", None, 48),
        ("convnet_small", None, 64),
        ("resnet18", None, 384),
        ("resnet18", "vit_nano", 48),
    ],
)
def test_the_vit_is_the_profiles_size_unless_chosen(backbone, vit, dim):
    model = _method(backbone=backbone, vit=vit)
    assert isinstance(model.encoder, ViT) and model.encoder.out_dim == dim


def test_a_frozen_patch_projection_stays_at_its_init_through_adamw_steps_while_the_rest_trains():
    model = _method(frozen_patch=True)
    init = _method(frozen_patch=True).encoder.patch_embed  # the same seed: the same random projection
    assert not any(p.requires_grad for p in model.encoder.patch_embed.parameters())
    others = {n: p.clone() for n, p in model.encoder.named_parameters() if not n.startswith("patch_embed.")}
    optimizer = adamw(model, 1e-3, 0.1)
    for step in range(3):
        optimizer.zero_grad(set_to_none=True)
        step_on(model, random_images(seed=step)).backward()
        optimizer.step()
        model.on_step_end(step, 10)
    patch = model.encoder.patch_embed
    assert patch.weight.grad is None and patch.bias.grad is None
    assert torch.equal(patch.weight, init.weight) and torch.equal(patch.bias, init.bias)
    assert all(not torch.equal(others[n], p) for n, p in model.encoder.named_parameters() if n in others)
    trained = _method()  # without the option the projection trains
    optimizer = adamw(trained, 1e-3, 0.1)
    step_on(trained, random_images()).backward()
    optimizer.step()
    assert not torch.equal(trained.encoder.patch_embed.weight, init.weight)


@pytest.mark.parametrize("frozen", [False, True])
def test_token_grad_norm_is_the_gradient_norm_at_the_patch_tokens_and_patch_grad_norm_that_of_w(frozen):
    model = _method(frozen_patch=frozen)
    seen = []
    watch = model._watch_tokens

    def keep(tokens):
        tokens = watch(tokens)
        tokens.retain_grad()
        seen.append(tokens)
        return tokens

    model._watch_tokens = keep
    model.loss(*random_views()).backward()
    model.on_step_end(0, 10)
    rows = model.epoch_metrics()
    assert len(seen) == 1 and seen[0].shape == (16, 64, 48)  # both views' 8 x 8 patch tokens, one pass
    assert rows["token_grad_norm"] == pytest.approx([seen[0].grad.norm().item()], rel=1e-5)
    if frozen:
        assert "patch_grad_norm" not in rows and model.encoder.patch_embed.weight.grad is None
    else:
        assert rows["patch_grad_norm"] == pytest.approx([model.encoder.patch_embed.weight.grad.norm().item()])
        assert rows["patch_grad_norm"][0] > 0


def test_freezing_changes_no_loss_and_no_token_gradient_at_the_same_weights():
    grads = []
    for frozen in (False, True):
        model = _method(frozen_patch=frozen)
        loss = model.loss(*random_views())
        loss.backward()
        grads.append((loss.item(), model.epoch_metrics()["token_grad_norm"][0]))
    assert grads[0][0] == pytest.approx(grads[1][0], abs=1e-6)
    assert grads[0][1] == pytest.approx(grads[1][1], rel=1e-5)


def test_the_token_watch_leaves_evaluation_alone_and_gives_a_frozen_projection_a_gradient_to_record():
    model = _method(frozen_patch=True)
    tokens = torch.randn(2, 64, 48)
    with torch.no_grad():  # evaluation: the tokens pass through untouched, nothing is hooked
        assert model._watch_tokens(tokens) is tokens
        x = random_views()[0]
        assert torch.equal(model.encoder(x, watch=model._watch_tokens), model.encoder(x))
    watched = model._watch_tokens(tokens)  # training: a leaf that the backward pass reaches
    assert watched.requires_grad and not tokens.requires_grad
    watched.sum().backward()
    assert model.epoch_metrics()["token_grad_norm"] == pytest.approx([math.sqrt(tokens.numel())])


@pytest.mark.parametrize(
    "options, message",
    [
        (
            {"vit": "convnet_small"},
            r"needs a ViT: vit must be one of \['vit_nano', 'vit_small', 'vit_tiny'\]",
        ),
        ({"vit": "vit_huge"}, "got 'vit_huge'"),
        ({"temperature": 0.0}, "temperature must be positive, got 0.0"),
        ({"tau_base": 1.5}, r"tau_base must be in \[0, 1\]"),
        ({"weight_decay": -0.1}, "weight_decay must be non-negative, got -0.1"),
        ({"queue_size": 10}, "mocov3 has no option 'queue_size'; its options are .*frozen_patch"),
    ],
)
def test_bad_options_are_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        _method(**options)


def test_a_backbone_without_a_vit_of_its_size_and_no_vit_the_error_says_what_to_pass():
    # every profile's backbone has a ViT of its size; a backbone outside that table needs vit
    vits = r"\['vit_nano', 'vit_small', 'vit_tiny'\]"
    with pytest.raises(ValueError, match=rf"MoCo v3 needs a ViT: vit must be one of {vits}.*got 'lenet'"):
        MoCoV3(Spec(backbone="lenet"))
    assert MoCoV3(Spec(backbone="lenet"), vit="vit_nano").encoder.out_dim == 48  # the ViT chosen instead


# ---- training through the common loop -------------------------------------------------------------------


@pytest.mark.parametrize("frozen", [False, True])
def test_mocov3_trains_through_the_common_loop_with_adamw_and_records_every_steps_gradient(
    tiny_data, tiny_profile, frozen
):
    run = train("mocov3", tiny_profile, data=tiny_data, method_options={"frozen_patch": frozen}, **QUIET)
    assert isinstance(run.method, MoCoV3) and isinstance(run.method.encoder, ViT) and len(run.metrics) == 2
    assert run.summary["lr"] == pytest.approx(tiny_profile.lr * MoCoV3.lr_scale)
    for epoch, row in enumerate(run.metrics, start=1):
        assert len(row["step_loss"]) == len(row["token_grad_norm"]) == 4  # 200 images, batch 50
        assert sum(row["step_loss"]) / 4 == pytest.approx(row["loss"], rel=1e-6)
        assert all(g > 0 and math.isfinite(g) for g in row["token_grad_norm"])
        assert ("patch_grad_norm" in row) != frozen
        assert 0 <= row["instance_accuracy"] <= 1
        assert row["momentum"] == pytest.approx(cosine_momentum(4 * epoch - 1, 8), abs=1e-12)
    if not frozen:
        assert all(g > 0 for g in run.metrics[-1]["patch_grad_norm"])
    torch.manual_seed(0)  # the loop's seed: the same initialisation
    name = tiny_profile.backbone
    init = build_method("mocov3", name, 0)
    same = torch.equal(run.method.encoder.patch_embed.weight, init.encoder.patch_embed.weight)
    assert same == frozen


def test_in_bfloat16_autocast_the_loss_is_float32_and_close_to_the_float32_loss():
    model = _method()
    x1, x2 = random_views()
    full = model.loss(x1, x2)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        half = model.loss(x1, x2)
    assert half.dtype == torch.float32 and abs(half.item() - full.item()) < 0.05


# ---- two gloo ranks ----------------------------------------------------------------------------------------


def _rank_main(rank, world, port, out):
    import torch.distributed as dist

    torch.set_num_threads(1)  # two processes share the CPU
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        # float64, so that the two reduction orders (per rank + all_reduce, one process) agree to 1e-10
        model = _method().double()
        x1, x2 = (v.double() for v in random_views())
        mine = slice(rank * 4, (rank + 1) * 4)
        loss = model.loss(x1[mine], x2[mine])
        loss.backward()
        grad = torch.cat([p.grad.flatten() for p in _base_parameters(model) if p.grad is not None])
        dist.all_reduce(grad)  # DistributedDataParallel averages the ranks' gradients; do the same by hand
        out[rank, : len(grad)] = grad / world
        out[rank, -2] = loss.detach()
        out[rank, -1] = model.epoch_metrics()["token_grad_norm"][0]
    finally:
        from contrastive import distributed

        distributed.cleanup()


@pytest.mark.slow
def test_over_two_ranks_the_loss_and_gradients_are_those_of_one_process_with_keys_from_both_ranks():
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    model = _method().double()
    size = sum(p.numel() for p in _base_parameters(model) if p.requires_grad)
    out = torch.zeros(2, size + 2, dtype=torch.float64).share_memory_()
    mp.spawn(_rank_main, args=(2, port, out), nprocs=2, join=True)

    # One process, with each rank's 4 images through the heads' BN as one group, as on the ranks.
    x1, x2 = (v.double() for v in random_views())
    tokens = []

    def keep(t):
        t.retain_grad()
        tokens.append(t)
        return t

    def per_rank(f, x):
        return torch.cat([f(x[r * 4 : (r + 1) * 4]) for r in range(2)])

    q1, q2 = (
        per_rank(lambda v: model.predictor(model.projector(model.encoder(v, watch=keep))), x)
        for x in (x1, x2)
    )
    with torch.no_grad():
        k1, k2 = (per_rank(model.momentum_encoder, x) for x in (x1, x2))
    loss = mocov3_loss(q1, k2, 0.2) + mocov3_loss(q2, k1, 0.2)
    loss.backward()
    grad = torch.cat([p.grad.flatten() for p in _base_parameters(model) if p.grad is not None])
    for rank in range(2):
        assert out[rank, -2].item() == pytest.approx(loss.item(), rel=1e-12)
        assert torch.allclose(out[rank, :size], grad, rtol=1e-9, atol=1e-12)
        # rank r's tokens: its 4 images in view 1 (tokens[r]) and in view 2 (tokens[2 + r])
        norm = (tokens[rank].grad.norm() ** 2 + tokens[2 + rank].grad.norm() ** 2).sqrt()
        assert out[rank, -1].item() == pytest.approx(norm.item(), rel=1e-5)
    # keys from one rank only would give another loss
    local = mocov3_loss(q1[:4], k2[:4], 0.2) + mocov3_loss(q2[:4], k1[:4], 0.2)
    assert local.item() != pytest.approx(loss.item(), rel=1e-3)
