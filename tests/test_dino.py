"""DINO: the loss against a direct formula, the center and the teacher EMA, multi-crop, the centering and
sharpening switches, the collapse metrics and training through the common loop."""

import math

import pytest
import torch
from conftest import QUIET, random_images

from contrastive.losses import dino_loss
from contrastive.methods import build_method
from contrastive.methods.dino import DINO, update_center
from contrastive.methods.momentum import cosine_momentum
from contrastive.models import DINOHead, ViT, build_backbone
from contrastive.train import train


def _method(seed=0, backbone="convnet_tiny", **options):
    torch.manual_seed(seed)
    return build_method("dino", backbone, 0, **options)


def _crops(n=8, local=2, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return (
        [torch.randn(n, 3, 32, 32, generator=gen) for _ in range(2)],
        [torch.randn(n, 3, 16, 16, generator=gen) for _ in range(local)],
    )


def _student_parameters(model):
    """The student's encoder and head parameters, in the teacher's order."""
    return [*model.encoder.parameters(), *model.head.parameters()]


def _perturb_student(model, seed=2):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in _student_parameters(model):
            p.add_(0.1 * torch.randn(p.shape, generator=gen))


# ---- the loss and the center ---------------------------------------------------------------------------


def test_dino_loss_is_the_mean_cross_entropy_of_the_centered_sharpened_teacher_and_the_student():
    gen = torch.Generator().manual_seed(0)
    s, t = torch.randn(5, 7, generator=gen, dtype=torch.float64), torch.randn(5, 7, generator=gen).double()
    c = torch.randn(7, generator=gen, dtype=torch.float64)
    total = 0.0
    for i in range(5):
        zt = sum(math.exp((t[i, j] - c[j]) / 0.04) for j in range(7))
        zs = sum(math.exp(s[i, j] / 0.1) for j in range(7))
        for k in range(7):
            p_t = math.exp((t[i, k] - c[k]) / 0.04) / zt
            total -= p_t * math.log(math.exp(s[i, k] / 0.1) / zs)
    assert dino_loss(s, t, c, 0.1, 0.04).item() == pytest.approx(total / 5, rel=1e-12)
    assert dino_loss(s, t, c.view(1, 7), 0.1, 0.04).item() == pytest.approx(total / 5, rel=1e-12)
    # the center, the two temperatures and the argument order all matter
    assert dino_loss(s, t, torch.zeros(7).double(), 0.1, 0.04).item() != pytest.approx(total / 5, rel=1e-3)
    assert dino_loss(s, t, c, 0.04, 0.1).item() != pytest.approx(total / 5, rel=1e-3)
    assert dino_loss(t, s, c, 0.1, 0.04).item() != pytest.approx(total / 5, rel=1e-3)


def test_dino_loss_leaves_the_stop_gradient_to_the_caller():
    gen = torch.Generator().manual_seed(1)
    s, t = torch.randn(4, 6, generator=gen, requires_grad=True), torch.randn(4, 6, generator=gen)
    t.requires_grad_()
    dino_loss(s, t.detach(), torch.zeros(6)).backward()
    assert t.grad is None and s.grad.abs().sum() > 0
    # d/ds of H(P_t, softmax(s / tau_s)) = (P_s - P_t) / (tau_s N)
    p_t = torch.softmax(t.detach() / 0.04, 1)
    assert torch.allclose(s.grad, (torch.softmax(s.detach() / 0.1, 1) - p_t) / (0.1 * 4), atol=1e-6)


def test_the_center_update_is_m_c_plus_one_minus_m_times_the_batch_mean_of_the_teacher_logits():
    gen = torch.Generator().manual_seed(2)
    c, t = torch.randn(1, 5, generator=gen), torch.randn(6, 5, generator=gen)
    by_hand = torch.stack([0.9 * c[0, k] + 0.1 * sum(t[i, k] for i in range(6)) / 6 for k in range(5)])
    assert torch.allclose(update_center(c, t, 0.9), by_hand.view(1, 5), atol=1e-6)
    assert torch.equal(update_center(c, t, 1.0), c) and torch.allclose(update_center(c, t, 0.0), t.mean(0))


def test_on_step_end_moves_the_center_towards_this_steps_teacher_logits_over_both_global_crops():
    model = _method()
    with torch.no_grad():
        model.center.fill_(0.5)
    global_crops, local_crops = _crops()
    model.loss(global_crops, local_crops)
    with torch.no_grad():
        teacher = model.teacher(torch.cat(global_crops))  # (2N, K): the teacher never sees a local crop
    model.on_step_end(0, 10)
    assert torch.allclose(model.center, 0.9 * 0.5 + 0.1 * teacher.mean(0, keepdim=True), atol=1e-6)
    assert model.epoch_metrics()["center_norm"] == pytest.approx(model.center.norm().item())


def test_the_teacher_update_is_tau_xi_plus_one_minus_tau_theta_with_tau_from_the_schedule():
    model = _method(tau_base=0.9)
    _perturb_student(model)
    before = [p.clone() for p in model.teacher.parameters()]
    theta = [p.clone() for p in _student_parameters(model)]
    assert len(before) == len(theta) > 0 and not any(p.requires_grad for p in model.teacher.parameters())
    model.on_step_end(3, 10)
    tau = cosine_momentum(3, 10, 0.9)
    triples = list(zip(before, model.teacher.parameters(), theta))
    assert all(torch.allclose(b, tau * a + (1 - tau) * t, rtol=0, atol=1e-6) for a, b, t in triples)
    assert not all(torch.allclose(b, 0.9 * a + 0.1 * t, atol=1e-4) for a, b, t in triples)


# ---- multi-crop and the switches -------------------------------------------------------------------------


def test_the_loss_averages_every_teacher_global_crop_against_every_other_student_crop():
    model = _method()
    _perturb_student(model)
    with torch.no_grad():
        model.center.normal_(0, 0.1)
    global_crops, local_crops = _crops(local=3)
    loss = model.loss(global_crops, local_crops)
    with torch.no_grad():
        student = [*model.head(model.encoder(torch.cat(global_crops))).chunk(2)]
        student += model.head(model.encoder(torch.cat(local_crops))).chunk(3)
        teacher = model.teacher(torch.cat(global_crops)).chunk(2)
    terms = [dino_loss(student[j], teacher[i], model.center, 0.1, 0.04) for i in range(2) for j in range(5)]
    pairs = [terms[5 * i + j] for i in range(2) for j in range(5) if i != j]  # 2 x (2 + 3) - 2 = 8 pairs
    assert torch.allclose(loss, sum(pairs) / 8, atol=1e-5)
    assert not torch.allclose(loss, sum(terms) / 10, atol=1e-4)  # a crop is never its own target


def test_a_training_step_draws_two_32px_global_crops_and_the_local_crops_at_16px():
    model = _method(local_crops=3)
    seen = {}
    model.loss = lambda g, loc: (
        seen.update(g=[x.shape for x in g], l=[x.shape for x in loc]) or torch.zeros(())
    )
    model(random_images(), torch.arange(8))
    assert seen["g"] == [(8, 3, 32, 32)] * 2 and seen["l"] == [(8, 3, 16, 16)] * 3


@pytest.mark.parametrize("name", ["convnet_tiny", "convnet_small", "resnet18", "vit_nano"])
def test_every_backbone_reads_16px_local_crops(name):
    net = build_backbone(name)
    assert net(torch.randn(2, 3, 16, 16)).shape == (2, net.out_dim)


def test_sharpening_false_puts_the_teacher_at_the_students_temperature():
    sharp, flat = _method(), _method(sharpening=False)
    assert sharp.teacher_temp == 0.04 and flat.teacher_temp == flat.student_temp == 0.1
    crops = _crops()
    a, b = sharp.loss(*crops), flat.loss(*crops)
    assert a.item() != pytest.approx(b.item(), rel=1e-3)
    # a flat teacher is closer to uniform than a sharp one
    assert flat.epoch_metrics()["teacher_entropy"] > sharp.epoch_metrics()["teacher_entropy"]


def test_centering_false_leaves_the_center_out_of_the_loss_but_still_tracks_it():
    on, off = _method(), _method(centering=False)
    for model in (on, off):
        with torch.no_grad():
            model.center.normal_(0, 0.2, generator=torch.Generator().manual_seed(3))
    crops = _crops()
    loss_on, loss_off = on.loss(*crops), off.loss(*crops)
    with torch.no_grad():
        student = off.head(off.encoder(torch.cat(crops[0]))).chunk(2)
        teacher = off.teacher(torch.cat(crops[0])).chunk(2)
    zero = torch.zeros_like(off.center)
    global_only = (dino_loss(student[1], teacher[0], zero) + dino_loss(student[0], teacher[1], zero)) / 2
    off_global_only = off.loss(crops[0], [])
    assert torch.allclose(off_global_only, global_only, atol=1e-5)
    assert loss_on.item() != pytest.approx(loss_off.item(), rel=1e-4)
    before = off.center.clone()
    off.on_step_end(0, 10)
    assert not torch.equal(off.center, before)


def test_the_collapse_metrics_are_the_teacher_entropy_the_kl_and_the_entropy_of_the_mean_teacher():
    model = _method(local_crops=0)
    _perturb_student(model)
    global_crops, _ = _crops()
    loss = model.loss(global_crops, [])
    with torch.no_grad():
        s = model.head(model.encoder(torch.cat(global_crops))).chunk(2)
        t = model.teacher(torch.cat(global_crops)).chunk(2)
    p_t = [torch.softmax(x / 0.04, 1) for x in t]  # the center starts at 0
    log_p_s = [torch.log_softmax(x / 0.1, 1) for x in s]
    entropy = sum(-(p * p.log()).sum(1).mean() for p in p_t) / 2
    kl = sum((p_t[i] * (p_t[i].log() - log_p_s[1 - i])).sum(1).mean() for i in range(2)) / 2
    marginal = torch.cat(p_t).mean(0)
    rows = model.epoch_metrics()
    assert rows["teacher_entropy"] == pytest.approx(entropy.item(), rel=1e-4)
    assert rows["teacher_student_kl"] == pytest.approx(kl.item(), rel=1e-3, abs=1e-5)
    assert rows["teacher_marginal_entropy"] == pytest.approx(
        -(marginal * marginal.log()).sum().item(), rel=1e-4
    )
    assert loss.item() == pytest.approx(entropy.item() + kl.item(), rel=1e-4)  # H(P_t, P_s) = H + KL
    assert 0 <= rows["teacher_entropy"] <= math.log(1024) and rows["teacher_student_kl"] >= 0


def test_the_head_ends_in_cosines_against_k_unit_prototypes():
    head = DINOHead(16, 32)
    h = torch.randn(5, 16)
    with torch.no_grad():
        head.last.mul_(7.0)  # the last layer's scale is normalised away (gain fixed at 1)
    logits = head(h)
    assert logits.shape == (5, 32) and logits.abs().max() <= 1 + 1e-6
    z = head.mlp(h)
    assert torch.allclose(
        logits, torch.nn.functional.cosine_similarity(z[:, None], head.last[None], dim=2), atol=1e-6
    )


def test_head_bn_defaults_to_batchnorm_for_convnets_and_none_for_vits():
    def has_bn(model):
        return any(isinstance(m, torch.nn.BatchNorm1d) for m in model.head.modules())

    assert has_bn(_method()) and not has_bn(_method(vit="vit_nano"))
    assert not has_bn(_method(head_bn=False)) and has_bn(_method(vit="vit_nano", head_bn=True))


@pytest.mark.parametrize(
    "options, message",
    [
        ({"teacher_temp": 0.1}, "sharpening=True needs teacher_temp below student_temp, got 0.1 >= 0.1"),
        ({"student_temp": 0.0}, "temperatures must be positive"),
        ({"out_dim": 1}, r"out_dim \(K, the number of outputs\) must be an integer >= 2, got 1"),
        ({"local_crops": -1}, "local_crops must be an integer >= 0, got -1"),
        ({"local_crops": 2.5}, "local_crops must be an integer >= 0, got 2.5"),
        ({"center_momentum": 1.5}, r"center_momentum must be in \[0, 1\], got 1.5"),
        ({"tau_base": -0.1}, r"tau_base must be in \[0, 1\], got -0.1"),
        ({"vit": "convnet_small"}, r"vit must name a ViT, one of \['vit_nano', 'vit_small', 'vit_tiny'\]"),
        ({"temperature": 0.1}, "dino has no option 'temperature'; its options are .*student_temp"),
    ],
)
def test_bad_options_are_rejected(options, message):
    with pytest.raises(ValueError, match=message):
        _method(**options)


# ---- training through the common loop --------------------------------------------------------------------


@pytest.mark.parametrize("options", [{}, {"centering": False}, {"sharpening": False}])
def test_dino_trains_through_the_common_loop_and_reports_the_collapse_metrics(
    tiny_data, tiny_profile, options
):
    run = train("dino", tiny_profile, data=tiny_data, method_options=options, **QUIET)
    assert isinstance(run.method, DINO) and len(run.metrics) == 2
    assert run.summary["lr"] == pytest.approx(tiny_profile.lr * 0.1)  # SGD for a ConvNet
    for row in run.metrics:
        assert 0 <= row["teacher_entropy"] <= math.log(1024) + 1e-6
        assert 0 <= row["teacher_marginal_entropy"] <= math.log(1024) + 1e-6
        assert row["teacher_student_kl"] >= -1e-6 and row["center_norm"] > 0
        assert row["loss"] == pytest.approx(row["teacher_entropy"] + row["teacher_student_kl"], rel=1e-5)


def test_dino_with_a_vit_trains_with_adamw(tiny_data, tiny_profile):
    run = train("dino", tiny_profile, data=tiny_data, epochs=1, method_options={"vit": "vit_nano"}, **QUIET)
    assert isinstance(run.method.encoder, ViT)
    assert run.summary["lr"] == pytest.approx(tiny_profile.lr * 1e-3)
    assert math.isfinite(run.metrics[0]["loss"])
