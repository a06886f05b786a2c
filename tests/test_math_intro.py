"""The Introduction's identities, re-checked outside the notebook."""

import sympy as sp


def sq(v):
    return (v.T * v)[0]


def test_triplet_gradients_in_the_active_region():
    a, p, n = (sp.Matrix(sp.symbols(f"{name}1:4", real=True)) for name in "apn")
    alpha = sp.Symbol("alpha", nonnegative=True)
    loss = sq(a - p) - sq(a - n) + alpha
    grad = lambda v: sp.Matrix([sp.diff(loss, vi) for vi in v])  # noqa: E731
    assert sp.simplify(grad(a) - 2 * (n - p)) == sp.zeros(3, 1)
    assert sp.simplify(grad(p) - 2 * (p - a)) == sp.zeros(3, 1)
    assert sp.simplify(grad(n) - 2 * (a - n)) == sp.zeros(3, 1)
    # a wrong claim is caught: the anchor gradient is not 2(p - n)
    assert sp.simplify(grad(a) - 2 * (p - n)) != sp.zeros(3, 1)


def test_squared_distance_on_the_unit_sphere_is_two_minus_twice_the_cosine():
    def on_sphere(theta, phi):
        return sp.Matrix([sp.sin(theta) * sp.cos(phi), sp.sin(theta) * sp.sin(phi), sp.cos(theta)])

    t = sp.symbols("t1:5", real=True)
    u, v = on_sphere(t[0], t[1]), on_sphere(t[2], t[3])
    assert sp.simplify(sq(u - v) - (2 - 2 * (u.T * v)[0])) == 0


def test_log_sum_exp_tends_to_the_maximum_and_softmax_to_one_hot():
    tau, u = sp.symbols("tau u", positive=True)
    s_max = sp.Symbol("s_max", real=True)
    gaps = sp.symbols("g1:4", positive=True)
    lse = tau * sp.log(sp.exp(s_max / tau) + sum(sp.exp((s_max - g) / tau) for g in gaps))
    rest = tau * sp.log(1 + sum(sp.exp(-g / tau) for g in gaps))
    assert sp.simplify(sp.exp((lse - s_max) / tau) - sp.exp(rest / tau)) == 0
    assert sp.limit(tau * sp.log(len(gaps) + 1), tau, 0, "+") == 0
    weight_max = 1 / (1 + sum(sp.exp(-g * u) for g in gaps))
    assert sp.limit(weight_max, u, sp.oo) == 1


def test_softplus_with_temperature_tends_to_the_hinge():
    tau, d = sp.symbols("tau d", positive=True)
    assert sp.limit(tau * sp.log(1 + sp.exp(d / tau)), tau, 0, "+") == d
    assert sp.limit(tau * sp.log(1 + sp.exp(-d / tau)), tau, 0, "+") == 0
