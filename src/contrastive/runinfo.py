"""What every record says about where it was made, and how records reach the disk.

`git_commit` and `device_description` go into every summary and benchmark row;
`atomic_write_bytes` writes a file so that a crash leaves the old version or the
new one, never half of either.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

import torch


def atomic_write_bytes(path: Path, write: Callable[[BinaryIO], object]) -> None:
    """Write through `write(file)` to a temporary file, flush it to disk, then rename over `path`."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(tmp, "wb") as fh:
            write(fh)
            fh.flush()
            os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_json(path: Path, obj) -> None:
    """`obj` as indented JSON, atomically."""
    atomic_write_bytes(path, lambda fh: fh.write((json.dumps(obj, indent=2) + "\n").encode()))


def write_jsonl(path: Path, rows: list[dict]) -> None:
    """One JSON object per line, atomically."""
    text = "".join(json.dumps(row) + "\n" for row in rows)
    atomic_write_bytes(path, lambda fh: fh.write(text.encode()))


def git_commit() -> str:
    """The package's commit, with "-dirty" when tracked files differ from it; "unknown" outside git."""
    root = Path(__file__).resolve().parents[2]
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        return head + ("-dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def device_description(device: torch.device) -> str:
    """The GPU's name, or the CPU's model name and the number of threads torch uses."""
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
