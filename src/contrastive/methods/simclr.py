"""SimCLR (Chen et al. 2020): two augmented views, a projection head, NT-Xent over 2N views.

Chapter: SimCLR. The loss is `contrastive.losses.nt_xent`; under torchrun the
projections are gathered from every rank (with gradient) so the negatives are
the whole global batch, as in the paper. Each epoch also reports Wang and
Isola's alignment and uniformity of the normalised projections, averaged over
the epoch's training batches (measured without gradient; they change nothing).
"""

from __future__ import annotations

import torch

from ..augment import SIMCLR_CIFAR, Recipe, augment
from ..distributed import gather_with_grad
from ..evaluate import alignment, uniformity
from ..losses import nt_xent
from ..models import projection_mlp
from .base import Method, Spec


class SimCLR(Method):
    def __init__(
        self,
        spec: Spec,
        proj_hidden_dim: int = 512,
        proj_dim: int = 128,
        temperature: float = 0.5,
        recipe: Recipe = SIMCLR_CIFAR,
    ):
        super().__init__()
        self.backbone = spec.build_backbone()
        self.projector = projection_mlp(self.backbone.out_dim, proj_hidden_dim, proj_dim)
        self.temperature = temperature
        self.recipe = recipe

    def forward(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) uint8 -> NT-Xent over the 2N views (the indices are not needed)."""
        x = torch.cat([augment(images, self.recipe), augment(images, self.recipe)])
        z1, z2 = self.projector(self.backbone(x)).chunk(2)
        self.log_geometry(z1, z2)
        return nt_xent(gather_with_grad(z1), gather_with_grad(z2), self.temperature)

    @torch.no_grad()
    def log_geometry(self, z1: torch.Tensor, z2: torch.Tensor) -> None:
        """Alignment (alpha = 2) and uniformity (t = 2) of this batch's projections."""
        self.log("alignment", alignment(z1.float(), z2.float()))
        self.log("uniformity", uniformity(z1.float()))
