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

from ..augment import INSTDISC_CIFAR, Recipe, augment
from ..distributed import gather_with_grad
from ..losses import invaspread_loss
from ..models import embedding_head
from .base import Method, Spec

# The paper follows InstDisc's recipe: crops of at least 20%, colour jitter always on.
INVASPREAD_CIFAR = INSTDISC_CIFAR


class InvaSpread(Method):
    lr_scale = 0.2  # the rate is the profile's SimCLR rate times this; SimCLR's is tuned for tau = 0.5

    def __init__(
        self,
        spec: Spec,
        feature_dim: int = 128,
        temperature: float = 0.1,
        recipe: Recipe = INVASPREAD_CIFAR,
    ):
        super().__init__()
        self.backbone = spec.build_backbone()
        self.head = embedding_head(self.backbone.out_dim, feature_dim)
        self.temperature, self.recipe = temperature, recipe

    def forward(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) uint8 -> the InvaSpread loss of two views (the indices are not needed)."""
        x = torch.cat([augment(images, self.recipe), augment(images, self.recipe)])
        f, f_hat = self.head(self.backbone(x)).chunk(2)
        f, f_hat = gather_with_grad(f), gather_with_grad(f_hat)
        self.log_positive_probability(f, f_hat)
        return invaspread_loss(f, f_hat, self.temperature)

    @torch.no_grad()
    def log_positive_probability(self, f: torch.Tensor, f_hat: torch.Tensor) -> None:
        """P(i | x^_i), the probability the positive gets in the batch softmax, mean over the batch."""
        logits = F.normalize(f.float(), dim=1) @ F.normalize(f_hat.float(), dim=1).T / self.temperature
        self.log("positive_probability", logits.log_softmax(0).diagonal().exp().mean())
