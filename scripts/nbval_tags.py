"""Move nbval's comment markers (`# NBVAL_CHECK_OUTPUT` as a cell's first line) into cell tags
(`nbval-check-output`), which nbval reads the same way and the rendered book does not show.

    python scripts/nbval_tags.py book/*.ipynb
"""

from __future__ import annotations

import sys

import nbformat

MARKERS = {
    "NBVAL_CHECK_OUTPUT": "nbval-check-output",
    "NBVAL_IGNORE_OUTPUT": "nbval-ignore-output",
    "NBVAL_SKIP": "nbval-skip",
    "NBVAL_RAISES_EXCEPTION": "raises-exception",
}


def convert(path: str) -> int:
    nb = nbformat.read(path, as_version=4)
    moved = 0
    for cell in nb.cells:
        if cell.cell_type != "code":
            continue
        kept = []
        for line in cell.source.split("\n"):
            marker = line.strip().lstrip("#").strip()
            if line.strip().startswith("#") and marker in MARKERS:
                tags = cell.metadata.setdefault("tags", [])
                if MARKERS[marker] not in tags:
                    tags.append(MARKERS[marker])
                moved += 1
            else:
                kept.append(line)
        cell.source = "\n".join(kept)
    if moved:
        nbformat.write(nb, path)
    return moved


if __name__ == "__main__":
    for p in sys.argv[1:]:
        print(f"{p}: {convert(p)} markers moved into tags")
