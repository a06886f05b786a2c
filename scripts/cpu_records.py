"""The cpu-profile records that the notebooks do not make themselves: more seeds, and sweeps.

usage:
    python scripts/cpu_records.py seeds [--runs simclr byol cmc_rgb ...] [--seeds 1 2] [--jobs 2]
    python scripts/cpu_records.py sweep --method byol --set lr=0.3,1.0 --set option.tau_base=0.99,0.996 \\
        [--epochs 4] [--train-size 5000] [--jobs 2]

`seeds` trains each named run (a method and its options, RUNS below) once per seed, in the cpu profile,
into results/<run>_cpu_seed<S>/ (seed 0 is results/<run>_cpu/, the run the chapter stores): the same
summary.json and metrics.jsonl as every record, with the seed in the summary.

`sweep` trains one method at every combination of the values given (profile fields such as lr,
batch_size, weight_decay, warmup_epochs, epochs; method options as option.NAME), at a reduced budget
if asked, and appends one line per point to results/sweeps/<method>_cpu.jsonl: the settings, kNN top-1
and its random-init baseline, the gain, training seconds and images/s.

Every run is a `python -m contrastive train` process with one thread (two cores: --jobs 2). A run
whose summary exists is skipped; one with a checkpoint and no summary is resumed; a sweep point
already in the sweep's file is skipped. One progress line per finished run.
"""

from __future__ import annotations

import argparse
import ast
import concurrent.futures
import hashlib
import itertools
import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "results"

# A record's name -> (method, method options). The names are those of results/<name>_cpu/.
RUNS: dict[str, tuple[str, dict]] = {
    "instdisc": ("instdisc", {}),
    "cpc": ("cpc", {}),
    "cmc": ("cmc", {}),
    "cmc_rgb": ("cmc", {"views": "rgb"}),
    "invaspread": ("invaspread", {}),
    "moco": ("moco", {}),
    "simclr": ("simclr", {}),
    "mocov2": ("mocov2", {}),
    "byol": ("byol", {}),
    "byol_nobn": ("byol", {"batchnorm": False}),
    "simsiam": ("simsiam", {}),
    "simsiam_nosg": ("simsiam", {"stop_gradient": False}),
    "simsiam_nopred": ("simsiam", {"predictor": False}),
    "mocov3": ("mocov3", {}),
    "dino": ("dino", {}),
    "clip": ("clip", {}),
}
PROFILE_FIELDS = ("lr", "batch_size", "train_size", "weight_decay", "warmup_epochs", "epochs")

_print_lock = threading.Lock()


def _say(text: str) -> None:
    with _print_lock:
        print(text, flush=True)


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def train_command(
    method: str, options: dict, settings: dict, seed: int, out: Path, profile: str = "cpu"
) -> list[str]:
    """The `python -m contrastive train` command line of one run (resuming one that was cut short)."""
    cmd = [sys.executable, "-m", "contrastive", "train", "--method", method, "--profile", profile]
    cmd += ["--seed", str(seed), "--out", str(out)]
    for field, value in settings.items():
        cmd += [f"--{field.replace('_', '-')}", str(value)]
    for key, value in options.items():
        cmd += ["--option", f"{key}={value!r}" if isinstance(value, str) else f"{key}={value}"]
    if (out / "summary.json").exists() is False and any(out.glob("checkpoint_*.pt")):
        cmd.append("--resume")
    return cmd


def run_one(label: str, cmd: list[str], out: Path) -> dict:
    """Run one training process with one thread; its summary, or an error naming the log."""
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.parent / f"{out.name}.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "CONTRASTIVE_PROGRESS": "0"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT / "src"), env.get("PYTHONPATH")]))
    started = time.perf_counter()
    with open(log, "w") as fh:
        done = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    if done.returncode != 0:
        raise RuntimeError(f"{label} failed (exit {done.returncode}); see {log}")
    summary = json.loads((out / "summary.json").read_text())
    for ckpt in out.glob("checkpoint_*.pt"):  # weights are not part of the record
        ckpt.unlink()
    log.unlink()
    summary["_wall"] = time.perf_counter() - started
    return summary


def _line(label: str, s: dict) -> str:
    gain = 100 * (s["knn_top1"] - s["knn_top1_random_init"])
    return (
        f"{label}: kNN {100 * s['knn_top1']:.1f}% ({gain:+.1f} over random init), "
        f"{s['train_seconds']:.0f} s of training, {s['images_per_second']:.0f} img/s"
    )


def _parallel(jobs: int, tasks: list[tuple[str, callable]]) -> int:
    failed = 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        futures = {pool.submit(fn): label for label, fn in tasks}
        for i, future in enumerate(concurrent.futures.as_completed(futures), start=1):
            label = futures[future]
            try:
                _say(f"[{i}/{len(tasks)}] {future.result()}")
            except Exception as exc:  # one failed run must not lose the others
                failed += 1
                _say(f"[{i}/{len(tasks)}] {label}: {exc}")
    return 1 if failed else 0


def seeds(args) -> int:
    unknown = sorted(set(args.runs) - set(RUNS))
    if unknown:
        raise SystemExit(f"unknown runs {unknown}; choose from {sorted(RUNS)}")
    tasks = []
    for name, seed in itertools.product(args.runs, args.seeds):
        method, options = RUNS[name]
        out = args.results / (f"{name}_{args.profile}" + (f"_seed{seed}" if seed else ""))
        label = f"{name} seed {seed}"
        if (out / "summary.json").exists():
            _say(f"{label}: {out} exists, skipped")
            continue
        cmd = train_command(method, options, {}, seed, out, args.profile)

        def task(label=label, cmd=cmd, out=out):
            return _line(label, run_one(label, cmd, out))

        tasks.append((label, task))
    return _parallel(args.jobs, tasks)


def sweep(args) -> int:
    axes = {}
    for text in args.set:
        key, sep, values = text.partition("=")
        if not sep or not values:
            raise SystemExit(f"--set expects NAME=V1,V2,...; got {text!r}")
        if key not in PROFILE_FIELDS and not key.startswith("option."):
            raise SystemExit(f"cannot sweep {key!r}: choose from {PROFILE_FIELDS} or option.NAME")
        axes[key] = [_literal(v) for v in values.split(",")]
    record = args.results / "sweeps" / f"{args.method}_{args.profile}.jsonl"
    done = set()
    if record.exists():
        done = {json.dumps(json.loads(line)["settings"], sort_keys=True) for line in record.open()}
    fixed = {k: v for k, v in (("epochs", args.epochs), ("train_size", args.train_size)) if v is not None}
    lock = threading.Lock()
    tasks = []
    for values in itertools.product(*axes.values()):
        point = {**fixed, **dict(zip(axes, values, strict=True))}
        key = json.dumps(point, sort_keys=True)
        if key in done:
            _say(f"{args.method} {point}: already in {record}, skipped")
            continue
        settings = {k: v for k, v in point.items() if not k.startswith("option.")}
        options = {k.removeprefix("option."): v for k, v in point.items() if k.startswith("option.")}
        digest = hashlib.sha1(key.encode()).hexdigest()[:10]
        out = args.results.parent / "runs" / "sweeps" / args.method / f"point_{digest}_seed{args.seed}"
        cmd = train_command(args.method, options, settings, args.seed, out, args.profile)
        label = f"{args.method} {point}"

        def task(label=label, cmd=cmd, out=out, point=point):
            s = run_one(label, cmd, out)
            row = {
                "method": args.method,
                "settings": point,
                "seed": s["seed"],
                "epochs": s["epochs"],
                "train_images": s["train_images"],
                "knn_top1": s["knn_top1"],
                "knn_top1_random_init": s["knn_top1_random_init"],
                "knn_gain": s["knn_top1"] - s["knn_top1_random_init"],
                "train_seconds": s["train_seconds"],
                "images_per_second": s["images_per_second"],
                "device": s["device"],
                "torch": s["torch"],
                "commit": s["commit"],
            }
            with lock:
                record.parent.mkdir(parents=True, exist_ok=True)
                with record.open("a") as fh:
                    fh.write(json.dumps(row) + "\n")
            return _line(label, s)

        tasks.append((label, task))
    return _parallel(args.jobs, tasks)


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--jobs", type=int, default=2, help="runs at a time, one thread each")
    p.add_argument("--profile", default="cpu", help="the records' profile (smoke only to test this script)")
    p.add_argument("--results", type=Path, default=RESULTS, help="where records go (default: results/)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("seeds", help="main runs at more seeds")
    p.add_argument("--runs", nargs="+", default=list(RUNS), metavar="RUN")
    p.add_argument("--seeds", nargs="+", type=int, default=[1, 2])
    _common(p)
    p.set_defaults(func=seeds)
    p = sub.add_parser("sweep", help="one method over a grid of settings")
    p.add_argument("--method", required=True)
    p.add_argument("--set", action="append", default=[], metavar="NAME=V1,V2")
    p.add_argument("--epochs", type=int, default=None)
    p.add_argument("--train-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    _common(p)
    p.set_defaults(func=sweep)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
