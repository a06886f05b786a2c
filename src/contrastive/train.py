"""The one training loop every method uses.

Data stays uint8 on the device; each step slices a batch by index and hands it
to the method, which draws its own augmented views and returns the loss.
After each epoch the loop writes `metrics.jsonl` and a checkpoint (atomically:
temporary file, then rename), so a crash or an interrupt loses at most one
epoch and `resume=True` continues bit-for-bit on the CPU.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import math
import os
import platform
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch
from tqdm.auto import tqdm

from . import distributed
from .data import ImageDataset, load_cifar10
from .evaluate import evaluate_backbone
from .losses import NonFiniteInputError
from .methods import build_method, check_method
from .models import build_backbone
from .profiles import Profile, banner, get_profile

CHECKPOINTS_KEPT = 2


@dataclasses.dataclass
class Run:
    """What `train` returns: the summary (also in summary.json), the per-epoch
    metrics (also in metrics.jsonl), the trained method and the data it saw."""

    summary: dict
    metrics: list[dict]
    method: torch.nn.Module
    data: ImageDataset

    def report(self) -> str:
        """kNN and linear-probe top-1 against random init, and the training time, in three lines."""
        s = self.summary
        lines = [f"kNN top-1:    trained {100 * s['knn_top1']:.1f}%   "
                 f"random init {100 * s['knn_top1_random_init']:.1f}%"]  # fmt: skip
        if s.get("linear_top1") is not None:
            lines.append(f"linear probe: trained {100 * s['linear_top1']:.1f}%   "
                         f"random init {100 * s['linear_top1_random_init']:.1f}%")  # fmt: skip
        lines.append(f"{s['train_seconds']:.0f} s of training at {s['images_per_second']:.0f} images/s "
                     f"on {s['device']}")  # fmt: skip
        return "\n".join(lines)


class NonFiniteLossError(RuntimeError):
    """The loss became NaN or infinite; the run stopped before updating the weights."""


def _stopped(
    what: str, epoch: int, step: int, global_step: int, last_good: Path | None
) -> NonFiniteLossError:
    """The error that stops a run at a non-finite step: where it happened and which checkpoint survives."""
    kept = (f"the last good checkpoint {last_good} is intact" if last_good
            else "no epoch had finished, so there is no checkpoint")  # fmt: skip
    return NonFiniteLossError(f"{what} at epoch {epoch}, step {step} (global step {global_step}); training "
                              f"stopped before the update and {kept}. Lower the learning rate or check the "
                              "inputs, then resume.")  # fmt: skip


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


def build_optimizer(model: torch.nn.Module, profile: Profile) -> tuple[torch.optim.Optimizer, float]:
    """The method's optimiser and peak learning rate: the profile's (SimCLR's) rate times the method's
    `lr_scale`; AdamW for methods that set `adamw_weight_decay` (ViTs, CLIP), else SGD with momentum."""
    peak_lr = profile.lr * getattr(model, "lr_scale", 1.0)
    if getattr(model, "adamw_weight_decay", None) is not None:  # as in the MoCo v3, DINO and CLIP papers
        return adamw(model, peak_lr, model.adamw_weight_decay), peak_lr
    sgd = torch.optim.SGD(model.parameters(), lr=peak_lr, momentum=0.9, weight_decay=profile.weight_decay)
    return sgd, peak_lr


def atomic_write_bytes(path: Path, write) -> None:
    """Write through `write(file)` to a temporary file, flush it to disk, then rename over `path`."""
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _write_json(path: Path, obj) -> None:
    atomic_write_bytes(path, lambda fh: fh.write((json.dumps(obj, indent=2) + "\n").encode()))


def _write_metrics(path: Path, metrics: list[dict]) -> None:
    text = "".join(json.dumps(m) + "\n" for m in metrics)
    atomic_write_bytes(path, lambda fh: fh.write(text.encode()))


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
            warnings.warn(f"checkpoint {path} is unreadable ({exc}); trying the previous one",
                          stacklevel=2)  # fmt: skip
    raise ValueError(f"every checkpoint in {out_dir} is unreadable: {[str(p) for p in paths]}")


def git_commit() -> str:
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True,
                              text=True, timeout=10, check=True).stdout.strip()  # fmt: skip
        dirty = subprocess.run(["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
                               capture_output=True, text=True, timeout=10).stdout.strip()  # fmt: skip
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_description(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads"


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
    if sync_bn and method in ("moco", "mocov2"):
        raise ValueError("sync_bn would undo MoCo's shuffled BN (its statistics must not span a query's key)")
    if sync_bn and not torch.cuda.is_available():
        raise ValueError("sync_bn needs CUDA devices: torch's SyncBatchNorm does not run on CPUs")
    check_method(method, method_options)  # a misspelt name fails now, not after loading the data
    profile = profile if isinstance(profile, Profile) else get_profile(profile)
    if epochs is not None:
        if not epochs >= 1:
            raise ValueError(f"epochs must be at least 1, got {epochs}")
        profile = dataclasses.replace(profile, epochs=epochs)
    device = distributed.setup() or torch.device(profile.device)
    is_main, world = distributed.rank() == 0, distributed.world_size()
    out = Path(out_dir) if out_dir is not None else None
    if out is not None:
        if checkpoint_paths(out) and not resume:
            raise FileExistsError(f"{out} already holds a run: pass resume=True (--resume) to "
                                  "continue it, or choose another output folder")  # fmt: skip
        if resume and not checkpoint_paths(out):
            raise FileNotFoundError(f"nothing to resume: no checkpoint in {out}")
        out.mkdir(parents=True, exist_ok=True)
    elif resume:
        raise ValueError("resume=True needs the out_dir of the run to continue")

    data = profile_data(profile, data, device)
    if is_main:
        log(banner(profile, data.source))

    torch.manual_seed(seed)
    backbone = build_backbone(profile.backbone, in_channels=data.train_images.shape[1])
    model = build_method(method, backbone, len(data.train_images), backbone_name=profile.backbone,
                         **(method_options or {})).to(device)  # fmt: skip
    # channels_last speeds convolutions up on both CPUs (oneDNN) and GPUs (tensor cores).
    model = model.to(memory_format=torch.channels_last)
    use_amp = profile.amp and device.type == "cuda"
    if epochs is None and getattr(model, "epoch_scale", 1.0) != 1.0:  # a costlier step gets fewer epochs
        scaled = max(min(2, profile.epochs), round(profile.epochs * model.epoch_scale))  # two, to see a trend
        profile = dataclasses.replace(profile, epochs=scaled)
    encoder = getattr(model, "encoder", backbone)  # what evaluation reads (CPC: pooled patch features)
    optimizer, peak_lr = build_optimizer(model, profile)

    state = {"epoch": 0, "step": 0, "metrics": [], "random_init": None, "train_seconds": 0.0}
    last_good = None
    if resume:
        ckpt, last_good = load_checkpoint(out, device)
        if (ckpt["method"], ckpt["profile"], ckpt["seed"]) != (method, profile.name, seed):
            raise ValueError(f"{last_good} is a {ckpt['method']}/{ckpt['profile']}/seed {ckpt['seed']} "
                             f"run; cannot resume it as {method}/{profile.name}/seed {seed}")  # fmt: skip
        if ckpt.get("method_options", {}) != _literal_options(method_options):
            raise ValueError(f"{last_good} was trained with options {ckpt.get('method_options', {})}; "
                             f"cannot resume it with {_literal_options(method_options)}")  # fmt: skip
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["rng_cpu"].cpu())
        if device.type == "cuda" and ckpt["rng_cuda"] is not None:
            torch.cuda.set_rng_state(ckpt["rng_cuda"].cpu(), device)
        state = {k: ckpt[k] for k in state}
        if is_main:
            log(f"resumed from {last_good} (epoch {state['epoch']} of {profile.epochs})")
    if state["random_init"] is None:
        # The baseline: the same architecture, same seed, before any training.
        state["random_init"] = evaluate_backbone(encoder, data, profile.eval_batch_size,
                                                 linear=linear_probe)  # fmt: skip
        if hasattr(model, "setup"):  # per-image state (a memory bank) built from the untrained encoder
            # CLIP's captions are generated from the labels (and the images) before training
            wants_labels = "train_labels" in inspect.signature(model.setup).parameters
            labels = {"train_labels": data.train_labels} if wants_labels else {}
            model.setup(data.train_images, profile.eval_batch_size, **labels)

    ddp = model
    if world > 1 and sync_bn:  # BN statistics over the global batch, as SimCLR's large-batch runs
        model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ddp = model
    if world > 1:
        ddp = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[device] if device.type == "cuda" else None
        )
    if profile.compile and device.type == "cuda":
        ddp = torch.compile(ddp)

    n, batch = len(data.train_images), profile.batch_size
    steps_per_epoch = n // batch
    if steps_per_epoch == 0:
        raise ValueError(f"batch size {batch} exceeds the {n} training images")
    total_steps = steps_per_epoch * profile.epochs
    warmup_steps = int(profile.warmup_epochs * steps_per_epoch)

    final = None
    try:
        for epoch in range(state["epoch"], profile.epochs):
            # The order depends on (seed, epoch) alone, so a resumed run sees the same batches.
            order = torch.randperm(n, generator=torch.Generator().manual_seed(seed * 100003 + epoch)).to(
                device
            )
            if world > 1:  # each rank draws its own views; seeded per epoch, so a resume stays exact
                torch.manual_seed((seed * 100003 + epoch) * 1009 + distributed.rank())
            model.train()
            t0, loss_sum = time.perf_counter(), 0.0
            bar = tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{profile.epochs}", leave=False,
                       disable=not (is_main and _progress_enabled(progress)), dynamic_ncols=True)  # fmt: skip
            for i in bar:
                idx = order[i * batch : (i + 1) * batch][distributed.rank() :: world]
                lr = lr_at(state["step"], total_steps, warmup_steps, peak_lr)
                for group in optimizer.param_groups:
                    group["lr"] = lr
                try:
                    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                        loss = ddp(data.train_images[idx], idx)
                except NonFiniteInputError as exc:  # the embeddings, not only the loss, went NaN or infinite
                    raise _stopped(f"the {method} loss got non-finite input ({exc})", epoch + 1, i + 1,
                                   state["step"] + 1, last_good) from exc  # fmt: skip
                value = loss.item()
                if not math.isfinite(value):
                    raise _stopped(f"the {method} loss became {value}", epoch + 1, i + 1, state["step"] + 1,
                                   last_good)  # fmt: skip
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                model.on_step_end(state["step"], total_steps)
                state["step"] += 1
                loss_sum += value
                bar.set_postfix(
                    loss=f"{value:.3f}", img_s=f"{(i + 1) * batch / (time.perf_counter() - t0):.0f}"
                )
            bar.close()
            if device.type == "cuda":
                torch.cuda.synchronize()
            seconds = time.perf_counter() - t0
            state["train_seconds"] += seconds
            state["epoch"] = epoch + 1
            row = {"epoch": epoch + 1, "loss": loss_sum / steps_per_epoch, "lr": lr, "seconds": seconds,
                   "images_per_second": steps_per_epoch * batch / seconds}  # fmt: skip
            if epoch + 1 == profile.epochs:  # the protocol reads the final epoch, never the best one
                final = evaluate_backbone(encoder, data, profile.eval_batch_size, linear=linear_probe)
                row["knn_top1"] = final["knn_top1"]
            elif (epoch + 1) % profile.knn_every == 0:
                row["knn_top1"] = evaluate_backbone(encoder, data, profile.eval_batch_size, linear=False)[
                    "knn_top1"
                ]
            if hasattr(model, "epoch_metrics"):
                row.update(model.epoch_metrics())
            state["metrics"].append(row)
            if is_main:
                knn = f"  kNN {100 * row['knn_top1']:.1f}%" if "knn_top1" in row else ""
                log(f"epoch {epoch + 1}/{profile.epochs}  loss {row['loss']:.4f}  lr {lr:.3f}  "
                    f"{row['images_per_second']:.0f} img/s{knn}")  # fmt: skip
                if out is not None:
                    last_good = _save_checkpoint(out, model, optimizer, state, method, profile, seed, device,
                                                 method_options)  # fmt: skip
                    _write_metrics(out / "metrics.jsonl", state["metrics"])
    except KeyboardInterrupt:
        if is_main and out is not None:
            where = f"the checkpoint {last_good}" if last_good else "no checkpoint yet (no epoch finished)"
            log(
                f"interrupted during epoch {state['epoch'] + 1}; {where} holds the run: call train(..., "
                "resume=True) or pass --resume to continue it"
            )
        raise

    if final is None:  # a finished run was resumed: nothing left to train
        final = evaluate_backbone(encoder, data, profile.eval_batch_size, linear=linear_probe)
    summary = {
        "method": method, "method_options": _literal_options(method_options), "profile": profile.name,
        "epochs": profile.epochs, "seed": seed,
        "knn_top1": final["knn_top1"], "knn_top1_random_init": state["random_init"]["knn_top1"],
        "linear_top1": final.get("linear_top1"),
        "linear_top1_random_init": state["random_init"].get("linear_top1"),
        "train_images": n, "test_images": len(data.test_images), "batch_size": batch, "lr": peak_lr,
        "seconds": time.perf_counter() - started, "train_seconds": state["train_seconds"],
        "images_per_second": state["step"] * batch / max(state["train_seconds"], 1e-9),
        "device": device_description(device), "world_size": world, "torch": torch.__version__,
        "python": sys.version.split()[0], "commit": git_commit(), "data": data.source,
    }  # fmt: skip
    if is_main and out is not None:
        _write_json(out / "summary.json", summary)
    return Run(summary, state["metrics"], model, data)


def _literal_options(options: dict | None) -> dict:
    """The method options a checkpoint can record and `weights_only` loading can read back."""
    return {k: v for k, v in (options or {}).items() if isinstance(v, (bool, int, float, str))}


def _save_checkpoint(out, model, optimizer, state, method, profile, seed, device, options) -> Path:
    ckpt = {
        "method": method, "profile": profile.name, "seed": seed, "method_options": _literal_options(options),
        "model": model.state_dict(), "optimizer": optimizer.state_dict(),
        "rng_cpu": torch.get_rng_state(),
        "rng_cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None,
        "profile_fields": dataclasses.asdict(profile), **state,
    }  # fmt: skip
    path = out / f"checkpoint_{state['epoch']:04d}.pt"
    atomic_write_bytes(path, lambda fh: torch.save(ckpt, fh))
    for old in checkpoint_paths(out)[CHECKPOINTS_KEPT:]:
        old.unlink()
    return path


def evaluate_checkpoint(out_dir: str | os.PathLike, data: ImageDataset | None = None,
                        linear_probe: bool = True) -> dict:  # fmt: skip
    """Re-evaluate the newest readable checkpoint of a run with the common protocol."""
    ckpt, path = load_checkpoint(Path(out_dir), "cpu")
    profile = Profile(**ckpt["profile_fields"])
    device = torch.device(profile.device)
    data = profile_data(profile, data, device)
    backbone = build_backbone(profile.backbone, in_channels=data.train_images.shape[1])
    model = build_method(ckpt["method"], backbone, len(data.train_images), backbone_name=profile.backbone,
                         **ckpt.get("method_options", {})).to(device)  # fmt: skip
    model.load_state_dict(ckpt["model"])
    encoder = getattr(model, "encoder", backbone)
    result = evaluate_backbone(encoder, data, profile.eval_batch_size, linear=linear_probe)
    return {"checkpoint": str(path), "method": ckpt["method"], "profile": profile.name,
            "epoch": ckpt["epoch"], **result}  # fmt: skip
