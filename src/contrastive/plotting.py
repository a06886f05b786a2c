"""The few figure helpers the chapters share, and one colour per method for the whole book."""

from __future__ import annotations

import textwrap

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


def timeline_figure():
    """The book's map: the twelve methods on one time axis."""
    fig, ax = plt.subplots(figsize=(11, 4.2))
    heights = (1.0, -1.0, 2.2, -2.2)  # neighbours alternate sides and levels, so labels never overlap
    per_year: dict[int, int] = {}
    for i, (year, name, idea) in enumerate(TIMELINE):
        k = per_year.get(year, 0)
        per_year[year] = k + 1
        x, y = year + 0.25 * k, heights[i % len(heights)]
        c = color(name.replace(" v1", ""))
        ax.plot([x, x], [0, y], color=c, lw=1.5)
        ax.scatter([x], [0], color=c, zorder=3, s=40)
        label = f"{name}\n" + "\n".join(textwrap.wrap(idea, 18))
        ax.text(
            x,
            y + (0.08 if y > 0 else -0.08),
            label,
            ha="center",
            va="bottom" if y > 0 else "top",
            fontsize=8,
            color="black",
        )
    ax.axhline(0, color="black", lw=0.8)
    ax.set_xlim(2017.8, 2021.9)
    ax.set_ylim(-3.6, 3.6)
    ax.set_xticks([2018, 2019, 2020, 2021])
    ax.set_yticks([])
    for side in ("left", "right", "top"):
        ax.spines[side].set_visible(False)
    ax.set_title("Contrastive and self-supervised learning in vision, 2018 to 2021")
    fig.tight_layout()
    return fig


def plot_run(metrics: list[dict], summary: dict, label: str | None = None):
    """Loss per epoch beside kNN top-1 per epoch, with the random-init encoder as a dashed line."""
    label = label or summary["method"]
    fig, (ax_loss, ax_knn) = plt.subplots(1, 2, figsize=(9, 3.4))
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
