"""contrastive.plotting: one colour per method, looked up however a chapter spells the method."""

from __future__ import annotations

from contrastive.plotting import METHOD_COLORS, color


def test_every_method_and_the_random_init_baseline_get_their_own_colour():
    assert color("random init") == METHOD_COLORS["random init"] != "#333333"
    assert color("MoCo v2") == color("mocov2") == METHOD_COLORS["mocov2"]
    assert color("SimCLR") == METHOD_COLORS["simclr"]
    assert len(set(METHOD_COLORS.values())) == len(METHOD_COLORS)  # no two share a colour
    assert color("no such method") == "#333333"  # control: an unknown name gets the fallback
