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


def test_a_runs_table_puts_each_run_beside_its_random_init():
    from contrastive.tables import runs_table

    s = {
        "knn_top1": 0.4162,
        "knn_top1_random_init": 0.3634,
        "linear_top1": 0.513,
        "linear_top1_random_init": None,
        "epochs": 10,
        "train_seconds": 420.0,
    }
    t = runs_table({"BYOL": s})
    assert t.columns == ["run", "kNN", "(init)", "linear", "(init)", "epochs", "training"]
    assert t.rows == [["BYOL", "41.6%", "36.3%", "51.3%", "-", "10", "7.0 min"]]


def test_a_seeds_table_gives_the_mean_and_the_spread_largest_minus_smallest():
    from contrastive.tables import seeds_table

    def run(knn, linear, seed):
        return {
            "seed": seed,
            "knn_top1": knn,
            "knn_top1_random_init": 0.36,
            "linear_top1": linear,
            "train_seconds": 600.0,
        }

    t = seeds_table({"BYOL": [run(0.46, 0.55, 0), run(0.47, 0.56, 1), run(0.45, 0.57, 2)]})
    assert t.rows == [["BYOL", "3", "46.0%", "2.0", "+10.0", "56.0%", "2.0", "10.0 min"]]
    # control: the standard deviation (0.8 points here) is not what the column reports
    assert t.rows[0][3] != "0.8"
