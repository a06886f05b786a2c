"""InvaSpread (Ye et al. 2019): the other images of the batch as negatives, no memory bank.

Chapter: InvaSpread. A step embeds two augmented views of every image,
f and f^ (a linear head with BatchNorm, then normalised), and minimises
`contrastive.losses.invaspread_loss`: the batch's f are the instance weights;
each f^_i must be recognised as instance i (invariance), and each f_j must not
be mistaken for any other instance (spreading). The paper's f is the
un-augmented image; here both views are augmented with the same recipe.
Under torchrun the embeddings are gathered from every rank (with gradient), so
the negatives are the whole global batch."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..augment import Recipe, augment
from ..distributed import gather_with_grad
from ..losses import invaspread_loss
from ..models import embedding_head

# The paper follows InstDisc's recipe: crops of at least 20%, colour jitter always on.
INVASPREAD_CIFAR = Recipe(scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, gray_p=0.2)


class InvaSpread(nn.Module):
    lr_scale = 0.2  # the rate is the profile's SimCLR rate times this; SimCLR's is tuned for tau = 0.5

    def __init__(
        self,
        backbone: nn.Module,
        feature_dim: int = 128,
        temperature: float = 0.1,
        recipe: Recipe = INVASPREAD_CIFAR,
    ):
        super().__init__()
        self.backbone = backbone
        self.head = embedding_head(backbone.out_dim, feature_dim)
        self.temperature, self.recipe = temperature, recipe
        self._positive: list[float] = []

    def forward(self, images: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        """The training step: images (B, 3, H, W) uint8 -> the InvaSpread loss (indices are not needed)."""
        x = torch.cat([augment(images, self.recipe), augment(images, self.recipe)])
        f, f_hat = self.head(self.backbone(x)).chunk(2)
        f, f_hat = gather_with_grad(f), gather_with_grad(f_hat)
        loss = invaspread_loss(f, f_hat, self.temperature)
        with torch.no_grad():  # P(i | x^_i), the probability the positive gets in the batch softmax
            logits = F.normalize(f.float(), dim=1) @ F.normalize(f_hat.float(), dim=1).T / self.temperature
            self._positive.append(logits.log_softmax(0).diagonal().exp().mean().item())
        return loss

    training_step = forward

    def on_step_end(self, step: int, total_steps: int) -> None:
        """InvaSpread keeps no state beyond its weights."""

    def epoch_metrics(self) -> dict:
        """The mean over this epoch's steps of P(i | x^_i)."""
        values, self._positive = self._positive, []
        return {"positive_probability": sum(values) / len(values)} if values else {}
