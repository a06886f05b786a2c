"""contrastive.plotting: one colour per method, looked up however a chapter spells the method."""

from __future__ import annotations

from contrastive.plotting import METHOD_COLORS, color


def test_every_method_and_the_random_init_baseline_get_their_own_colour():
    assert color("random init") == METHOD_COLORS["random init"] != "#333333"
    assert color("MoCo v2") == color("mocov2") == METHOD_COLORS["mocov2"]
    assert color("SimCLR") == METHOD_COLORS["simclr"]
    assert len(set(METHOD_COLORS.values())) == len(METHOD_COLORS)  # no two share a colour
    assert color("no such method") == "#333333"  # control: an unknown name gets the fallback


def test_image_grid_draws_every_image_as_pixels_and_pads_short_rows():
    import matplotlib

    matplotlib.use("Agg")
    import torch

    from contrastive.plotting import image_grid

    rgb, gray = torch.rand(6, 3, 32, 32), torch.rand(4, 1, 28, 28)
    fig = image_grid([("rgb", rgb), ("gray", gray)])
    drawn = [ax.images[0] for ax in fig.axes if ax.images]
    assert len(fig.axes) == 12 and len(drawn) == 10  # two rows of six, the short row padded
    assert drawn[0].get_array().shape == (32, 32, 3) and drawn[-1].get_array().shape == (28, 28)
    assert drawn[0].get_interpolation() == "nearest"
    assert fig.get_figwidth() <= 7.0  # the page's column


def test_each_run_of_a_chapter_gets_its_own_colour_and_marker_the_first_its_methods():
    import pytest

    from contrastive.plotting import run_styles

    styles = run_styles("simsiam", ["SimSiam", "no stop-gradient", "no predictor"])
    assert styles["SimSiam"]["color"] == color("simsiam")
    assert len({s["color"] for s in styles.values()}) == 3 == len({s["marker"] for s in styles.values()})
    assert not {s["color"] for s in styles.values()} - {color("simsiam")} & set(METHOD_COLORS.values())
    with pytest.raises(ValueError, match="at most"):
        run_styles("byol", [str(i) for i in range(9)])
