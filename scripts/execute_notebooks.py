"""Execute notebooks in place and record how their stored outputs were produced.

usage: python scripts/execute_notebooks.py [--profile smoke|cpu|gpu] book/*.ipynb

Each notebook's metadata gets a `contrastive` entry with the profile, device,
torch version, commit and date of the run, which the book's readers can check
against the banner the notebook prints.
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
import time
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=["smoke", "cpu", "gpu"], default=None)
    parser.add_argument("--timeout", type=int, default=3600, help="seconds per cell")
    parser.add_argument("notebooks", nargs="+", type=Path)
    args = parser.parse_args(argv)
    if args.profile:
        os.environ["CONTRASTIVE_PROFILE"] = args.profile
    # A page shows one line per epoch; a progress bar is for a reader watching a run, not for a page.
    os.environ["CONTRASTIVE_PROGRESS"] = "0"

    from contrastive.profiles import get_profile
    from contrastive.runinfo import device_description, git_commit

    profile = get_profile()
    import torch

    device = device_description(torch.device(profile.device))
    commit = git_commit()  # before running: the code that produced the outputs
    for path in args.notebooks:
        nb = nbformat.read(path, as_version=4)
        started = time.perf_counter()
        print(f"executing {path} (profile {profile.name}) ...", flush=True)
        NotebookClient(
            nb,
            timeout=args.timeout,
            kernel_name="python3",
            resources={"metadata": {"path": str(path.parent)}},
        ).execute()
        seconds = time.perf_counter() - started
        nb.metadata["contrastive"] = {
            "profile": profile.name,
            "device": device,
            "torch": torch.__version__,
            "commit": commit,
            "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "seconds": round(seconds, 1),
        }
        nbformat.write(nb, path)
        print(f"  done in {seconds:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
