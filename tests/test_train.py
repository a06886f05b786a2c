import dataclasses
import json
import math

import pytest
import torch
from conftest import CONTRACT_KEYS

import contrastive.losses as losses_module
import contrastive.train as train_module
from contrastive.augment import SIMCLR_CIFAR
from contrastive.methods.simclr import SimCLR
from contrastive.runinfo import atomic_write_bytes
from contrastive.train import NonFiniteLossError, evaluate_checkpoint, load_checkpoint, lr_at, train


def _weights(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _without_timing(metrics):
    return [{k: v for k, v in m.items() if k not in ("seconds", "images_per_second")} for m in metrics]


def test_training_writes_metrics_checkpoints_and_a_summary_with_the_contract_keys(
    tmp_path, tiny_data, tiny_profile
):
    run = train("simclr", tiny_profile, out_dir=tmp_path, data=tiny_data, progress=False, log=lambda *_: None)
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert CONTRACT_KEYS <= set(summary)
    assert summary["method"] == "simclr" and summary["epochs"] == 2 and summary["profile"] == "smoke"
    assert 0 <= summary["knn_top1"] <= 1 and 0 <= summary["knn_top1_random_init"] <= 1
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    assert all(math.isfinite(json.loads(line)["loss"]) for line in lines)
    assert sorted(p.name for p in tmp_path.glob("checkpoint_*.pt")) == [
        "checkpoint_0001.pt",
        "checkpoint_0002.pt",
    ]
    assert not list(tmp_path.glob(".*tmp*"))  # no temporary file left behind
    ckpt = torch.load(tmp_path / "checkpoint_0002.pt", weights_only=True)
    assert ckpt["epoch"] == 2 and ckpt["step"] == 8
    assert run.summary["knn_top1"] == summary["knn_top1"]


def test_training_learns_on_data_with_structure(tiny_data, tiny_profile):
    """Colour-coded classes: the loss falls, and the trained encoder's kNN beats chance."""
    run = train("simclr", tiny_profile, data=tiny_data, epochs=4, progress=False, log=lambda *_: None)
    assert run.metrics[-1]["loss"] < run.metrics[0]["loss"]
    assert run.summary["knn_top1"] > 0.3


def test_same_seed_gives_identical_weights_and_metrics_on_cpu(tiny_data, tiny_profile):
    quiet = dict(data=tiny_data, progress=False, log=lambda *_: None, linear_probe=False)
    runs = [train("simclr", tiny_profile, seed=3, **quiet) for _ in range(2)]
    assert _same_weights(runs[0].method.state_dict(), runs[1].method.state_dict())
    assert _without_timing(runs[0].metrics) == _without_timing(runs[1].metrics)
    other = train(
        "simclr",
        tiny_profile,
        data=tiny_data,
        seed=4,
        progress=False,
        log=lambda *_: None,
        linear_probe=False,
    )
    assert not _same_weights(runs[0].method.state_dict(), other.method.state_dict())


def test_a_run_interrupted_mid_epoch_and_resumed_matches_an_uninterrupted_run(
    tmp_path, tiny_data, tiny_profile, monkeypatch
):
    profile = tiny_profile.__class__(**{**tiny_profile.__dict__, "epochs": 3})
    quiet = dict(data=tiny_data, progress=False, log=lambda *_: None, linear_probe=False)
    full = train("simclr", profile, out_dir=tmp_path / "full", **quiet)

    real_lr_at = train_module.lr_at

    def interrupt_in_epoch_three(step, *args):
        if step == 9:  # 4 steps per epoch: the second step of epoch 3
            raise KeyboardInterrupt
        return real_lr_at(step, *args)

    monkeypatch.setattr(train_module, "lr_at", interrupt_in_epoch_three)
    said = []
    with pytest.raises(KeyboardInterrupt):
        train("simclr", profile, out_dir=tmp_path / "resumed", **{**quiet, "log": said.append})
    assert "interrupted during epoch 3" in said[-1] and "checkpoint_0002.pt" in said[-1]
    monkeypatch.setattr(train_module, "lr_at", real_lr_at)
    assert len((tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()) == 2

    resumed = train("simclr", profile, out_dir=tmp_path / "resumed", resume=True, **quiet)
    assert _same_weights(full.method.state_dict(), resumed.method.state_dict())
    assert _without_timing(full.metrics) == _without_timing(resumed.metrics)
    assert resumed.summary["knn_top1"] == full.summary["knn_top1"]


def test_a_nan_loss_stops_with_the_step_named_and_the_last_checkpoint_intact(
    tmp_path, tiny_data, tiny_profile, monkeypatch
):
    real_forward, calls = SimCLR.forward, []

    def nan_in_epoch_two(self, images, indices=None):
        calls.append(1)
        loss = real_forward(self, images, indices)
        return loss * float("nan") if len(calls) == 6 else loss

    monkeypatch.setattr(SimCLR, "forward", nan_in_epoch_two)
    with pytest.raises(NonFiniteLossError, match=r"nan at epoch 2, step 2 \(global step 6\)") as err:
        train("simclr", tiny_profile, out_dir=tmp_path, data=tiny_data, progress=False, log=lambda *_: None)
    assert "checkpoint_0001.pt is intact" in str(err.value)
    ckpt, path = load_checkpoint(tmp_path, "cpu")
    assert path.name == "checkpoint_0001.pt" and ckpt["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_a_nan_loss_read_only_every_few_steps_as_on_a_gpu_still_names_the_first_bad_step(
    tmp_path, tiny_data, tiny_profile, monkeypatch
):
    """The GPU path: the loss's finiteness is kept on the device and read every CHECK_EVERY steps; a NaN at
    global step 6 is found at step 7, named as step 6, and no checkpoint holds the weights it produced."""
    real_forward, calls = SimCLR.forward, []

    def nan_in_epoch_two(self, images, indices=None):
        calls.append(1)
        loss = real_forward(self, images, indices)
        return loss * float("nan") if len(calls) == 6 else loss

    monkeypatch.setattr(train_module, "CHECK_EVERY_CPU", 3)
    monkeypatch.setattr(losses_module, "_values_checked", lambda x: False)  # as on a GPU
    monkeypatch.setattr(SimCLR, "forward", nan_in_epoch_two)
    with pytest.raises(NonFiniteLossError, match=r"epoch 2, step 2 \(global step 6\)") as err:
        train("simclr", tiny_profile, out_dir=tmp_path, data=tiny_data, progress=False, log=lambda *_: None)
    assert "without saving the weights since" in str(err.value) and "checkpoint_0001.pt is intact" in str(
        err.value
    )
    assert len(calls) == 7  # read at the interval's end, one step later
    ckpt, path = load_checkpoint(tmp_path, "cpu")
    assert path.name == "checkpoint_0001.pt" and ckpt["epoch"] == 1


def test_a_corrupt_latest_checkpoint_is_named_and_the_previous_one_is_used(tmp_path, tiny_data, tiny_profile):
    quiet = dict(data=tiny_data, progress=False, log=lambda *_: None, linear_probe=False)
    train("simclr", tiny_profile, out_dir=tmp_path, **quiet)
    latest = tmp_path / "checkpoint_0002.pt"
    latest.write_bytes(latest.read_bytes()[:1000])  # truncated, as by a crash during a non-atomic write
    with pytest.warns(UserWarning, match="checkpoint_0002.pt is unreadable"):
        ckpt, path = load_checkpoint(tmp_path, "cpu")
    assert path.name == "checkpoint_0001.pt" and ckpt["epoch"] == 1
    with pytest.warns(UserWarning, match="unreadable"):
        run = train("simclr", tiny_profile, out_dir=tmp_path, resume=True, **quiet)
    assert [m["epoch"] for m in run.metrics] == [1, 2]


def test_an_existing_run_is_never_overwritten_and_resume_needs_a_checkpoint(
    tmp_path, tiny_data, tiny_profile
):
    quiet = dict(data=tiny_data, progress=False, log=lambda *_: None, linear_probe=False)
    train("simclr", tiny_profile, out_dir=tmp_path / "a", epochs=1, **quiet)
    with pytest.raises(FileExistsError, match="resume"):
        train("simclr", tiny_profile, out_dir=tmp_path / "a", epochs=1, **quiet)
    with pytest.raises(FileNotFoundError, match="no checkpoint"):
        train("simclr", tiny_profile, out_dir=tmp_path / "b", resume=True, **quiet)
    with pytest.raises(ValueError, match="cannot resume"):
        train("simclr", tiny_profile, out_dir=tmp_path / "a", epochs=1, seed=5, resume=True, **quiet)


def test_a_resume_with_another_recipe_or_any_other_option_is_refused_naming_the_option(
    tmp_path, tiny_data, tiny_profile
):
    """The checkpoint stores every option, a Recipe included; the old checkpoints dropped the recipe, so
    resuming with another one passed the option check silently and trained on a different augmentation."""
    quiet = dict(data=tiny_data, progress=False, log=lambda *_: None, linear_probe=False)
    mild = dataclasses.replace(SIMCLR_CIFAR, scale=(0.5, 1.0))
    train("simclr", tiny_profile, out_dir=tmp_path, epochs=1, method_options={"recipe": mild}, **quiet)
    assert load_checkpoint(tmp_path, "cpu")[0]["method_options"]["recipe"] == {
        "Recipe": dataclasses.asdict(mild)
    }
    for options, named in (
        ({}, "recipe"),
        ({"recipe": SIMCLR_CIFAR}, "recipe"),
        ({"recipe": mild, "temperature": 0.2}, "temperature"),
    ):
        with pytest.raises(
            ValueError, match=f"cannot resume .* other method options \\({named}: trained with"
        ):
            train(
                "simclr",
                tiny_profile,
                out_dir=tmp_path,
                epochs=2,
                resume=True,
                method_options=options,
                **quiet,
            )
    run = train(
        "simclr",
        tiny_profile,
        out_dir=tmp_path,
        epochs=2,
        resume=True,
        method_options={"recipe": mild},
        **quiet,
    )
    assert [m["epoch"] for m in run.metrics] == [1, 2] and run.summary["method_options"]["recipe"]["Recipe"][
        "scale"
    ] == (0.5, 1.0)
    assert (
        evaluate_checkpoint(tmp_path, data=tiny_data, linear_probe=False)["knn_top1"]
        == run.summary["knn_top1"]
    )


def test_an_option_a_checkpoint_cannot_store_is_refused_before_any_training(
    tmp_path, tiny_data, tiny_profile
):
    with pytest.raises(ValueError, match="option recipe=.* cannot be stored in a checkpoint"):
        train("simclr", tiny_profile, out_dir=tmp_path, data=tiny_data, method_options={"recipe": object()})
    assert not list(tmp_path.iterdir())


def test_evaluating_knn_between_epochs_changes_nothing_in_the_training(tiny_data, tiny_profile):
    """The protocol's kNN read-outs draw no random numbers: a run that evaluates after every epoch
    trains exactly as one that evaluates only at the end (the probe, which seeds, runs at the end)."""
    quiet = dict(data=tiny_data, progress=False, log=lambda *_: None, linear_probe=False)
    often = train("simclr", dataclasses.replace(tiny_profile, epochs=3, knn_every=1), **quiet)
    rarely = train("simclr", dataclasses.replace(tiny_profile, epochs=3, knn_every=100), **quiet)
    assert [m["loss"] for m in often.metrics] == [m["loss"] for m in rarely.metrics]
    assert "knn_top1" in often.metrics[0] and "knn_top1" not in rarely.metrics[0]
    assert often.summary["knn_top1"] == rarely.summary["knn_top1"]


def test_an_unknown_method_is_an_error_listing_the_valid_ones(tiny_data, tiny_profile):
    with pytest.raises(ValueError, match="choose one of .*simclr"):
        train("simclr2", tiny_profile, data=tiny_data, progress=False, log=lambda *_: None)


def test_learning_rate_warms_up_linearly_then_decays_by_a_cosine_to_zero():
    lrs = [lr_at(s, 100, 10, 0.5) for s in range(100)]
    assert lrs[:10] == pytest.approx([0.05 * (s + 1) for s in range(10)])
    assert max(lrs) == pytest.approx(0.5)
    assert all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    assert lrs[55] == pytest.approx(0.25, abs=0.01)  # halfway through the decay
    assert lr_at(100, 100, 10, 0.5) == pytest.approx(0.0)


def test_atomic_write_leaves_the_old_file_when_writing_fails(tmp_path):
    target = tmp_path / "file.bin"
    target.write_bytes(b"old")

    def failing(fh):
        fh.write(b"half")
        raise OSError("disk full")

    with pytest.raises(OSError):
        atomic_write_bytes(target, failing)
    assert target.read_bytes() == b"old"
    assert [p.name for p in tmp_path.iterdir()] == ["file.bin"]  # the partial temporary file is gone


class _WrapperWithoutTruth:
    """Like torch.compile's wrapper of a module without `__len__`: asking it for its truth raises."""

    def __init__(self, model):
        self.model, self.calls = model, 0

    def __len__(self):
        raise TypeError("this wrapper does not support len()")

    def __call__(self, images, indices):
        self.calls += 1
        return self.model(images, indices)


def test_train_step_runs_through_a_wrapper_that_has_no_truth_value():
    from conftest import random_images

    from contrastive.methods import build_method
    from contrastive.train import train_step

    torch.manual_seed(0)
    model = build_method("simclr", "convnet_tiny")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    runner = _WrapperWithoutTruth(model)
    images = random_images(8)
    loss = train_step(model, optimizer, images, torch.arange(8), 0.1, 0, 10, runner=runner)
    assert runner.calls == 1 and torch.isfinite(loss)


def test_what_torch_compile_would_specialise_on_runs_eagerly():
    """The per-call order of the colour jitter and the growing list of logged values would make
    torch.compile recompile on every new order or step; both are left out of the compiled graph."""
    from contrastive.augment import color_jitter
    from contrastive.methods.base import Method

    for fn in (color_jitter, Method.log):
        assert getattr(fn, "_torchdynamo_disable", False), fn.__qualname__


def test_a_resume_with_another_learning_rate_or_batch_size_is_refused_naming_it(
    tmp_path, tiny_data, tiny_profile
):
    quiet = dict(data=tiny_data, progress=False, log=lambda *_: None, linear_probe=False)
    train("simclr", tiny_profile, out_dir=tmp_path, epochs=1, **quiet)
    for field, value in (("lr", tiny_profile.lr * 2), ("batch_size", tiny_profile.batch_size // 2)):
        changed = dataclasses.replace(tiny_profile, **{field: value})
        with pytest.raises(ValueError, match=f"other training settings \\({field}: trained with"):
            train("simclr", changed, out_dir=tmp_path, epochs=2, resume=True, **quiet)


def test_the_command_line_sets_the_profile_fields_a_sweep_varies(tmp_path, monkeypatch):
    from contrastive import __main__ as cli

    seen = {}
    monkeypatch.setattr(train_module, "train", lambda method, profile, **kw: seen.setdefault("p", profile))
    with pytest.raises(AttributeError):  # the stand-in returns a profile, not a run: stop after the call
        cli.main(
            ["train", "--method", "simclr", "--profile", "cpu", "--lr", "0.3", "--batch-size", "128"]
            + ["--train-size", "5000", "--weight-decay", "1e-4", "--warmup-epochs", "0.5"]
        )
    p = seen["p"]
    assert (p.name, p.lr, p.batch_size, p.train_size, p.weight_decay, p.warmup_epochs) == (
        "cpu",
        0.3,
        128,
        5000,
        1e-4,
        0.5,
    )


class _TwoRates(torch.nn.Module):
    """A stand-in method with a body at the run's rate, a head at ten times it, and a constant-rate part."""

    lr_scale, adamw_weight_decay = 1.0, None

    def __init__(self, groups=None):
        super().__init__()
        self.body, self.head, self.pred = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)
        self._groups = groups

    def parameter_groups(self):
        if self._groups is not None:
            return self._groups
        return [
            {"params": list(self.body.parameters())},
            {"params": list(self.head.parameters()), "lr_scale": 10.0},
            {"params": list(self.pred.parameters()), "constant_lr": True},
        ]


def test_each_parameter_group_gets_its_rate_the_constant_one_keeps_the_peak_through_warmup_and_decay():
    model = _TwoRates()
    profile = dataclasses.replace(train_module.get_profile("smoke"), lr=0.4)
    optimizer, peak = train_module.build_optimizer(model, profile)
    assert peak == 0.4 and sum(len(g["params"]) for g in optimizer.param_groups) == 6

    def rate_of(module):
        (group,) = [g for g in optimizer.param_groups if g["params"][0] is module.weight]
        return group["lr"]

    for lr in (0.01, 0.4, 0.0):  # warm-up, peak, the end of the cosine
        train_module.set_lr(optimizer, lr)
        assert rate_of(model.body) == lr and rate_of(model.head) == pytest.approx(10 * lr)
        assert rate_of(model.pred) == 0.4  # constant: the peak at every step
    # control: without the groups every parameter follows the schedule
    plain, _ = train_module.build_optimizer(_TwoRates([{"params": list(_TwoRates().parameters())}]), profile)
    train_module.set_lr(plain, 0.01)
    assert {g["lr"] for g in plain.param_groups} == {0.01}


def test_a_parameter_group_with_an_unknown_key_is_refused_by_name():
    model = _TwoRates([{"params": list(_TwoRates().parameters()), "lr_mult": 2.0}])
    with pytest.raises(ValueError, match="lr_mult"):
        train_module.build_optimizer(model, train_module.get_profile("smoke"))


def test_simsiam_and_byol_put_their_predictor_in_its_own_group_only_when_asked():
    from contrastive.methods import build_method

    plain = build_method("simsiam", "convnet_tiny", 0)
    assert len(plain.parameter_groups()) == 1  # the paper's ablation settings: one rate for everything
    fast = build_method("simsiam", "convnet_tiny", 0, predictor_lr_scale=10.0, constant_predictor_lr=True)
    rest, head = fast.parameter_groups()
    assert (
        head["lr_scale"] == 10.0
        and head["constant_lr"]
        and len(head["params"]) == len(list(fast.predictor.parameters()))
    )
    assert len(build_method("byol", "convnet_tiny", 0).parameter_groups()) == 1  # default: as before
    byol = build_method("byol", "convnet_tiny", 0, predictor_lr_scale=10.0)
    trained = {id(p) for g in byol.parameter_groups() for p in g["params"]}
    assert trained.isdisjoint(id(p) for p in byol.target.parameters())  # the target gets no gradient step
    with pytest.raises(ValueError, match="predictor_lr_scale"):
        build_method("simsiam", "convnet_tiny", 0, predictor_lr_scale=0.0)


def test_a_method_trains_with_its_tuned_cpu_settings_unless_the_caller_fixes_them():
    from contrastive.methods import METHODS

    cpu = train_module.get_profile("cpu")
    profile, method_options, stored = train_module._checked("byol", cpu, None, None, False)
    assert (profile.batch_size, profile.lr, method_options) == (128, 1.0, {"predictor_lr_scale": 30.0})
    assert stored == {"predictor_lr_scale": 30.0}  # the checkpoint and summary record what was used
    # what a caller sets by name wins: a sweep's rate, an option given
    fixed = train_module.get_profile("cpu", lr=0.3)
    profile, method_options, _ = train_module._checked("byol", fixed, 4, {"predictor_lr_scale": 1.0}, False)
    assert (profile.batch_size, profile.lr, profile.epochs, method_options) == (
        128,
        0.3,
        4,
        {"predictor_lr_scale": 1.0},
    )
    # the other profiles keep their settings, and so does a method that tunes nothing (SimCLR)
    smoke = train_module.get_profile("smoke")
    assert train_module.tuned(METHODS["byol"], smoke) == (smoke, {})
    assert train_module.tuned(METHODS["simclr"], cpu) == (cpu, {})
    # control: without `fixed` the tuned rate would replace the caller's
    assert train_module.tuned(METHODS["byol"], dataclasses.replace(fixed, fixed=()))[0].lr == 1.0


def test_every_tuned_setting_names_a_profile_a_profile_field_and_an_option_of_its_method():
    from contrastive.methods import METHODS, method_options
    from contrastive.profiles import PROFILES, Profile

    fields = {f.name for f in dataclasses.fields(Profile)} - {"name", "fixed", "device", "backbone"}
    tuned = [name for name, cls in METHODS.items() if cls.tuned_settings or cls.tuned_options]
    assert {"byol", "simsiam"} <= set(tuned)
    for name in tuned:
        cls = METHODS[name]
        for profile, settings in cls.tuned_settings.items():
            assert profile in PROFILES and set(settings) <= fields, (name, settings)
        for profile, options in cls.tuned_options.items():
            assert profile in PROFILES and set(options) <= set(method_options(name)), (name, options)
