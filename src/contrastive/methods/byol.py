"""BYOL (Grill et al. 2020): predict a slow target network's projection, no negatives.

Chapter: BYOL. The online network (backbone f, projector g, predictor q) embeds
one view of each image; the target network, a copy of f and g that is never
trained by gradient, embeds the other. The online prediction is pulled towards
the target projection by the normalised MSE ||q/||q|| - z'/||z'||||^2 = 2 - 2 cos,
for both orders of the two views. After every optimiser step the target follows
the online weights, xi <- tau xi + (1 - tau) theta, with tau rising from tau_base
to 1 along a cosine (`momentum.cosine_momentum`).

The loss is reported as the mean of `contrastive.losses.negative_cosine` over
the two view orders, in [-1, 1], the scale of SimSiam's loss: the paper's summed
normalised MSE is 4 + 4 x this value.

`batchnorm=False` removes every BatchNorm from projector and predictor (the
backbone keeps its own): the ablation behind the question whether BN's batch
statistics act as implicit negatives. Each view goes through the networks on
its own, as in the paper's code, so BN normalises it with its own statistics.
Both views use the same recipe (SimCLR's); the paper's blur and solarisation
differ between its two views.
"""

from __future__ import annotations

import torch

from ..augment import SIMCLR_CIFAR, Recipe, augment
from ..evaluate import output_std
from ..losses import negative_cosine
from ..models import projection_mlp
from .base import Method, Spec, check_widths
from .momentum import TAU_BASE, check_momentum, cosine_momentum, ema_update, momentum_copy


class BYOL(Method):
    # SimSiam's SGD rate, 0.05 x B/256 (its BYOL reproduction trains with SGD too), against the profiles'
    # SimCLR 0.5 x B/256. BYOL's own 0.2 x B/256 is a LARS rate, which rescales every layer's step.
    lr_scale = 0.1
    # In the cpu profile (20,000 images, ten epochs) these settings gain about 5 kNN points; the sweep in
    # results/sweeps/byol_cpu.jsonl found twice the steps (batch 128), four times the linearly scaled rate
    # and a predictor thirty times faster than the rest (+10.6). The gpu profile keeps the paper's.
    tuned_settings = {"cpu": {"batch_size": 128, "lr": 1.0}}
    tuned_options = {"cpu": {"predictor_lr_scale": 30.0}}

    def __init__(
        self,
        spec: Spec,
        proj_hidden_dim: int = 512,
        proj_dim: int = 128,
        pred_hidden_dim: int = 512,
        tau_base: float = TAU_BASE,
        batchnorm: bool = True,
        predictor_lr_scale: float = 1.0,
        recipe: Recipe = SIMCLR_CIFAR,
    ):
        super().__init__()
        check_widths(proj_hidden_dim=proj_hidden_dim, proj_dim=proj_dim, pred_hidden_dim=pred_hidden_dim)
        check_momentum("tau_base", tau_base, "0 copies the online network, 1 freezes the target")
        self.backbone = spec.build_backbone()
        # The paper's shapes (4096 hidden, 256 out, predictor as wide as the projector) at SimCLR's width
        # in this book, 512 hidden and 128 out, so the two heads differ only in the predictor.
        self.projector = projection_mlp(self.backbone.out_dim, proj_hidden_dim, proj_dim, batchnorm=batchnorm)
        self.predictor = projection_mlp(proj_dim, pred_hidden_dim, proj_dim, batchnorm=batchnorm)
        self.target = momentum_copy(self.backbone, self.projector)
        self.tau_base, self.batchnorm, self.recipe = tau_base, batchnorm, recipe
        if not predictor_lr_scale > 0:
            raise ValueError(f"predictor_lr_scale must be positive, got {predictor_lr_scale!r}")
        self.predictor_lr_scale = float(predictor_lr_scale)
        # A buffer, so a resumed run reports the momentum of its last step.
        self.register_buffer("momentum", torch.tensor(float(tau_base), dtype=torch.float64))

    def parameter_groups(self) -> list[dict]:
        """The predictor at `predictor_lr_scale` times the run's rate (1: the paper's single rate); a faster
        predictor tracks the projection's current correlations sooner (Tian et al. 2021)."""
        return self.groups_apart(self.predictor, self.predictor_lr_scale)

    def _online_parameters(self) -> list[torch.Tensor]:
        """The online backbone and projector's parameters, in the target's order."""
        return [*self.backbone.parameters(), *self.projector.parameters()]

    def loss(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """Augmented views (N, C, H, W) -> (D(q1, z2') + D(q2, z1')) / 2, D the negative cosine."""
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        q1, q2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():  # the target network is never trained by gradient
            t1, t2 = self.target(x1), self.target(x2)
        self.log("output_std", (output_std(z1.detach()) + output_std(z2.detach())) / 2)
        return (negative_cosine(q1, t2) + negative_cosine(q2, t1)) / 2

    def forward(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) uint8 -> the symmetrised loss of two views (the indices are not needed)."""
        return self.loss(augment(images, self.recipe), augment(images, self.recipe))

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """xi <- tau_k xi + (1 - tau_k) theta, tau_k = `cosine_momentum(step, ...)`.

        The target's BN running statistics are its own, as in MoCo: it always runs
        in training mode, so they never enter the loss.
        """
        tau = cosine_momentum(step, total_steps, self.tau_base)
        self.momentum.fill_(tau)
        ema_update(self.target.parameters(), self._online_parameters(), tau)

    def epoch_metrics(self) -> dict:
        """`output_std`: the mean over the epoch's steps of the per-dimension std of the normalised online
        projections (about 1/sqrt(proj_dim) when spread, 0 when collapsed); `target_momentum`: tau now."""
        return {"target_momentum": self.momentum.item(), **super().epoch_metrics()}
