"""The MoCo chapter's statements (He et al. 2020): the momentum average, its window, the queue's cost, age."""

import sympy as sp
import torch

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
