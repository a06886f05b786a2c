"""Benchmarks: how fast the package's pieces run on this machine.

`bench_augment` times one random view per image three ways: the batched
augmentation of `contrastive.augment`, the same ops called one image at a time,
and torchvision's v2 pipeline applied per image as a DataLoader would run it.
"""

import time
from collections.abc import Callable, Sequence

import torch

from contrastive.augment import SIMCLR_CIFAR, Recipe, augment


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _images_per_second(run: Callable[[], object], images: int, seconds: float, device: torch.device) -> float:
    """Throughput of `run` (which handles `images` images), warm-up excluded."""
    run()  # first call pays for lazy initialisation and allocator growth
    _synchronize(device)
    start, runs = time.perf_counter(), 0
    while time.perf_counter() - start < seconds:
        run()
        runs += 1
    # On CUDA the loop only queues kernels; the clock stops once they have all run.
    _synchronize(device)
    return runs * images / (time.perf_counter() - start)


def _torchvision_pipeline(recipe: Recipe) -> tuple[Callable | None, str | None]:
    """torchvision's v2 equivalent of `recipe` and torchvision's version, or (None, None)."""
    try:
        import torchvision
        from torchvision.transforms import v2
    except ImportError:
        return None, None
    steps = [
        v2.RandomResizedCrop(recipe.size, scale=recipe.scale, ratio=recipe.ratio, antialias=True),
        v2.RandomHorizontalFlip(recipe.flip_p),
        v2.RandomApply([v2.ColorJitter(*recipe.jitter)], p=recipe.jitter_p),
        v2.RandomGrayscale(recipe.gray_p),
        v2.ToDtype(torch.float32, scale=True),
    ]
    if recipe.blur_p > 0:
        blur = v2.GaussianBlur(recipe.blur_kernel, recipe.blur_sigma)
        steps.append(v2.RandomApply([blur], p=recipe.blur_p))
    if recipe.solarize_p > 0:
        steps.append(v2.RandomSolarize(0.5, p=recipe.solarize_p))
    steps.append(v2.Normalize(list(recipe.mean), list(recipe.std)))
    return v2.Compose(steps), torchvision.__version__


def bench_augment(
    batch_sizes: Sequence[int] = (256, 512, 1024),
    recipe: Recipe = SIMCLR_CIFAR,
    images: torch.Tensor | None = None,
    device: torch.device | str | None = None,
    seconds: float = 2.0,
) -> list[dict]:
    """Images per second of each augmentation pipeline at each batch size.

    `images` is a uint8 (N, C, H, W) pool, e.g. `load_cifar10().train_images[:N]`;
    batches take its first images, wrapping around when a batch is larger than the
    pool. Without it, uniform uint8 noise of CIFAR's shape stands in. `device`
    defaults to CUDA when available. All pipelines run on that device. The
    torchvision pipeline is left out when torchvision is not installed; the rows
    then say `"torchvision": None`.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if images is None:
        images = torch.randint(0, 256, (max(batch_sizes), 3, 32, 32), dtype=torch.uint8)
    if images.dtype != torch.uint8 or images.ndim != 4 or len(images) == 0:
        raise ValueError(
            f"images must be a non-empty uint8 tensor (N, C, H, W), got {images.dtype} "
            f"of shape {tuple(images.shape)}"
        )
    if seconds <= 0:
        raise ValueError(f"seconds must be positive, got {seconds}")
    pool = images.to(device)
    torchvision_pipeline, torchvision_version = _torchvision_pipeline(recipe)

    rows = []
    for batch_size in batch_sizes:
        batch = pool[torch.arange(batch_size, device=device) % len(pool)]
        pipelines = {
            "batched": lambda batch=batch: augment(batch, recipe),
            "per_image_loop": lambda batch=batch: [
                augment(batch[i : i + 1], recipe) for i in range(len(batch))
            ],
        }
        if torchvision_pipeline is not None:
            pipelines["torchvision_v2_per_image"] = lambda batch=batch: [
                torchvision_pipeline(image) for image in batch
            ]
        for name, run in pipelines.items():
            rows.append(
                {
                    "pipeline": name,
                    "batch_size": batch_size,
                    "images_per_second": _images_per_second(run, batch_size, seconds, device),
                    "device": str(device),
                    "torch": torch.__version__,
                    "torchvision": torchvision_version,
                }
            )
    return rows


def format_table(rows: Sequence[dict]) -> str:
    """An aligned text table of `bench_augment` rows, with the batched pipeline's
    speed-up over each pipeline at the same batch size."""
    if not rows:
        return "no benchmark rows"
    first = rows[0]
    torchvision = first["torchvision"] or "not installed, its pipeline was skipped"
    title = (
        f"augmentation throughput on {first['device']} (torch {first['torch']}, torchvision {torchvision})"
    )
    batched = {r["batch_size"]: r["images_per_second"] for r in rows if r["pipeline"] == "batched"}
    header = ("pipeline", "batch", "images/s", "batched speed-up")
    cells = [header]
    for row in rows:
        rate = row["images_per_second"]
        reference = batched.get(row["batch_size"])
        speedup = f"{reference / rate:.1f}x" if reference else "-"
        cells.append((row["pipeline"], str(row["batch_size"]), f"{rate:,.0f}", speedup))
    widths = [max(len(line[i]) for line in cells) for i in range(len(header))]
    lines = [
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(line, widths, strict=True))
        )
        for line in cells
    ]
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join([title, *lines])
