"""The MoCo chapter (He et al. 2020): the momentum average, its window, the queue's cost and age, the loss."""

import math

import sympy as sp
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

from contrastive.distributed import batch_shuffle
from contrastive.losses import info_nce, nt_xent
from contrastive.methods import build_method

m = sp.Symbol("m", positive=True)


def _moco(**options):
    torch.manual_seed(0)
    return build_method("moco", "convnet_tiny", 0, **{"bn_splits": 1, **options})


# ----------------------------------------------------------------------------------------------------------
# 1. The momentum update unrolled
# ----------------------------------------------------------------------------------------------------------


def _closed_form(t, theta_k0, theta_q):
    """m^t theta_k^0 + (1 - m) sum_{s<t} m^(t-1-s) theta_q^s."""
    return m**t * theta_k0 + (1 - m) * sum(m ** (t - 1 - s) * theta_q[s] for s in range(t))


def test_the_unrolled_momentum_update_is_a_geometric_mix_of_past_query_encoders():
    theta_k0 = sp.Symbol("theta_k0")
    theta_q = sp.symbols("theta_q0:8")
    theta_k = theta_k0
    for t in range(1, 8):
        theta_k = m * theta_k + (1 - m) * theta_q[t - 1]
        assert sp.expand(theta_k - _closed_form(t, theta_k0, theta_q)) == 0
    # the weights reversed (the oldest query encoder weighted most) is another average
    wrong = m**7 * theta_k0 + (1 - m) * sum(m**s * theta_q[s] for s in range(7))
    assert sp.expand(theta_k - wrong) != 0


def test_the_weights_of_the_unrolled_update_sum_to_one_for_every_t():
    t, s = sp.symbols("t s", integer=True, positive=True)
    total = m**t + sp.summation((1 - m) * m ** (t - 1 - s), (s, 0, t - 1))
    assert sp.simplify(total - 1) == 0
    assert sp.simplify(sp.summation(m ** (t - 1 - s), (s, 0, t - 1)) + m**t - 1) != 0  # without (1 - m)


def test_the_key_encoder_after_t_steps_is_the_closed_form_over_the_query_encoders_it_saw():
    momentum, steps = 0.7, 5
    model = _moco(momentum=momentum).double()
    gen = torch.Generator().manual_seed(0)
    theta_k0 = [p.clone() for p in model.key_encoder.parameters()]
    seen = []
    for step in range(steps):
        with torch.no_grad():  # stands in for an optimiser step on the query encoder
            for p in model._query_parameters():
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype))
        seen.append([p.clone() for p in model._query_parameters()])
        model.on_step_end(step, steps)
    for i, p in enumerate(model.key_encoder.parameters()):
        expected = momentum**steps * theta_k0[i] + (1 - momentum) * sum(
            momentum ** (steps - 1 - s) * seen[s][i] for s in range(steps)
        )
        assert torch.allclose(p, expected, rtol=0, atol=1e-12)


# ----------------------------------------------------------------------------------------------------------
# 2. The window of the average
# ----------------------------------------------------------------------------------------------------------


def test_the_mean_age_of_the_weights_is_m_over_one_minus_m_steps():
    r = sp.Symbol("r", positive=True)
    m_ = 1 / (1 + r)  # any m in (0, 1), so that the series converge
    s = sp.Symbol("s", integer=True, nonnegative=True)
    assert sp.simplify(sp.summation((1 - m_) * m_**s, (s, 0, sp.oo)) - 1) == 0
    mean_age = sp.summation(s * (1 - m_) * m_**s, (s, 0, sp.oo))
    assert sp.simplify(mean_age - m_ / (1 - m_)) == 0
    assert sp.simplify(mean_age - 1 / (1 - m_)) != 0  # the window 1/(1 - m) is the mean age plus one step
    assert sp.simplify(mean_age + 1 - 1 / (1 - m_)) == 0
    # m = 0.99 (the CIFAR setting) averages over about 100 steps, m = 0.999 (ImageNet) over about 1000
    for value, age in [(0.99, 99), (0.999, 999)]:
        assert abs(float((m / (1 - m)).subs(m, value)) - age) < 1e-6
        ages = torch.arange(200_000, dtype=torch.float64)
        assert abs(((1 - value) * value**ages * ages).sum().item() - age) < 1e-6


# ----------------------------------------------------------------------------------------------------------
# 3. What the queue costs per step
# ----------------------------------------------------------------------------------------------------------


def _logit_shapes(monkeypatch):
    shapes = []
    real = torch.nn.functional.cross_entropy

    def spy(logits, *args, **kwargs):
        shapes.append(tuple(logits.shape))
        return real(logits, *args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "cross_entropy", spy)
    return shapes


def test_moco_logits_are_b_by_one_plus_k_and_grow_linearly_in_k_at_fixed_b(monkeypatch):
    shapes = _logit_shapes(monkeypatch)
    b, d = 8, 16
    queue_sizes = [16, 64, 256, 1024]
    for k in queue_sizes:
        q, pos, queue = torch.randn(b, d), torch.randn(b, d), torch.randn(k, d)
        info_nce(q, pos, queue, 0.1)
    assert shapes == [(b, 1 + k) for k in queue_sizes]
    sizes = [rows * cols for rows, cols in shapes]
    kk = sp.Symbol("K")
    fit = sp.interpolate(list(zip(queue_sizes, sizes)), kk)
    assert sp.expand(fit - b * (1 + kk)) == 0  # exactly linear: B + B K entries
    # through the method itself: the queue is the negatives, whatever the batch
    shapes.clear()
    model = _moco(queue_size=32)
    model.contrast(torch.randn(4, 3, 32, 32), torch.randn(4, 3, 32, 32))
    assert shapes == [(4, 33)]


def test_an_in_batch_method_has_negatives_tied_to_the_batch(monkeypatch):
    shapes = _logit_shapes(monkeypatch)
    for n in (4, 8, 16):
        nt_xent(torch.randn(n, 16), torch.randn(n, 16), 0.5)
    # 2N x 2N logits: 2N - 2 negatives per anchor, growing only with the batch
    assert shapes == [(2 * n, 2 * n) for n in (4, 8, 16)]


# ----------------------------------------------------------------------------------------------------------
# 4. How old the queue is
# ----------------------------------------------------------------------------------------------------------


def test_a_full_queue_spans_k_over_b_steps_and_the_key_encoder_drifts_by_one_minus_m_to_the_steps():
    k, b = 12, 4
    model = _moco(queue_size=k, feature_dim=2)
    for step in range(10):
        if step >= k // b:  # what the loss at this step sees: the K/B previous steps' keys
            seen = model.queue[:, 0]
            assert set(seen.tolist()) == set(range(step - k // b, step))
            assert step - seen.min().item() == k // b  # the positive key is K/B steps newer than the oldest
        model._enqueue(torch.full((b, 2), float(step)))
        if step >= k // b - 1:
            assert model.queue[:, 0].max() - model.queue[:, 0].min() == k // b - 1  # the gap inside the queue

    # Over g momentum updates theta_k^(a+g) = m^g theta_k^a + (1 - m) sum_s m^(g-1-s) theta_q^(a+s):
    # the weight of what is new since the older key is 1 - m^g.
    g, s = sp.symbols("g s", integer=True, positive=True)
    new = sp.summation((1 - m) * m ** (g - 1 - s), (s, 0, g - 1))
    assert sp.simplify(new - (1 - m**g)) == 0
    kk, bb = sp.symbols("K B", positive=True)
    inside = (1 - m**g).subs(g, kk / bb - 1)  # between the oldest and the newest entry of the queue
    against_positive = (1 - m**g).subs(g, kk / bb)  # between the oldest entry and this step's keys
    assert sp.simplify(against_positive - inside - m ** (kk / bb - 1) * (1 - m)) == 0
    drift = sp.lambdify((m, kk, bb), against_positive)
    assert abs(drift(0.99, 4096, 512) - 0.0773) < 1e-3  # the CIFAR demo: 8 steps, keys nearly consistent
    assert abs(drift(0.999, 65536, 256) - 0.226) < 1e-3  # ImageNet: 256 steps at m = 0.999
    assert drift(0.9, 65536, 256) > 0.999_999  # m = 0.9: the oldest keys come from another encoder


def test_the_share_renewed_in_g_updates_is_one_minus_m_to_the_g_on_the_package_and_not_a_linear_rule():
    momentum, g = 0.99, 16
    model = _moco(momentum=momentum, feature_dim=2).double()
    start = [p.clone() for p in model.key_encoder.parameters()]
    with torch.no_grad():
        for p in model._query_parameters():
            p.add_(1.0)  # a query encoder that has moved by 1 everywhere and stays there
    for step in range(g):
        model.on_step_end(step, g)
    moved = torch.cat([(p - p0).flatten() for p, p0 in zip(model.key_encoder.parameters(), start)])
    assert torch.allclose(moved, torch.full_like(moved, 1 - momentum**g), rtol=0, atol=1e-12)
    for wrong in (g * (1 - momentum), 1 - (1 - momentum) ** g):  # linear; the other convention
        assert abs(moved[0].item() - wrong) > 1e-3


# ----------------------------------------------------------------------------------------------------------
# 5. The loss with the queue, pinned: value and gradient against the formula written with loops
# ----------------------------------------------------------------------------------------------------------


def _queue_loss(q, k, negatives, tau, with_positive=True):
    """mean_i -log e^{q_i.k_i/tau} / (e^{q_i.k_i/tau} + sum_j e^{q_i.n_j/tau}), one scalar at a time."""
    total = 0
    for i in range(len(q)):
        positive = torch.exp(q[i] @ k[i] / tau)
        denominator = sum(torch.exp(q[i] @ key / tau) for key in negatives)
        total = total - torch.log(positive / (denominator + (positive if with_positive else 0)))
    return total / len(q)


def test_moco_contrast_is_infonce_against_the_queue_before_the_step_in_value_and_gradient():
    tau, b, k = 0.1, 4, 16
    model = _moco(queue_size=k, shuffle_bn=False, temperature=tau).double()
    gen = torch.Generator().manual_seed(0)
    model._enqueue(model.keys(torch.randn(k // 2, 3, 32, 32, generator=gen, dtype=torch.float64)))
    x_q, x_k = (torch.randn(b, 3, 32, 32, generator=gen, dtype=torch.float64) for _ in range(2))
    params = model._query_parameters()
    queue = model.queue.clone()
    loss = model.contrast(x_q, x_k)
    grads = torch.autograd.grad(loss, params)

    def reference(negatives, **kwargs):
        q = F.normalize(model.head(model.backbone(x_q)), dim=1)
        with torch.no_grad():
            keys = F.normalize(model.key_encoder(x_k), dim=1)
        return _queue_loss(q, keys, negatives, tau, **kwargs)

    expected = reference(queue)
    assert abs(loss.item() - expected.item()) < 1e-6 * expected.item()  # the softmax runs in float32
    for ours, theirs in zip(grads, torch.autograd.grad(expected, params)):
        assert (ours - theirs).norm() <= 1e-5 * theirs.norm()
    for wrong in (reference(model.queue), reference(queue, with_positive=False)):  # enqueued first; no k+
        assert abs(wrong.item() - expected.item()) > 1e-3
        wrong_grads = torch.autograd.grad(wrong, params)
        assert max(((a - b).norm() / b.norm()).item() for a, b in zip(grads, wrong_grads)) > 1e-2


def test_info_nce_gradient_is_the_softmax_average_of_the_candidates_minus_the_positive():
    gen = torch.Generator().manual_seed(1)
    tau, b, k, d = 0.2, 3, 5, 4
    q = F.normalize(torch.randn(b, d, generator=gen, dtype=torch.float64), dim=1).requires_grad_(True)
    pos = F.normalize(torch.randn(b, d, generator=gen, dtype=torch.float64), dim=1)
    queue = F.normalize(torch.randn(k, d, generator=gen, dtype=torch.float64), dim=1)
    (grad,) = torch.autograd.grad(info_nce(q, pos, queue, tau), q)
    q = q.detach()
    for i in range(b):
        candidates = torch.cat([pos[i : i + 1], queue])
        p = (candidates @ q[i] / tau).softmax(0)
        expected = (p @ candidates - pos[i]) / (tau * b)  # (1/tau)(sum_c p_c c - k+), averaged over B
        assert torch.allclose(grad[i], expected, atol=1e-6)
        negatives_only = (queue @ q[i] / tau).softmax(0) @ queue
        assert not torch.allclose(grad[i], (negatives_only - pos[i]) / (tau * b), atol=1e-3)


# ----------------------------------------------------------------------------------------------------------
# 6. What a training step costs, counted: the queue is detached, the logged top-1 is extra
# ----------------------------------------------------------------------------------------------------------


def _step_flops(queue_size, b, diagnostic):
    torch.manual_seed(0)
    model = _moco(queue_size=queue_size)
    if not diagnostic:
        model.log_instance_accuracy = lambda *args: None
    x = torch.randn(b, 3, 32, 32)
    with FlopCounterMode(display=False) as counter:
        model.contrast(x, x.clone()).backward()
    return counter.get_total_flops()


def test_a_training_step_costs_two_products_with_the_queue_and_the_logged_top1_a_third():
    b, d, small, large = 8, 128, 256, 1024
    per_key = (_step_flops(large, b, False) - _step_flops(small, b, False)) / (large - small)
    assert per_key == 2 * (2 * b * d)  # forward, and the backward for q only
    assert per_key != 3 * (2 * b * d)
    logged = (_step_flops(large, b, True) - _step_flops(small, b, True)) / (large - small)
    assert logged - per_key == 2 * b * d
    # A queue that kept its gradient would cost the third product inside training.
    for queue_grad, products in ((False, 2), (True, 3)):
        counts = []
        for k in (small, large):
            q = torch.randn(b, d, requires_grad=True)
            queue = torch.randn(k, d, requires_grad=queue_grad)
            with FlopCounterMode(display=False) as counter:
                info_nce(q, torch.randn(b, d), queue, 0.1).backward()
            counts.append(counter.get_total_flops())
        assert (counts[1] - counts[0]) / (large - small) == products * 2 * b * d


# ----------------------------------------------------------------------------------------------------------
# 7. The run checks of the chapter, with their controls
# ----------------------------------------------------------------------------------------------------------


def _distance_after(momentum, steps=30, convention="package"):
    """encoder_distance after `steps` random moves of the query encoder, each followed by the EMA."""
    model = _moco(momentum=momentum)
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        with torch.no_grad():
            for p in model._query_parameters():
                p.add_(0.01 * torch.randn(p.shape, generator=gen))
            if convention == "package":
                model.on_step_end(step, steps)
            else:  # theta_k <- (1 - m) theta_k + m theta_q, m read as the weight of the new value
                for pk, pq in zip(model.key_encoder.parameters(), model._query_parameters()):
                    pk.mul_(1 - momentum).add_(momentum * pq)
    return model.epoch_metrics()["encoder_distance"]


def test_the_encoder_distance_grows_with_m_and_the_other_convention_fails_the_chapters_check():
    def chapter_check(distance):  # the assertions of the chapter's run cell
        return distance(0.0) < 1e-6 and distance(0.9) < distance(0.99) < distance(0.999)

    assert chapter_check(_distance_after)
    assert not chapter_check(lambda m: _distance_after(m, convention="other"))


def test_a_query_whose_positive_ties_the_queue_scores_zero_instance_accuracy():
    # The MoCo v2 chapter checks instance_accuracy > 1 / (K + 1), chance for a random encoder.
    model = _moco(queue_size=64)
    k = F.normalize(torch.ones(4, 128), dim=1)
    model.log_instance_accuracy(k, k, k[:1].expand(64, -1))  # collapsed: every key the same
    assert not model.epoch_metrics()["instance_accuracy"] > 1 / 65
    gen = torch.Generator().manual_seed(2)
    q = F.normalize(torch.randn(4, 128, generator=gen), dim=1)
    queue = F.normalize(torch.randn(64, 128, generator=gen), dim=1)
    model.log_instance_accuracy(q, q, queue)  # the positive is the query itself: it beats the queue
    assert model.epoch_metrics()["instance_accuracy"] == 1.0


def test_shuffling_leaves_a_query_and_its_key_sharing_about_one_over_g_of_their_bn_group():
    torch.manual_seed(0)
    b, n, trials = 64, 8, 400
    query_group = torch.arange(b) // n
    per_trial = []
    for _ in range(trials):
        shuffled, unshuffle = batch_shuffle(torch.arange(b))
        members = query_group[shuffled].view(b // n, n)
        shared = (members[unshuffle // n] == query_group[:, None]).sum(1)
        per_trial.append(shared.double().mean().item())
    per_trial = torch.tensor(per_trial, dtype=torch.float64)
    mean, se = per_trial.mean().item(), per_trial.std().item() / math.sqrt(trials)
    assert abs(mean - (1 + (n - 1) ** 2 / (b - 1))) < 4 * se
    assert abs(mean - (n - 1) ** 2 / (b - 1)) > 20 * se  # the key's own image left out
    assert abs(mean - n**2 / b) > 4 * se  # a group drawn independently of the image
