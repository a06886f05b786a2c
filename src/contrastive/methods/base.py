"""The one interface every method implements, and what a method is built from.

A method is an `nn.Module` whose `forward(images, indices)` is its training step:
it receives a uint8 batch on the device and the batch's dataset indices, draws
its own augmented views and returns the loss. The training loop reads what it
needs from the class attributes below and calls the three hooks; it never asks
a method whether it has something, and never names one.

A new method is a subclass with `__init__(self, spec, ...options)` that builds its
networks from `spec`, and a `forward`; everything else has a default. SimCLR without
its metrics, in ten lines:

    class TwoViews(Method):
        def __init__(self, spec: Spec, temperature: float = 0.5):
            super().__init__()
            self.backbone = spec.build_backbone()
            self.projector = projection_mlp(self.backbone.out_dim, 512, 128)
            self.temperature = temperature

        def forward(self, images, indices):
            x = torch.cat([augment(images, SIMCLR_CIFAR), augment(images, SIMCLR_CIFAR)])
            z1, z2 = self.projector(self.backbone(x)).chunk(2)
            return nt_xent(z1, z2, self.temperature)

plus one line in `methods/__init__.py`'s `METHODS`; `tests/test_contract.py` trains it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import nn

from ..data import CIFAR10_MEAN, CIFAR10_STD
from ..models import build_backbone


@dataclass(frozen=True)
class Spec:
    """What a method is built from: the profile's backbone by name, the data's size, channels and
    per-channel statistics (`ImageDataset.stats()`; CIFAR-10's by default).

    `build_backbone()` is the factory: a method calls it for each encoder it needs (CMC
    asks for two half-width ones on one and two channels), so no encoder is built only
    to be thrown away. Each backbone standardises its input with the data's statistics.
    """

    backbone: str = "convnet_small"
    num_images: int = 0
    in_channels: int = 3
    mean: tuple[float, ...] = CIFAR10_MEAN
    std: tuple[float, ...] = CIFAR10_STD

    def build_backbone(
        self,
        name: str | None = None,
        in_channels: int | None = None,
        width: float = 1.0,
        standardize: bool = True,
    ) -> nn.Module:
        """A fresh backbone: the profile's (or `name`), on the data's channels (or `in_channels`),
        standardising with the data's statistics (`standardize=False`: inputs the method scales itself)."""
        channels = self.in_channels if in_channels is None else in_channels
        stats = {"mean": self.mean, "std": self.std} if standardize else {"mean": None, "std": None}
        return build_backbone(name or self.backbone, in_channels=channels, width=width, **stats)


def check_widths(**widths: int) -> None:
    """Refuse a layer width that is not a positive integer, naming it."""
    for name, value in widths.items():
        if not (isinstance(value, int) and value > 0):
            raise ValueError(f"{name} must be a positive integer, got {value!r}")


class Method(nn.Module):
    """The base of every method: what the loop needs to know, do-nothing hooks, and per-epoch logging."""

    lr_scale: float = 1.0  # times the profile's learning rate, which is tuned for SimCLR
    epoch_scale: float = 1.0  # times the profile's epochs: a costlier step gets fewer
    adamw_weight_decay: float | None = None  # set: AdamW with this decay (ViTs, CLIP); None: SGD
    sync_bn_allowed: bool = True  # False where BN statistics over the global batch would undo the method
    # What the method uses in a named profile in place of the profile's own settings, found by sweeps at
    # that profile's budget (results/sweeps/): profile fields (`batch_size`, `lr` before `lr_scale`, ...)
    # that a caller did not fix, and option defaults beneath the caller's options. None by default.
    tuned_settings: ClassVar[dict[str, dict]] = {}
    tuned_options: ClassVar[dict[str, dict]] = {}

    def __init__(self) -> None:
        super().__init__()
        self._logged: dict[str, list] = {}
        self._series: set[str] = set()

    @property
    def encoder(self) -> nn.Module:
        """What evaluation reads: the `encoder` a method registers (CPC's pooled patches, CMC's two
        halves, a ViT), else its `backbone`."""
        modules = self._modules
        return modules["encoder"] if "encoder" in modules else modules["backbone"]

    def forward(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """The training step: uint8 images (B, C, H, W) and their dataset indices -> the loss."""
        raise NotImplementedError(f"{type(self).__name__} must define forward(images, indices)")

    def parameter_groups(self) -> list[dict]:
        """The optimiser's groups of trainable parameters: dicts of `params` and, optionally, `lr_scale`
        (times the run's rate at every step) and `constant_lr` (True: the peak rate at every step, no
        warm-up and no decay, as SimSiam's predictor). One group of everything by default."""
        return [{"params": [p for p in self.parameters() if p.requires_grad]}]

    def groups_apart(self, module: nn.Module, lr_scale: float = 1.0, constant_lr: bool = False) -> list[dict]:
        """`parameter_groups` with `module` (a predictor) at its own rate, or one group when it asks for
        none, so that a method's default run is built exactly as without the option."""
        own = list(module.parameters())
        if not own or (lr_scale == 1.0 and not constant_lr):
            return Method.parameter_groups(self)
        ids = {id(p) for p in own}
        rest = [p for p in self.parameters() if p.requires_grad and id(p) not in ids]
        return [{"params": rest}, {"params": own, "lr_scale": lr_scale, "constant_lr": constant_lr}]

    def setup(self, train_images: torch.Tensor, train_labels: torch.Tensor, batch_size: int = 1000) -> None:
        """Per-image state built before training (a memory bank, captions); nothing by default."""

    def on_step_end(self, step: int, total_steps: int) -> None:
        """After each optimiser step (momentum encoders, queues, centres); nothing by default."""

    @torch.compiler.disable  # a growing list would make torch.compile recompile at every step
    def log(self, name: str, value: torch.Tensor | float, every_step: bool = False) -> None:
        """Record `value` for this step. It stays on its device: `epoch_metrics` reads every logged
        value in one transfer per epoch and reports the epoch's mean, or with `every_step` the list."""
        if isinstance(value, torch.Tensor):
            value = value.detach().float().reshape(())
        self._logged.setdefault(name, []).append(value)
        if every_step:
            self._series.add(name)

    def epoch_metrics(self) -> dict:
        """The epoch's logged values (means, or lists for `every_step` ones), then a fresh epoch."""
        logged, self._logged = self._logged, {}
        if not logged:
            return {}
        names = list(logged)
        device = next(
            (v.device for rows in logged.values() for v in rows if isinstance(v, torch.Tensor)), "cpu"
        )
        values = torch.stack([torch.as_tensor(v, device=device).float() for n in names for v in logged[n]])
        flat = values.double().tolist()  # the one transfer
        out, start = {}, 0
        for name in names:
            rows, start = flat[start : start + len(logged[name])], start + len(logged[name])
            out[name] = rows if name in self._series else sum(rows) / len(rows)
        return out
