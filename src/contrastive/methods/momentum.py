"""Momentum encoders, written once: the copy, the EMA update and BYOL's cosine schedule.

MoCo's key encoder, BYOL's target, MoCo v3's momentum encoder and DINO's teacher are
all a copy of the trained network that follows it as xi <- m xi + (1 - m) theta after
every optimiser step and is never trained by gradient.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable

import torch
from torch import nn

# BYOL's tau_base is 0.996 over about 300k steps. The slow copy averages the online weights of the last
# ~1 / (1 - tau) steps: 250 steps at 0.996, about a third of the cpu profile's ~780 steps, so it would
# stay near its random init for much of the run. 0.99 averages over ~100 steps (about one cpu epoch), as
# MoCo's CIFAR setting does.
TAU_BASE = 0.99


def momentum_copy(*modules: nn.Module) -> nn.Sequential:
    """A frozen copy of `modules` chained in order: it follows them by `ema_update`, never by gradient."""
    copied = copy.deepcopy(nn.Sequential(*modules))
    return copied.requires_grad_(False)


@torch.no_grad()
def ema_update(slow: Iterable[torch.Tensor], fast: Iterable[torch.Tensor], momentum: float) -> None:
    """xi <- m xi + (1 - m) theta for each pair of tensors, in place (one fused op per list)."""
    slow = list(slow)
    torch._foreach_mul_(slow, momentum)
    torch._foreach_add_(slow, list(fast), alpha=1.0 - momentum)


def cosine_momentum(step: int, total_steps: int, base: float = TAU_BASE) -> float:
    """tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2: tau_base at k = 0, rising to 1 at k = K."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return 1.0 - (1.0 - base) * (math.cos(math.pi * progress) + 1.0) / 2.0


def check_momentum(name: str, value: float, meaning: str = "") -> None:
    """Refuse a momentum outside [0, 1]; `meaning` says what the two ends do."""
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1]{f' ({meaning})' if meaning else ''}, got {value}")
