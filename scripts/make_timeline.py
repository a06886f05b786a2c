"""Draw the landing page's timeline as an SVG whose methods link to their chapters.

usage: python scripts/make_timeline.py [--out book/images/timeline.svg]

The figure is `contrastive.plotting.timeline_figure`, the map the Introduction
draws, with larger type and a link on each method's label, stem and marker. The SVG is written for
inlining into the landing page (`{raw} html` with `:file:`), so that the links
work: no XML prolog, a viewBox instead of a fixed size, text kept as text.
Rerun it when TIMELINE or the chapter files change, and commit the result.
"""

from __future__ import annotations

import argparse
import io
import re
import sys
from pathlib import Path

import matplotlib

matplotlib.use("Agg")

ROOT = Path(__file__).resolve().parent.parent

# The chapter of each method in contrastive.plotting.TIMELINE, as the landing page links to it.
CHAPTERS = {
    "InstDisc": "01_instdisc",
    "CPC": "02_cpc",
    "CMC": "03_cmc",
    "InvaSpread": "04_invaspread",
    "MoCo v1": "05_moco",
    "SimCLR": "06_simclr",
    "MoCo v2": "07_mocov2",
    "BYOL": "08_byol",
    "SimSiam": "09_simsiam",
    "MoCo v3": "10_mocov3",
    "DINO": "11_dino",
    "CLIP": "12_clip",
}


def timeline_svg() -> str:
    """The timeline as an SVG document ready to inline, each method linked to `NN_name.html`."""
    import matplotlib.pyplot as plt

    from contrastive.plotting import TIMELINE, timeline_figure

    missing = [name for _, name, _ in TIMELINE if name not in CHAPTERS]
    if missing:
        raise SystemExit(f"no chapter known for {', '.join(missing)}: add it to CHAPTERS in {__file__}.")
    with plt.rc_context({"svg.fonttype": "none", "svg.hashsalt": "contrastive-timeline"}):
        fig = timeline_figure()
        ax = fig.axes[0]
        # The page shows the SVG at most 560 px wide (the whole column on a phone): 11 pt labels
        # stay about 9 px tall at a phone's 390 px.
        for text in ax.texts:
            text.set_fontsize(11 if text.get_fontweight() == "normal" else 12)
        ax.title.set_fontsize(12)
        fig.set_size_inches(5.6, 7.8)
        fig.tight_layout()
        # timeline_figure draws, per method in TIMELINE order, one stem (a line), one marker
        # (a scatter collection) and one label whose first line is the method's name.
        labels = {t.get_text().split("\n")[0]: t for t in ax.texts}
        for (_, name, _), marker, stem in zip(TIMELINE, ax.collections, ax.lines):
            url = f"{CHAPTERS[name]}.html"
            for artist in (labels[name], marker, stem):
                artist.set_url(url)
        buffer = io.StringIO()
        fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None})
        plt.close(fig)
    svg = buffer.getvalue()
    svg = svg[svg.index("<svg") :]  # no XML prolog or DOCTYPE inside an HTML page
    # Scale with the page instead of a fixed size in points (the viewBox keeps the proportions), up
    # to 560 px: a vertical map that fits a phone's column without scrolling sideways.
    svg = re.sub(
        r'<svg([^>]*?) width="[^"]+" height="[^"]+"',
        r'<svg\1 width="100%" style="height: auto; max-width: 560px"',
        svg,
        count=1,
    )
    svg = svg.replace(' target="_blank"', "")  # matplotlib opens links in a new tab; chapters open in place
    svg = svg.replace(
        "<svg", '<svg role="img" aria-label="Timeline of the methods, each linked to its chapter"', 1
    )
    return svg


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "book" / "images" / "timeline.svg")
    args = parser.parse_args(argv)
    svg = timeline_svg()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(svg, encoding="utf-8")
    print(f"wrote {args.out} ({len(svg) // 1024} KiB, {svg.count('xlink:href=')} links)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
