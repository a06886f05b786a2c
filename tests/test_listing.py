"""contrastive.listing: a chapter's listing keeps the algorithm and drops the docstring and input checks."""

from __future__ import annotations

import inspect
import json
import re
from pathlib import Path

from contrastive import losses
from contrastive.listing import algorithm, show

BOOK = Path(__file__).resolve().parent.parent / "book"


def _example(x, scale: float = 2.0):
    """A docstring the listing leaves out."""
    _check_positive(scale)
    ok = x.dim() == 2  # assigned only for the check below
    if not ok:
        raise ValueError("x must be 2-d")
    y = x * scale  # a comment the listing keeps
    if scale > 1:  # a branch that computes: kept
        y = y + 1
    for row in y:
        if row.sum() < 0:
            raise ValueError("negative row")
        y = y - row
    return y


def _check_positive(value):
    if not value > 0:
        raise ValueError("positive")


def test_the_listing_drops_docstring_checks_and_check_only_names_and_keeps_the_rest():
    assert algorithm(_example) == (
        "def _example(x, scale: float = 2.0):\n"
        "    y = x * scale  # a comment the listing keeps\n"
        "    if scale > 1:  # a branch that computes: kept\n"
        "        y = y + 1\n"
        "    for row in y:\n"
        "        y = y - row\n"
        "    return y\n"
    )


def test_a_loss_listing_has_its_formula_and_none_of_its_validation():
    listing = algorithm(losses.nce_loss)
    assert "torch.logaddexp(log_p_pos, log_noise)" in listing and listing.startswith("def nce_loss(")
    assert not re.search(r"raise|_check|\"\"\"", listing)
    assert "raise ValueError" in inspect.getsource(losses.nce_loss)  # control: the source has them


def test_show_renders_as_a_python_block_in_a_notebook_and_as_text_elsewhere():
    shown = show(losses.triplet_loss)
    assert shown._repr_markdown_().startswith("```python\ndef triplet_loss(") and str(shown) == algorithm(
        losses.triplet_loss
    )


def test_no_chapter_prints_a_whole_source():
    for path in sorted(BOOK.glob("*.ipynb")):
        cells = json.loads(path.read_text(encoding="utf-8"))["cells"]
        for i, cell in enumerate(cells):
            if cell["cell_type"] == "code":
                assert "getsource" not in "".join(cell["source"]), f"{path.name} cell {i}: use listing.show"
