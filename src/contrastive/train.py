"""The one training loop every method uses.

Data stays uint8 on the device; each step slices a batch by index and hands it
to the method, which draws its own augmented views and returns the loss.
After each epoch the loop writes `metrics.jsonl` and a checkpoint (atomically:
temporary file, then rename), so a crash or an interrupt loses at most one
epoch and `resume=True` continues bit-for-bit on the CPU.
"""

from __future__ import annotations

import dataclasses
import math
import os
import sys
import time
import warnings
from pathlib import Path

import torch
from torch import nn
from tqdm.auto import tqdm

from . import distributed
from .augment import Recipe
from .data import ImageDataset, load_cifar10
from .evaluate import evaluate_backbone
from .losses import NonFiniteInputError
from .methods import Method, build_method, check_method
from .profiles import Profile, banner, get_profile
from .runinfo import atomic_write_bytes, device_description, git_commit, write_json, write_jsonl

CHECKPOINTS_KEPT = 2
# On a GPU, reading the loss makes the host wait for the device; the loop reads its finiteness flag
# every this many steps there, and at every step on a CPU, where the read costs nothing.
CHECK_EVERY_CUDA, CHECK_EVERY_CPU = 50, 1


@dataclasses.dataclass
class Run:
    """What `train` returns: the summary (also in summary.json), the per-epoch
    metrics (also in metrics.jsonl), the trained method and the data it saw."""

    summary: dict
    metrics: list[dict]
    method: Method
    data: ImageDataset

    def report(self) -> str:
        """kNN and linear-probe top-1 against random init, and the training time, in three lines."""
        s = self.summary
        lines = [
            f"kNN top-1:    trained {100 * s['knn_top1']:.1f}%   "
            f"random init {100 * s['knn_top1_random_init']:.1f}%"
        ]
        if s.get("linear_top1") is not None:
            lines.append(
                f"linear probe: trained {100 * s['linear_top1']:.1f}%   "
                f"random init {100 * s['linear_top1_random_init']:.1f}%"
            )
        lines.append(
            f"{s['train_seconds']:.0f} s of training at {s['images_per_second']:.0f} images/s "
            f"on {s['device']}"
        )
        return "\n".join(lines)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped, and no checkpoint holds the bad weights."""


def _stopped(
    what: str, epoch: int, step: int, global_step: int, last_good: Path | None, before_update: bool = True
) -> NonFiniteLossError:
    """The error that stops a run at a non-finite step: where it happened and which checkpoint survives."""
    kept = (
        f"the last good checkpoint {last_good} is intact"
        if last_good
        else "no epoch had finished, so there is no checkpoint"
    )
    when = "before the update" if before_update else "without saving the weights since"
    return NonFiniteLossError(
        f"{what} at epoch {epoch}, step {step} (global step {global_step}); training "
        f"stopped {when} and {kept}. Lower the learning rate or check the "
        "inputs, then resume."
    )


def lr_at(step: int, total_steps: int, warmup_steps: int, peak_lr: float) -> float:
    """Linear warmup to `peak_lr`, then cosine decay to 0 at `total_steps`."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return peak_lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def adamw(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters; biases, norms, CLS tokens and position embeddings get no decay.

    Decay pulls a weight matrix towards 0; on a LayerNorm gain, a bias or a position
    embedding it only erases what was learned (the ViT recipes of MoCo v3 and DINO).
    """
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if p.requires_grad:
            plain = p.ndim <= 1 or name.endswith(("cls_token", "pos_embed"))
            (no_decay if plain else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr)


GROUP_KEYS = {"params", "lr_scale", "constant_lr"}


def _with_group_rates(optimizer: torch.optim.Optimizer, model: Method, peak_lr: float):
    """Split the optimiser's groups by the method's `parameter_groups`, each remembering its `lr_scale`
    and `constant_lr`, so that `set_lr` can give every group its own rate."""
    owner = {}
    for group in model.parameter_groups():
        unknown = set(group) - GROUP_KEYS
        if unknown:
            raise ValueError(f"{type(model).__name__}.parameter_groups: unknown keys {sorted(unknown)}")
        for p in group["params"]:
            owner[p] = (float(group.get("lr_scale", 1.0)), bool(group.get("constant_lr", False)))
    groups = []
    for base in optimizer.param_groups:
        rates = {}
        for p in base["params"]:
            rates.setdefault(owner.get(p, (1.0, False)), []).append(p)
        for (scale, constant), params in rates.items():
            extra = {k: v for k, v in base.items() if k != "params"}
            groups.append(
                {**extra, "params": params, "lr_scale": scale, "constant_lr": constant, "peak_lr": peak_lr}
            )
    optimizer.param_groups.clear()
    for group in groups:
        optimizer.param_groups.append(group)
    set_lr(optimizer, peak_lr)
    return optimizer


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Every group's rate for this step: the scheduled `lr` times the group's `lr_scale`, or the run's
    peak rate times it where the method asked for a constant rate."""
    for group in optimizer.param_groups:
        rate = group["peak_lr"] if group.get("constant_lr", False) else lr
        group["lr"] = rate * group.get("lr_scale", 1.0)


def build_optimizer(model: Method, profile: Profile) -> tuple[torch.optim.Optimizer, float]:
    """The method's optimiser and peak learning rate: the profile's (SimCLR's) rate times the method's
    `lr_scale`; AdamW for methods that set `adamw_weight_decay` (ViTs, CLIP), else SGD with momentum.
    Each of the method's `parameter_groups` gets its own rate (`set_lr`)."""
    peak_lr = profile.lr * model.lr_scale
    if model.adamw_weight_decay is not None:  # as in the MoCo v3, DINO and CLIP papers
        optimizer = adamw(model, peak_lr, model.adamw_weight_decay)
    else:
        optimizer = torch.optim.SGD(
            [p for p in model.parameters() if p.requires_grad],
            lr=peak_lr,
            momentum=0.9,
            weight_decay=profile.weight_decay,
        )
    return _with_group_rates(optimizer, model, peak_lr), peak_lr


def checkpoint_paths(out_dir: Path) -> list[Path]:
    """Checkpoints in `out_dir`, newest first."""
    return sorted(Path(out_dir).glob("checkpoint_*.pt"), reverse=True)


def load_checkpoint(out_dir: Path, device) -> tuple[dict, Path]:
    """The newest readable checkpoint; an unreadable one is reported by name and skipped."""
    paths = checkpoint_paths(out_dir)
    if not paths:
        raise FileNotFoundError(f"no checkpoint to resume from in {out_dir}")
    for path in paths:
        try:
            return torch.load(path, map_location=device, weights_only=True), path
        except Exception as exc:  # a truncated or corrupt file: fall back to the previous one
            warnings.warn(f"checkpoint {path} is unreadable ({exc}); trying the previous one", stacklevel=2)
    raise ValueError(f"every checkpoint in {out_dir} is unreadable: {[str(p) for p in paths]}")


def _progress_enabled(progress: bool | None) -> bool:
    if progress is not None:
        return progress
    return os.environ.get("CONTRASTIVE_PROGRESS", "1") != "0"


def profile_data(profile: Profile, data: ImageDataset | None, device) -> ImageDataset:
    """The profile's share of the data (CIFAR-10 unless given), moved to the device once."""
    data = data if data is not None else load_cifar10()
    if profile.train_size or profile.test_size:
        data = data.subset(profile.train_size, profile.test_size, seed=0)
    return data.to(device)


# ---- building a run (shared by train, evaluate_checkpoint and bench step) -----------------------


def build_model(
    method: str,
    profile: Profile,
    num_images: int,
    in_channels: int = 3,
    options: dict | None = None,
    seed: int = 0,
    device=None,
    stats: dict | None = None,
) -> Method:
    """Method `method` on the profile's backbone for data of `num_images` images with `in_channels`
    channels and per-channel `stats` (CIFAR-10's when None), initialised from `seed`, on `device` (the
    profile's by default) in channels_last, which speeds convolutions up on CPUs (oneDNN) and GPUs."""
    torch.manual_seed(seed)
    model = build_method(method, profile.backbone, num_images, in_channels, stats, **(options or {}))
    return model.to(device or profile.device).to(memory_format=torch.channels_last)


def tuned(cls: type[Method], profile: Profile, options: dict | None = None) -> tuple[Profile, dict]:
    """The profile and options method `cls` runs with: its `tuned_settings` for this profile in place of
    the profile's fields (not those the caller fixed, `profile.fixed`), its `tuned_options` beneath the
    caller's `options`."""
    settings = cls.tuned_settings.get(profile.name, {})
    settings = {field: value for field, value in settings.items() if field not in profile.fixed}
    if settings:
        profile = dataclasses.replace(profile, **settings)
    return profile, {**cls.tuned_options.get(profile.name, {}), **(options or {})}


def scaled_epochs(profile: Profile, model: Method) -> Profile:
    """The profile with the method's `epoch_scale` applied: a costlier step gets fewer epochs (at least
    two, to see a trend)."""
    if model.epoch_scale == 1.0:
        return profile
    return dataclasses.replace(
        profile, epochs=max(min(2, profile.epochs), round(profile.epochs * model.epoch_scale))
    )


def stored_options(options: dict | None) -> dict:
    """The method options as a checkpoint stores them (what `weights_only` loading reads back): plain
    values as they are, an augmentation `Recipe` as its fields. Anything else is refused, since a resume
    or `eval` could not rebuild the model from it."""
    stored = {}
    for key, value in sorted((options or {}).items()):
        if isinstance(value, Recipe):
            stored[key] = {"Recipe": dataclasses.asdict(value)}
        elif (
            value is None
            or isinstance(value, (bool, int, float, str))
            or (
                isinstance(value, (tuple, list))
                and all(isinstance(v, (bool, int, float, str)) for v in value)
            )
        ):
            stored[key] = tuple(value) if isinstance(value, list) else value
        else:
            raise ValueError(
                f"option {key}={value!r} cannot be stored in a checkpoint, so a resume or eval "
                "could not rebuild this model: pass numbers, strings, booleans, tuples of them "
                "or an augment.Recipe"
            )
    return stored


def restored_options(stored: dict) -> dict:
    """The method options a checkpoint stored, as the method's constructor takes them."""
    return {
        k: Recipe(**v["Recipe"]) if isinstance(v, dict) and "Recipe" in v else v for k, v in stored.items()
    }


# The profile's fields that change what a run trains; a resume must keep them (it may add epochs).
RESUME_PROFILE_FIELDS = (
    "backbone",
    "train_size",
    "test_size",
    "batch_size",
    "lr",
    "weight_decay",
    "warmup_epochs",
    "amp",
)


def _check_resumable(ckpt: dict, path: Path, method: str, profile: Profile, seed: int, options: dict) -> None:
    """Refuse to resume a checkpoint as another method, profile, seed or with any other option."""
    if (ckpt["method"], ckpt["profile"], ckpt["seed"]) != (method, profile.name, seed):
        raise ValueError(
            f"{path} is a {ckpt['method']}/{ckpt['profile']}/seed {ckpt['seed']} run; cannot "
            f"resume it as {method}/{profile.name}/seed {seed}"
        )
    before = ckpt["method_options"]
    changed = sorted(
        k for k in set(before) | set(options) if before.get(k, "default") != options.get(k, "default")
    )
    if changed:
        detail = "; ".join(
            f"{k}: trained with {before.get(k, 'the default')!r}, now {options.get(k, 'the default')!r}"
            for k in changed
        )
        raise ValueError(
            f"cannot resume {path} with other method options ({detail}); pass the options it "
            "was trained with, or start a new run in another folder"
        )
    trained = ckpt.get("profile_fields", {})
    now = dataclasses.asdict(profile)
    differ = [k for k in RESUME_PROFILE_FIELDS if k in trained and trained[k] != now[k]]
    if differ:
        detail = "; ".join(f"{k}: trained with {trained[k]!r}, now {now[k]!r}" for k in differ)
        raise ValueError(
            f"cannot resume {path} with other training settings ({detail}); pass the settings it "
            "was trained with, or start a new run in another folder"
        )


# ---- one step (shared by the loop and bench step, so the benchmark times what training runs) -----


def train_step(
    model: Method,
    optimizer: torch.optim.Optimizer,
    images: torch.Tensor,
    indices: torch.Tensor,
    lr: float,
    step: int,
    total_steps: int,
    runner=None,
    use_amp: bool = False,
    check: bool = True,
) -> torch.Tensor:
    """One optimiser step of `model` on a uint8 batch: forward (through `runner`, the DDP or compiled
    wrapper, when given), backward, update, then the method's `on_step_end`. Returns the loss, detached,
    on its device. With `check`, a NaN or infinite loss raises `NonFiniteLossError` before the update
    (reading the loss, which makes the host wait for a GPU)."""
    set_lr(optimizer, lr)
    with torch.autocast(images.device.type, dtype=torch.bfloat16, enabled=use_amp):
        loss = (model if runner is None else runner)(images, indices)
    if check and not torch.isfinite(loss).item():
        raise NonFiniteLossError(f"loss became {loss.item()}")
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    model.on_step_end(step, total_steps)
    return loss.detach()


# ---- the loop ---------------------------------------------------------------------------------


def train(
    method: str = "simclr",
    profile: str | Profile | None = None,
    out_dir: str | os.PathLike | None = None,
    epochs: int | None = None,
    seed: int = 0,
    resume: bool = False,
    data: ImageDataset | None = None,
    method_options: dict | None = None,
    linear_probe: bool = True,
    progress: bool | None = None,
    sync_bn: bool = False,
    log=print,
) -> Run:
    """Train `method` under `profile`, evaluate it and its random init.

    `out_dir` receives `metrics.jsonl`, checkpoints and `summary.json`; without
    it nothing is written and a crash cannot be resumed. `resume=True`
    continues from the newest readable checkpoint in `out_dir`.
    """
    started = time.perf_counter()
    profile, method_options, options = _checked(method, profile, epochs, method_options, sync_bn)
    out = _prepare_out(out_dir, resume)
    device = distributed.setup() or torch.device(profile.device)
    is_main = distributed.rank() == 0
    data = profile_data(profile, data, device)
    if is_main:
        log(banner(profile, data.source))
    n, channels = data.train_images.shape[:2]
    model = build_model(method, profile, n, channels, method_options, seed, device, data.stats())
    if epochs is None:
        profile = scaled_epochs(profile, model)
    if len(data.train_images) < profile.batch_size:
        raise ValueError(
            f"batch size {profile.batch_size} exceeds the {len(data.train_images)} training images"
        )
    optimizer, peak_lr = build_optimizer(model, profile)
    state, last_good = _start_or_resume(
        out if resume else None, model, optimizer, (method, profile, seed, options)
    )
    if last_good is not None and is_main:
        log(f"resumed from {last_good} (epoch {state['epoch']} of {profile.epochs})")
    if state["random_init"] is None:  # the baseline: the same architecture and seed, before any training
        state["random_init"] = evaluate_backbone(
            model.encoder, data, profile.eval_batch_size, linear=linear_probe
        )
        model.setup(data.train_images, data.train_labels, profile.eval_batch_size)  # a bank, captions
    model, runner = _wrapped(model, profile, device, sync_bn)

    final = None
    try:
        for epoch in range(state["epoch"], profile.epochs):
            row = _run_epoch(
                model,
                runner,
                optimizer,
                data,
                profile,
                peak_lr,
                state,
                seed,
                method,
                last_good,
                show_progress=is_main and _progress_enabled(progress),
            )
            if epoch + 1 == profile.epochs:  # the protocol reads the final epoch, never the best one
                final = evaluate_backbone(model.encoder, data, profile.eval_batch_size, linear=linear_probe)
                row["knn_top1"] = final["knn_top1"]
            elif (epoch + 1) % profile.knn_every == 0:
                row["knn_top1"] = evaluate_backbone(
                    model.encoder, data, profile.eval_batch_size, linear=False
                )["knn_top1"]
            row.update(model.epoch_metrics())
            state["metrics"].append(row)
            if is_main:
                knn = f"  kNN {100 * row['knn_top1']:.1f}%" if "knn_top1" in row else ""
                log(
                    f"epoch {epoch + 1}/{profile.epochs}  loss {row['loss']:.4f}  lr {row['lr']:.3f}  "
                    f"{row['images_per_second']:.0f} img/s{knn}"
                )
                if out is not None:
                    last_good = _save_checkpoint(out, model, optimizer, state, method, profile, seed, options)
                    write_jsonl(out / "metrics.jsonl", state["metrics"])
    except KeyboardInterrupt:
        if is_main and out is not None:
            where = f"the checkpoint {last_good}" if last_good else "no checkpoint yet (no epoch finished)"
            log(
                f"interrupted during epoch {state['epoch'] + 1}; {where} holds the run: call train(..., "
                "resume=True) or pass --resume to continue it"
            )
        raise

    if final is None:  # a finished run was resumed: nothing left to train
        final = evaluate_backbone(model.encoder, data, profile.eval_batch_size, linear=linear_probe)
    summary = _summary(method, options, profile, seed, final, state, data, peak_lr, device, started)
    if is_main and out is not None:
        write_json(out / "summary.json", summary)
    return Run(summary, state["metrics"], model, data)


def _checked(
    method: str, profile, epochs: int | None, method_options: dict | None, sync_bn: bool
) -> tuple[Profile, dict, dict]:
    """The profile (the method's tuned settings and `epochs` applied), the options (the method's tuned
    ones beneath those given) and the options as stored; refuses, before any data is loaded, an unknown
    method or option, an option a checkpoint cannot store, or a bad `sync_bn`."""
    cls = check_method(method, method_options)
    stored_options(method_options)  # refuses an option a checkpoint cannot store, before any data loads
    if sync_bn and not cls.sync_bn_allowed:
        raise ValueError(
            f"sync_bn would undo {method}'s BatchNorm design (MoCo's shuffled BN: its statistics "
            "must not span a query's own key)"
        )
    if sync_bn and not torch.cuda.is_available():
        raise ValueError("sync_bn needs CUDA devices: torch's SyncBatchNorm does not run on CPUs")
    profile = profile if isinstance(profile, Profile) else get_profile(profile)
    profile, method_options = tuned(cls, profile, method_options)
    if epochs is not None:
        if not epochs >= 1:
            raise ValueError(f"epochs must be at least 1, got {epochs}")
        profile = dataclasses.replace(profile, epochs=epochs)
    return profile, method_options, stored_options(method_options)


def _start_or_resume(out: Path | None, model: Method, optimizer, identity: tuple) -> tuple[dict, Path | None]:
    """A fresh run's state, or the state of the newest readable checkpoint in `out` with the model,
    optimiser and random generators restored; `identity` is (method, profile, seed, options)."""
    state = {"epoch": 0, "step": 0, "metrics": [], "random_init": None, "train_seconds": 0.0}
    if out is None:
        return state, None
    device = next(model.parameters()).device
    ckpt, path = load_checkpoint(out, device)
    _check_resumable(ckpt, path, *identity)
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    torch.set_rng_state(ckpt["rng_cpu"].cpu())
    if device.type == "cuda" and ckpt["rng_cuda"] is not None:
        torch.cuda.set_rng_state(ckpt["rng_cuda"].cpu(), device)
    return {k: ckpt[k] for k in state}, path


def _wrapped(
    model: Method, profile: Profile, device: torch.device, sync_bn: bool
) -> tuple[Method, nn.Module]:
    """The model (with SyncBatchNorm under `sync_bn`) and what runs its steps: DistributedDataParallel
    under torchrun, compiled when the profile asks for it on CUDA."""
    runner = model
    if distributed.world_size() > 1:
        if sync_bn:  # BN statistics over the global batch, as SimCLR's large-batch runs
            model = runner = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        runner = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    if profile.compile and device.type == "cuda":
        runner = torch.compile(runner)
    return model, runner


def _prepare_out(out_dir, resume: bool) -> Path | None:
    """The output folder, created; refuses to overwrite a run or to resume nothing."""
    if out_dir is None:
        if resume:
            raise ValueError("resume=True needs the out_dir of the run to continue")
        return None
    out = Path(out_dir)
    if checkpoint_paths(out) and not resume:
        raise FileExistsError(
            f"{out} already holds a run: pass resume=True (--resume) to continue it, or "
            "choose another output folder"
        )
    if resume and not checkpoint_paths(out):
        raise FileNotFoundError(f"nothing to resume: no checkpoint in {out}")
    out.mkdir(parents=True, exist_ok=True)
    return out


def _run_epoch(
    model: Method,
    runner,
    optimizer,
    data: ImageDataset,
    profile: Profile,
    peak_lr: float,
    state: dict,
    seed: int,
    method: str,
    last_good: Path | None,
    show_progress: bool,
) -> dict:
    """One pass over the training images; returns the epoch's row of metrics (loss, lr, speed).

    The loss and its finiteness stay on the device: a GPU is waited for only every
    `CHECK_EVERY_CUDA` steps, and the error still names the first bad step.
    """
    epoch = state["epoch"]
    device, n, batch = data.train_images.device, len(data.train_images), profile.batch_size
    rank, world = distributed.rank(), distributed.world_size()
    steps_per_epoch = n // batch
    total_steps, warmup_steps = steps_per_epoch * profile.epochs, int(profile.warmup_epochs * steps_per_epoch)
    check_every = CHECK_EVERY_CUDA if device.type == "cuda" else CHECK_EVERY_CPU
    use_amp = profile.amp and device.type == "cuda"
    # The order depends on (seed, epoch) alone, so a resumed run sees the same batches.
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).to(device)
    if world > 1:  # each rank draws its own views; seeded per epoch, so a resume stays exact
        torch.manual_seed((seed * 100003 + epoch) * 1009 + rank)
    model.train()
    t0 = time.perf_counter()
    loss_sum = torch.zeros((), dtype=torch.float64, device=device)
    first_bad = torch.full((), -1, dtype=torch.long, device=device)  # the first non-finite step, if any
    bar = tqdm(
        range(steps_per_epoch),
        desc=f"epoch {epoch + 1}/{profile.epochs}",
        leave=False,
        disable=not show_progress,
        dynamic_ncols=True,
    )
    for i in bar:
        idx = order[i * batch : (i + 1) * batch][rank::world]
        lr = lr_at(state["step"], total_steps, warmup_steps, peak_lr)
        check = (i + 1) % check_every == 0 or i + 1 == steps_per_epoch
        try:
            loss = train_step(
                model,
                optimizer,
                data.train_images[idx],
                idx,
                lr,
                state["step"],
                total_steps,
                runner,
                use_amp,
                check=check_every == 1,
            )
        except NonFiniteLossError as exc:
            raise _stopped(f"the {method} {exc}", epoch + 1, i + 1, state["step"] + 1, last_good) from exc
        except NonFiniteInputError as exc:  # the embeddings, not only the loss, went NaN or infinite
            raise _stopped(
                f"the {method} loss got non-finite input ({exc})",
                epoch + 1,
                i + 1,
                state["step"] + 1,
                last_good,
            ) from exc
        if check_every > 1:
            first_bad = torch.where((first_bad < 0) & ~torch.isfinite(loss), state["step"], first_bad)
        state["step"] += 1
        loss_sum += loss.double()
        if check and check_every > 1 and (bad := int(first_bad)) >= 0:
            step_in_epoch = bad - (state["step"] - (i + 1)) + 1
            raise _stopped(
                f"the {method} loss became non-finite",
                epoch + 1,
                step_in_epoch,
                bad + 1,
                last_good,
                before_update=False,
            )
        if check:
            bar.set_postfix(
                loss=f"{loss.item():.3f}", img_s=f"{(i + 1) * batch / (time.perf_counter() - t0):.0f}"
            )
    bar.close()
    if device.type == "cuda":
        torch.cuda.synchronize()
    seconds = time.perf_counter() - t0
    state["train_seconds"] += seconds
    state["epoch"] = epoch + 1
    return {
        "epoch": epoch + 1,
        "loss": loss_sum.item() / steps_per_epoch,
        "lr": lr,
        "seconds": seconds,
        "images_per_second": steps_per_epoch * batch / seconds,
    }


def _summary(method, options, profile, seed, final, state, data, peak_lr, device, started) -> dict:
    """What summary.json records: the protocol's numbers beside the random init, time, and where it ran."""
    n, batch = len(data.train_images), profile.batch_size
    return {
        "method": method,
        "method_options": options,
        "profile": profile.name,
        "epochs": profile.epochs,
        "seed": seed,
        "knn_top1": final["knn_top1"],
        "knn_top1_random_init": state["random_init"]["knn_top1"],
        "linear_top1": final.get("linear_top1"),
        "linear_top1_random_init": state["random_init"].get("linear_top1"),
        "train_images": n,
        "test_images": len(data.test_images),
        "batch_size": batch,
        "lr": peak_lr,
        "seconds": time.perf_counter() - started,
        "train_seconds": state["train_seconds"],
        "images_per_second": state["step"] * batch / max(state["train_seconds"], 1e-9),
        "device": device_description(device),
        "world_size": distributed.world_size(),
        "torch": torch.__version__,
        "python": sys.version.split()[0],
        "commit": git_commit(),
        "data": data.source,
    }


def _save_checkpoint(out, model, optimizer, state, method, profile, seed, options) -> Path:
    device = next(model.parameters()).device
    ckpt = {
        "method": method,
        "profile": profile.name,
        "seed": seed,
        "method_options": options,
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "profile_fields": dataclasses.asdict(profile),
        **state,
    }
    path = out / f"checkpoint_{state['epoch']:04d}.pt"
    atomic_write_bytes(path, lambda fh: torch.save(ckpt, fh))
    for old in checkpoint_paths(out)[CHECKPOINTS_KEPT:]:
        old.unlink()
    return path


def evaluate_checkpoint(
    out_dir: str | os.PathLike, data: ImageDataset | None = None, linear_probe: bool = True
) -> dict:
    """Re-evaluate the newest readable checkpoint of a run with the common protocol."""
    ckpt, path = load_checkpoint(Path(out_dir), "cpu")
    profile = Profile(**ckpt["profile_fields"])
    device = torch.device(profile.device)
    data = profile_data(profile, data, device)
    model = build_model(
        ckpt["method"],
        profile,
        len(data.train_images),
        data.train_images.shape[1],
        restored_options(ckpt["method_options"]),
        ckpt["seed"],
        device,
        data.stats(),
    )
    model.load_state_dict(ckpt["model"])  # the statistics the encoders standardise with included
    result = evaluate_backbone(model.encoder, data, profile.eval_batch_size, linear=linear_probe)
    return {
        "checkpoint": str(path),
        "method": ckpt["method"],
        "profile": profile.name,
        "epoch": ckpt["epoch"],
        **result,
    }
