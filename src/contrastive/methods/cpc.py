"""CPC (van den Oord et al. 2018) on images: predict the patches below from the patches above.

Chapter: CPC. Each 32 x 32 image is cut into a 3 x 3 grid of overlapping
16 x 16 patches (stride 8); the backbone encodes every patch to z; a GRU runs
down each column of the grid, so the context c at row r has seen rows 0..r
only; a linear map W_k predicts the patch k rows further down, and InfoNCE
scores the prediction against the true patch and against patches of other
positions and other images. Evaluation uses the mean of the patch features.

The negatives are drawn once per step, without replacement, from every patch
of the batch (every position of every image, the query's own image included)
except the query's own target: each query is scored against exactly
`num_negatives` patches that are not its positive (fewer only when the batch
has fewer patches).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..augment import CPC_CIFAR, Recipe, augment
from ..losses import info_nce
from .base import Method, Spec

PATCH, STRIDE = 16, 8


def patch_grid(x: torch.Tensor) -> torch.Tensor:
    """(B, C, 32, 32) -> (B, rows, cols, C, 16, 16) overlapping patches."""
    b, c, _, _ = x.shape
    patches = x.unfold(2, PATCH, STRIDE).unfold(3, PATCH, STRIDE)  # (B, C, rows, cols, P, P)
    return patches.permute(0, 2, 3, 1, 4, 5).contiguous()


class PatchEncoder(nn.Module):
    """Images -> the mean of their patch features: the encoder the evaluation protocol reads."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.out_dim = backbone.out_dim

    def patch_features(self, x: torch.Tensor) -> torch.Tensor:
        grid = patch_grid(x)
        b, rows, cols = grid.shape[:3]
        z = self.backbone(grid.flatten(0, 2))
        return z.view(b, rows, cols, -1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.patch_features(x).mean(dim=(1, 2))


class CPC(Method):
    # Nine 16 x 16 patches cost more per image than two 32 x 32 views; 60% of the profile's
    # epochs keeps a cpu-profile run near five minutes.
    epoch_scale = 0.6

    def __init__(
        self,
        spec: Spec,
        max_offset: int = 2,
        num_negatives: int = 1024,
        temperature: float = 0.1,
        recipe: Recipe = CPC_CIFAR,
    ):
        super().__init__()
        self.encoder = PatchEncoder(spec.build_backbone())
        d = self.encoder.out_dim
        self.context = nn.GRU(d, d, batch_first=True)
        self.predictors = nn.ModuleList([nn.Linear(d, d, bias=False) for _ in range(max_offset)])
        self.num_negatives, self.temperature, self.recipe = num_negatives, temperature, recipe

    def forward(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Images (B, C, 32, 32) uint8 -> mean InfoNCE over prediction offsets (indices not needed)."""
        z = self.encoder.patch_features(augment(images, self.recipe))  # (B, rows, cols, D)
        b, rows, cols, d = z.shape
        columns = z.permute(0, 2, 1, 3).reshape(b * cols, rows, d)  # the GRU runs down each column
        c = self.context(columns)[0].view(b, cols, rows, d).permute(0, 2, 1, 3)  # (B, rows, cols, D)
        z = F.normalize(z, dim=-1)  # score directions: ReLU features have large, all-positive dot products
        pool = z.reshape(-1, d)
        drawn = torch.randperm(len(pool), device=z.device)[: self.num_negatives + 1]
        negatives = pool[drawn]
        position = torch.arange(len(pool), device=z.device).view(b, rows, cols)  # each patch's row in pool
        loss = 0.0
        for k, predictor in enumerate(self.predictors, start=1):
            query = F.normalize(predictor(c[:, : rows - k].reshape(-1, d)), dim=1)
            target = z[:, k:].reshape(-1, d)
            exclude = own_target_excluded(drawn, position[:, k:].reshape(-1), self.num_negatives)
            loss = loss + info_nce(query, target, negatives, self.temperature, exclude=exclude)
            self.log_top1(k, query, target, negatives, exclude)
        return loss / len(self.predictors)

    @torch.no_grad()
    def log_top1(self, k: int, query, target, negatives, exclude: torch.Tensor) -> None:
        """InfoNCE top-1 at offset k: does the true patch outscore every negative it is scored against?"""
        positive = (query * target).sum(1)
        scores = (query @ negatives.T).masked_fill(exclude, float("-inf"))
        self.log(f"cpc_accuracy_k{k}", (positive > scores.max(1).values).float().mean())


def own_target_excluded(drawn: torch.Tensor, targets: torch.Tensor, num_negatives: int) -> torch.Tensor:
    """Which of the `drawn` patches (pool rows, distinct, in random order) each query leaves out.

    Query i leaves out its own target `targets[i]` where it was drawn, and otherwise the last drawn
    patch, so that with `num_negatives + 1` patches drawn every query keeps exactly `num_negatives`,
    a uniform draw without replacement from the patches other than its target."""
    exclude = drawn.unsqueeze(0) == targets.unsqueeze(1)  # (queries, drawn)
    if len(drawn) > num_negatives:
        exclude[:, -1] |= ~exclude.any(1)
    return exclude
