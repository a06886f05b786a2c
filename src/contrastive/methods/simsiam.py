"""SimSiam (Chen and He 2021): BYOL without the momentum encoder; the stop-gradient prevents collapse.

Chapter: SimSiam. One network, backbone f and projector, embeds both views,
z1 and z2; a predictor h maps each to p = h(z). The loss is
D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2 with D the negative cosine,
`contrastive.losses.negative_cosine`, and sg the stop-gradient: the target
branch is a constant. The paper reads this as alternating optimisation: the
targets eta_x are held fixed while the network moves towards them.

`constant_predictor_lr=True` keeps the predictor at the peak learning rate while the
rest decays, as the paper trains it; `predictor_lr_scale` multiplies its rate. Two
ablations: `stop_gradient=False` lets the gradient through both branches, and
`predictor=False` replaces h by the identity; the paper reports collapse for both.
Each view goes through the network on its own, as in the paper's code.

`output_std` is measured on z, after the projector's last BN (affine-free, as in
the paper), and `prediction_std` on p. That BN gives every dimension of z zero
mean and unit variance over the batch, so `output_std` stays near 1/sqrt(D) even
when z collapses onto a single line through the origin (z_n = s_n u); p has no
last BN (nor has BYOL's projector), so `prediction_std` shows such a collapse.
"""

from __future__ import annotations

import torch
from torch import nn

from ..augment import SIMCLR_CIFAR, Recipe, augment
from ..evaluate import output_std
from ..losses import negative_cosine
from ..models import projection_mlp
from .base import Method, Spec, check_widths


class SimSiam(Method):
    # The paper's SGD rate, 0.05 x B/256, against the profiles' SimCLR 0.5 x B/256.
    lr_scale = 0.1
    # In the cpu profile (20,000 images, ten epochs) these settings gain about 6 kNN points; the sweep in
    # results/sweeps/simsiam_cpu.jsonl found twice the steps (batch 128), four times the linearly scaled
    # rate and a predictor ten times faster than the rest (+11.3). The gpu profile keeps the paper's.
    tuned_settings = {"cpu": {"batch_size": 128, "lr": 1.0}}
    tuned_options = {"cpu": {"predictor_lr_scale": 10.0}}

    def __init__(
        self,
        spec: Spec,
        proj_dim: int = 512,
        pred_hidden_dim: int = 128,
        stop_gradient: bool = True,
        predictor: bool = True,
        constant_predictor_lr: bool = False,
        predictor_lr_scale: float = 1.0,
        recipe: Recipe = SIMCLR_CIFAR,
    ):
        super().__init__()
        check_widths(proj_dim=proj_dim, pred_hidden_dim=pred_hidden_dim)
        self.backbone = spec.build_backbone()
        # The paper's ImageNet heads scaled from 2048 to 512: a 3-layer projector as wide as its output,
        # BN after every layer including the last, and a predictor with a bottleneck of a quarter.
        self.projector = projection_mlp(self.backbone.out_dim, proj_dim, proj_dim, num_layers=3, last_bn=True)
        self.predictor = projection_mlp(proj_dim, pred_hidden_dim, proj_dim) if predictor else nn.Identity()
        self.stop_gradient, self.recipe = stop_gradient, recipe
        if not predictor_lr_scale > 0:
            raise ValueError(f"predictor_lr_scale must be positive, got {predictor_lr_scale!r}")
        self.constant_predictor_lr, self.predictor_lr_scale = constant_predictor_lr, float(predictor_lr_scale)

    def parameter_groups(self) -> list[dict]:
        """The predictor at `predictor_lr_scale` times the rate, and with `constant_predictor_lr` at the
        peak rate throughout, as the paper trains it (its Sec. 4); the rest follows the schedule."""
        return self.groups_apart(self.predictor, self.predictor_lr_scale, self.constant_predictor_lr)

    def objective(self, z1: torch.Tensor, z2: torch.Tensor) -> torch.Tensor:
        """Projections (N, D) of the two views -> D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2, p = h(z)."""
        p1, p2 = self.predictor(z1), self.predictor(z2)
        if self.stop_gradient:
            z1, z2 = z1.detach(), z2.detach()
        self.log("prediction_std", (output_std(p1.detach()) + output_std(p2.detach())) / 2)
        return negative_cosine(p1, z2) / 2 + negative_cosine(p2, z1) / 2

    def loss(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """Augmented views (N, C, H, W) -> the objective of their projections."""
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        self.log("output_std", (output_std(z1.detach()) + output_std(z2.detach())) / 2)
        return self.objective(z1, z2)

    def forward(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) uint8 -> the symmetrised loss of two views (the indices are not needed)."""
        return self.loss(augment(images, self.recipe), augment(images, self.recipe))
