"""Draw one architecture diagram per method, all in one visual language, as SVGs for the chapters.

usage: python scripts/make_diagrams.py [--out book/images] [--check] [--png DIR]

Writes `diagram_<name>.svg` for every name in NAMES. `--check` draws them into a
temporary folder instead and exits 1, naming each file of `--out` that differs
(stale or missing), so CI can tell when the committed diagrams lag this script.
`--png DIR` also writes PNGs, to look at while editing. The output is
byte-for-byte deterministic (fixed hash salt, no date, text kept as text), and
every figure is checked for overlapping or clipped text before it is saved.

The visual language, defined once in STYLES and the helpers below: grey = data;
blue trapezoid = encoder trained by gradient; orange, dashed = momentum (EMA) copy;
green = head; purple = predictor; white = fixed operation; yellow stack = memory
bank or queue; dark = loss; red // "sg" = stop-gradient.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from xml.etree import ElementTree

import matplotlib

matplotlib.use("Agg")

from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: E402
from matplotlib.figure import Figure  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch, Polygon, Rectangle  # noqa: E402
from matplotlib.path import Path as MPath  # noqa: E402
from matplotlib.transforms import Bbox  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
NAMES = "instdisc cpc cmc invaspread moco simclr mocov2 byol simsiam mocov3 dino clip protocol".split()

# Everything that decides the bytes of the output: applied with rc_context, never globally. Text is
# measured in DejaVu Sans, which matplotlib ships; a browser without it falls back to the next font.
FONTS = ["DejaVu Sans", "Verdana", "Arial", "Helvetica"]
RC = {"svg.hashsalt": "contrastive", "svg.fonttype": "none", "font.family": "sans-serif", "font.size": 10}
RC |= {"font.sans-serif": FONTS, "mathtext.fontset": "dejavusans"}
WIDTH, MAX_HEIGHT = 7.0, 3.2  # inches; the axes run 0..WIDTH x 0..height, so data units are inches
INK, NOTE, RED = "#262626", "#4d4d4d", "#d62728"
PAD_X, PAD_Y, GAP = 0.09, 0.07, 0.05  # inside boxes, and between an arrow and its label
# kind: (fill, edge, text colour, shape, minimum width, minimum height)
STYLES = {
    "data": ("#ececec", "#8c8c8c", INK, "round", 0.36, 0.40),
    "encoder": ("#d5e6f5", "#1f5f8f", INK, "trapezoid", 0.8, 0.62),
    "head": ("#d9f0d6", "#2b8a2b", INK, "round", 0.5, 0.40),
    "predictor": ("#e8ddf2", "#6a3d9a", INK, "round", 0.5, 0.40),
    "op": ("#ffffff", "#8c8c8c", INK, "round", 0.4, 0.40),
    "memory": ("#fff2c2", "#b38600", INK, "round", 0.4, 0.40),
    "loss": ("#333333", "#111111", "#ffffff", "round", 0.6, 0.48),
}
EMA_FILL, EMA_EDGE = "#fde2c6", "#d9730d"  # a box drawn with ema=True, dashed: a momentum copy


@dataclass
class Box:
    """A drawn box: centre and size in inches; W, E, N, S: the midpoints of its sides (shifted by d)."""

    x: float
    y: float
    w: float
    h: float
    W = lambda self, d=0.0: (self.x - self.w / 2, self.y + d)
    E = lambda self, d=0.0: (self.x + self.w / 2, self.y + d)
    N = lambda self, d=0.0: (self.x + d, self.y + self.h / 2)
    S = lambda self, d=0.0: (self.x + d, self.y - self.h / 2)


def note(ax, x, y, s, color=NOTE, ha="center", va="center", **kw):
    """Free text: the labels of arrows, stacks and grids."""
    return ax.text(x, y, s, color=color, ha=ha, va=va, zorder=5, linespacing=1.2, **kw)


def box(ax, x, y, text, kind="data", w=None, h=None, ema=False) -> Box:
    """A labelled box of `kind` centred at (x, y), sized to its text unless w, h are given.

    ema=True draws it as a momentum copy: orange fill and a dashed edge, whatever its kind."""
    fill, edge, ink, shape, min_w, min_h = STYLES[kind]
    fill, edge, style = (EMA_FILL, EMA_EDGE, "--") if ema else (fill, edge, "-")
    bb = note(ax, x, y, text, color=ink).get_window_extent(ax.figure.canvas.get_renderer())
    tw, th = bb.width / ax.figure.dpi, bb.height / ax.figure.dpi
    taper = 0.72 if shape == "trapezoid" else 1.0  # the right side of a trapezoid is this much shorter
    w = w or max(min_w, tw + 2 * PAD_X + (0.14 if taper < 1 else 0))
    h = h or max(min_h, (th + 2 * PAD_Y) / taper)
    kw = dict(facecolor=fill, edgecolor=edge, linestyle=style, linewidth=1.3, zorder=2)
    x0, x1, y0, y1 = x - w / 2, x + w / 2, y - h / 2, y + h / 2
    if shape == "trapezoid":  # wide input on the left, narrower representation on the right
        d = h * (1 - taper) / 2
        ax.add_patch(Polygon([(x0, y0), (x1, y0 + d), (x1, y1 - d), (x0, y1)], **kw))
    else:
        ax.add_patch(FancyBboxPatch((x0, y0), w, h, boxstyle="round,pad=0,rounding_size=0.07", **kw))
    return Box(x, y, w, h)


def _point(p, q, at):
    """The point at fraction `at` of segment p -> q, and whether the segment is horizontal."""
    return p[0] + (q[0] - p[0]) * at, p[1] + (q[1] - p[1]) * at, abs(q[1] - p[1]) < abs(q[0] - p[0])


def arrow(ax, *pts, label=None, seg=None, at=0.5, side=None, sg=None, sg_seg=0, dashed=False, color=INK):
    """A polyline arrow through `pts`, its head at the last point.

    label: text beside segment `seg` (default the longest) at fraction `at`, above a horizontal
    segment or right of a vertical one unless `side` says otherwise; sg: the fraction of segment
    `sg_seg` where a stop-gradient mark cuts the arrow."""
    style = dict(color=color, linewidth=1.2, linestyle="--" if dashed else "-", zorder=3)
    ax.add_patch(FancyArrowPatch(path=MPath(pts), arrowstyle="-|>", mutation_scale=11, **style))
    segs = list(zip(pts[:-1], pts[1:]))
    if label is not None:
        longest = max(segs, key=lambda s: abs(s[1][0] - s[0][0]) + abs(s[1][1] - s[0][1]))
        mx, my, horizontal = _point(*(segs[seg] if seg is not None else longest), at)
        x, y, align = {
            "above": (mx, my + GAP, dict(va="bottom")),
            "below": (mx, my - GAP, dict(va="top")),
            "right": (mx + GAP, my, dict(ha="left")),
            "left": (mx - GAP, my, dict(ha="right")),
        }[side or ("above" if horizontal else "right")]
        note(ax, x, y, label, color=NOTE if color == INK else color, **align)
    if sg is not None:  # two short red strokes across the arrow, and "sg" above (or left of) them
        mx, my, horizontal = _point(*segs[sg_seg], sg)
        for k in (-0.035, 0.035):
            across, along = [-0.09, 0.09], [k - 0.03, k + 0.03]  # offsets across and along the arrow
            xs, ys = (along, across) if horizontal else (across, along)
            ax.plot([mx + d for d in xs], [my + d for d in ys], color=RED, linewidth=1.8, zorder=4)
        at = dict(x=mx, y=my + 0.11, va="bottom") if horizontal else dict(x=mx - 0.12, y=my, ha="right")
        note(ax, s="sg", color=RED, fontweight="bold", **at)


def elbow(ax, a: Box, b: Box, **kw):
    """An arrow from the right of `a` to the left of `b`, bending half-way if they are not level."""
    (x0, y0), (x1, y1) = a.E(), b.W()
    xm = (x0 + x1) / 2
    arrow(ax, *([(x0, y0), (x1, y1)] if y0 == y1 else [(x0, y0), (xm, y0), (xm, y1), (x1, y1)]), **kw)


def ema(ax, a: Box, b: Box):
    """The dashed orange update from a trained box `a` down to its momentum copy `b`."""
    arrow(ax, a.S(), b.N(), label="EMA", dashed=True, color=EMA_EDGE)


def into_loss(ax, src: Box, loss: Box, label=None, sg=False):
    """From the end of a branch above or below the loss: across, then down (or up) into it."""
    end = loss.N() if src.y > loss.y else loss.S()
    sg_at, at = (0.2, 0.7) if sg else (None, 0.5)  # the label clear of the stop-gradient mark
    arrow(ax, src.E(), (loss.x, src.y), end, label=label, seg=0, at=at, sg=sg_at)


def stack(ax, x, y, w, h, rows, label) -> Box:
    """A memory bank or queue: a stack of `rows` thin rectangles, labelled below it."""
    fill, edge = STYLES["memory"][:2]
    for i in range(rows):
        xy = (x - w / 2, y - h / 2 + i * h / rows)
        ax.add_patch(Rectangle(xy, w, h / rows, facecolor=fill, edgecolor=edge, linewidth=0.9, zorder=2))
    note(ax, x, y - h / 2 - GAP, label, va="top")
    return Box(x, y, w, h)


def grid(ax, x, y, n, cell, fill, text=None) -> Box:
    """An n x n grid of square cells centred at (x, y); fill(i, j) and text(i, j) for row i, column j."""
    x0, y1 = x - n * cell / 2, y + n * cell / 2
    for i in range(n):
        for j in range(n):
            xy = (x0 + j * cell, y1 - (i + 1) * cell)
            ax.add_patch(Rectangle(xy, cell, cell, facecolor=fill(i, j), edgecolor="#7f7f7f", zorder=2))
            if text:
                note(ax, xy[0] + cell / 2, xy[1] + cell / 2, text(i, j), color=INK)
    return Box(x, y, n * cell, n * cell)


def row(ax, y, items, labels=()) -> list[Box]:
    """Boxes (x, text, kind[, ema]) along height y, each joined to the next by an arrow (labelled)."""
    boxes = [box(ax, x, y, text, kind, ema=bool(rest and rest[0])) for x, text, kind, *rest in items]
    for a, b, label in zip(boxes, boxes[1:], [*labels] + [None] * len(boxes)):
        arrow(ax, a.E(), b.W(), label=label)
    return boxes


def two_rows(ax, top, bottom, y_top, y_bottom, x=None, x_label="x"):
    """Two rows of boxes; with `x`, an input box at that x and mid-height forks into both."""
    t, b = row(ax, y_top, top), row(ax, y_bottom, bottom)
    if x is not None:
        src = box(ax, x, (y_top + y_bottom) / 2, x_label)
        elbow(ax, src, t[0])
        elbow(ax, src, b[0])
    return t, b


def similarities(ax, rows: Box, cols: Box, x, caption, row_label, col_label) -> Box:
    """A 4 x 4 similarity matrix at x, mid-way between two branches: rows from the upper one (arrow
    into its left side), columns from the lower one (into its bottom); positives on the diagonal."""
    sims = grid(ax, x, (rows.y + cols.y) / 2, 4, 0.22, lambda i, j: "#2b8a2b" if i == j else "#f2f2f2")
    note(ax, sims.x, sims.N()[1] + GAP, caption, va="bottom")
    xm = sims.W()[0] - 0.35
    arrow(ax, rows.E(), (xm, rows.y), (xm, sims.y), sims.W(), label=row_label, seg=0)
    arrow(ax, cols.E(), (sims.x, cols.y), sims.S(), label=col_label, seg=0)
    return sims


def overlaps(fig) -> list[str]:
    """Every text that overlaps another text, a box edge, an arrow or line, or leaves the figure,
    and every two boxes that overlap (cells of a grid or stack only share edges)."""
    renderer = fig.canvas.get_renderer()
    shrink = lambda bb: Bbox.from_extents(bb.x0 + 1, bb.y0 + 1, bb.x1 - 1, bb.y1 - 1)  # touching is fine
    problems = []
    for ax in fig.axes:
        arrows = [p for p in ax.patches if isinstance(p, FancyArrowPatch)] + ax.lines
        boxes = [p.get_window_extent(renderer) for p in ax.patches if not isinstance(p, FancyArrowPatch)]
        paths = [  # every arrow and line as polylines in pixels (to_polygons also closes the arrowheads)
            MPath(poly)
            for a in arrows
            for poly in a.get_transform().transform_path(a.get_path()).to_polygons(closed_only=False)
        ]
        pairs = [(b, c) for i, b in enumerate(boxes) for c in boxes[:i]]
        problems += ["two boxes overlap" for b, c in pairs if shrink(b).overlaps(c)]
        texts = [t for t in ax.texts if t.get_visible() and t.get_text()]
        extents = [shrink(t.get_window_extent(renderer)) for t in texts]
        for i, (t, bb) in enumerate(zip(texts, extents)):
            name = repr(t.get_text())
            earlier = zip(texts[:i], extents)
            problems += [f"{name} overlaps {u.get_text()!r}" for u, e in earlier if bb.overlaps(e)]
            if not (fig.bbox.contains(bb.x0, bb.y0) and fig.bbox.contains(bb.x1, bb.y1)):
                problems.append(f"{name} is clipped by the figure's edge")
            for b in boxes:
                inside = b.x0 <= bb.x0 and bb.x1 <= b.x1 and b.y0 <= bb.y0 and bb.y1 <= b.y1
                if bb.overlaps(b) and not inside:
                    problems.append(f"{name} crosses the edge of a box")
            if any(path.intersects_bbox(bb, filled=False) for path in paths):
                problems.append(f"{name} touches an arrow or line")
    return problems


# ------------------------------------------------------------------------------------------ diagrams
DIAGRAMS = {}  # name: (height in inches, function drawing on axes whose data units are inches)


def diagram(height):
    """Register the decorated drawing function under its name, with its figure's height."""
    assert height <= MAX_HEIGHT
    return lambda fn: DIAGRAMS.setdefault(fn.__name__, (height, fn))[1]


@diagram(2.5)
def instdisc(ax):
    items = [(0.3, "x", "data"), (1.35, "encoder f", "encoder"), (2.75, "linear + BN,\n128-d, ‖·‖", "head")]
    x, enc, head, score = row(ax, 1.85, [*items, (4.4, "scores\nvᵀvⱼ / τ", "op")], [None, None, "v"])
    loss = box(ax, 6.2, 1.85, "NCE\nm noise samples", "loss")
    arrow(ax, score.E(), loss.W())
    bank = stack(ax, 4.4, 0.7, 1.1, 0.48, 8, "memory bank (n × d)")
    arrow(ax, bank.N(), score.S(), label="vᵢ and m\nnoise vⱼ")
    xv, update = head.E()[0] + 0.25, "after the step: vᵢ ←\nmomentum update"
    arrow(ax, (xv, 1.85), (xv, 0.7), bank.W(), label=update, side="left", dashed=True, color=NOTE)


@diagram(2.8)
def cpc(ax):
    shade = "bdbdbd d9d9d9 a6a6a6 cccccc e0e0e0 b3b3b3 c7c7c7 dedede adadad".split()
    img = grid(ax, 0.7, 1.45, 3, 0.34, lambda i, j: "#" + shade[3 * i + j])
    note(ax, 0.7, img.S()[1] - GAP, "x: 3 × 3 patches", va="top")
    enc = box(ax, 1.95, 1.45, "encoder f\n(each patch)", "encoder")
    arrow(ax, img.E(), enc.W())
    colour = lambda i, j: "#d5e6f5" if i == 0 else "#d9f0d6"  # the context row, then the rows to predict
    z = grid(ax, 3.35, 1.45, 3, 0.4, colour, lambda i, j: ["zₜ", "zₜ₊₁", "zₜ₊₂"][i])
    note(ax, 3.35, z.S()[1] - GAP, "z per patch", va="top")
    arrow(ax, enc.E(), z.W())
    gru = box(ax, 4.75, 2.45, "GRU down\neach column", "head")
    pred = box(ax, 6.25, 2.45, "Wₖ cₜ\nk = 1, 2", "predictor")
    arrow(ax, z.N(), (z.x, gru.y), gru.W())
    arrow(ax, gru.E(), pred.W(), label="cₜ")
    loss = box(ax, 6.25, 0.75, "InfoNCE", "loss")
    arrow(ax, pred.S(), loss.N(), label="predicts\nzₜ₊ₖ")
    arrow(ax, z.E(-0.2), (4.3, z.y - 0.2), (4.3, loss.y), loss.W(), label="true zₜ₊ₖ", seg=2)
    note(ax, 4.95, 0.45, "negatives: other patches", va="top")


@diagram(2.6)
def cmc(ax):
    split = box(ax, 1.45, 1.425, "Lab\nsplit", "op")
    arrow(ax, box(ax, 0.45, 1.425, "image\n(RGB)").E(), split.W())
    top = row(ax, 2.1, [(2.55, "L\n(lightness)", "data"), (3.95, "encoder $f_L$", "encoder")])
    bot = row(ax, 0.75, [(2.55, "ab\n(colour)", "data"), (3.95, "encoder $f_{ab}$", "encoder")])
    elbow(ax, split, top[0])
    elbow(ax, split, bot[0])
    loss = box(ax, 6.05, 1.425, "InfoNCE\nL → ab and ab → L", "loss")
    into_loss(ax, top[-1], loss, label="$z_L$")
    into_loss(ax, bot[-1], loss, label="$z_{ab}$")
    note(ax, 5.45, 0.3, "negatives: the other images of the batch")


@diagram(2.8)
def invaspread(ax):
    view = lambda k, t: [(1.45, f"view {k}\n{t}(xᵢ)", "data"), (2.75, "encoder f", "encoder")]
    top, bot = two_rows(ax, view(1, "t"), view(2, "t′"), 2.2, 0.6, x=0.45, x_label="batch\n$x_1 \\ldots x_N$")
    note(ax, 2.75, 1.4, "shared weights\n(siamese)")
    caption, labels = "diagonal: positives\nrest: negatives", ("f̂ᵢ (rows)", "fⱼ (columns)")
    sims = similarities(ax, top[-1], bot[-1], 4.7, caption, *labels)
    arrow(ax, sims.E(), box(ax, 6.3, 1.4, "in-batch\nsoftmax", "loss").W(), label="/ τ")


def _moco(ax, v2):
    """MoCo; with v2, an MLP head after both encoders, blur in the views and temperature 0.2."""
    yt, yb = (2.45, 0.95) if v2 else (2.3, 0.8)
    query = [(1.1, "query view\nt(x)", "data"), (2.35, "encoder $f_q$", "encoder")]
    key = [(1.1, "key view\nt′(x)", "data"), (2.35, "momentum\nencoder $f_k$", "encoder", True)]
    if v2:
        query, key = query + [(3.6, "MLP\nhead", "head")], key + [(3.6, "MLP\nhead", "head", True)]
    top, bot = two_rows(ax, query, key, yt, yb, x=0.25)
    for a, b in zip(top[1:], bot[1:]):
        ema(ax, a, b)
    loss = box(ax, 6.35, (yt + yb) / 2 + 0.15, "InfoNCE\n(q, k⁺, queue)", "loss")
    into_loss(ax, top[-1], loss, label="q")
    xk = bot[-1].E()[0] + 0.4  # where the (stop-gradient) key goes both to the loss and into the queue
    queue = stack(ax, xk + 0.9, yb, 0.55, 0.5, 6, "queue (K keys),\noldest dequeued")
    arrow(ax, bot[-1].E(), (xk, yb), queue.W(), label="enqueue", seg=1, at=0.45, side="below", sg=0.5)
    arrow(ax, (xk, yb), (xk, loss.y), loss.W(), label="k⁺", seg=1)
    arrow(ax, queue.E(), (loss.x - 0.3, yb), loss.S(-0.3), label="negatives", seg=1)
    if v2:
        note(ax, 0.1, 3.12, "MoCo v1 + MLP head + blur, τ = 0.2", ha="left", va="top", fontweight="bold")


DIAGRAMS["moco"] = (2.8, lambda ax: _moco(ax, v2=False))
DIAGRAMS["mocov2"] = (3.2, lambda ax: _moco(ax, v2=True))


@diagram(2.5)
def simclr(ax):
    stages = lambda view: [(1.2, view, "data"), (2.65, "encoder f", "encoder"), (4.05, "head g", "head")]
    top, bot = two_rows(ax, stages("view 1\nt(x)"), stages("view 2\nt′(x)"), 2.0, 0.5, x=0.3)
    note(ax, 2.65, 1.25, "shared weights")
    loss = box(ax, 6.05, 1.25, "NT-Xent\nover 2N samples", "loss")
    into_loss(ax, top[-1], loss, label="z₁")
    into_loss(ax, bot[-1], loss, label="z₂")


@diagram(2.7)
def byol(ax):
    online = [(1.2, "view 1\nt(x)", "data"), (2.45, "encoder $f_\\theta$", "encoder")]
    online += [(3.7, "projector $g_\\theta$", "head"), (5.0, "predictor $q_\\theta$", "predictor")]
    target = [(1.2, "view 2\nt′(x)", "data"), (2.45, "target\nencoder $f_\\xi$", "encoder", True)]
    target += [(3.7, "projector $g_\\xi$", "head", True)]
    top, bot = two_rows(ax, online, target, 2.25, 0.65, x=0.3)
    for a, b in zip(top[1:], bot[1:]):
        ema(ax, a, b)
    loss = box(ax, 6.25, 1.45, "2 − 2 cos\n(normalised MSE,\nsymmetrised)", "loss")
    into_loss(ax, top[-1], loss, label="q(z)")
    into_loss(ax, bot[-1], loss, label="target z′", sg=True)


@diagram(2.7)
def simsiam(ax):
    shared = [(2.45, "encoder f", "encoder"), (3.7, "projector", "head")]
    top = [(1.2, "view 1\nt(x)", "data"), *shared, (5.0, "predictor h", "predictor")]
    top, bot = two_rows(ax, top, [(1.2, "view 2\nt′(x)", "data"), *shared], 2.25, 0.65, x=0.3)
    note(ax, 3.07, 1.45, "shared weights (no EMA)")
    loss = box(ax, 6.3, 1.45, "−cos\nsymmetrised", "loss")
    into_loss(ax, top[-1], loss, label="p")
    into_loss(ax, bot[-1], loss, label="z", sg=True)


@diagram(3.0)
def mocov3(ax):
    vit = [(1.2, "patch\nproj.", "encoder"), (2.45, "transformer", "encoder"), (3.7, "projector", "head")]
    top = [(0.38, "view 1\nt(x)", "data"), *vit, (4.85, "predictor", "predictor")]
    bot = [(0.38, "view 2\nt′(x)", "data"), *[(*s, True) for s in vit]]
    top, bot = two_rows(ax, top, bot, 2.4, 0.8)
    for a, b in zip(top[1:], bot[1:]):
        ema(ax, a, b)
    note(ax, 1.85, 2.95, "ViT backbone f", va="top", fontweight="bold")
    loss = box(ax, 6.25, 1.6, "2τ · InfoNCE\nsymmetrised", "loss")
    into_loss(ax, top[-1], loss, label="q")
    into_loss(ax, bot[-1], loss, label="k", sg=True)
    note(ax, 6.25, 0.45, "keys: this batch\n(no queue)")


@diagram(3.2)
def dino(ax):
    head = (3.35, "head\nK outputs", "head")
    student = [(0.7, "global + local\ncrops of x", "data"), (2.0, "student\nViT / ConvNet", "encoder"), head]
    teacher = [(0.7, "global\ncrops of x", "data"), (2.0, "teacher (EMA)\nViT / ConvNet", "encoder", True)]
    teacher += [(*head, True), (4.3, "− c", "op"), (5.3, "softmax\nτₜ (sharpen)", "op")]
    top, bot = row(ax, 2.55, student), row(ax, 1.15, teacher)
    soft = box(ax, 5.3, 2.55, "softmax\nτₛ", "op")
    arrow(ax, top[-1].E(), soft.W())
    for a, b in zip(top[1:], bot[1:3]):
        ema(ax, a, b)
    loss = box(ax, 6.4, 1.85, "cross-entropy\nH(Pₜ, Pₛ)", "loss")
    arrow(ax, soft.E(), (loss.x, soft.y), loss.N(), label="Pₛ", seg=0)
    arrow(ax, bot[-1].E(), (loss.x, bot[-1].y), loss.S(), label="Pₜ", seg=0, at=0.75, sg=0.3)
    xo, centre = (bot[2].E()[0] + bot[3].W()[0]) / 2, "center c ← EMA of teacher outputs"
    loop = [(xo, 1.15), (xo, 0.35), (bot[3].x, 0.35), bot[3].S()]
    arrow(ax, *loop, label=centre, seg=2, side="right", at=0.35, dashed=True, color=NOTE)


@diagram(2.8)
def clip(ax):
    image = [(0.55, "image", "data"), (1.8, "image\nencoder", "encoder"), (3.05, "projection", "head")]
    text = [(0.55, "“a photo\nof a dog”", "data"), (1.8, "text\nencoder", "encoder"), image[-1]]
    top, bot = row(ax, 2.2, image), row(ax, 0.6, text)
    sims = similarities(ax, top[-1], bot[-1], 4.75, "N × N similarities\n× exp(t), t learned", "Iᵢ", "Tⱼ")
    arrow(ax, sims.E(), box(ax, 6.35, 1.4, "symmetric\ncross-entropy", "loss").W())


@diagram(3.2)
def protocol(ax):
    images = box(ax, 0.55, 1.6, "train + test\nimages")
    knn, linear = "(a) kNN, k = 200,\ncosine, weighted vote", "(b) linear probe,\nlogistic regression"
    for y, name in ((2.4, "pretrained f\n❄ frozen"), (0.8, "random-init f\n❄ frozen")):
        enc, feats = row(ax, y, [(2.0, name, "encoder"), (3.25, "features", "op")])
        elbow(ax, images, enc)
        for dy, text in ((0.36, knn), (-0.36, linear)):
            clf = box(ax, 4.85, y + dy, text, "op", w=1.7)
            elbow(ax, feats, clf)
            arrow(ax, clf.E(), box(ax, 6.45, y + dy, "top-1\naccuracy", "data", w=0.8).W())
    note(ax, 2.0, 0.2, "baseline", fontweight="bold")


# ------------------------------------------------------------------------------------------ output
def render(name: str) -> Figure:
    """The figure of diagram `name`, checked for overlaps (call inside rc_context(RC))."""
    height, draw = DIAGRAMS[name]
    fig = Figure(figsize=(WIDTH, height))
    FigureCanvasAgg(fig)
    ax = fig.add_axes((0, 0, 1, 1), xlim=(0, WIDTH), ylim=(0, height))
    ax.set_axis_off()
    draw(ax)
    problems = overlaps(fig)
    assert not problems, f"diagram {name}: " + "; ".join(problems)
    return fig


def write_all(out: Path, png: Path | None = None) -> list[Path]:
    """Draw every diagram into `out` (and PNGs into `png`); the paths of the SVGs written."""
    out.mkdir(parents=True, exist_ok=True)
    paths = []
    with matplotlib.rc_context(RC):
        for name in NAMES:
            fig = render(name)
            paths.append(out / f"diagram_{name}.svg")
            fig.savefig(paths[-1], format="svg", metadata={"Date": None, "Creator": None})
            if png is not None:
                png.mkdir(parents=True, exist_ok=True)
                fig.savefig(png / f"diagram_{name}.png", dpi=150)
    return paths


# The matplotlib that drew the committed SVGs: `--check` compares bytes under it, text under another.
DRAWN_WITH = "3.11.2"


def svg_texts(data: bytes) -> list[str]:
    """The text of every <text> element of an SVG, in order (mathtext: its glyphs joined)."""
    root = ElementTree.fromstring(data)
    return ["".join(t.itertext()).strip() for t in root.iter("{http://www.w3.org/2000/svg}text")]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "book" / "images")
    parser.add_argument("--check", action="store_true", help="exit 1 if a file in --out is not up to date")
    parser.add_argument("--png", type=Path, help="also write PNGs here, to look at")
    args = parser.parse_args(argv)
    if not args.check:
        print(f"wrote {len(write_all(args.out, args.png))} diagrams to {args.out}")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        fresh = {p.name: p.read_bytes() for p in write_all(Path(tmp), args.png)}
    same = lambda a, b: a == b  # noqa: E731
    if matplotlib.__version__ != DRAWN_WITH:  # another matplotlib writes other bytes for the same figure
        print(
            f"matplotlib {matplotlib.__version__}, not the {DRAWN_WITH} that drew the committed files: "
            "comparing their text only",
            file=sys.stderr,
        )
        same = lambda a, b: a is not None and svg_texts(a) == svg_texts(b)  # noqa: E731
    old = lambda name: (args.out / name).read_bytes() if (args.out / name).is_file() else None  # noqa: E731
    stale = [args.out / name for name, data in fresh.items() if not same(old(name), data)]
    for path in stale:
        print(f"stale or missing: {path}", file=sys.stderr)
    if stale:
        print("rerun `python scripts/make_diagrams.py` and commit the result", file=sys.stderr)
        return 1
    print(f"all {len(NAMES)} diagrams in {args.out} are up to date")
    return 0


if __name__ == "__main__":
    sys.exit(main())
