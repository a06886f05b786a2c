"""scripts/make_diagrams.py: one SVG per method, deterministic, committed up to date, and clean.

Fast (a few seconds): every run draws the 13 small figures with matplotlib's Agg backend.
"""

from __future__ import annotations

import shutil
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

import matplotlib
import pytest

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import make_diagrams  # noqa: E402 - a script beside the package, not an installed module

SVG = "{http://www.w3.org/2000/svg}"
COMMITTED = ROOT / "book" / "images"

# The loss (or, for the protocol, the read-out) each diagram must name.
LABELS = {
    "instdisc": "NCE",
    "cpc": "InfoNCE",
    "cmc": "InfoNCE",
    "invaspread": "softmax",
    "moco": "InfoNCE",
    "simclr": "NT-Xent",
    "mocov2": "InfoNCE",
    "byol": "2 − 2 cos",
    "simsiam": "−cos",
    "mocov3": "2τ · InfoNCE",
    "dino": "H(Pₜ, Pₛ)",
    "clip": "symmetric",
    "protocol": "linear probe",
}


@pytest.fixture(scope="module")
def generated(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("diagrams")
    assert make_diagrams.main(["--out", str(out)]) == 0
    return out


def svg_text(path: Path) -> str:
    """All the text of an SVG's <text> elements (mathtext comes as one <tspan> per glyph), one per line."""
    root = ET.parse(path).getroot()
    return "\n".join("".join(t.itertext()).strip() for t in root.iter(f"{SVG}text"))


def test_there_is_one_diagram_per_method_and_the_protocol():
    assert make_diagrams.NAMES == list(LABELS)
    assert set(make_diagrams.DIAGRAMS) == set(LABELS)


def test_every_diagram_is_an_svg_with_a_size(generated):
    for name in make_diagrams.NAMES:
        root = ET.parse(generated / f"diagram_{name}.svg").getroot()
        assert root.tag == f"{SVG}svg", name
        assert root.get("viewBox") or (root.get("width") and root.get("height")), name


def test_generating_twice_gives_identical_bytes(generated, tmp_path):
    assert make_diagrams.main(["--out", str(tmp_path)]) == 0
    for name in make_diagrams.NAMES:
        file = f"diagram_{name}.svg"
        assert (tmp_path / file).read_bytes() == (generated / file).read_bytes(), file


def test_the_committed_diagrams_are_up_to_date(capsys):
    code = make_diagrams.main(["--check", "--out", str(COMMITTED)])
    assert code == 0, f"stale diagrams: run `python scripts/make_diagrams.py`\n{capsys.readouterr().err}"


def test_under_another_matplotlib_check_compares_text_and_still_finds_a_changed_label(
    tmp_path, capsys, monkeypatch
):
    copy = tmp_path / "images"
    shutil.copytree(COMMITTED, copy)
    monkeypatch.setattr(make_diagrams, "DRAWN_WITH", "0.0")  # as if CI installed a newer matplotlib
    other = copy / "diagram_byol.svg"
    other.write_bytes(other.read_bytes().replace(b"<svg ", b"<svg data-other-writer='1' ", 1))
    assert make_diagrams.main(["--check", "--out", str(copy)]) == 0  # other bytes, the same text
    assert "comparing their text only" in capsys.readouterr().err
    altered = copy / "diagram_simclr.svg"
    altered.write_bytes(altered.read_bytes().replace(b"NT-Xent", b"NT-Xtra"))
    assert make_diagrams.main(["--check", "--out", str(copy)]) == 1
    assert "diagram_simclr.svg" in capsys.readouterr().err


def test_check_fails_and_names_an_altered_or_missing_diagram(tmp_path, capsys):
    copy = tmp_path / "images"  # a copy: the committed files are never touched
    shutil.copytree(COMMITTED, copy)
    altered = copy / "diagram_simclr.svg"
    altered.write_bytes(altered.read_bytes().replace(b"NT-Xent", b"NT-Xtra"))
    (copy / "diagram_dino.svg").unlink()
    assert make_diagrams.main(["--check", "--out", str(copy)]) == 1
    err = capsys.readouterr().err
    assert "diagram_simclr.svg" in err and "diagram_dino.svg" in err
    assert "diagram_moco.svg" not in err


@pytest.mark.parametrize("name", list(LABELS))
def test_each_diagram_names_its_loss(generated, name):
    assert LABELS[name] in svg_text(generated / f"diagram_{name}.svg")


def test_the_diagrams_share_one_visual_language(generated):
    """The encoder's blue, the momentum copies' dashed orange and the stop-gradient's red, where due."""
    text = {name: (generated / f"diagram_{name}.svg").read_text() for name in make_diagrams.NAMES}
    encoder, momentum = make_diagrams.STYLES["encoder"][0], make_diagrams.EMA_FILL
    assert all(encoder in text[name] for name in make_diagrams.NAMES)
    for name in ("moco", "mocov2", "byol", "mocov3", "dino"):
        assert momentum in text[name] and "EMA" in svg_text(generated / f"diagram_{name}.svg"), name
    for name in ("moco", "mocov2", "byol", "simsiam", "mocov3", "dino"):
        assert "sg" in svg_text(generated / f"diagram_{name}.svg").split("\n"), name
    assert momentum not in text["simclr"] and momentum not in text["simsiam"]


@pytest.mark.parametrize("name", list(LABELS))
def test_no_text_overlaps_and_every_figure_fits_a_column(name):
    with matplotlib.rc_context(make_diagrams.RC):
        fig = make_diagrams.render(name)  # render asserts the same, before any file is written
        assert make_diagrams.overlaps(fig) == []
        width, height = fig.get_size_inches()
        assert width <= 7 and height <= 3.2
        assert all(t.get_fontsize() >= 10 for t in fig.axes[0].texts)


def test_overlaps_finds_what_it_should():
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    with matplotlib.rc_context(make_diagrams.RC):
        fig = Figure(figsize=(4, 2))
        FigureCanvasAgg(fig)
        ax = fig.add_axes((0, 0, 1, 1), xlim=(0, 4), ylim=(0, 2))
        a = make_diagrams.box(ax, 1.0, 1.0, "encoder f", "encoder")
        make_diagrams.arrow(ax, a.E(), (3.0, 1.0))
        assert make_diagrams.overlaps(fig) == []
        make_diagrams.note(ax, 1.1, 1.0, "on top of the label")
        make_diagrams.note(ax, 2.5, 1.0, "on the arrow")
        make_diagrams.note(ax, 3.95, 0.5, "off the edge")
        problems = "\n".join(make_diagrams.overlaps(fig))
    assert "'on top of the label' overlaps 'encoder f'" in problems
    assert "'on top of the label' crosses the edge of a box" in problems
    assert "'on the arrow' touches an arrow or line" in problems
    assert "'off the edge' is clipped by the figure's edge" in problems
