"""CMC (Tian et al. 2019): two views of one image, its lightness L and its colour ab, one encoder each.

Chapter: CMC. An augmented image (crop and flip; no colour jitter, colour is
one of the views) is converted to CIE Lab on the device, `augment.rgb_to_lab`.
A half-width encoder reads L (one channel), another reads ab (two channels);
each is followed by a linear embedding, and the loss is the two-view objective
in both directions, `losses.multiview_info_nce`, with the other images of the
batch as negatives (the softmax form of the paper's later versions; Chapter 1's
memory bank is the way to more negatives). Evaluation reads the concatenation
of the two encoders' features, as wide as the one full-width encoder it is
compared with.

`views="rgb"` is that comparison: one full-width encoder on RGB, two
independently cropped views of each image, the same embedding and loss. Both
views then see all three channels, so what is shared between them is what
survives a change of crop, not what links lightness to colour.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..augment import CMC_CIFAR, Recipe, augment, rgb_to_lab
from ..distributed import gather_with_grad
from ..losses import multiview_info_nce
from ..models import embedding_head
from .base import Method, Spec


def split_lab(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """RGB images (B, 3, H, W) in [0, 1] -> (L, ab), each scaled to about [-1, 1]."""
    lab = rgb_to_lab(x.clamp(0, 1))
    return (lab[:, :1] - 50) / 50, lab[:, 1:] / 100


class LabEncoder(nn.Module):
    """RGB images in [0, 1] -> [f_L(L), f_ab(ab)]: the features the evaluation protocol reads."""

    def __init__(self, l_net: nn.Module, ab_net: nn.Module):
        super().__init__()
        self.l_net, self.ab_net = l_net, ab_net
        self.out_dim = l_net.out_dim + ab_net.out_dim

    def views(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lightness, colour = split_lab(x)
        return self.l_net(lightness), self.ab_net(colour)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat(self.views(x), dim=1)


class CMC(Method):
    lr_scale = 0.2  # the profiles' SimCLR rate is tuned for tau = 0.5; tau = 0.07 needs smaller steps

    def __init__(
        self,
        spec: Spec,
        views: str = "lab",
        feature_dim: int = 128,
        temperature: float = 0.07,
        recipe: Recipe = CMC_CIFAR,
    ):
        super().__init__()
        if views not in ("lab", "rgb"):
            raise ValueError(f"views must be 'lab' (CMC) or 'rgb' (one encoder, two crops), got {views!r}")
        self.views, self.temperature, self.recipe = views, temperature, recipe
        if views == "lab":  # two half-width encoders, one on L, one on ab, which split_lab scales
            self.encoder = LabEncoder(
                spec.build_backbone(in_channels=1, width=0.5, standardize=False),
                spec.build_backbone(in_channels=2, width=0.5, standardize=False),
            )
            nets = (self.encoder.l_net, self.encoder.ab_net)
            self.heads = nn.ModuleList([embedding_head(net.out_dim, feature_dim) for net in nets])
        else:
            self.encoder = spec.build_backbone()
            self.heads = nn.ModuleList([embedding_head(self.encoder.out_dim, feature_dim)])

    def embeddings(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """The two views' embeddings (B, feature_dim) each, before normalisation."""
        if self.views == "lab":
            h_l, h_ab = self.encoder.views(augment(images, self.recipe))  # one crop, split by channel
            return self.heads[0](h_l), self.heads[1](h_ab)
        x = torch.cat([augment(images, self.recipe), augment(images, self.recipe)])  # two crops
        return self.heads[0](self.encoder(x)).chunk(2)

    def forward(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Images (B, 3, H, W) uint8 -> L(v1 -> v2) + L(v2 -> v1) over the batch (indices not needed)."""
        z1, z2 = self.embeddings(images)
        z1, z2 = gather_with_grad(z1), gather_with_grad(z2)
        loss = multiview_info_nce([z1, z2], self.temperature)
        self.log_views(z1, z2, loss)
        return loss

    @torch.no_grad()
    def log_views(self, z1: torch.Tensor, z2: torch.Tensor, loss: torch.Tensor) -> None:
        """Top-1 of picking the partner view among the batch (v1 -> v2), and log K - L per direction: an
        estimate, not a bound, since the critic was fitted to the batch it scores."""
        sims = F.normalize(z1.float(), dim=1) @ F.normalize(z2.float(), dim=1).T
        self.log(
            "view_accuracy", (sims.argmax(1) == torch.arange(len(sims), device=sims.device)).float().mean()
        )
        self.log("infonce_estimate", math.log(len(sims)) - loss.detach().float() / 2)
