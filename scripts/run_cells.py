"""Execute some cells of a notebook in place, in one fresh kernel, and store their outputs only.

usage: python scripts/run_cells.py [--profile smoke|cpu|gpu] book/NN_chapter.ipynb 3 5 7

For the cells of a chapter that derive or check its mathematics and read nothing a training run
made: they can be re-run after an edit without re-running the chapter's training. The cells run in
the order given, so list first the cells whose names they use (imports, helpers). A cell that
trains (calls `train(`) is refused: re-run the whole notebook with `execute_notebooks.py` instead,
since its outputs are what the prose quotes.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import nbformat
from nbclient import NotebookClient


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--profile", choices=["smoke", "cpu", "gpu"], default="cpu")
    parser.add_argument("--timeout", type=int, default=600, help="seconds per cell")
    parser.add_argument("notebook", type=Path)
    parser.add_argument("cells", nargs="+", type=int, help="indices of the cells, in execution order")
    args = parser.parse_args(argv)
    os.environ["CONTRASTIVE_PROFILE"] = args.profile
    nb = nbformat.read(args.notebook, as_version=4)
    for i in args.cells:
        if not 0 <= i < len(nb.cells):
            parser.error(f"{args.notebook} has cells 0 to {len(nb.cells) - 1}, not {i}")
        cell = nb.cells[i]
        if cell.cell_type != "code":
            parser.error(f"cell {i} of {args.notebook} is {cell.cell_type}, not code")
        if "train(" in cell.source:
            parser.error(f"cell {i} trains a model: re-run the notebook with scripts/execute_notebooks.py")
    client = NotebookClient(
        nb,
        timeout=args.timeout,
        kernel_name="python3",
        resources={"metadata": {"path": str(args.notebook.parent)}},
    )
    with client.setup_kernel():
        for i in args.cells:
            print(f"cell {i} ...", flush=True)
            client.execute_cell(nb.cells[i], i)
    nbformat.write(nb, args.notebook)
    print(f"stored the outputs of {len(args.cells)} cells in {args.notebook}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
