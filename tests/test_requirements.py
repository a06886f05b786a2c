"""`make book` renders stored outputs with the book's renderer alone; everything else installs it too."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _names(path: Path) -> set[str]:
    names = set()
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line and not line.startswith("-r"):
            names.add(re.split(r"[<>=!~\[ ]", line)[0].lower())
    return names


def test_the_books_requirements_render_without_the_training_stack_and_the_full_set_includes_them():
    book = _names(ROOT / "requirements-book.txt")
    assert "jupyter-book" in book and "sphinx-proof" in book
    assert not book & {"torch", "numpy", "matplotlib", "sympy", "pytest"}  # nothing that trains or tests
    full = (ROOT / "requirements.txt").read_text()
    assert "-r requirements-book.txt" in full.splitlines()
    assert "torch" in _names(ROOT / "requirements.txt")  # control: the full set is not the book's
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^book: \$\(BOOK_STAMP\)$", makefile, re.M)  # not $(STAMP), which installs torch
