"""One file per method. Each is an `nn.Module` whose `forward(images, indices)`
is its training step: it receives a uint8 batch on the device and the batch's
dataset indices, draws its own views, and returns the loss. `epoch_metrics()`,
when a method has it, adds method-specific numbers to each epoch's metrics;
`setup(train_images, batch_size[, train_labels])`, when present, builds per-image state
before training (CLIP's captions need the labels);
`lr_scale` scales the profile's learning rate (which is tuned for SimCLR) and
`epoch_scale` its number of epochs;
`encoder`, when present, is what evaluation reads instead of the bare backbone;
`adamw_weight_decay`, when set, trains with AdamW instead of SGD (the ViT methods).
Per-step state updates (momentum encoders, queues, centers) go in `on_step_end`."""

from __future__ import annotations

import inspect

from torch import nn

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

METHODS: dict[str, type[nn.Module]] = {
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


def check_method(name: str, options: dict | None = None) -> None:
    """Refuse an unknown method or option name, listing the valid ones; needs no model or data."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(sorted(METHODS))}")
    accepted = set(inspect.signature(METHODS[name]).parameters) - {"backbone", "num_images", "backbone_name"}
    unknown = sorted(set(options or {}) - accepted)
    if unknown:
        raise ValueError(f"{name} has no option {', '.join(map(repr, unknown))}; "
                         f"its options are {', '.join(sorted(accepted)) or 'none'}")  # fmt: skip


def build_method(
    name: str, backbone: nn.Module, num_images: int, backbone_name: str | None = None, **options
) -> nn.Module:
    """The method `name` around `backbone`; an unknown name is an error listing the valid ones.

    Methods that keep per-image state (a memory bank) receive the number of training images;
    methods that build encoders of their own (CMC's half-width pair) receive the backbone's name.
    """
    check_method(name, options)
    cls = METHODS[name]
    if "num_images" in inspect.signature(cls).parameters:
        options["num_images"] = num_images
    if "backbone_name" in inspect.signature(cls).parameters:
        options["backbone_name"] = backbone_name
    return cls(backbone, **options)
