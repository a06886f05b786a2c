"""The contract every registered method keeps with the training loop, tested once for all of them.

A method is a `Method`: its step returns a finite scalar loss that backpropagates, its hooks
run, it reads nothing back from its device during a step, an interrupted and resumed run is
bit-identical to an uninterrupted one, and `evaluate_checkpoint` rebuilds the same model.
"""

import inspect
import math
import sys
from pathlib import Path

import pytest
import torch

import contrastive.losses as losses_module
from contrastive.augment import SIMCLR_CIFAR, augment
from contrastive.losses import nt_xent
from contrastive.methods import METHODS, Method, Spec, build_method
from contrastive.methods import base as base_module
from contrastive.models import projection_mlp
from contrastive.train import evaluate_checkpoint, train

ALL = sorted(METHODS)


def _built(name: str, data) -> Method:
    torch.manual_seed(0)
    method = build_method(name, "convnet_tiny", len(data.train_images), data.train_images.shape[1])
    method.setup(data.train_images, data.train_labels, batch_size=100)
    return method.train()


@pytest.mark.parametrize("name", ALL)
def test_every_method_is_a_method_built_from_a_spec_with_what_the_loop_reads(name):
    cls = METHODS[name]
    assert issubclass(cls, Method)
    assert next(iter(inspect.signature(cls).parameters)) == "spec"
    method = cls(Spec("convnet_tiny", num_images=8))
    assert isinstance(method.encoder, torch.nn.Module) and method.encoder.out_dim > 0
    assert method.lr_scale > 0 and 0 < method.epoch_scale <= 1
    assert method.adamw_weight_decay is None or method.adamw_weight_decay >= 0
    assert isinstance(method.sync_bn_allowed, bool)
    assert not hasattr(method, "training_step")  # one name for the step: forward


@pytest.mark.parametrize("name", ALL)
def test_a_step_gives_a_finite_scalar_that_backpropagates_and_the_hooks_run(name, tiny_data):
    method = _built(name, tiny_data)
    indices = torch.arange(20)
    loss = method(tiny_data.train_images[indices], indices)
    assert loss.dim() == 0 and math.isfinite(loss.item())
    loss.backward()
    grads = [p.grad for p in method.parameters() if p.requires_grad]
    assert any(g is not None and g.abs().sum() > 0 for g in grads)
    method.on_step_end(0, 10)
    metrics = method.epoch_metrics()
    assert metrics and all(isinstance(v, (float, list)) for v in metrics.values()), metrics
    assert method.epoch_metrics().keys() <= metrics.keys()  # a fresh epoch keeps only the "now" values


# Reads the code makes on purpose: color_jitter's op order, drawn on the CPU whatever the images'
# device, and the text encoder's check of its tokens, which runs on CPU tensors only.
HOST_READS = {("augment.py", "color_jitter"), ("text.py", "forward")}
READS = ("item", "tolist", "__bool__", "__float__", "__int__")


@pytest.mark.parametrize("name", ALL)
def test_a_step_reads_nothing_back_from_the_device(name, tiny_data, monkeypatch):
    """No `.item()`, `.tolist()` or truth test of a tensor in the step, backward or `on_step_end`: on a
    GPU each would make the host wait for the device. The losses' checks of values are off, as on a GPU."""
    method = _built(name, tiny_data)
    indices = torch.arange(20)
    images = tiny_data.train_images[indices]
    reads = []

    def watched(attribute):
        real = getattr(torch.Tensor, attribute)

        def read(self, *args, **kwargs):
            caller = sys._getframe(1).f_code
            if (Path(caller.co_filename).name, caller.co_name) not in HOST_READS:
                reads.append(f"{attribute} in {caller.co_name} ({caller.co_filename})")
            return real(self, *args, **kwargs)

        return read

    monkeypatch.setattr(losses_module, "_values_checked", lambda x: False)
    for attribute in READS:
        monkeypatch.setattr(torch.Tensor, attribute, watched(attribute))
    for step in range(2):
        method(images, indices).backward()
        method.on_step_end(step, 10)
    monkeypatch.undo()
    assert reads == []
    assert method.epoch_metrics()  # the logged values are read here, once per epoch


@pytest.mark.slow
@pytest.mark.parametrize("name", ALL)
def test_an_interrupted_and_resumed_run_is_bit_identical_and_eval_rebuilds_the_model(
    name, tiny_data, tiny_profile, interrupted_and_resumed, tmp_path
):
    full, resumed = interrupted_and_resumed(name, tiny_profile, 5, data=tiny_data, linear_probe=False)
    timing = ("seconds", "images_per_second")
    assert [{k: v for k, v in row.items() if k not in timing} for row in resumed.metrics] == [
        {k: v for k, v in row.items() if k not in timing} for row in full.metrics
    ]
    for (key, a), b in zip(full.method.state_dict().items(), resumed.method.state_dict().values()):
        assert torch.equal(a, b), key
    again = evaluate_checkpoint(tmp_path / "resumed", data=tiny_data, linear_probe=False)
    assert again["method"] == name and again["epoch"] == tiny_profile.epochs
    assert again["knn_top1"] == full.summary["knn_top1"]


class TwoViews(Method):
    """The example of `methods/base.py`'s docstring, line for line: a new method in ten lines."""

    def __init__(self, spec: Spec, temperature: float = 0.5):
        super().__init__()
        self.backbone = spec.build_backbone()
        self.projector = projection_mlp(self.backbone.out_dim, 512, 128)
        self.temperature = temperature

    def forward(self, images, indices):
        x = torch.cat([augment(images, SIMCLR_CIFAR), augment(images, SIMCLR_CIFAR)])
        z1, z2 = self.projector(self.backbone(x)).chunk(2)
        return nt_xent(z1, z2, self.temperature)


def test_a_new_method_of_ten_lines_trains_resumes_and_evaluates_through_the_loop(
    tiny_data, tiny_profile, tmp_path, monkeypatch
):
    example = [line[4:] for line in base_module.__doc__.splitlines() if line.startswith("        ")]
    body = [line for line in inspect.getsource(TwoViews).split('"""', 2)[2].splitlines() if line.strip()]
    assert example == body and len(body) + 1 == 10  # and the class line
    monkeypatch.setitem(METHODS, "twoviews", TwoViews)
    run = train(
        "twoviews",
        tiny_profile,
        out_dir=tmp_path,
        data=tiny_data,
        method_options={"temperature": 0.2},
        progress=False,
        log=lambda *_: None,
        linear_probe=False,
    )
    assert run.summary["method_options"] == {"temperature": 0.2} and math.isfinite(run.metrics[-1]["loss"])
    assert run.metrics[-1]["loss"] < run.metrics[0]["loss"]
    again = evaluate_checkpoint(tmp_path, data=tiny_data, linear_probe=False)
    assert again["knn_top1"] == run.summary["knn_top1"]
