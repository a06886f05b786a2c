"""contrastive.tables.Table: Markdown in a notebook, aligned text in a terminal, bad shapes refused."""

from __future__ import annotations

import pytest

from contrastive.tables import Table


def test_a_table_renders_as_markdown_with_its_alignment_and_as_aligned_text():
    t = Table(["method", "kNN"], [["simclr", "49.2%"], ["byol", "41.6%"]], caption="cpu profile")
    assert t._repr_markdown_() == (
        "**cpu profile**\n\n| method | kNN |\n| :--- | ---: |\n| simclr | 49.2% |\n| byol | 41.6% |\n"
    )
    assert str(t).splitlines() == ["cpu profile", "method    kNN", "simclr  49.2%", "byol    41.6%"]


def test_a_pipe_inside_a_cell_is_escaped_so_the_row_keeps_its_columns():
    assert "| a \\| b | 1 |" in Table(["x", "y"], [["a | b", 1]])._repr_markdown_()


@pytest.mark.parametrize(
    "columns, rows, align, match",
    [
        (["a", "b"], [["1"]], None, "rows \\[0\\] do not have 2 cells"),
        ([], [], None, "at least one column"),
        (["a", "b"], [["1", "2"]], "lc", "align must be 2 letters"),
    ],
)
def test_a_table_of_the_wrong_shape_is_refused_with_what_is_wrong(columns, rows, align, match):
    with pytest.raises(ValueError, match=match):
        Table(columns, rows, align=align)
