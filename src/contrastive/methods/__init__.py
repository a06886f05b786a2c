"""One file per method, each a subclass of `base.Method` (the interface the training loop reads).

`build_method(name, backbone, num_images, in_channels, stats, **options)` builds one by name;
the options are its constructor's keyword arguments, every one with a default.
"""

from __future__ import annotations

import inspect

from .base import Method, Spec
from .byol import BYOL
from .clip import CLIP
from .cmc import CMC
from .cpc import CPC
from .dino import DINO
from .instdisc import InstDisc
from .invaspread import InvaSpread
from .moco import MoCo, MoCoV2
from .mocov3 import MoCoV3
from .simclr import SimCLR
from .simsiam import SimSiam

METHODS: dict[str, type[Method]] = {
    "byol": BYOL,
    "clip": CLIP,
    "cmc": CMC,
    "cpc": CPC,
    "dino": DINO,
    "instdisc": InstDisc,
    "invaspread": InvaSpread,
    "moco": MoCo,
    "mocov2": MoCoV2,
    "mocov3": MoCoV3,
    "simclr": SimCLR,
    "simsiam": SimSiam,
}


def method_options(name: str) -> dict[str, inspect.Parameter]:
    """The options of method `name`: its constructor's parameters after the spec, by name."""
    return dict(list(inspect.signature(METHODS[name]).parameters.items())[1:])


def check_method(name: str, options: dict | None = None) -> type[Method]:
    """The class of method `name`; an unknown method or option name is an error listing the valid ones."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    accepted = method_options(name)
    unknown = sorted(set(options or {}) - set(accepted))
    if unknown:
        raise ValueError(
            f"{name} has no option {', '.join(map(repr, unknown))}; "
            f"its options are {', '.join(sorted(accepted)) or 'none'}"
        )
    return METHODS[name]


def build_method(
    name: str,
    backbone: str = "convnet_small",
    num_images: int = 0,
    in_channels: int = 3,
    stats: dict | None = None,
    **options,
) -> Method:
    """Method `name` built on the backbone called `backbone`, for `num_images` training images of
    `in_channels` channels (per-image state: a memory bank, captions) whose per-channel statistics are
    `stats` ({"mean": ..., "std": ...}, `ImageDataset.stats()`; CIFAR-10's when None); `options` go to
    its constructor."""
    if not isinstance(backbone, str):
        raise TypeError(
            f"backbone is the backbone's name, one of contrastive.models.BACKBONES, got "
            f"{type(backbone).__name__}; the method builds its own encoders"
        )
    spec = Spec(backbone, num_images, in_channels, **{k: tuple(v) for k, v in (stats or {}).items()})
    return check_method(name, options)(spec, **options)


__all__ = ["METHODS", "Method", "Spec", "build_method", "check_method", "method_options"]
