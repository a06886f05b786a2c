"""BYOL (Grill et al. 2020): predict a slow target network's projection, no negatives.

Chapter: BYOL. The online network (backbone f, projector g, predictor q) embeds
one view of each image; the target network, a copy of f and g that is never
trained by gradient, embeds the other. The online prediction is pulled towards
the target projection by the normalised MSE ||q/||q|| - z'/||z'||||^2 = 2 - 2 cos,
for both orders of the two views. After every optimiser step the target follows
the online weights, xi <- tau xi + (1 - tau) theta, with tau rising from tau_base
to 1 along a cosine (`target_momentum`).

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

import copy
import math

import torch
from torch import nn

from ..augment import SIMCLR_CIFAR, Recipe, augment
from ..evaluate import output_std
from ..losses import negative_cosine
from ..models import projection_mlp

# The paper uses tau_base = 0.996 over about 300k steps. The target averages the online weights of the
# last ~1 / (1 - tau) steps: 250 steps at 0.996, about a third of the cpu profile's ~780 steps, so the
# target would stay near its random init for much of the run. 0.99 averages over ~100 steps (about one
# cpu epoch), as MoCo's CIFAR setting does.
TAU_BASE = 0.99


def target_momentum(step: int, total_steps: int, tau_base: float = TAU_BASE) -> float:
    """tau_k = 1 - (1 - tau_base) (cos(pi k / K) + 1) / 2: tau_base at k = 0, rising to 1 at k = K."""
    progress = min(max(step / max(total_steps, 1), 0.0), 1.0)
    return 1.0 - (1.0 - tau_base) * (math.cos(math.pi * progress) + 1.0) / 2.0


class BYOL(nn.Module):
    # SimSiam's SGD rate, 0.05 x B/256 (its BYOL reproduction trains with SGD too), against the profiles'
    # SimCLR 0.5 x B/256. BYOL's own 0.2 x B/256 is a LARS rate, which rescales every layer's step.
    lr_scale = 0.1

    def __init__(
        self,
        backbone: nn.Module,
        proj_hidden_dim: int = 512,
        proj_dim: int = 128,
        pred_hidden_dim: int = 512,
        tau_base: float = TAU_BASE,
        batchnorm: bool = True,
        recipe: Recipe = SIMCLR_CIFAR,
    ):
        super().__init__()
        for name, value in (("proj_hidden_dim", proj_hidden_dim), ("proj_dim", proj_dim),
                            ("pred_hidden_dim", pred_hidden_dim)):  # fmt: skip
            if not (isinstance(value, int) and value > 0):
                raise ValueError(f"{name} must be a positive integer, got {value!r}")
        if not 0.0 <= tau_base <= 1.0:
            raise ValueError(f"tau_base must be in [0, 1] (0 copies the online network, 1 freezes the "
                             f"target), got {tau_base}")  # fmt: skip
        self.backbone = backbone
        # The paper's shapes (4096 hidden, 256 out, predictor as wide as the projector) at SimCLR's width
        # in this book, 512 hidden and 128 out, so the two heads differ only in the predictor.
        self.projector = projection_mlp(backbone.out_dim, proj_hidden_dim, proj_dim, batchnorm=batchnorm)
        self.predictor = projection_mlp(proj_dim, pred_hidden_dim, proj_dim, batchnorm=batchnorm)
        self.target = copy.deepcopy(nn.Sequential(self.backbone, self.projector))
        self.target.requires_grad_(False)
        self.tau_base, self.batchnorm, self.recipe = tau_base, batchnorm, recipe
        # A buffer, so a resumed run reports the momentum of its last step.
        self.register_buffer("momentum", torch.tensor(float(tau_base), dtype=torch.float64))
        self._std: list[torch.Tensor] = []

    def _online_parameters(self) -> list[torch.Tensor]:
        """The online backbone and projector's parameters, in the target's order."""
        return [*self.backbone.parameters(), *self.projector.parameters()]

    def loss(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """Augmented views (N, C, H, W) -> (D(q1, z2') + D(q2, z1')) / 2, D the negative cosine."""
        z1, z2 = self.projector(self.backbone(x1)), self.projector(self.backbone(x2))
        q1, q2 = self.predictor(z1), self.predictor(z2)
        with torch.no_grad():  # the target network is never trained by gradient
            t1, t2 = self.target(x1), self.target(x2)
            self._std.append((output_std(z1) + output_std(z2)) / 2)
        return (negative_cosine(q1, t2) + negative_cosine(q2, t1)) / 2

    def forward(self, images: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        """The training step: images (N, C, H, W) uint8 -> the symmetrised loss (indices are not needed)."""
        return self.loss(augment(images, self.recipe), augment(images, self.recipe))

    training_step = forward

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """xi <- tau_k xi + (1 - tau_k) theta over the parameters, tau_k = `target_momentum(step, ...)`.

        The target's BN running statistics are its own, as in MoCo: it always runs
        in training mode, so they never enter the loss.
        """
        tau = target_momentum(step, total_steps, self.tau_base)
        self.momentum.fill_(tau)
        targets = list(self.target.parameters())
        torch._foreach_mul_(targets, tau)
        torch._foreach_add_(targets, self._online_parameters(), alpha=1.0 - tau)

    def epoch_metrics(self) -> dict:
        """`output_std`: the mean over the epoch's steps of the per-dimension std of the normalised online
        projections (about 1/sqrt(proj_dim) when spread, 0 when collapsed); `target_momentum`: tau now."""
        rows, self._std = self._std, []
        out = {"target_momentum": self.momentum.item()}
        if rows:
            out["output_std"] = torch.stack(rows).mean().item()
        return out
