"""Three budgets, one code path: `smoke` (CI), `cpu` (a laptop), `gpu` (one CUDA device).

A notebook never branches on the profile: it asks `get_profile()` for the
settings and prints `banner(...)`. `CONTRASTIVE_PROFILE` overrides the choice
made from the hardware.
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass

import torch

from .models import BACKBONES


@dataclass(frozen=True)
class Profile:
    name: str
    backbone: str
    train_size: int | None  # images per split; None means the whole split
    test_size: int | None
    batch_size: int  # global batch (images, each seen as two or more views)
    epochs: int
    lr: float  # peak learning rate for batch_size (already scaled)
    weight_decay: float
    warmup_epochs: float
    knn_every: int  # epochs between kNN evaluations; the final epoch is always evaluated
    eval_batch_size: int
    amp: bool  # bf16 autocast and channels_last (CUDA only)
    compile: bool  # torch.compile the method (CUDA only)
    device: str
    # Fields a caller set by name (`get_profile(..., lr=...)`, a sweep): a method's own settings for the
    # profile (`Method.tuned_settings`) leave these as they are.
    fixed: tuple[str, ...] = ()


PROFILES: dict[str, Profile] = {
    "smoke": Profile(
        name="smoke",
        backbone="convnet_tiny",
        train_size=1000,
        test_size=500,
        batch_size=100,
        epochs=2,
        lr=0.3,
        weight_decay=5e-4,
        warmup_epochs=0.0,
        knn_every=1,
        eval_batch_size=500,
        amp=False,
        compile=False,
        device="cpu",
    ),
    "cpu": Profile(
        name="cpu",
        backbone="convnet_small",
        train_size=20000,
        test_size=5000,
        batch_size=256,
        epochs=10,
        lr=0.5,
        weight_decay=5e-4,
        warmup_epochs=1.0,
        knn_every=2,
        eval_batch_size=1000,
        amp=False,
        compile=False,
        device="cpu",
    ),
    "gpu": Profile(
        name="gpu",
        backbone="resnet18",
        train_size=None,
        test_size=None,
        batch_size=512,
        epochs=100,
        lr=1.0,
        weight_decay=5e-4,
        warmup_epochs=10.0,
        knn_every=10,
        eval_batch_size=2048,
        amp=True,
        compile=False,
        device="cuda",
    ),
}


def get_profile(name: str | None = None, **overrides) -> Profile:
    """The profile `name`, else `$CONTRASTIVE_PROFILE`, else `gpu` with CUDA and `cpu` without.

    Keyword arguments replace fields, e.g. `get_profile("cpu", epochs=3)`, and are kept by every
    method: they are listed in the profile's `fixed`.
    """
    name = name or os.environ.get("CONTRASTIVE_PROFILE") or None
    if name is None:
        name = "gpu" if torch.cuda.is_available() else "cpu"
    if name not in PROFILES:
        raise ValueError(
            f"unknown profile {name!r}: choose one of {', '.join(PROFILES)} (argument or CONTRASTIVE_PROFILE)"
        )
    profile = PROFILES[name]
    if profile.device == "cuda" and not torch.cuda.is_available():
        raise ValueError("the gpu profile needs a CUDA device and none is available; use the cpu profile")
    unknown = set(overrides) - {f.name for f in dataclasses.fields(Profile) if f.name != "fixed"}
    if unknown:
        raise ValueError(f"unknown profile fields {sorted(unknown)}")
    profile = dataclasses.replace(profile, **overrides, fixed=tuple(sorted({*profile.fixed, *overrides})))
    if profile.backbone not in BACKBONES:
        raise ValueError(f"unknown backbone {profile.backbone!r}; choose one of {sorted(BACKBONES)}")
    for field in ("batch_size", "epochs", "eval_batch_size", "knn_every"):
        if not getattr(profile, field) >= 1:
            raise ValueError(f"the profile's {field} must be at least 1, got {getattr(profile, field)}")
    return profile


def banner(profile: Profile, data_source: str = "") -> str:
    """One line a notebook prints so a reader knows what produced its numbers."""
    device = profile.device
    if device == "cuda":
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu ({torch.get_num_threads()} threads)"
    line = (
        f"profile={profile.name} | device={device} | backbone={profile.backbone} | torch {torch.__version__}"
    )
    return line + (f" | data: {data_source}" if data_source else "")
