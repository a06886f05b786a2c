"""Command line: `python -m contrastive train|eval|bench ...` (see README)."""

from __future__ import annotations

import argparse
import ast
import json
import pickle
import sys


def parse_option(text: str) -> tuple[str, object]:
    """'views=rgb' -> ('views', 'rgb'); numbers and booleans are read as Python literals."""
    key, sep, value = text.partition("=")
    if not sep or not key.isidentifier():
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE, got {text!r}")
    try:
        return key, ast.literal_eval(value)
    except (ValueError, SyntaxError):
        return key, value


def _train(args) -> int:
    from .distributed import cleanup
    from .profiles import get_profile
    from .train import train

    # Fields of the profile that a sweep varies; the run's summary records the values used.
    overrides = {
        field: getattr(args, field)
        for field in ("lr", "batch_size", "train_size", "weight_decay", "warmup_epochs")
        if getattr(args, field) is not None
    }
    if args.compile:
        overrides["compile"] = True
    profile = get_profile(args.profile, **overrides) if overrides else args.profile
    run = train(
        args.method,
        profile=profile,
        out_dir=args.out,
        epochs=args.epochs,
        seed=args.seed,
        resume=args.resume,
        linear_probe=not args.no_linear,
        method_options=dict(args.option),
        sync_bn=args.sync_bn,
    )
    cleanup()
    s = run.summary
    print(
        json.dumps(
            {
                k: s[k]
                for k in (
                    "method",
                    "profile",
                    "epochs",
                    "knn_top1",
                    "knn_top1_random_init",
                    "linear_top1",
                    "linear_top1_random_init",
                    "train_seconds",
                    "images_per_second",
                    "device",
                )
            },
            indent=2,
        )
    )
    if args.out:
        print(f"wrote {args.out}/summary.json and {args.out}/metrics.jsonl")
    return 0


def _eval(args) -> int:
    from .train import evaluate_checkpoint

    print(json.dumps(evaluate_checkpoint(args.out, linear_probe=not args.no_linear), indent=2))
    return 0


def _bench(args) -> int:
    from .bench import bench_all, bench_augment, bench_step, format_step_table, format_table

    if args.what == "augment":
        from .data import load_cifar10

        images = load_cifar10().train_images[: max(args.batch_sizes)]
        rows = bench_augment(batch_sizes=tuple(args.batch_sizes), images=images, seconds=args.seconds)
        print(format_table(rows))
    else:
        timing = dict(warmup=args.warmup, windows=args.windows, steps_per_window=args.steps_per_window)
        if args.what == "step":
            if not args.method:
                raise ValueError("bench step needs --method NAME")
            rows = [bench_step(args.method, args.profile, args.batch_size, compile=args.compile, **timing)]
        else:
            if args.batch_size:
                timing["batch_size"] = args.batch_size
            rows = bench_all(args.methods, profile=args.profile, compile=args.compile, **timing)
        print(format_step_table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
        print(f"wrote {args.json}")
    return 0


def main(argv=None) -> int:
    from .methods import METHODS
    from .profiles import PROFILES

    parser = argparse.ArgumentParser(prog="python -m contrastive", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a method and evaluate it against its random init")
    p.add_argument("--method", required=True, choices=sorted(METHODS))
    p.add_argument(
        "--profile",
        choices=list(PROFILES),
        default=None,
        help="default: $CONTRASTIVE_PROFILE, else gpu with CUDA and cpu without",
    )
    p.add_argument("--epochs", type=int, default=None, help="default: the profile's")
    p.add_argument("--lr", type=float, default=None, help="peak learning rate before the method's scale")
    p.add_argument("--batch-size", type=int, default=None, help="default: the profile's")
    p.add_argument("--train-size", type=int, default=None, help="training images (default: the profile's)")
    p.add_argument("--weight-decay", type=float, default=None, help="default: the profile's")
    p.add_argument("--warmup-epochs", type=float, default=None, help="default: the profile's")
    p.add_argument("--out", default=None, help="folder for metrics.jsonl, checkpoints and summary.json")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--resume", action="store_true", help="continue from the last checkpoint in --out")
    p.add_argument("--no-linear", action="store_true", help="skip the linear probe (kNN only)")
    p.add_argument(
        "--sync-bn", action="store_true", help="torchrun on GPUs: BatchNorm statistics over all ranks"
    )
    p.add_argument(
        "--compile", action="store_true", help="torch.compile the method (CUDA only; ignored on CPUs)"
    )
    p.add_argument(
        "--option",
        type=parse_option,
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a method option, e.g. --option views=rgb for CMC (repeatable)",
    )
    p.set_defaults(func=_train)

    p = sub.add_parser("eval", help="evaluate the newest checkpoint of a run (kNN, linear probe)")
    p.add_argument("--out", required=True, help="the run's folder")
    p.add_argument("--no-linear", action="store_true", help="skip the linear probe (kNN only)")
    p.set_defaults(func=_eval)

    p = sub.add_parser("bench", help="measure throughput: the augmentation, one method's step, every method")
    p.add_argument("what", choices=["augment", "step", "all"])
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[256, 512, 1024], help="augment only")
    p.add_argument("--seconds", type=float, default=3.0, help="augment: timed seconds per measurement")
    p.add_argument("--method", choices=sorted(METHODS), default=None, help="step: the method to time")
    p.add_argument(
        "--methods", choices=sorted(METHODS), nargs="+", default=None, help="all: default every one"
    )
    p.add_argument("--profile", choices=list(PROFILES), default=None, help="step, all: default as for train")
    p.add_argument("--batch-size", type=int, default=None, help="step, all: default the profile's")
    p.add_argument("--warmup", type=int, default=3, help="step, all: untimed steps first")
    p.add_argument("--windows", type=int, default=5, help="step, all: timed windows (the median is kept)")
    p.add_argument("--steps-per-window", type=int, default=3, help="step, all: steps per timed window")
    p.add_argument("--compile", action="store_true", help="step, all: torch.compile the method (CUDA only)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.set_defaults(func=_bench)

    args = parser.parse_args(argv)
    from .train import NonFiniteLossError

    # A mistake in the input gets one sentence; anything else is a bug and keeps its traceback.
    try:
        return args.func(args)
    except (
        ValueError,
        FileNotFoundError,
        FileExistsError,
        pickle.UnpicklingError,
        NonFiniteLossError,
    ) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
