"""Benchmarks: how fast the package's pieces run on this machine.

`bench_augment` times one random view per image three ways: the batched
augmentation of `contrastive.augment`, the same ops called one image at a time,
and torchvision's v2 pipeline applied per image as a DataLoader would run it.
"""

import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch

from .augment import SIMCLR_CIFAR, Recipe, augment
from .runinfo import device_description, git_commit


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
                    "device": device_description(device),
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


# ---- one method's training step ----------------------------------------------------------------

STEP_FIELDS = (
    "method",
    "profile",
    "device",
    "batch_size",
    "compiled",
    "images_per_second",
    "window_images_per_second",
    "warmup_steps",
    "steps_per_window",
    "peak_memory_bytes",
    "peak_memory_kind",
    "torch",
    "commit",
)


def time_steps(
    step: Callable[[], object],
    images_per_step: int,
    device: torch.device,
    warmup: int = 3,
    windows: int = 5,
    steps_per_window: int = 3,
    clock: Callable[[], float] = time.perf_counter,
) -> dict:
    """Median images/s over `windows` timed windows of `steps_per_window` calls of `step`.

    The first `warmup` calls are run and not timed (lazy initialisation, allocator
    growth, autotuning, compilation). On CUDA each window is timed with events,
    which measure the queued kernels rather than the Python loop; elsewhere with
    `clock`. The median, not the mean, so one window disturbed by another process
    does not move the figure.
    """
    if warmup < 0 or windows < 1 or steps_per_window < 1:
        raise ValueError(
            f"need warmup >= 0, windows >= 1 and steps_per_window >= 1; got {warmup}, "
            f"{windows}, {steps_per_window}"
        )
    for _ in range(warmup):
        step()
    _synchronize(device)
    rates = []
    for _ in range(windows):
        if device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(steps_per_window):
                step()
            end.record()
            end.synchronize()
            seconds = start.elapsed_time(end) / 1000
        else:
            began = clock()
            for _ in range(steps_per_window):
                step()
            seconds = clock() - began
        rates.append(steps_per_window * images_per_step / max(seconds, 1e-12))
    ordered = sorted(rates)
    middle = len(ordered) // 2
    median = ordered[middle] if len(ordered) % 2 else (ordered[middle - 1] + ordered[middle]) / 2
    return {
        "images_per_second": median,
        "window_images_per_second": rates,
        "warmup_steps": warmup,
        "steps_per_window": steps_per_window,
    }


def _peak_memory(device: torch.device) -> tuple[int | None, str]:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device), "cuda_max_allocated"
    import resource

    # ru_maxrss is in KiB on Linux: the process's high-water mark, so `bench all` measures each method
    # in a process of its own.
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024, "process_max_rss"


def bench_step(
    method: str,
    profile: str | None = None,
    batch_size: int | None = None,
    warmup: int = 3,
    windows: int = 5,
    steps_per_window: int = 3,
    options: dict | None = None,
    compile: bool = False,
) -> dict:
    """Training images/s and peak memory of one method's full step (views, forward, backward, optimiser
    step, per-step hook) on the profile's device, backbone and batch size, on random uint8 images.
    `compile=True` runs the method through torch.compile, as the profile's own `compile` does (CUDA
    only); the compilation happens in the untimed warm-up steps."""
    from .methods import check_method
    from .profiles import get_profile
    from .train import build_model, build_optimizer, train_step, tuned

    cls = check_method(method, options)
    prof = get_profile(profile, **({"compile": True} if compile else {}))
    prof, options = tuned(cls, prof, options)  # the batch and options the method trains with
    device = torch.device(prof.device)
    batch = batch_size or prof.batch_size
    if batch < 2:
        raise ValueError(f"batch_size must be at least 2, got {batch}")
    pool = 4 * batch  # enough images for per-image state (memory banks, captions) to be indexed at random
    torch.manual_seed(0)
    images = torch.randint(0, 256, (pool, 3, 32, 32), dtype=torch.uint8, device=device)
    labels = torch.randint(0, 10, (pool,), device=device)
    model = build_model(method, prof, pool, 3, options, seed=0, device=device)
    model.setup(images, labels, prof.eval_batch_size)
    optimizer, peak_lr = build_optimizer(model, prof)
    runner = torch.compile(model) if prof.compile and device.type == "cuda" else model
    use_amp = prof.amp and device.type == "cuda"
    total = warmup + windows * steps_per_window
    counter = {"step": 0}

    def step():
        idx = torch.randint(0, pool, (batch,), device=device)
        train_step(
            model,
            optimizer,
            images[idx],
            idx,
            peak_lr,
            counter["step"],
            total,
            runner,
            use_amp,
            check=device.type != "cuda",
        )
        counter["step"] += 1

    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    model.train()
    timing = time_steps(step, batch, device, warmup, windows, steps_per_window)
    peak, kind = _peak_memory(device)
    return {
        "method": method,
        "profile": prof.name,
        "device": device_description(device),
        "batch_size": batch,
        "compiled": runner is not model,
        **timing,
        "peak_memory_bytes": peak,
        "peak_memory_kind": kind,
        "torch": torch.__version__,
        "commit": git_commit(),
    }


def check_step_row(row: dict) -> dict:
    """Refuse a `bench_step` row that lacks a field or holds an impossible value; return it unchanged."""
    missing = [f for f in STEP_FIELDS if f not in row]
    if missing:
        raise ValueError(f"benchmark row lacks {missing}")
    if not (row["images_per_second"] > 0 and all(r > 0 for r in row["window_images_per_second"])):
        raise ValueError(f"benchmark row has a non-positive rate: {row['images_per_second']}")
    if not isinstance(row["compiled"], bool):
        raise ValueError(f"benchmark row's compiled is {row['compiled']!r}, not true or false")
    if row["peak_memory_kind"] not in ("cuda_max_allocated", "process_max_rss"):
        raise ValueError(f"unknown peak_memory_kind {row['peak_memory_kind']!r}")
    return row


def bench_all(methods: Sequence[str] | None = None, profile: str | None = None, **step_options) -> list[dict]:
    """`bench_step` for every method, each in a fresh Python process so that peak memory is its own."""
    import json
    import subprocess
    import sys
    import tempfile

    from .methods import METHODS

    rows = []
    for name in methods or sorted(METHODS):
        with tempfile.TemporaryDirectory() as tmp:
            out = f"{tmp}/row.json"
            argv = [sys.executable, "-m", "contrastive", "bench", "step", "--method", name, "--json", out]
            if profile:
                argv += ["--profile", profile]
            for key, value in step_options.items():
                if isinstance(value, bool):  # a switch: present or absent
                    argv += [f"--{key.replace('_', '-')}"] if value else []
                else:
                    argv += [f"--{key.replace('_', '-')}", str(value)]
            done = subprocess.run(argv, capture_output=True, text=True)
            if done.returncode != 0:
                raise RuntimeError(f"bench step --method {name} failed:\n{done.stderr.strip()}")
            with open(out) as fh:
                rows.append(check_step_row(json.load(fh)[0]))
    return rows


def format_step_table(rows: Sequence[dict]) -> str:
    """An aligned text table of `bench_step` rows: images/s and peak memory per method."""
    if not rows:
        return "no benchmark rows"
    first = rows[0]
    head = f"training step throughput, profile {first['profile']}, {first['device']}, torch {first['torch']}"
    lines = [head, f"{'method':12s}{'batch':>7s}{'images/s':>11s}{'peak memory (MiB)':>20s}  kind"]
    for r in rows:
        peak = "-" if r["peak_memory_bytes"] is None else f"{r['peak_memory_bytes'] / 2**20:,.0f}"
        lines.append(
            f"{r['method']:12s}{r['batch_size']:7d}{r['images_per_second']:11,.0f}{peak:>20s}  "
            f"{r['peak_memory_kind']}"
        )
    return "\n".join(lines)


# ---- the records the benchmark chapter reads ----------------------------------------------------


def load_summary(results: str | Path, run: str) -> dict:
    """One run's `results/<run>/summary.json`, e.g. `load_summary("results", "simsiam_nosg_cpu")`; a
    missing record is an error naming the file and the command that writes it."""
    import json

    path = Path(results) / run / "summary.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"no record {path}: `python scripts/cpu_records.py` or `python -m contrastive "
            f"train ... --out {path.parent}` writes it"
        )
    return json.loads(path.read_text())


def load_records(
    results: str | Path, profile: str = "cpu", methods: Sequence[str] | None = None
) -> list[dict]:
    """One row per method: its reference runs (`results/<method>_<profile>/summary.json`, seed 0, and
    any `<method>_<profile>_seed<S>/`: accuracies as the mean over seeds with their spread, largest
    minus smallest, training time, where they ran) joined with its `bench all` row
    (`results/bench_step_<profile>.json`: images/s and peak memory, every method on one machine). A
    method missing from either record is an error naming the file, so a table never silently drops a
    row; seeds trained with other settings are an error too, so a mean never mixes two recipes."""
    import json

    from .methods import METHODS

    results = Path(results)
    bench_path = results / f"bench_step_{profile}.json"
    if not bench_path.is_file():
        raise FileNotFoundError(
            f"no throughput record {bench_path}: run `python -m contrastive bench all "
            f"--profile {profile} --json {bench_path}`"
        )
    bench = {row["method"]: check_step_row(row) for row in json.loads(bench_path.read_text())}
    rows = []
    for method in methods or sorted(METHODS):
        summary_path = results / f"{method}_{profile}" / "summary.json"
        if not summary_path.is_file():
            raise FileNotFoundError(
                f"no reference run {summary_path}: run `python -m contrastive train "
                f"--method {method} --profile {profile} "
                f"--out {summary_path.parent}`"
            )
        if method not in bench:
            raise ValueError(f"{bench_path} has no row for {method}")
        seeds, b = run_records(results, method, profile), bench[method]
        s = seeds[0]
        for other in seeds:
            if other["method"] != method or other["profile"] != profile or b["profile"] != profile:
                raise ValueError(
                    f"a record of {method} in {results} or {bench_path} is not a {method}/{profile} one"
                )
            recipe = ("epochs", "batch_size", "lr", "method_options", "train_images")
            changed = [k for k in recipe if other.get(k) != s.get(k)]
            if changed:
                raise ValueError(
                    f"{method}'s seed {other['seed']} was trained with another {', '.join(changed)} than "
                    f"seed {s['seed']}: re-run it (scripts/cpu_records.py seeds)"
                )
        knn, knn_spread = seed_stats(seeds, "knn_top1")
        lin, lin_spread = seed_stats(seeds, "linear_top1")
        rows.append(
            {
                "method": method,
                "seeds": len(seeds),
                "epochs": s["epochs"],
                "batch_size": s["batch_size"],
                "knn_top1": knn,
                "knn_top1_spread": knn_spread,
                "knn_top1_random_init": seed_stats(seeds, "knn_top1_random_init")[0],
                "linear_top1": lin,
                "linear_top1_spread": lin_spread,
                "linear_top1_random_init": seed_stats(seeds, "linear_top1_random_init")[0],
                "train_seconds": seed_stats(seeds, "train_seconds")[0],
                "seconds": seed_stats(seeds, "seconds")[0],
                "run_device": s["device"],
                "images_per_second": b["images_per_second"],
                "peak_memory_bytes": b["peak_memory_bytes"],
                "bench_device": b["device"],
            }
        )
    return rows


def run_records(results: str | Path, run: str, profile: str = "cpu") -> list[dict]:
    """Every seed's `summary.json` of one run, by seed: `results/<run>_<profile>/` (seed 0, the reference
    run) and `results/<run>_<profile>_seed<S>/`. No record at all is an error naming the script that
    makes them."""
    import json

    results = Path(results)
    paths = [results / f"{run}_{profile}" / "summary.json"]
    paths += sorted(results.glob(f"{run}_{profile}_seed*/summary.json"))
    found = [json.loads(p.read_text()) for p in paths if p.is_file()]
    if not found:
        raise FileNotFoundError(
            f"no record of {run} in {results}: run `python scripts/cpu_records.py seeds --runs {run} "
            "--seeds 0 1 2`"
        )
    seeds = [s["seed"] for s in found]
    if len(set(seeds)) != len(seeds):
        raise ValueError(f"two records of {run} in {results} have the same seed: {seeds}")
    return sorted(found, key=lambda s: s["seed"])


def mean_and_spread(values: Sequence[float]) -> tuple[float, float]:
    """The mean of a few runs and their spread, the largest minus the smallest (0 for one run)."""
    values = list(values)
    if not values:
        raise ValueError("no values")
    return sum(values) / len(values), max(values) - min(values)


def seed_stats(summaries: Sequence[dict], key: str) -> tuple[float | None, float | None]:
    """`mean_and_spread` of `key` over the summaries that record it, or (None, None) where none does (a
    run made with `--no-linear`)."""
    values = [s[key] for s in summaries if s.get(key) is not None]
    return mean_and_spread(values) if values else (None, None)


def amdahl_speedup(fraction: float, factor: float) -> float:
    """Amdahl's law: the whole step's speed-up when the part taking `fraction` of its time runs `factor`
    times faster and the rest is unchanged, 1 / ((1 - fraction) + fraction / factor)."""
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must lie in [0, 1], got {fraction}")
    if not factor > 0:
        raise ValueError(f"factor must be positive, got {factor}")
    return 1.0 / ((1.0 - fraction) + fraction / factor)
