"""SimCLR two ways on the same machine: this package's device-resident pipeline against lightly's.

Both sides train the same backbone and projection head (the package's, from
the same seed), on the same CIFAR-10 subset (the cpu profile's 20,000 training
and 5,000 test images), with the same optimiser, learning-rate schedule, batch
size, augmentation recipe and number of steps, and both are read out with the
package's weighted kNN. What differs is what users of each library run:

- contrastive: uint8 images held as one tensor, views drawn by batched tensor
  ops (`contrastive.augment`), `contrastive.losses.nt_xent`;
- lightly: a Dataset of PIL images, lightly's `SimCLRTransform` (torchvision
  transforms) applied per image in DataLoader workers, lightly's `NTXentLoss`.
  The number of workers is lightly's best on this machine, found by timing a
  few steps with each candidate first.

lightly and torchvision are not dependencies of the book. Run this in an
environment of its own, from the repository root:

    python -m venv ../lightly-env
    ../lightly-env/bin/pip install torch torchvision lightly
    ../lightly-env/bin/pip install -e . --no-deps
    ../lightly-env/bin/python benchmarks/lightly_side_by_side.py --json results/lightly_side_by_side_cpu.json

Without lightly and torchvision it says so and exits with status 2.
"""

from __future__ import annotations

import argparse
import json
import math
import platform
import sys
import time

RECORD_FIELDS = (
    "benchmark",
    "device",
    "torch",
    "torchvision",
    "lightly",
    "commit",
    "profile",
    "epochs",
    "steps",
    "batch_size",
    "train_images",
    "test_images",
    "seed",
    "rows",
    "speedup",
    "knn_difference",
)
ROW_FIELDS = (
    "pipeline",
    "images_per_second",
    "train_seconds",
    "knn_top1",
    "knn_top1_random_init",
    "knn_by_epoch",
)


def missing_dependencies() -> list[str]:
    """The names of the side-by-side's extra packages that cannot be imported here."""
    missing = []
    for name in ("lightly", "torchvision"):
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    return missing


def check_record(record: dict) -> dict:
    """Refuse a record that lacks a field, holds an impossible value or whose ratios disagree with its
    rows."""
    missing = [f for f in RECORD_FIELDS if f not in record]
    if missing:
        raise ValueError(f"side-by-side record lacks {missing}")
    rows = {row.get("pipeline"): row for row in record["rows"]}
    if set(rows) != {"contrastive", "lightly"}:
        raise ValueError(f"expected one contrastive and one lightly row, got {sorted(map(str, rows))}")
    for name, row in rows.items():
        lacking = [f for f in ROW_FIELDS if f not in row]
        if lacking:
            raise ValueError(f"the {name} row lacks {lacking}")
        if not (row["images_per_second"] > 0 and row["train_seconds"] > 0):
            raise ValueError(f"the {name} row has a non-positive rate or time")
        for key in ("knn_top1", "knn_top1_random_init"):
            if not 0.0 <= row[key] <= 1.0:
                raise ValueError(f"the {name} row's {key} is {row[key]}, outside [0, 1]")
    ours, theirs = rows["contrastive"], rows["lightly"]
    ratio = ours["images_per_second"] / theirs["images_per_second"]
    if not math.isclose(record["speedup"], ratio, rel_tol=1e-9):
        raise ValueError("speedup is not the ratio of the rows' images/s")
    if not math.isclose(record["knn_difference"], ours["knn_top1"] - theirs["knn_top1"], abs_tol=1e-12):
        raise ValueError("knn_difference is not the difference of the rows' kNN top-1")
    return record


def format_record(record: dict) -> str:
    """The record as a short aligned table."""
    lines = [
        f"SimCLR side by side on {record['device']} (torch {record['torch']}, torchvision "
        f"{record['torchvision']}, lightly {record['lightly']}): {record['steps']} steps of batch "
        f"{record['batch_size']}, {record['train_images']} training images",
        f"{'pipeline':12s}{'images/s':>10s}{'train s':>9s}{'kNN final':>11s}{'kNN best':>10s}"
        f"{'random init':>13s}",
    ]
    for row in record["rows"]:
        best = max([row["knn_top1"], *[k for _, k in row["knn_by_epoch"]]])
        lines.append(
            f"{row['pipeline']:12s}{row['images_per_second']:10,.0f}{row['train_seconds']:9.0f}"
            f"{100 * row['knn_top1']:10.1f}%{100 * best:9.1f}%"
            f"{100 * row['knn_top1_random_init']:12.1f}%"
        )
    lines.append(
        f"speed-up {record['speedup']:.2f}x, kNN difference {100 * record['knn_difference']:+.1f} points"
    )
    return "\n".join(lines)


# ---- lightly's way -------------------------------------------------------------------------------


class PILImages:
    """CIFAR images as torchvision's CIFAR10 serves them: a PIL image per index, then the transform."""

    def __init__(self, images_uint8, transform):
        self.array = images_uint8.permute(0, 2, 3, 1).contiguous().numpy()  # (N, H, W, C) as in the pickles
        self.transform = transform

    def __len__(self) -> int:
        return len(self.array)

    def __getitem__(self, i):
        from PIL import Image

        return self.transform(Image.fromarray(self.array[i]))


def lightly_transform(recipe):
    """lightly's SimCLRTransform set to the package's recipe (crop scale, jitter, grayscale, no blur)."""
    from lightly.transforms import SimCLRTransform

    brightness, contrast, saturation, hue = recipe.jitter
    return SimCLRTransform(
        input_size=recipe.size,
        cj_prob=recipe.jitter_p,
        cj_strength=1.0,
        cj_bright=brightness,
        cj_contrast=contrast,
        cj_sat=saturation,
        cj_hue=hue,
        min_scale=recipe.scale[0],
        random_gray_scale=recipe.gray_p,
        gaussian_blur=recipe.blur_p,
        hf_prob=recipe.flip_p,
        normalize=None,  # the backbone standardises its input, as in the package's own pipeline
    )


def _loader(dataset, batch_size: int, workers: int, seed: int):
    import torch

    return torch.utils.data.DataLoader(
        dataset,
        batch_size=batch_size,
        shuffle=True,
        drop_last=True,
        num_workers=workers,
        persistent_workers=workers > 0,
        generator=torch.Generator().manual_seed(seed),
    )


def _simclr_model(backbone_name: str, seed: int):
    import torch

    from contrastive.models import build_backbone, projection_mlp

    torch.manual_seed(seed)  # the same draw as train(): the backbone first, then the head
    backbone = build_backbone(backbone_name)
    head = projection_mlp(backbone.out_dim, 512, 128)
    return torch.nn.Sequential(backbone, head).to(memory_format=torch.channels_last)


def _step(model, optimizer, criterion, views) -> float:
    x0, x1 = views
    z0, z1 = model(x0), model(x1)
    loss = criterion(z0, z1)
    optimizer.zero_grad(set_to_none=True)
    loss.backward()
    optimizer.step()
    return loss.item()


def probe_workers(
    dataset, profile, candidates, steps: int = 12, warmup: int = 3, seed: int = 0
) -> dict[int, float]:
    """Images/s of lightly's full training step with each number of DataLoader workers (a throwaway
    model)."""
    from lightly.loss import NTXentLoss

    from contrastive.train import build_optimizer

    rates = {}
    for workers in candidates:
        model = _simclr_model(profile.backbone, seed)
        optimizer, _ = build_optimizer(model, profile)
        criterion = NTXentLoss(temperature=0.5)
        loader = _loader(dataset, profile.batch_size, workers, seed)
        batches = (views for _ in range(warmup + steps) for views in loader)  # epochs over a small subset
        for _ in range(warmup):
            _step(model, optimizer, criterion, next(batches))
        began = time.perf_counter()
        for _ in range(steps):
            _step(model, optimizer, criterion, next(batches))
        rates[workers] = steps * profile.batch_size / (time.perf_counter() - began)
        del batches
    return rates


def train_lightly(data, profile, workers: int, seed: int = 0, log=print) -> dict:
    """SimCLR lightly's way for the profile's epochs; the schedule and optimiser are train()'s."""
    from lightly.loss import NTXentLoss
    from tqdm import tqdm

    from contrastive.augment import SIMCLR_CIFAR
    from contrastive.evaluate import evaluate_backbone
    from contrastive.train import NonFiniteLossError, _progress_enabled, build_optimizer, lr_at

    dataset = PILImages(data.train_images.cpu(), lightly_transform(SIMCLR_CIFAR))
    model = _simclr_model(profile.backbone, seed)
    backbone = model[0]
    random_init = evaluate_backbone(backbone, data, profile.eval_batch_size, linear=False)["knn_top1"]
    optimizer, peak_lr = build_optimizer(model, profile)
    criterion = NTXentLoss(temperature=0.5)
    loader = _loader(dataset, profile.batch_size, workers, seed)
    steps_per_epoch = len(loader)
    total = steps_per_epoch * profile.epochs
    warmup = int(profile.warmup_epochs * steps_per_epoch)
    step, train_seconds, knn_by_epoch, final = 0, 0.0, [], None
    for epoch in range(profile.epochs):
        model.train()
        began = time.perf_counter()
        bar = tqdm(
            loader,
            desc=f"lightly epoch {epoch + 1}/{profile.epochs}",
            leave=False,
            disable=not _progress_enabled(None),
        )
        for views in bar:
            for group in optimizer.param_groups:
                group["lr"] = lr_at(step, total, warmup, peak_lr)
            loss = _step(model, optimizer, criterion, views)
            if not math.isfinite(loss):
                raise NonFiniteLossError(f"lightly's NT-Xent became {loss} at step {step + 1}")
            step += 1
        seconds = time.perf_counter() - began
        train_seconds += seconds
        if epoch + 1 == profile.epochs or (epoch + 1) % profile.knn_every == 0:
            knn = evaluate_backbone(backbone, data, profile.eval_batch_size, linear=False)["knn_top1"]
            knn_by_epoch.append((epoch + 1, knn))
            final = knn
        evaluated = bool(knn_by_epoch) and knn_by_epoch[-1][0] == epoch + 1
        log(
            f"lightly epoch {epoch + 1}/{profile.epochs}  loss {loss:.4f}  "
            f"{steps_per_epoch * profile.batch_size / seconds:.0f} img/s"
            + (f"  kNN {100 * knn_by_epoch[-1][1]:.1f}%" if evaluated else "")
        )
    return {
        "pipeline": "lightly",
        "images_per_second": step * profile.batch_size / train_seconds,
        "train_seconds": train_seconds,
        "knn_top1": final,
        "knn_top1_random_init": random_init,
        "knn_by_epoch": knn_by_epoch,
        "num_workers": workers,
        "steps": step,
    }


def train_ours(data, profile, seed: int = 0) -> dict:
    from contrastive.train import train

    run = train("simclr", profile=profile, data=data, seed=seed, linear_probe=False)
    s = run.summary
    knn_by_epoch = [(m["epoch"], m["knn_top1"]) for m in run.metrics if "knn_top1" in m]
    return {
        "pipeline": "contrastive",
        "images_per_second": s["images_per_second"],
        "train_seconds": s["train_seconds"],
        "knn_top1": s["knn_top1"],
        "knn_top1_random_init": s["knn_top1_random_init"],
        "knn_by_epoch": knn_by_epoch,
        "steps": len(data.train_images) // profile.batch_size * profile.epochs,
    }


def losses_agree(batch: int = 64, dim: int = 128, seed: int = 0) -> float:
    """The largest |nt_xent - lightly NTXentLoss| over a few random projection pairs: the same objective."""
    import torch
    from lightly.loss import NTXentLoss

    from contrastive.losses import nt_xent

    g = torch.Generator().manual_seed(seed)
    worst = 0.0
    for _ in range(5):
        z0, z1 = torch.randn(batch, dim, generator=g), torch.randn(batch, dim, generator=g)
        worst = max(worst, abs(nt_xent(z0, z1, 0.5).item() - NTXentLoss(temperature=0.5)(z0, z1).item()))
    return worst


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--epochs", type=int, default=None, help="default: the cpu profile's")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--train-size", type=int, default=None, help="default: the cpu profile's")
    parser.add_argument("--test-size", type=int, default=None, help="default: the cpu profile's")
    parser.add_argument(
        "--workers",
        type=int,
        nargs="+",
        default=[1, 2, 3],
        help="DataLoader worker counts to try for lightly; the fastest is used",
    )
    parser.add_argument("--json", default=None, help="write the record to this file")
    args = parser.parse_args(argv)

    missing = missing_dependencies()
    if missing:
        print(
            f"error: this benchmark needs {' and '.join(missing)}, which the book does not depend on. "
            "Install them in an environment of their own (see this script's docstring) and run it "
            "there.",
            file=sys.stderr,
        )
        return 2
    import lightly
    import torch
    import torchvision

    from contrastive.augment import SIMCLR_CIFAR
    from contrastive.profiles import get_profile
    from contrastive.runinfo import device_description, git_commit
    from contrastive.train import profile_data

    gap = losses_agree()
    if gap > 1e-4:
        raise SystemExit(f"nt_xent and lightly's NTXentLoss differ by {gap:.2e}: not the same objective")
    print(f"nt_xent and lightly's NTXentLoss agree to {gap:.1e} on random projections")
    overrides = {
        k: v
        for k, v in (("epochs", args.epochs), ("train_size", args.train_size), ("test_size", args.test_size))
        if v is not None
    }
    profile = get_profile("cpu", **overrides)
    data = profile_data(profile, None, torch.device("cpu"))

    images = PILImages(data.train_images, lightly_transform(SIMCLR_CIFAR))
    probe = probe_workers(images, profile, args.workers, seed=args.seed)
    workers = max(probe, key=probe.get)
    print(
        "lightly's images/s by DataLoader workers: "
        + ", ".join(f"{w}: {r:.0f}" for w, r in probe.items())
        + f"; using {workers}"
    )
    theirs = train_lightly(data, profile, workers, args.seed)
    theirs["worker_probe"] = {str(w): r for w, r in probe.items()}
    ours = train_ours(data, profile, args.seed)
    record = {
        "benchmark": "lightly_side_by_side",
        "device": device_description(torch.device("cpu")),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torchvision": torchvision.__version__,
        "lightly": lightly.__version__,
        "commit": git_commit(),
        "profile": profile.name,
        "epochs": profile.epochs,
        "steps": theirs["steps"],
        "batch_size": profile.batch_size,
        "train_images": len(data.train_images),
        "test_images": len(data.test_images),
        "seed": args.seed,
        "loss_gap": gap,
        "rows": [ours, theirs],
        "speedup": ours["images_per_second"] / theirs["images_per_second"],
        "knn_difference": ours["knn_top1"] - theirs["knn_top1"],
        "data": data.source,
    }
    if ours["steps"] != theirs["steps"]:
        raise SystemExit(f"the two runs took {ours['steps']} and {theirs['steps']} steps; expected the same")
    if ours["knn_top1_random_init"] != theirs["knn_top1_random_init"]:  # same seed, same draw: same encoder
        raise SystemExit("the two runs did not start from the same encoder (their random-init kNN differ)")
    check_record(record)
    print(format_record(record))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(record, fh, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
