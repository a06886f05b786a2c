"""BYOL and SimSiam: the negative cosine, the stop-gradient, the target network's EMA, the ablations,
state round trips and training through the common loop."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import QUIET, random_images, random_views, step_on

from contrastive.evaluate import output_std
from contrastive.losses import negative_cosine
from contrastive.methods import build_method
from contrastive.methods.byol import BYOL
from contrastive.methods.momentum import TAU_BASE, cosine_momentum
from contrastive.methods.simsiam import SimSiam
from contrastive.models import projection_mlp
from contrastive.train import train


def _method(name, seed=0, **options):
    torch.manual_seed(seed)
    return build_method(name, "convnet_tiny", 0, **options)


def _batchnorms(module):
    return [m for m in module.modules() if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)]


# ----------------------------------------------------------------------------------------------------------
# The negative cosine
# ----------------------------------------------------------------------------------------------------------


def test_negative_cosine_is_minus_the_mean_cosine_of_the_rows():
    gen = torch.Generator().manual_seed(0)
    p, z = torch.randn(6, 5, generator=gen, dtype=torch.float64), torch.randn(6, 5, generator=gen).double()
    direct = -sum((p[i] @ z[i]) / (p[i].norm() * z[i].norm()) for i in range(6)) / 6
    assert torch.allclose(negative_cosine(p, z), direct, rtol=0, atol=1e-12)
    # the unnormalised dot product is another loss
    assert not torch.allclose(-(p * z).sum(1).mean(), direct, atol=1e-3)
    # for unit rows the normalised MSE is 2 - 2 cos, i.e. 2 + 2 D
    mse = (F.normalize(p, dim=1) - F.normalize(z, dim=1)).pow(2).sum(1).mean()
    assert torch.allclose(mse, 2 + 2 * negative_cosine(p, z), atol=1e-12)


def test_negative_cosine_lies_in_minus_one_to_one_and_reaches_both_ends():
    gen = torch.Generator().manual_seed(1)
    for _ in range(20):
        p, z = torch.randn(5, 4, generator=gen), torch.randn(5, 4, generator=gen)
        assert -1 <= negative_cosine(p, z).item() <= 1
    p = torch.randn(5, 4, generator=gen)
    assert negative_cosine(p, 3 * p).item() == pytest.approx(-1, abs=1e-6)  # aligned, any scale
    assert negative_cosine(p, -0.5 * p).item() == pytest.approx(1, abs=1e-6)  # opposite


def test_negative_cosine_leaves_the_stop_gradient_to_the_caller():
    gen = torch.Generator().manual_seed(2)
    p, z = torch.randn(4, 3, generator=gen, requires_grad=True), torch.randn(4, 3, generator=gen)
    z.requires_grad_()
    negative_cosine(p, z).backward()
    assert z.grad is not None and z.grad.abs().sum() > 0
    z.grad = None
    negative_cosine(p, z.detach()).backward()
    assert z.grad is None


# ----------------------------------------------------------------------------------------------------------
# SimSiam: the stop-gradient and the predictor
# ----------------------------------------------------------------------------------------------------------


def _cosine_gradient(a, b):
    """d(-cos(a_i, b_i)) / d a_i for each row: -(b^ - cos a^) / ||a||."""
    a_hat, b_hat = F.normalize(a, dim=1), F.normalize(b, dim=1)
    cos = (a_hat * b_hat).sum(1, keepdim=True)
    return -(b_hat - cos * a_hat) / a.norm(dim=1, keepdim=True)


def test_with_the_stop_gradient_the_target_branch_passes_no_gradient_to_z():
    gen = torch.Generator().manual_seed(3)
    z1, z2 = torch.randn(6, 5, generator=gen).double(), torch.randn(6, 5, generator=gen).double()
    z1.requires_grad_(), z2.requires_grad_()
    model = _method("simsiam", predictor=False).double()
    g1, g2 = torch.autograd.grad(model.objective(z1, z2), (z1, z2))
    # z1 gets only D(p1, sg(z2)) / 2's gradient, as the predictor's input; none as a target of p2
    n = len(z1)
    assert torch.allclose(g1, _cosine_gradient(z1, z2) / (2 * n), atol=1e-12)
    assert torch.allclose(g2, _cosine_gradient(z2, z1) / (2 * n), atol=1e-12)
    # without it the target branch adds the same gradient again: D is symmetric, so it doubles
    model.stop_gradient = False
    h1, h2 = torch.autograd.grad(model.objective(z1, z2), (z1, z2))
    assert torch.allclose(h1, 2 * g1, atol=1e-12) and torch.allclose(h2, 2 * g2, atol=1e-12)


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_simsiam_parameter_gradients_match_the_loss_with_explicitly_detached_targets(stop_gradient):
    model = _method("simsiam", stop_gradient=stop_gradient)
    x1, x2 = random_views()
    model.loss(x1, x2).backward()
    got = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()

    def reference(detach):
        z1, z2 = model.projector(model.backbone(x1)), model.projector(model.backbone(x2))
        p1, p2 = model.predictor(z1), model.predictor(z2)
        t1, t2 = (z1.detach(), z2.detach()) if detach else (z1, z2)
        return (-F.cosine_similarity(p1, t2).mean() - F.cosine_similarity(p2, t1).mean()) / 2

    grads = {}
    for detach in (True, False):
        reference(detach).backward()
        grads[detach] = [p.grad.clone() for p in model.parameters()]
        model.zero_grad()
    match = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, grads[stop_gradient]))
    other = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(got, grads[not stop_gradient]))
    assert match and not other


def test_predictor_false_is_the_identity():
    plain, bare = _method("simsiam"), _method("simsiam", predictor=False)
    assert isinstance(bare.predictor, torch.nn.Identity) and not list(bare.predictor.parameters())
    z = torch.randn(4, 512)
    assert torch.equal(bare.predictor(z), z)
    assert sum(p.numel() for p in plain.predictor.parameters()) > 0
    z1, z2 = torch.randn(4, 512), torch.randn(4, 512)
    expected = (negative_cosine(z1, z2) + negative_cosine(z2, z1)) / 2
    assert torch.allclose(bare.objective(z1, z2), expected, atol=1e-7)
    assert not torch.allclose(plain.objective(z1, z2), expected, atol=1e-3)


def test_simsiam_heads_follow_the_paper():
    model = _method("simsiam")
    linears = [m for m in model.projector if isinstance(m, torch.nn.Linear)]
    assert len(linears) == 3 and len(_batchnorms(model.projector)) == 3  # BN after every layer
    assert isinstance(model.projector[-1], torch.nn.BatchNorm1d) and not model.projector[-1].affine
    hidden = [m.out_features for m in model.predictor if isinstance(m, torch.nn.Linear)]
    assert hidden == [128, 512]  # a bottleneck of a quarter of the output


# ----------------------------------------------------------------------------------------------------------
# BYOL: the loss, the target network and its EMA
# ----------------------------------------------------------------------------------------------------------


def test_byol_loss_is_the_mean_negative_cosine_of_both_view_orders_against_the_target():
    model = _method("byol")
    _perturb_online(model)  # so that target and online networks differ
    x1, x2 = random_views()
    loss = model.loss(x1, x2)
    with torch.no_grad():
        q1, q2 = (model.predictor(model.projector(model.backbone(x))) for x in (x1, x2))
        t1, t2 = model.target(x1), model.target(x2)
        forward, backward = negative_cosine(q1, t2), negative_cosine(q2, t1)
    assert torch.allclose(loss, (forward + backward) / 2, atol=1e-6)
    assert not torch.allclose(loss, forward, atol=1e-4)  # one order alone is not the loss
    assert torch.allclose(loss, model.loss(x2, x1), atol=1e-6)  # symmetric in the views
    # the paper's summed normalised MSE is 4 + 4 x the reported loss
    pairs = ((q1, t2), (q2, t1))
    mse = sum((F.normalize(q, dim=1) - F.normalize(t, dim=1)).pow(2).sum(1).mean() for q, t in pairs)
    assert torch.allclose(mse, 4 + 4 * loss.detach(), atol=1e-5)


def test_byol_target_is_a_copy_of_backbone_and_projector_that_gets_no_gradient():
    model = _method("byol")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    online = model._online_parameters()
    target_before = [p.clone() for p in model.target.parameters()]
    assert all(torch.equal(a, b) for a, b in zip(target_before, online))  # starts as an exact copy
    assert not any(p.requires_grad for p in model.target.parameters())
    step_on(model, random_images()).backward()
    assert all(p.grad is None for p in model.target.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in online)
    optimizer.step()  # weight decay and momentum included: a parameter without gradient is skipped
    assert all(torch.equal(a, b) for a, b in zip(target_before, model.target.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(target_before, online))


def test_the_momentum_schedule_rises_from_tau_base_to_one_along_a_cosine():
    total = 40
    taus = [cosine_momentum(k, total, 0.99) for k in range(total + 1)]
    assert taus[0] == pytest.approx(0.99, abs=1e-15) and taus[-1] == pytest.approx(1.0, abs=1e-15)
    assert all(a < b for a, b in zip(taus, taus[1:]))  # strictly increasing
    assert taus[total // 2] == pytest.approx(1 - 0.01 / 2, abs=1e-15)  # halfway: half the gap closed
    # the cosine, not a straight line: a quarter of the way only (1 - cos(pi/4)) / 2 ~ 15% of the gap
    assert taus[total // 4] == pytest.approx(0.99 + 0.01 * (1 - math.cos(math.pi / 4)) / 2, abs=1e-15)
    assert taus[total // 4] != pytest.approx(0.99 + 0.01 / 4, abs=1e-6)
    assert cosine_momentum(0, total) == TAU_BASE == 0.99


def _perturb_online(model, seed=2):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model._online_parameters():
            p.add_(torch.randn(p.shape, generator=gen))


def test_the_target_update_is_tau_xi_plus_one_minus_tau_theta_with_tau_from_the_schedule():
    model = _method("byol", tau_base=0.9)
    _perturb_online(model)
    xi0 = [p.clone() for p in model.target.parameters()]
    theta = [p.clone() for p in model._online_parameters()]
    buffers = [b.clone() for b in model.target.buffers()]
    model.on_step_end(3, 10)
    tau = 1 - 0.1 * (math.cos(math.pi * 3 / 10) + 1) / 2
    xi1 = list(model.target.parameters())
    assert len(xi1) == len(theta) > 0
    triples = list(zip(xi0, xi1, theta))
    assert all(torch.allclose(b, tau * a + (1 - tau) * t, rtol=0, atol=1e-6) for a, b, t in triples)
    # the weights swapped, or tau_base in place of the scheduled tau, give other targets
    assert not all(torch.allclose(b, (1 - tau) * a + tau * t, atol=1e-3) for a, b, t in triples)
    assert not all(torch.allclose(b, 0.9 * a + 0.1 * t, atol=1e-4) for a, b, t in triples)
    # the BN running statistics are the target's own
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.target.buffers()))
    assert model.epoch_metrics()["target_momentum"] == pytest.approx(tau, abs=1e-15)


def test_batchnorm_false_removes_every_batchnorm_from_projector_and_predictor_only():
    with_bn, without = _method("byol"), _method("byol", batchnorm=False)
    assert _batchnorms(with_bn.projector) and _batchnorms(with_bn.predictor)
    assert not _batchnorms(without.projector) and not _batchnorms(without.predictor)
    assert not _batchnorms(without.target[1])  # the target's projector is a copy of the online one
    assert len(_batchnorms(without.backbone)) == len(_batchnorms(with_bn.backbone)) > 0
    # the hidden layers get the bias BN's shift provided
    hidden = [m for m in without.projector if isinstance(m, torch.nn.Linear)][0]
    assert hidden.bias is not None
    assert torch.isfinite(step_on(without, random_images()))
    with pytest.raises(ValueError, match="last_bn=True asks for a BatchNorm that batchnorm=False removes"):
        projection_mlp(8, 16, 4, last_bn=True, batchnorm=False)


@pytest.mark.parametrize(
    "name, options, message",
    [
        ("byol", {"tau_base": 1.5}, r"tau_base must be in \[0, 1\]"),
        ("byol", {"proj_dim": 0}, "proj_dim must be a positive integer"),
        ("simsiam", {"pred_hidden_dim": -1}, "pred_hidden_dim must be a positive integer"),
        ("simsiam", {"momentum": 0.9}, "simsiam has no option 'momentum'; its options are .*stop_gradient"),
    ],
)
def test_bad_options_are_rejected(name, options, message):
    with pytest.raises(ValueError, match=message):
        _method(name, **options)


# ----------------------------------------------------------------------------------------------------------
# State round trip and output_std
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["byol", "simsiam"])
def test_state_dict_round_trip_reproduces_the_next_step_loss(name):
    model = _method(name)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    for step in range(2):
        step_on(model, random_images(seed=step)).backward()
        optimizer.step()
        optimizer.zero_grad()
        model.on_step_end(step, 10)
    state = model.state_dict()
    restored, stranger = _method(name, seed=7), _method(name, seed=7)
    restored.load_state_dict(state)
    losses = []
    for m in (model, restored, stranger):
        torch.manual_seed(3)  # the views
        losses.append(step_on(m, random_images(seed=9)).item())
    assert losses[0] == losses[1] and losses[0] != losses[2]
    if name == "byol":
        assert any(k.startswith("target.") for k in state) and "momentum" in state
        assert restored.momentum.item() == model.momentum.item() == cosine_momentum(1, 10)
        # the target is part of the state: the online weights with a fresh target give another loss
        partial = _method(name, seed=7)
        partial.load_state_dict({k: v for k, v in state.items() if not k.startswith("target.")}, strict=False)
        torch.manual_seed(3)
        assert step_on(partial, random_images(seed=9)).item() != losses[0]


@pytest.mark.parametrize("name", ["byol", "simsiam"])
def test_output_std_is_the_per_dimension_std_of_the_normalised_projections(name):
    model = _method(name)
    x1, x2 = random_views()
    model.loss(x1, x2)
    with torch.no_grad():
        z1, z2 = (F.normalize(model.projector(model.backbone(x)), dim=1) for x in (x1, x2))
    expected = (z1.std(0).mean() + z2.std(0).mean()) / 2
    assert model.epoch_metrics()["output_std"] == pytest.approx(expected.item(), rel=1e-5)
    assert "output_std" not in model.epoch_metrics()  # the epoch's rows were consumed


def test_simsiam_prediction_std_is_the_per_dimension_std_of_the_normalised_predictions():
    model = _method("simsiam")
    x1, x2 = random_views()
    model.loss(x1, x2)
    with torch.no_grad():
        p1, p2 = (F.normalize(model.predictor(model.projector(model.backbone(x))), dim=1) for x in (x1, x2))
    expected = (p1.std(0).mean() + p2.std(0).mean()) / 2
    metrics = model.epoch_metrics()
    assert metrics["prediction_std"] == pytest.approx(expected.item(), rel=1e-5)
    assert metrics["prediction_std"] != pytest.approx(metrics["output_std"], rel=1e-3)  # p is not z
    assert model.epoch_metrics() == {}  # both lists were consumed


def test_simsiam_last_bn_hides_a_collapse_onto_one_line_that_the_output_std_of_bn_free_outputs_shows():
    model = _method("simsiam")
    gen = torch.Generator().manual_seed(4)
    s, u = torch.randn(64, 1, generator=gen), torch.randn(1, 512, generator=gen)
    collapsed = s * u  # every row on one line through the origin
    last_bn = model.projector[-1]
    assert output_std(last_bn(collapsed)).item() == pytest.approx(512**-0.5, rel=0.05)
    assert output_std(collapsed.abs()).item() == pytest.approx(0, abs=1e-6)  # one direction, no BN: 0


# ----------------------------------------------------------------------------------------------------------
# Training through the common loop
# ----------------------------------------------------------------------------------------------------------


def test_byol_trains_through_the_common_loop_and_reports_the_scheduled_momentum(tiny_data, tiny_profile):
    run = train("byol", tiny_profile, data=tiny_data, **QUIET)
    assert isinstance(run.method, BYOL) and len(run.metrics) == 2
    for epoch, row in enumerate(run.metrics, start=1):
        assert math.isfinite(row["loss"]) and -1 <= row["loss"] <= 1
        assert 0 < row["output_std"] <= 1
        # 4 steps per epoch: the last update of epoch e used step 4e - 1 of 8
        assert row["target_momentum"] == pytest.approx(cosine_momentum(4 * epoch - 1, 8), abs=1e-12)
    assert run.summary["lr"] == pytest.approx(tiny_profile.lr * BYOL.lr_scale)


def test_simsiam_trains_through_the_common_loop(tiny_data, tiny_profile):
    run = train("simsiam", tiny_profile, data=tiny_data, epochs=1, **QUIET)
    assert isinstance(run.method, SimSiam)
    row = run.metrics[0]
    assert math.isfinite(row["loss"]) and -1 <= row["loss"] <= 1 and 0 < row["output_std"] <= 1
    assert 0 < row["prediction_std"] <= 1
