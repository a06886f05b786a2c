"""Bad inputs are refused with a message that names them; good inputs of any scale give finite results.

Every loss in `contrastive.losses` is called with mismatched shapes, an empty batch, a bad
temperature and NaN or infinite entries; every name lookup and the command line with names and
arguments that do not exist. The property tests then check, over many random inputs, what the
math promises: finite losses and gradients, scale invariance where a loss normalises, symmetries.
"""

import inspect
import itertools
import re
import subprocess
import sys
import urllib.error
import urllib.request

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from contrastive import losses
from contrastive.__main__ import main
from contrastive.losses import NonFiniteInputError
from contrastive.methods import METHODS, build_method
from contrastive.models import BACKBONES, build_backbone
from contrastive.profiles import PROFILES, get_profile
from contrastive.train import train


def _x(*shape, seed=0, dtype=torch.float32):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _valid(name: str) -> dict:
    """Arguments on which loss `name` is well defined."""
    return {
        "triplet_loss": lambda: dict(anchor=_x(4, 3), positive=_x(4, 3, seed=1), negative=_x(4, 3, seed=2)),
        "smooth_max": lambda: dict(scores=_x(4, 5), temperature=0.5),
        "nt_xent": lambda: dict(z1=_x(4, 3), z2=_x(4, 3, seed=1), temperature=0.5),
        "nce_loss": lambda: dict(
            positive_sim=_x(4), noise_sim=_x(4, 7, seed=1), temperature=0.5, normaliser=3.0, num_data=100
        ),
        "info_nce": lambda: dict(
            query=_x(4, 3), positive=_x(4, 3, seed=1), negatives=_x(6, 3, seed=2), temperature=0.5
        ),
        "multiview_info_nce": lambda: dict(views=[_x(4, 3), _x(4, 3, seed=1)], temperature=0.5),
        "invaspread_loss": lambda: dict(f=_x(4, 3), f_hat=_x(4, 3, seed=1), temperature=0.5),
        "negative_cosine": lambda: dict(p=_x(4, 3), z=_x(4, 3, seed=1)),
        "mocov3_loss": lambda: dict(q=_x(4, 3), k=_x(4, 3, seed=1), temperature=0.2),
        "dino_loss": lambda: dict(
            student_logits=_x(4, 5),
            teacher_logits=_x(4, 5, seed=1),
            center=_x(5, seed=2),
            student_temp=0.1,
            teacher_temp=0.04,
        ),
        "clip_loss": lambda: dict(image_emb=_x(4, 3), text_emb=_x(4, 3, seed=1), logit_scale=14.0),
    }[name]()


LOSSES = [
    "triplet_loss",
    "smooth_max",
    "nt_xent",
    "nce_loss",
    "info_nce",
    "multiview_info_nce",
    "invaspread_loss",
    "negative_cosine",
    "mocov3_loss",
    "dino_loss",
    "clip_loss",
]
WITH_TEMPERATURE = [name for name in LOSSES if "temperature" in _valid(name)]
TENSOR_ARGUMENTS = [
    (name, arg)
    for name in LOSSES
    for arg, value in _valid(name).items()
    for arg in ([f"views[{i}]" for i in range(len(value))] if arg == "views" else [arg])
    if arg.startswith("views[") or isinstance(value, torch.Tensor)
]


def _call(name: str, kwargs: dict):
    return getattr(losses, name)(**kwargs)


def test_every_public_loss_is_covered():
    public = {
        name
        for name, f in inspect.getmembers(losses, inspect.isfunction)
        if f.__module__ == losses.__name__ and not name.startswith("_")
    }
    assert public == set(LOSSES)


@pytest.mark.parametrize("name", LOSSES)
def test_the_valid_arguments_give_a_finite_loss(name):
    loss = _call(name, _valid(name))
    assert loss.shape == ((4,) if name == "smooth_max" else ())  # smooth_max reduces the last dim only
    assert torch.isfinite(loss).all()


# ---- shapes and empty batches -------------------------------------------------------------

SHAPE_CASES = [
    (
        "triplet_loss",
        dict(positive=_x(5, 3)),
        r"anchor, positive and negative .*anchor \(4, 3\), "
        r"positive \(5, 3\), negative \(4, 3\)",
    ),
    (
        "triplet_loss",
        dict(anchor=_x(4, 3, 1), positive=_x(4, 3, 1), negative=_x(4, 3, 1)),
        r"anchor \(4, 3, 1\)",
    ),
    ("nt_xent", dict(z2=_x(5, 3)), r"z1 and z2 .*z1 \(4, 3\), z2 \(5, 3\)"),
    ("nt_xent", dict(z1=_x(4), z2=_x(4)), r"z1 and z2 .*\(N, D\).*z1 \(4,\)"),
    ("nce_loss", dict(noise_sim=_x(5, 7)), r"positive_sim .*noise_sim .*\(4,\) and \(5, 7\)"),
    ("nce_loss", dict(positive_sim=_x(4, 1)), r"positive_sim .*\(4, 1\) and \(4, 7\)"),
    ("info_nce", dict(positive=_x(5, 3)), r"query and positive .*query \(4, 3\), positive \(5, 3\)"),
    ("info_nce", dict(negatives=_x(6, 4)), r"negatives must be \(K, 3\); got \(6, 4\)"),
    ("info_nce", dict(negatives=_x(3)), r"negatives must be \(K, 3\); got \(3,\)"),
    ("multiview_info_nce", dict(views=[_x(4, 3), _x(4, 5)]), r"every view .*\[\(4, 3\), \(4, 5\)\]"),
    ("multiview_info_nce", dict(views=[_x(4, 3)]), r"at least two views, got 1"),
    ("invaspread_loss", dict(f_hat=_x(5, 3)), r"f and f_hat .*f \(4, 3\), f_hat \(5, 3\)"),
    ("negative_cosine", dict(z=_x(4, 5)), r"p and z .*p \(4, 3\), z \(4, 5\)"),
    ("mocov3_loss", dict(k=_x(5, 3)), r"q and k .*q \(4, 3\), k \(5, 3\)"),
    (
        "dino_loss",
        dict(teacher_logits=_x(4, 6)),
        r"student_logits and teacher_logits .*student_logits \(4, 5\), teacher_logits \(4, 6\)",
    ),
    ("dino_loss", dict(center=_x(4)), r"center must be \(5,\) or \(1, 5\), one entry per output; got \(4,\)"),
    ("dino_loss", dict(center=_x(4, 5)), r"center must be \(5,\) or \(1, 5\).*got \(4, 5\)"),
    ("clip_loss", dict(text_emb=_x(5, 3)), r"image_emb and text_emb .*image_emb \(4, 3\), text_emb \(5, 3\)"),
]

EMPTY_CASES = [
    ("triplet_loss", dict(anchor=_x(0, 3), positive=_x(0, 3), negative=_x(0, 3)), r"non-empty.*\(0, 3\)"),
    ("smooth_max", dict(scores=_x(4, 0)), r"scores must have at least one entry .*\(4, 0\)"),
    ("nt_xent", dict(z1=_x(0, 3), z2=_x(0, 3)), r"z1 and z2 .*non-empty.*z1 \(0, 3\)"),
    ("nce_loss", dict(positive_sim=_x(0), noise_sim=_x(0, 7)), r"B > 0; got \(0,\) and \(0, 7\)"),
    ("info_nce", dict(query=_x(0, 3), positive=_x(0, 3)), r"query and positive .*non-empty.*\(0, 3\)"),
    ("multiview_info_nce", dict(views=[_x(0, 3), _x(0, 3)]), r"non-empty.*\(0, 3\)"),
    ("invaspread_loss", dict(f=_x(0, 3), f_hat=_x(0, 3)), r"f and f_hat .*non-empty.*\(0, 3\)"),
    ("negative_cosine", dict(p=_x(0, 3), z=_x(0, 3)), r"p and z .*non-empty.*\(0, 3\)"),
    ("mocov3_loss", dict(q=_x(0, 3), k=_x(0, 3)), r"q and k .*non-empty.*\(0, 3\)"),
    (
        "dino_loss",
        dict(student_logits=_x(0, 5), teacher_logits=_x(0, 5)),
        r"student_logits and teacher_logits .*non-empty.*\(0, 5\)",
    ),
    (
        "clip_loss",
        dict(image_emb=_x(0, 3), text_emb=_x(0, 3)),
        r"image_emb and text_emb .*non-empty.*\(0, 3\)",
    ),
]


@pytest.mark.parametrize("name, changes, message", SHAPE_CASES + EMPTY_CASES)
def test_mismatched_shapes_and_empty_batches_are_refused_naming_the_arguments_and_shapes(
    name, changes, message
):
    with pytest.raises(ValueError, match=message):
        _call(name, {**_valid(name), **changes})


def test_every_loss_refuses_an_empty_batch():
    assert {name for name, _, _ in EMPTY_CASES} == set(LOSSES)


@pytest.mark.parametrize("name", WITH_TEMPERATURE)
@pytest.mark.parametrize("temperature", [0.0, -0.5, 1e-9, float("nan"), float("inf")])
def test_a_temperature_that_is_not_positive_and_finite_is_refused(name, temperature):
    with pytest.raises(ValueError, match=r"temperature must be positive and finite \(got "):
        _call(name, {**_valid(name), "temperature": temperature})


@pytest.mark.parametrize("argument", ["student_temp", "teacher_temp"])
@pytest.mark.parametrize("temperature", [0.0, -0.5, 1e-9, float("nan"), float("inf")])
def test_dino_loss_refuses_either_temperature_unless_positive_and_finite_naming_which(argument, temperature):
    with pytest.raises(ValueError, match=rf"{argument} must be positive and finite \(got "):
        _call("dino_loss", {**_valid("dino_loss"), argument: temperature})


@pytest.mark.parametrize(
    "changes, message",
    [
        (dict(normaliser=0.0), "normaliser must be positive and finite; got 0.0"),
        (dict(normaliser=-2.0), "normaliser must be positive and finite; got -2.0"),
        (dict(normaliser=float("inf")), "normaliser must be positive and finite; got inf"),
        (dict(normaliser=torch.tensor(float("nan"))), "normaliser must be positive and finite"),
        (dict(num_data=0), "num_data must be positive; got 0"),
    ],
)
def test_nce_loss_refuses_a_normaliser_or_data_size_that_is_not_positive(changes, message):
    with pytest.raises(ValueError, match=message):
        _call("nce_loss", {**_valid("nce_loss"), **changes})


# ---- NaN and infinite entries -------------------------------------------------------------


def _poison(kwargs: dict, arg: str, value: float) -> tuple[dict, tuple]:
    """`kwargs` with two entries of tensor `arg` set to `value`; also the tensor's shape."""
    if arg.startswith("views["):
        views = list(kwargs["views"])
        i = int(arg[len("views[") : -1])
        views[i] = views[i].clone()
        views[i].view(-1)[:2] = value
        return {**kwargs, "views": views}, tuple(views[i].shape)
    bad = kwargs[arg].clone()
    bad.view(-1)[:2] = value
    return {**kwargs, arg: bad}, tuple(bad.shape)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("name, arg", TENSOR_ARGUMENTS, ids=[f"{n}-{a}" for n, a in TENSOR_ARGUMENTS])
def test_nan_or_infinite_entries_are_refused_naming_the_argument_its_shape_and_the_count(name, arg, value):
    kwargs, shape = _poison(_valid(name), arg, value)
    expected = f"{arg} {shape} has 2 non-finite (NaN or infinite) entries of {torch.Size(shape).numel()}"
    with pytest.raises(NonFiniteInputError, match=re.escape(expected)):
        _call(name, kwargs)


def test_every_tensor_argument_is_checked_for_non_finite_entries():
    assert {name for name, _ in TENSOR_ARGUMENTS} == set(LOSSES)
    assert len(TENSOR_ARGUMENTS) == 3 + 1 + 2 + 2 + 3 + 2 + 2 + 2 + 2 + 3 + 2
    assert issubclass(NonFiniteInputError, ValueError)  # callers catching ValueError still see it


# ---- unknown names ------------------------------------------------------------------------


def test_an_unknown_method_profile_or_backbone_name_is_refused_listing_every_valid_one():
    lookups = [
        (lambda: build_method("simclrr", "convnet_tiny", 10), "'simclrr'", METHODS),
        (lambda: get_profile("laptop"), "'laptop'", PROFILES),
        (lambda: build_backbone("resnet19"), "'resnet19'", BACKBONES),
    ]
    for lookup, named, valid in lookups:
        with pytest.raises(ValueError) as err:
            lookup()
        assert named in str(err.value)
        assert all(name in str(err.value) for name in valid), str(err.value)


def test_an_unknown_method_option_is_refused_listing_the_valid_ones():
    with pytest.raises(ValueError, match="simclr has no option 'tau'; its options are .*temperature"):
        build_method("simclr", "convnet_tiny", 10, tau=0.1)


# ---- the command line ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, message",
    [
        ([], "the following arguments are required: command"),
        (["fit"], "invalid choice: 'fit'"),
        (["train", "--method", "simclr", "--bogus"], "unrecognized arguments: --bogus"),
        (["train", "--method", "simclr", "--epochs", "abc"], "argument --epochs: invalid int value: 'abc'"),
        (["train", "--method", "simclr", "--seed", "1.5"], "argument --seed: invalid int value: '1.5'"),
        (["train", "--method", "simclr", "--option", "views"], "expected KEY=VALUE, got 'views'"),
        (["train", "--method", "simclr", "--option", "1x=2"], "expected KEY=VALUE, got '1x=2'"),
        (["train", "--method", "simclr", "--profile", "laptop"], "invalid choice: 'laptop'.*smoke.*cpu.*gpu"),
        (["train", "--profile", "smoke"], "the following arguments are required: --method"),
        (["eval"], "the following arguments are required: --out"),
        (["bench", "memory"], "invalid choice: 'memory'"),
    ],
    ids=[
        "no-command",
        "unknown-command",
        "unknown-flag",
        "epochs-abc",
        "seed-float",
        "option-no-equals",
        "option-bad-key",
        "unknown-profile",
        "no-method",
        "eval-no-out",
        "bench-unknown",
    ],
)
def test_command_line_misuse_prints_usage_on_stderr_and_exits_with_2(argv, message, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    out, err = capsys.readouterr()
    assert out == "" and "usage: python -m contrastive" in err
    assert re.search(message, err), err


def test_command_line_misuse_exits_the_process_with_2():
    done = subprocess.run(
        [sys.executable, "-m", "contrastive", "train", "--method", "simclr", "--epochs", "abc"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 2 and done.stdout == ""
    assert "usage: python -m contrastive" in done.stderr and "invalid int value: 'abc'" in done.stderr


@pytest.fixture
def no_network(monkeypatch, tmp_path):
    """An empty data folder and a network that refuses every download."""

    def refuse(*args, **kwargs):
        raise urllib.error.URLError("no network in this test")

    monkeypatch.setattr(urllib.request, "urlopen", refuse)
    monkeypatch.setenv("CONTRASTIVE_DATA", str(tmp_path / "data"))
    monkeypatch.setenv("CONTRASTIVE_PROGRESS", "0")


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            ["train", "--method", "simclr", "--profile", "smoke", "--option", "tau=0.1"],
            "error: simclr has no option 'tau'; its options are .*temperature",
        ),
        (
            ["train", "--method", "moco", "--profile", "smoke", "--option", "queue=5"],
            "error: moco has no option 'queue'; its options are .*queue_size",
        ),
        (["eval", "--out", "{tmp}/missing"], "error: no checkpoint .* in {tmp}/missing"),
        (
            ["train", "--method", "simclr", "--profile", "smoke", "--out", "{tmp}/run"],
            "error: {tmp}/run already holds a run: pass resume=True",
        ),
    ],
    ids=["simclr-option", "moco-option", "eval-missing", "existing-run"],
)
def test_command_line_input_errors_print_one_error_line_and_return_2_before_loading_data(
    argv, message, tmp_path, no_network, capsys
):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "checkpoint_0001.pt").write_bytes(b"a run is here")
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert re.match(message.replace("{tmp}", re.escape(str(tmp_path))), err), err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "data").exists()  # refused before looking for the data


# ---- properties ---------------------------------------------------------------------------


def _random_inputs(name, n, d, scale, temperature, seed, dtype=torch.float32):
    """Arguments of loss `name` with standard normal entries times `scale`, as leaves requiring grad."""
    gen = torch.Generator().manual_seed(seed)

    def r(*shape):
        return (torch.randn(*shape, generator=gen, dtype=dtype) * scale).requires_grad_()

    return {
        "triplet_loss": lambda: dict(anchor=r(n, d), positive=r(n, d), negative=r(n, d)),
        "smooth_max": lambda: dict(scores=r(n, d), temperature=temperature),
        "nt_xent": lambda: dict(z1=r(n, d), z2=r(n, d), temperature=temperature),
        "nce_loss": lambda: dict(
            positive_sim=r(n),
            noise_sim=r(n, d),
            temperature=temperature,
            normaliser=float(n * d),
            num_data=10 * n,
        ),
        "info_nce": lambda: dict(
            query=r(n, d), positive=r(n, d), negatives=r(2 * n, d), temperature=temperature
        ),
        "multiview_info_nce": lambda: dict(views=[r(n, d), r(n, d), r(n, d)], temperature=temperature),
        "invaspread_loss": lambda: dict(f=r(n, d), f_hat=r(n, d), temperature=temperature),
        "negative_cosine": lambda: dict(p=r(n, d), z=r(n, d)),
        "mocov3_loss": lambda: dict(q=r(n, d), k=r(n, d), temperature=temperature),
        "dino_loss": lambda: dict(
            student_logits=r(n, d),
            teacher_logits=r(n, d),
            center=r(d),
            student_temp=temperature,
            teacher_temp=temperature / 2,
        ),
        "clip_loss": lambda: dict(image_emb=r(n, d), text_emb=r(n, d), logit_scale=1 / temperature),
    }[name]()


def _leaves(kwargs):
    return [v for v in kwargs.get("views", []) + list(kwargs.values()) if isinstance(v, torch.Tensor)]


SIZES = dict(n=st.integers(2, 6), d=st.integers(2, 8), seed=st.integers(0, 10_000))
SCALE = st.floats(-3, 3).map(lambda e: 10.0**e)
TEMPERATURE = st.floats(0.05, 1.0)


@pytest.mark.parametrize("name", LOSSES)
@settings(max_examples=25, deadline=None)
@given(scale=SCALE, temperature=TEMPERATURE, **SIZES)
def test_finite_inputs_of_any_magnitude_give_a_finite_loss_and_finite_gradients(
    name, n, d, seed, scale, temperature
):
    kwargs = _random_inputs(name, n, d, scale, temperature, seed)
    loss = _call(name, kwargs)
    assert torch.isfinite(loss).all(), (name, scale, loss)
    loss.sum().backward()
    for leaf in _leaves(kwargs):
        assert leaf.grad is not None and torch.isfinite(leaf.grad).all(), (name, scale)


def _row_scales(gen, n, dtype=torch.float64):
    """A positive scale per row, from 1e-3 to 1e3."""
    return 10.0 ** (torch.rand(n, 1, generator=gen, dtype=dtype) * 6 - 3)


@pytest.mark.parametrize(
    "name",
    ["nt_xent", "multiview_info_nce", "invaspread_loss", "negative_cosine", "mocov3_loss", "clip_loss"],
)
@settings(max_examples=25, deadline=None)
@given(temperature=TEMPERATURE, **SIZES)
def test_losses_that_normalise_are_invariant_to_the_scale_of_each_row(name, n, d, seed, temperature):
    kwargs = _random_inputs(name, n, d, 1.0, temperature, seed, dtype=torch.float64)
    gen = torch.Generator().manual_seed(seed + 1)
    scaled = {
        k: v.detach() * _row_scales(gen, n) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()
    }
    if "views" in kwargs:
        scaled["views"] = [v.detach() * _row_scales(gen, n) for v in kwargs["views"]]
    assert torch.allclose(_call(name, kwargs).double(), _call(name, scaled).double(), rtol=1e-5, atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(scale=SCALE, temperature=TEMPERATURE, **SIZES)
def test_info_nce_does_not_normalise_scaling_the_query_divides_the_temperature(
    n, d, seed, scale, temperature
):
    kwargs = _random_inputs("info_nce", n, d, 1.0, temperature, seed, dtype=torch.float64)
    scaled = {**kwargs, "query": kwargs["query"] * scale}
    cooler = {**kwargs, "temperature": temperature / scale}
    assert torch.allclose(losses.info_nce(**scaled), losses.info_nce(**cooler), rtol=1e-5, atol=1e-6)


def test_info_nce_is_not_invariant_to_the_scale_of_the_query():
    q, k, negatives = _x(4, 3), _x(4, 3, seed=1), _x(6, 3, seed=2)
    assert abs(losses.info_nce(q, k, negatives, 0.5) - losses.info_nce(3 * q, k, negatives, 0.5)) > 0.1


@settings(max_examples=25, deadline=None)
@given(temperature=TEMPERATURE, **SIZES)
def test_nt_xent_and_two_view_multiview_info_nce_are_symmetric_in_the_two_views(n, d, seed, temperature):
    a, b = (
        t.detach()
        for t in _random_inputs("nt_xent", n, d, 1.0, temperature, seed).values()
        if isinstance(t, torch.Tensor)
    )
    assert torch.allclose(losses.nt_xent(a, b, temperature), losses.nt_xent(b, a, temperature), atol=1e-6)
    for graph in ("core", "full"):
        forward = losses.multiview_info_nce([a, b], temperature, graph=graph)
        assert torch.allclose(forward, losses.multiview_info_nce([b, a], temperature, graph=graph), atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(temperature=TEMPERATURE, **SIZES)
def test_multiview_info_nce_over_the_full_graph_ignores_the_order_of_the_views(n, d, seed, temperature):
    views = [v.detach() for v in _random_inputs("multiview_info_nce", n, d, 1.0, temperature, seed)["views"]]
    values = [losses.multiview_info_nce(list(p), temperature) for p in itertools.permutations(views)]
    assert all(torch.allclose(values[0], v, atol=1e-5) for v in values[1:])


@pytest.mark.parametrize("name", [name for name in LOSSES if name != "smooth_max"])
@settings(max_examples=25, deadline=None)
@given(temperature=TEMPERATURE, **SIZES)
def test_losses_averaged_over_the_batch_ignore_the_order_of_its_rows(name, n, d, seed, temperature):
    inputs = _random_inputs(name, n, d, 1.0, temperature, seed, torch.float64)
    kwargs = {k: v.detach() if isinstance(v, torch.Tensor) else v for k, v in inputs.items()}
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    # the same permutation for every per-image argument; what the batch shares (negatives, center) stays
    shuffled = {
        k: v[perm] if isinstance(v, torch.Tensor) and k not in ("negatives", "center") else v
        for k, v in kwargs.items()
    }
    if "views" in kwargs:
        shuffled["views"] = [v.detach()[perm] for v in kwargs["views"]]
    assert torch.allclose(_call(name, kwargs).double(), _call(name, shuffled).double(), atol=1e-5)


@settings(max_examples=25, deadline=None)
@given(shift=st.floats(-1e3, 1e3), temperature=TEMPERATURE, **SIZES)
def test_smooth_max_moves_with_a_constant_shift_of_the_scores(n, d, seed, shift, temperature):
    s = _x(n, d, seed=seed, dtype=torch.float64)
    shifted = losses.smooth_max(s + shift, temperature)
    assert torch.allclose(shifted, losses.smooth_max(s, temperature) + shift, atol=1e-9 * (1 + abs(shift)))


def test_a_profile_with_an_unknown_backbone_or_no_epochs_is_refused_before_any_data_is_loaded():
    with pytest.raises(ValueError, match=r"unknown backbone 'resnet81'.*convnet_small"):
        get_profile("smoke", backbone="resnet81")
    with pytest.raises(ValueError, match="epochs must be at least 1, got 0"):
        get_profile("smoke", epochs=0)
    with pytest.raises(ValueError, match="epochs must be at least 1, got -2"):
        train("simclr", "smoke", epochs=-2, data=None, progress=False, log=lambda *_: None)


def test_sync_bn_is_refused_on_cpus_and_for_moco_before_any_data_is_loaded(capsys):
    quiet = dict(data=None, progress=False, log=lambda *_: None)
    with pytest.raises(ValueError, match="shuffled BN"):
        train("moco", "smoke", sync_bn=True, **quiet)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="sync_bn needs CUDA"):
            train("simclr", "smoke", sync_bn=True, **quiet)
        assert main(["train", "--method", "simclr", "--profile", "smoke", "--sync-bn"]) == 2
        assert "error: sync_bn needs CUDA" in capsys.readouterr().err
