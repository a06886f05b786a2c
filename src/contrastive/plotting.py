"""The few figure helpers the chapters share, and one colour per method for the whole book."""

from __future__ import annotations

import matplotlib.pyplot as plt

METHOD_COLORS = {
    "random init": "#9e9e9e",
    "instdisc": "#8c564b",
    "cpc": "#e377c2",
    "cmc": "#7f7f7f",
    "invaspread": "#bcbd22",
    "moco": "#1f77b4",
    "simclr": "#d62728",
    "mocov2": "#17becf",
    "byol": "#2ca02c",
    "simsiam": "#9467bd",
    "mocov3": "#ff7f0e",
    "dino": "#393b79",
    "clip": "#637939",
}

TIMELINE = [
    (2018, "InstDisc", "memory bank + NCE"),
    (2018, "CPC", "InfoNCE, predict the future"),
    (2019, "CMC", "views from modalities"),
    (2019, "InvaSpread", "in-batch negatives"),
    (2019, "MoCo v1", "queue + momentum encoder"),
    (2020, "SimCLR", "augmentations, MLP head, NT-Xent"),
    (2020, "MoCo v2", "SimCLR's tricks in MoCo"),
    (2020, "BYOL", "no negatives, predictor + EMA"),
    (2020, "SimSiam", "stop-gradient is enough"),
    (2021, "MoCo v3", "ViT backbone, stability"),
    (2021, "DINO", "self-distillation, centering"),
    (2021, "CLIP", "language as the other view"),
]


def color(method: str) -> str:
    """The method's colour ("MoCo v2" and "mocov2" alike; "random init" too), dark grey if unknown."""
    key = method.lower()
    return METHOD_COLORS.get(key) or METHOD_COLORS.get(key.replace(" ", ""), "#333333")


# Colours for the other runs of one chapter (ablations, variants): the first run keeps its method's
# colour, the others take these in turn (colour-blind-safe, none a method's colour), each with its marker.
VARIANT_COLORS = ("#000000", "#e69f00", "#56b4e9", "#cc79a7", "#009e73")
MARKERS = ("o", "s", "^", "D", "v", "P")


def run_styles(method: str, names) -> dict[str, dict]:
    """A distinct colour and marker per run of `method`: plot keywords for each of `names`, the first
    (the method as published) in the method's colour, the rest in `VARIANT_COLORS`."""
    names = list(names)
    if len(names) > 1 + len(VARIANT_COLORS):
        raise ValueError(f"at most {1 + len(VARIANT_COLORS)} runs get their own colour, got {len(names)}")
    colours = [color(method), *VARIANT_COLORS]
    return {name: {"color": colours[i], "marker": MARKERS[i]} for i, name in enumerate(names)}


def timeline_figure():
    """The book's map: the twelve methods down one time axis, each with the idea it added.

    Vertical, so that it reads at the width of a page and of a phone alike. Per method, in
    TIMELINE order: one stem (a line), one marker (a scatter collection) and one label whose
    first line is the method's name (scripts/make_timeline.py links all three to the chapter).
    """
    fig, ax = plt.subplots(figsize=(5.6, 7.2))
    n = len(TIMELINE)
    ax.plot([0, 0], [0.4, n + 0.2], color="black", lw=0.8)  # the time axis, 2018 at the top
    seen_years = set()
    for i, (year, name, idea) in enumerate(TIMELINE):
        y = n - i
        c = color(name.replace(" v1", ""))
        ax.plot([0, 0.35], [y, y], color=c, lw=1.5)
        ax.scatter([0], [y], color=c, zorder=3, s=40)
        ax.text(0.45, y, f"{name}\n{idea}", ha="left", va="center", fontsize=9, linespacing=1.15)
        if year not in seen_years:
            seen_years.add(year)
            ax.text(-0.2, y, str(year), ha="right", va="center", fontsize=10, fontweight="bold")
            if i:
                ax.axhline(y + 0.5, xmin=0.02, xmax=0.98, color="#dddddd", lw=0.8, zorder=0)
    ax.set_xlim(-1.1, 4.2)
    ax.set_ylim(0.3, n + 0.7)
    ax.axis("off")
    ax.set_title("Contrastive and self-supervised learning in vision, 2018 to 2021", fontsize=10)
    fig.tight_layout()
    return fig


def plot_run(metrics: list[dict], summary: dict, label: str | None = None):
    """Loss per epoch beside kNN top-1 per epoch, with the random-init encoder as a dashed line."""
    label = label or summary["method"]
    fig, (ax_loss, ax_knn) = plt.subplots(1, 2, figsize=(7, 3.2))
    epochs = [m["epoch"] for m in metrics]
    ax_loss.plot(epochs, [m["loss"] for m in metrics], marker="o", color=color(summary["method"]))
    ax_loss.set(xlabel="epoch", ylabel="training loss", title=f"{label}: loss")
    knn = [(m["epoch"], 100 * m["knn_top1"]) for m in metrics if "knn_top1" in m]
    ax_knn.plot(*zip(*knn), marker="o", color=color(summary["method"]), label=label)
    ax_knn.axhline(
        100 * summary["knn_top1_random_init"], ls="--", color=color("random init"), label="random init"
    )
    ax_knn.set(xlabel="epoch", ylabel="kNN top-1 (%)", title="kNN accuracy on the test split")
    ax_knn.legend()
    fig.tight_layout()
    return fig


def image_grid(rows, width: float = 7.0):
    """Rows of images, each row (label, images (N, C, H, W) in [0, 1]), drawn large enough to see.

    Pixels are shown as pixels (no smoothing), one gray channel in gray, with the label
    over the row's first image; every row has as many columns as the longest.
    """
    columns = max(len(images) for _, images in rows)
    side = width / columns
    fig, axes = plt.subplots(len(rows), columns, figsize=(width, side * len(rows) * 1.18), squeeze=False)
    for (label, images), line in zip(rows, axes):
        for ax, image in zip(line, list(images) + [None] * (columns - len(images))):
            ax.axis("off")
            if image is None:
                continue
            pixels = image.detach().float().clamp(0, 1).permute(1, 2, 0).squeeze(-1).cpu().numpy()
            ax.imshow(pixels, cmap="gray", vmin=0, vmax=1, interpolation="nearest")
        line[0].set_title(label, fontsize=10, loc="left")
    fig.subplots_adjust(left=0.01, right=0.99, bottom=0.01, top=0.93, wspace=0.06, hspace=0.28)
    return fig
