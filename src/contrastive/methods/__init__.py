"""One file per method. Each is an `nn.Module` whose `forward(images)` is its
training step: it receives a uint8 batch on the device, draws its own views,
and returns the loss. Per-step state updates (momentum encoders, queues,
centers) go in `on_step_end`."""

from __future__ import annotations

from torch import nn

from .simclr import SimCLR

METHODS: dict[str, type[nn.Module]] = {
    "simclr": SimCLR,
}


def build_method(name: str, backbone: nn.Module, **options) -> nn.Module:
    """The method `name` around `backbone`; an unknown name is an error listing the valid ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    return METHODS[name](backbone, **options)
