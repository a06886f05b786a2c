"""The evaluation protocol shared by every chapter.

Features are the backbone's output (before any projection head), computed on
non-augmented images (the backbone standardises them). Two read-outs: InstDisc's weighted kNN
(k = 200, temperature 0.1, cosine similarity) and a linear probe whose weight
decay is chosen on a validation split carved from train, never on test.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .augment import eval_transform
from .data import stratified_indices


@torch.no_grad()
def extract_features(backbone: nn.Module, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
    """Backbone features (N, D), float32, of uint8 images (N, C, H, W); eval mode, images' device."""
    was_training = backbone.training
    backbone.eval()
    use_amp = images.device.type == "cuda"
    chunks = []
    for start in range(0, len(images), batch_size):
        x = eval_transform(images[start : start + batch_size])
        with torch.autocast("cuda", dtype=torch.bfloat16, enabled=use_amp):
            chunks.append(backbone(x).float())
    backbone.train(was_training)
    return torch.cat(chunks)


@torch.no_grad()
def knn_accuracy(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    k: int = 200,
    temperature: float = 0.1,
    chunk_size: int = 1024,
) -> float:
    """Weighted kNN top-1 (Wu et al. 2018): each of the k most cosine-similar
    training features votes for its class with weight exp(s / temperature)."""
    if len(train_feats) != len(train_labels) or len(test_feats) != len(test_labels):
        raise ValueError("features and labels must have the same length")
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    k = min(k, len(train_feats))
    train_feats = F.normalize(train_feats.float(), dim=1)
    test_feats = F.normalize(test_feats.float(), dim=1)
    correct = 0
    for start in range(0, len(test_feats), chunk_size):
        sims = test_feats[start : start + chunk_size] @ train_feats.T
        top_sims, top_idx = sims.topk(k, dim=1)
        weights = (top_sims / temperature).exp()
        votes = torch.zeros(len(sims), num_classes, device=sims.device)
        votes.scatter_add_(1, train_labels[top_idx], weights)
        correct += (votes.argmax(1) == test_labels[start : start + chunk_size]).sum().item()
    return correct / len(test_feats)


def _fit_linear(x, y, num_classes, weight_decay, max_iter, zero_init: bool = False):
    """Full-batch L-BFGS on cross-entropy + weight_decay ||W||^2. The problem is convex, so a zero start
    (`zero_init`) reaches the same optimum without touching the global RNG; the default keeps the seeded
    random start every chapter's stored probe used."""
    if zero_init:
        layer = nn.utils.skip_init(nn.Linear, x.shape[1], num_classes, device=x.device)
        nn.init.zeros_(layer.weight)
        nn.init.zeros_(layer.bias)
    else:
        torch.manual_seed(0)
        layer = nn.Linear(x.shape[1], num_classes).to(x.device)
    opt = torch.optim.LBFGS(
        layer.parameters(), lr=1.0, max_iter=max_iter, history_size=20, line_search_fn="strong_wolfe"
    )

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(layer(x), y) + weight_decay * layer.weight.pow(2).sum()
        loss.backward()
        return loss

    opt.step(closure)
    return layer


def _accuracy(layer, x, y) -> float:
    with torch.no_grad():
        return (layer(x).argmax(1) == y).float().mean().item()


def linear_probe(
    train_feats: torch.Tensor,
    train_labels: torch.Tensor,
    test_feats: torch.Tensor,
    test_labels: torch.Tensor,
    weight_decays=(0.0, 1e-5, 1e-4, 1e-3, 1e-2),
    val_fraction: float = 0.1,
    max_iter: int = 200,
    seed: int = 0,
    zero_init: bool = False,
) -> dict:
    """Multinomial logistic regression on frozen features (full-batch L-BFGS); the one probe of the book.

    The features are standardised with train statistics; the weight decay is chosen
    by accuracy on a stratified validation split of train (`val_fraction`, at least
    one image per class, drawn with `seed`; ties go to the stronger decay); the probe
    is then refit on all of train and scored once on test. Returns the test top-1,
    the test class probabilities (`test_scores`, for AUCs) and the choice.
    """
    num_classes = int(max(train_labels.max(), test_labels.max())) + 1
    mean, std = train_feats.mean(0), train_feats.std(0) + 1e-6
    xtr, xte = (train_feats - mean) / std, (test_feats - mean) / std
    n_val = max(round(val_fraction * len(train_labels)), len(train_labels.unique()))
    val_idx = stratified_indices(train_labels, n_val, torch.Generator().manual_seed(seed), minimum=1)
    fit = torch.ones(len(train_labels), dtype=torch.bool)
    fit[val_idx] = False
    fit_idx, val_idx = fit.nonzero().squeeze(1).to(xtr.device), val_idx.to(xtr.device)
    val_scores = {}
    for wd in weight_decays:
        layer = _fit_linear(xtr[fit_idx], train_labels[fit_idx], num_classes, wd, max_iter, zero_init)
        val_scores[wd] = _accuracy(layer, xtr[val_idx], train_labels[val_idx])
    best = max(weight_decays, key=lambda wd: (val_scores[wd], wd))
    layer = _fit_linear(xtr, train_labels, num_classes, best, max_iter, zero_init)
    with torch.no_grad():
        test_scores = layer(xte).softmax(1)
    return {
        "top1": _accuracy(layer, xte, test_labels),
        "test_scores": test_scores,
        "weight_decay": best,
        "val_top1": val_scores[best],
        "val_scores": {str(k): v for k, v in val_scores.items()},
    }


#: How far (kNN top-1, as a fraction) a trained encoder must beat its own random initialisation to count
#: as having learned: two points, above the seed-to-seed spread of one recipe (Chapter 14 measures 1.8).
LEARNED_MARGIN = 0.02


def learned(summary: dict, margin: float = LEARNED_MARGIN) -> bool:
    """Whether a run (its `summary.json`, or `train(...).summary`) learned: its encoder's kNN top-1 beats
    the same encoder at initialisation by more than `margin`.

    A falling loss is not the test: SimSiam without its stop-gradient collapses while its loss falls from
    -0.42 to -0.97 (`results/simsiam_nosg_cpu`), and that record fails this one."""
    if not 0 <= margin < 1:
        raise ValueError(f"margin is a fraction of the test images, in [0, 1); got {margin}")
    missing = [k for k in ("knn_top1", "knn_top1_random_init") if k not in summary]
    if missing:
        raise KeyError(f"the summary has no {', '.join(missing)}: is it a training run's summary.json?")
    return summary["knn_top1"] - summary["knn_top1_random_init"] > margin


def evaluate_backbone(
    backbone: nn.Module, data, batch_size: int = 1024, knn_k: int = 200, linear: bool = True
) -> dict:
    """kNN (and optionally the linear probe) of a backbone on a dataset's train/test splits."""
    train_feats = extract_features(backbone, data.train_images, batch_size)
    test_feats = extract_features(backbone, data.test_images, batch_size)
    out = {"knn_top1": knn_accuracy(train_feats, data.train_labels, test_feats, data.test_labels, k=knn_k)}
    if linear:
        out["linear_top1"] = linear_probe(train_feats, data.train_labels, test_feats, data.test_labels)[
            "top1"
        ]
    return out


def alignment(z1: torch.Tensor, z2: torch.Tensor, alpha: float = 2.0) -> torch.Tensor:
    """E ||f(x) - f(y)||^alpha over positive pairs of normalised embeddings (Wang and Isola 2020)."""
    return (F.normalize(z1, dim=1) - F.normalize(z2, dim=1)).norm(dim=1).pow(alpha).mean()


def uniformity(z: torch.Tensor, t: float = 2.0) -> torch.Tensor:
    """log E exp(-t ||f(x) - f(y)||^2) over distinct pairs of normalised embeddings (Wang and Isola 2020)."""
    return torch.pdist(F.normalize(z, dim=1)).pow(2).mul(-t).exp().mean().log()


def output_std(z: torch.Tensor) -> torch.Tensor:
    """Mean over dimensions of the std over the batch of z / ||z|| (SimSiam's collapse monitor).

    About 1/sqrt(D) for directions spread over the sphere in D dimensions, 0 when every
    output points the same way (complete collapse).
    """
    return F.normalize(z.float(), dim=1).std(0).mean()


def effective_rank(z: torch.Tensor) -> torch.Tensor:
    """exp(entropy of p_k = s_k / sum s), s the singular values of the rows z / ||z|| (Roy and Vetterli 2007).

    About D for directions spread evenly over the sphere in D dimensions (N >> D), k for directions
    spread evenly (isotropically) within a k-dimensional subspace however it is rotated, and less than
    k for an uneven spread within it; 1 for complete collapse. `output_std` sees only
    the last of the three: a rotated low-dimensional collapse keeps it near 1/sqrt(D).
    """
    if z.dim() != 2 or min(z.shape) == 0:
        raise ValueError(f"z must be a non-empty (N, D) matrix, got shape {tuple(z.shape)}")
    s = torch.linalg.svdvals(F.normalize(z.double(), dim=1))
    p = s / s.sum()
    p = p[p > 0]
    return torch.exp(-(p * p.log()).sum()).float()
