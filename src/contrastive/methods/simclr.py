"""SimCLR (Chen et al. 2020): two augmented views, a projection head, NT-Xent over 2N views.

Chapter: SimCLR. The loss is `contrastive.losses.nt_xent`; under torchrun the
projections are gathered from every rank (with gradient) so the negatives are
the whole global batch, as in the paper. Each epoch also reports Wang and
Isola's alignment and uniformity of the normalised projections, averaged over
the epoch's training batches (measured without gradient; they change nothing).
"""

from __future__ import annotations

import torch
from torch import nn

from ..augment import SIMCLR_CIFAR, Recipe, augment
from ..distributed import gather_with_grad
from ..evaluate import alignment, uniformity
from ..losses import nt_xent
from ..models import projection_mlp


class SimCLR(nn.Module):
    def __init__(
        self,
        backbone: nn.Module,
        proj_hidden_dim: int = 512,
        proj_dim: int = 128,
        temperature: float = 0.5,
        recipe: Recipe = SIMCLR_CIFAR,
    ):
        super().__init__()
        self.backbone = backbone
        self.projector = projection_mlp(backbone.out_dim, proj_hidden_dim, proj_dim)
        self.temperature = temperature
        self.recipe = recipe
        self._geometry: list[torch.Tensor] = []

    def forward(self, images: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        """The training step: images (N, C, H, W) uint8 -> NT-Xent loss (indices are not needed)."""
        x = torch.cat([augment(images, self.recipe), augment(images, self.recipe)])
        z = self.projector(self.backbone(x))
        z1, z2 = z.chunk(2)
        with torch.no_grad():  # kept as a tensor: reading it every step would wait for the GPU every step
            self._geometry.append(torch.stack([alignment(z1.float(), z2.float()), uniformity(z1.float())]))
        return nt_xent(gather_with_grad(z1), gather_with_grad(z2), self.temperature)

    training_step = forward

    def on_step_end(self, step: int, total_steps: int) -> None:
        """SimCLR keeps no state beyond its weights."""

    def epoch_metrics(self) -> dict:
        """Alignment (alpha = 2) and uniformity (t = 2) of the projections, mean over the epoch's batches."""
        rows, self._geometry = self._geometry, []
        if not rows:
            return {}
        align, uniform = torch.stack(rows).double().mean(0).tolist()
        return {"alignment": align, "uniformity": uniform}
