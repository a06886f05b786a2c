"""Contrastive learning on biomedical images: recipes per modality, label fractions, ACC and AUC.

Chapter: biomedical. MedMNIST v2 (Yang et al. 2023) at 28 px: PneumoniaMNIST
(grayscale chest X-rays) and PathMNIST (RGB H&E histology tiles). Self-supervised
pretraining uses the training images without labels; a linear probe on a
fraction of the labels is then compared with the same backbone trained from
scratch on the same labels, scored as MedMNIST scores: accuracy and ROC AUC
(one-vs-rest macro average for more than two classes).

Augmentations follow the modality, built from `contrastive.augment` so every
method takes them through `method_options={"recipe": ...}`. When a MedMNIST
file is missing and the profile is `smoke` (CI, which prepares only CIFAR-10),
the chapter trains on a synthetic stand-in that says so in its name, classes and
source line; every other profile loads (or downloads) the real file.
"""

from __future__ import annotations

import dataclasses
import math
import os
import time
import warnings
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .augment import Recipe, augment, eval_transform
from .data import MEDMNIST, ImageDataset, data_root, load_medmnist, stratified_indices
from .evaluate import extract_features, linear_probe
from .models import build_backbone
from .profiles import Profile
from .train import lr_at

# ---- recipes ------------------------------------------------------------------------------

# Grayscale chest X-rays, one channel. Crops keep at least 35% of the image: a lung
# opacity is a few pixels at 28 px, and SimCLR's 8% crops would often cut it out of
# one view, asking the encoder to match a diseased view with a healthy-looking one.
# Brightness and contrast vary with exposure and scanner, so they are jittered; there
# is no hue or saturation in a gray image, and `color_jitter` leaves them out for one
# channel (they are set to 0 here as well, so the recipe says what it does). No
# horizontal flip: a chest X-ray has a laterality (the heart lies on the left, and
# a report says which lung), and a mirrored film shows an anatomy (dextrocardia)
# that the data set does not contain. Where the label does not depend on the side
# (PneumoniaMNIST's does not), `dataclasses.replace(XRAY, flip_p=0.5)` is the experiment.
XRAY = Recipe(
    size=28,
    scale=(0.35, 1.0),
    ratio=(3 / 4, 4 / 3),
    flip_p=0.0,
    jitter=(0.4, 0.4, 0.0, 0.0),
    jitter_p=0.8,
    gray_p=0.0,
    blur_p=0.0,
)

# H&E histology tiles, three channels. Tissue in a slide has no up or down, so flips
# and 90-degree rotations change nothing a pathologist reads (`dihedral` below; the
# recipe itself can only flip left-right). Stain intensity and hue vary between
# labs, scanners and batches of eosin and haematoxylin, so hue and saturation are
# jittered (a stand-in for stain augmentation in the HED colour space) with a
# moderate hue shift: purple nuclei must stay distinguishable from pink stroma.
# No random grayscale: colour carries the stain, which is the signal.
HISTOLOGY = Recipe(
    size=28,
    scale=(0.35, 1.0),
    ratio=(3 / 4, 4 / 3),
    flip_p=0.5,
    jitter=(0.25, 0.25, 0.3, 0.05),
    jitter_p=0.8,
    gray_p=0.0,
    blur_p=0.0,
)


def dihedral(x: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """A random element of the square's symmetry group per sample: k * 90 degrees, then a flip with p = 1/2.

    x' = F^f R^k x with k uniform in {0, 1, 2, 3} and f in {0, 1}: all eight orientations
    of a tile are equally likely. Batched (four rotated copies and one gather), on the
    images' device, drawn from `generator` (the global RNG when None) like `augment`'s ops.
    """
    if x.ndim != 4 or x.shape[-1] != x.shape[-2]:
        raise ValueError(f"dihedral needs square images (B, C, H, H), got shape {tuple(x.shape)}.")
    source = generator.device if generator is not None else x.device
    k = torch.randint(4, (len(x),), generator=generator, device=source).to(x.device)
    flip = torch.randint(2, (len(x),), generator=generator, device=source).to(x.device).bool()
    rotated = torch.stack([x.rot90(r, dims=(-2, -1)) for r in range(4)])[k, torch.arange(len(x))]
    return torch.where(flip.view(-1, 1, 1, 1), rotated.flip(-1), rotated)


# ---- the chapter's budget per profile -----------------------------------------------------


@dataclass(frozen=True)
class Budget:
    """What the chapter trains under one profile (the profile's own sizes are CIFAR-10's)."""

    xray_train: int | None  # PneumoniaMNIST training images kept, stratified (None: all)
    xray_test: int | None
    xray_epochs: int  # SimCLR epochs on the X-rays
    tiles: int  # the first PathMNIST training tiles, split stratified into train and test
    tile_test_fraction: float
    tile_epochs: int  # fewer images than the X-rays, so more epochs for a similar number of steps
    tile_batch: int
    baseline_epochs: int  # supervised passes over the labelled subset ...
    baseline_min_steps: int  # ... but at least this many updates, so 1% of the labels still trains
    seeds: tuple[int, ...]  # label subsets (and baseline inits) for the fractions below 100%
    xray_fractions: tuple[float, ...] = (0.01, 0.1, 1.0)
    tile_fractions: tuple[float, ...] = (0.1, 1.0)  # 1% of 700 tiles is fewer than one per class

    def seeds_for(self, fraction: float) -> tuple[int, ...]:
        """Every seed below 100% of the labels; one at 100%, where the labelled set is fixed."""
        return self.seeds if fraction < 1 else self.seeds[:1]


BUDGETS = {
    "smoke": Budget(
        xray_train=600,
        xray_test=200,
        xray_epochs=2,
        tiles=300,
        tile_test_fraction=0.3,
        tile_epochs=3,
        tile_batch=50,
        baseline_epochs=2,
        baseline_min_steps=8,
        seeds=(0, 1),
        tile_fractions=(0.2, 1.0),
    ),  # 10% of 210 tiles leaves classes with a single label
    "cpu": Budget(
        xray_train=None,
        xray_test=None,
        xray_epochs=40,
        tiles=1000,
        tile_test_fraction=0.3,
        tile_epochs=150,
        tile_batch=128,
        baseline_epochs=30,
        baseline_min_steps=300,
        seeds=(0, 1, 2),
    ),
    "gpu": Budget(
        xray_train=None,
        xray_test=None,
        xray_epochs=200,
        tiles=1000,
        tile_test_fraction=0.3,
        tile_epochs=600,
        tile_batch=128,
        baseline_epochs=100,
        baseline_min_steps=1000,
        seeds=(0, 1, 2, 3, 4),
    ),
}


def budget(profile: Profile) -> Budget:
    """The chapter's budget for `profile` (by its name)."""
    if profile.name not in BUDGETS:
        known = ", ".join(BUDGETS)
        raise ValueError(f"no biomedical budget for profile {profile.name!r}; choose one of {known}.")
    return BUDGETS[profile.name]


# MedMNIST v2 (Yang et al. 2023), its table of 2-D benchmarks: ResNet-18 at 28 px, test split.
PAPER_RESNET18_28 = {"pneumoniamnist": {"acc": 0.854, "auc": 0.944}}

# ---- data: the real file, or a synthetic stand-in for the smoke profile -------------------

_STAND_IN_CHANNELS = {"pneumoniamnist": 1, "pathmnist": 3}


def synthetic_stand_in(name: str, n_train: int, n_test: int, seed: int = 0) -> ImageDataset:
    """Random gratings shaped like a MedMNIST set: NOT medical images, for smoke tests only.

    Class c is a sinusoidal grating sin(2 pi f_c (x cos t_c + y sin t_c) + phase) with
    noise (and a class tint in colour), so a network can learn it in a few steps. The
    name, every class name and the source line say that it is synthetic.
    """
    if name not in _STAND_IN_CHANNELS:
        known = ", ".join(_STAND_IN_CHANNELS)
        raise ValueError(f"a synthetic stand-in exists for {known} only, not {name!r}.")
    channels, classes = _STAND_IN_CHANNELS[name], MEDMNIST[name][1]
    g = torch.Generator().manual_seed(seed)
    k = len(classes)
    freq = 1.5 + 3.0 * torch.arange(k) / max(1, k - 1)  # cycles per image
    angle = math.pi * torch.arange(k) / k
    tint = 0.55 + 0.35 * torch.rand(k, channels, 1, 1, generator=g)
    grid = torch.linspace(0, 1, 28)
    yy, xx = torch.meshgrid(grid, grid, indexing="ij")

    def split(n):
        labels = torch.randint(k, (n,), generator=g)
        phase = 2 * math.pi * torch.rand(n, 1, 1, generator=g)
        along = xx * angle[labels].cos().view(-1, 1, 1) + yy * angle[labels].sin().view(-1, 1, 1)
        wave = torch.sin(2 * math.pi * freq[labels].view(-1, 1, 1) * along + phase)
        noise = 0.08 * torch.randn(n, channels, 28, 28, generator=g)
        images = tint[labels] * (0.5 + 0.3 * wave[:, None]) + noise
        return (images.clamp(0, 1) * 255).round().to(torch.uint8), labels

    (xtr, ytr), (xte, yte) = split(n_train), split(n_test)
    return ImageDataset(
        xtr,
        ytr,
        xte,
        yte,
        [f"synthetic {c}" for c in classes],
        name=f"synthetic stand-in for {name}",
        source=f"SYNTHETIC STAND-IN for {name} (random gratings, no medical images, numbers mean nothing)",
    )


def load_chapter_data(
    name: str, profile: Profile, root: str | os.PathLike | None = None, download: bool = True
) -> ImageDataset:
    """`load_medmnist(name, root, download)`, or under the smoke profile with no file, `synthetic_stand_in`.

    CI prepares CIFAR-10 only and has no network, so its smoke run of the chapter uses a
    stand-in of `budget(profile)`'s size and warns that it does (the chapter's two data
    sets only). Every other case loads the real file, downloading it (md5-checked)
    when it is missing and `download` is true.
    """
    path = data_root(root) / "medmnist" / f"{name}.npz"
    if profile.name == "smoke" and name in _STAND_IN_CHANNELS and not path.is_file():
        warnings.warn(
            f"{path} is missing: the smoke profile trains on a SYNTHETIC STAND-IN for {name}, "
            "not on medical images; put the file there to smoke-test the real data.",
            UserWarning,
            stacklevel=2,
        )
        b = budget(profile)
        sizes = {"pneumoniamnist": (b.xray_train, b.xray_test), "pathmnist": (b.tiles, 0)}
        return synthetic_stand_in(name, *sizes[name])
    return load_medmnist(name, root, download)


def first_tiles(data: ImageDataset, n: int, test_fraction: float, seed: int = 0) -> ImageDataset:
    """The first n training images, split stratified into train and test (val/test of the file unused).

    The offline copy of PathMNIST holds only its first 1,000 training tiles; taking the
    first n of the full official file gives the same tiles, hence the same split.
    """
    if not 0 < n <= len(data.train_images):
        raise ValueError(f"cannot take the first {n} of {len(data.train_images)} training images.")
    images, labels = data.train_images[:n], data.train_labels[:n]
    test = label_subset(labels, test_fraction, seed)
    train = torch.ones(n, dtype=torch.bool)
    train[test] = False
    return dataclasses.replace(
        data,
        train_images=images[train],
        train_labels=labels[train],
        test_images=images[test],
        test_labels=labels[test],
        val_images=None,
        val_labels=None,
        source=f"{data.source}; first {n} training tiles, {len(test)} held out as test (stratified)",
    )


def label_subset(labels: Tensor, fraction: float, seed: int) -> Tensor:
    """Indices of a stratified fraction of `labels`: round(fraction * N) images, at least one per class.

    `data.stratified_indices` with at least one image per class (a class lifted from none to
    one adds that image to the total), drawn with a generator seeded by `seed`; the indices
    come back sorted. fraction = 1 keeps every image.
    """
    if not 0 < fraction <= 1:
        raise ValueError(f"fraction is a share of the labels and must be in (0, 1], got {fraction}.")
    n = max(round(fraction * len(labels)), len(torch.unique(labels)))
    return stratified_indices(labels, n, torch.Generator().manual_seed(seed), minimum=1)


# ---- metrics as MedMNIST reports them -----------------------------------------------------


def _binary_auc(scores: Tensor, positive: Tensor) -> float:
    n_pos = int(positive.sum())
    n_neg = len(positive) - n_pos
    if n_pos == 0 or n_neg == 0:
        raise ValueError("ROC AUC needs at least one positive and one negative example.")
    # Mid-ranks: a block of k tied scores ending at 1-based position e has ranks e-k+1..e, mean e-(k-1)/2.
    _, inverse, counts = torch.unique(scores.double(), return_inverse=True, return_counts=True)
    midrank = counts.cumsum(0).double() - (counts.double() - 1) / 2
    rank_sum = midrank[inverse][positive].sum().item()
    return (rank_sum - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg)


def roc_auc(scores: Tensor, labels: Tensor) -> float:
    """ROC AUC = P(s+ > s-) + P(s+ = s-) / 2, from the rank sum of the positives (Mann-Whitney U).

    Binary: `scores` (N,) for class 1, or (N, 2) class scores, of which column 1 is used.
    More classes: `scores` (N, C), the macro average over classes of the one-vs-rest AUC
    of column c against (label == c), as MedMNIST's `getAUC` computes it.
    """
    scores, labels = scores.detach().cpu(), labels.detach().cpu().long()
    if len(scores) != len(labels):
        raise ValueError(f"scores ({len(scores)}) and labels ({len(labels)}) must have the same length.")
    if scores.ndim == 1:
        if not set(labels.unique().tolist()) <= {0, 1}:
            raise ValueError("one score per example needs binary labels in {0, 1}; pass (N, C) class scores.")
        return _binary_auc(scores, labels == 1)
    if scores.ndim != 2 or int(labels.max()) >= scores.shape[1]:
        shape = tuple(scores.shape)
        raise ValueError(f"scores must be (N,) or (N, C) with C above the largest label, got {shape}.")
    if scores.shape[1] == 2:
        return _binary_auc(scores[:, 1], labels == 1)
    return sum(_binary_auc(scores[:, c], labels == c) for c in range(scores.shape[1])) / scores.shape[1]


def accuracy(scores: Tensor, labels: Tensor) -> float:
    """Share of examples whose highest class score is their label; (N,) scores: P(class 1) > 0.5."""
    if len(scores) != len(labels):
        raise ValueError(f"scores ({len(scores)}) and labels ({len(labels)}) must have the same length.")
    predicted = (scores > 0.5).long() if scores.ndim == 1 else scores.argmax(1)
    return (predicted.cpu() == labels.cpu()).float().mean().item()


# ---- the linear probe on a label fraction --------------------------------------------------


def probe(
    train_feats: Tensor,
    train_labels: Tensor,
    test_feats: Tensor,
    test_labels: Tensor,
    fraction: float = 1.0,
    seed: int = 0,
    weight_decays: tuple[float, ...] = (0.0, 1e-5, 1e-4, 1e-3, 1e-2),
    val_fraction: float = 0.1,
    max_iter: int = 200,
) -> dict:
    """The book's linear probe (`evaluate.linear_probe`) on a labelled fraction; test ACC and AUC.

    The labelled images are `label_subset(train_labels, fraction, seed)`; the probe's
    validation split is drawn from them with seed + 1, and L-BFGS starts from zero
    weights (the problem is convex, so the start does not change the optimum).
    """
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    labelled = label_subset(train_labels, fraction, seed).to(train_feats.device)
    y = train_labels[labelled]
    if int(torch.bincount(y.cpu(), minlength=num_classes).min()) < 2:
        raise ValueError(
            f"a {fraction:.0%} label subset leaves a class with fewer than 2 images, one to fit "
            "and one to validate: choose a larger fraction."
        )
    fitted = linear_probe(
        train_feats[labelled],
        y,
        test_feats,
        test_labels,
        weight_decays,
        val_fraction,
        max_iter,
        seed=seed + 1,
        zero_init=True,
    )
    scores = fitted["test_scores"]
    return {
        "acc": accuracy(scores, test_labels),
        "auc": roc_auc(scores, test_labels),
        "labels": len(y),
        "weight_decay": fitted["weight_decay"],
    }


def features(backbone: nn.Module, data: ImageDataset, batch_size: int = 1000) -> tuple[Tensor, Tensor]:
    """Frozen backbone features of the train and test splits (the backbone standardises its input)."""
    return extract_features(backbone, data.train_images, batch_size), extract_features(
        backbone, data.test_images, batch_size
    )


# ---- the supervised baseline ----------------------------------------------------------------


def supervised_baseline(
    data: ImageDataset,
    labelled_indices: Tensor,
    backbone_name: str,
    epochs: int,
    seed: int,
    recipe: Recipe,
    batch_size: int = 128,
    lr: float = 0.1,
    weight_decay: float = 5e-4,
    min_steps: int = 0,
) -> dict:
    """The same backbone plus a linear layer, trained from scratch on the labelled images; test ACC and AUC.

    min_theta E[-log softmax(W f_theta(aug(x)) + b)_y] over the labelled images, each
    batch augmented with `recipe`: SGD with momentum 0.9, a linear warm-up over the
    first tenth of the steps, then cosine decay (the training loop's `lr_at`), for
    max(epochs * steps per epoch, min_steps) steps. Seeds the global RNG with `seed`
    (initialisation and augmentations), so a run on the CPU is repeatable.
    """
    if len(labelled_indices) == 0:
        raise ValueError("the supervised baseline needs at least one labelled image.")
    started = time.perf_counter()
    device = data.train_images.device
    labelled_indices = labelled_indices.to(device)
    images, labels = data.train_images[labelled_indices], data.train_labels[labelled_indices]
    num_classes = len(data.classes)
    torch.manual_seed(seed)
    backbone = build_backbone(backbone_name, in_channels=images.shape[1], **data.stats())
    model = nn.Sequential(backbone, nn.Linear(backbone.out_dim, num_classes)).to(device)
    optimizer = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    batch = min(batch_size, len(images))
    steps_per_epoch = len(images) // batch
    total = max(epochs * steps_per_epoch, min_steps)
    order_rng = torch.Generator().manual_seed(seed)
    order, step = torch.empty(0, dtype=torch.long), 0
    model.train()
    while step < total:
        if len(order) < batch:  # a fresh permutation per pass; a last partial batch is dropped, as in `train`
            order = torch.randperm(len(images), generator=order_rng)
        idx, order = order[:batch].to(device), order[batch:]
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step, total, total // 10, lr)
        loss = F.cross_entropy(model(augment(images[idx], recipe)), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        step += 1
    model.eval()
    with torch.no_grad():
        logits = torch.cat(
            [
                model(eval_transform(data.test_images[i : i + 1000]))
                for i in range(0, len(data.test_images), 1000)
            ]
        )
    scores = logits.float().softmax(1)
    return {
        "acc": accuracy(scores, data.test_labels),
        "auc": roc_auc(scores, data.test_labels),
        "labels": len(images),
        "steps": total,
        "seconds": time.perf_counter() - started,
    }


# ---- reporting ------------------------------------------------------------------------------


def mean_spread(values: list[float]) -> tuple[float, float]:
    """Mean and sample standard deviation (0 for a single value) of a list of scores."""
    t = torch.tensor(values, dtype=torch.float64)
    return t.mean().item(), (t.std().item() if len(t) > 1 else 0.0)


def results_table(results: dict, fractions: tuple[float, ...], reference: dict | None = None) -> str:
    """A text table: one row per model, ACC and AUC per label fraction as mean +- std (seeds).

    `results[(model, fraction)]` is a list of dicts with "acc", "auc" and "labels";
    `reference` is {"name": ..., "acc": ..., "auc": ...}, shown under 100% only.
    """
    models = list(dict.fromkeys(m for m, _ in results))
    head = f"{'':34s}" + "".join(f"{f'{f:.0%} labels':>28s}" for f in fractions)
    sub = f"{'':34s}" + f"{'ACC':>14s}{'AUC':>14s}" * len(fractions)
    lines = [head, sub]
    for m in models:
        cells = ""
        for f in fractions:
            runs = results.get((m, f), [])
            for key in ("acc", "auc"):
                if not runs:
                    cells += f"{'':>14s}"
                    continue
                mu, sd = mean_spread([r[key] for r in runs])
                cells += f"{mu:7.3f}" + (f" ±{sd:.3f}" if len(runs) > 1 else f"{'':7s}")
        lines.append(f"{m:34s}{cells}")
    if reference is not None:
        pad = f"{'':>28s}" * (len(fractions) - 1)
        lines.append(
            f"{reference['name']:34s}{pad}{reference['acc']:7.3f}{'':7s}{reference['auc']:7.3f}{'':7s}"
        )
    counts = {
        f: sorted({r["labels"] for (_, g), runs in results.items() if g == f for r in runs})
        for f in fractions
    }
    shown = ", ".join(f"{f:.0%}: {'/'.join(map(str, c))}" for f, c in counts.items())
    lines.append(f"labelled images per run: {shown}")
    return "\n".join(lines)


def pca_2d(feats: Tensor) -> Tensor:
    """The first two principal components of standardised features, (N, D) -> (N, 2), signs fixed.

    Z = (X - mean) / std, Z = U S V^T, returns Z V[:, :2]; each component's sign makes its
    largest-magnitude loading positive, so the picture does not flip between runs.
    """
    z = (feats - feats.mean(0)) / (feats.std(0) + 1e-6)
    _, _, vt = torch.linalg.svd(z.double(), full_matrices=False)
    top = vt[:2]
    signs = torch.sign(top.gather(1, top.abs().argmax(1, keepdim=True)))
    return (z.double() @ (top * signs).T).float()
