"""MoCo v3 (Chen, Xie & He 2021): a ViT, in-batch keys from a momentum encoder, no queue.

Chapter: MoCo v3. The base encoder (ViT f, projector g, predictor q) embeds both
views; the momentum encoder, an EMA copy of f and g, gives the keys. The loss is
ctr(q1, k2) + ctr(q2, k1), ctr = `contrastive.losses.mocov3_loss`, InfoNCE over the
batch's keys scaled by 2 tau; under torchrun queries and keys are gathered from
every rank, so the negatives are the global batch. The momentum rises from
tau_base to 1 along BYOL's cosine (`momentum.cosine_momentum`). ViTs train with AdamW.

Instability: the paper traces loss spikes to sudden jumps of the gradient at the
first layer, and freezes the random patch projection to avoid them
(`frozen_patch=True`). Every step records `patch_grad_norm`, ||dL/dW|| of the
patch projection's weight after backward (absent when frozen: there is no
gradient), and `token_grad_norm`, ||dL/dE|| of the gradient at the projection's
output tokens E (the whole batch, both views): the signal that reaches the first
layer in both settings, so the two runs can be compared on one axis.

The ViT is the profile's size: vit_nano for convnet_tiny, vit_tiny for convnet_small,
vit_small for resnet18 (`VIT_FOR_BACKBONE`); `vit="vit_small"` chooses another.
"""

from __future__ import annotations

import torch
from torch import nn

from ..augment import SIMCLR_CIFAR, Recipe, augment
from ..distributed import concat_all_gather, gather_with_grad, world_size
from ..losses import mocov3_loss
from ..models import VIT_FOR_BACKBONE, VITS, projection_mlp
from .base import Method, Spec
from .momentum import TAU_BASE, check_momentum, cosine_momentum, ema_update, momentum_copy


def _project(encoder: nn.Module, projector: nn.Module, x1: torch.Tensor, x2: torch.Tensor, **kwargs):
    """Both views through the ViT at once (it has no batch statistics), then the projector view by
    view, so its BN normalises each view with its own statistics, as the paper's code does."""
    h1, h2 = encoder(torch.cat([x1, x2]), **kwargs).chunk(2)
    return projector(h1), projector(h2)


class MoCoV3(Method):
    lr_scale = 1e-3  # AdamW at 5e-4 for batch 256, against the profiles' SimCLR SGD rate 0.5
    epoch_scale = 0.4  # a step costs about 2.4 x SimCLR's (vit_tiny against convnet_small on a CPU)

    def __init__(
        self,
        spec: Spec,
        vit: str | None = None,
        frozen_patch: bool = False,
        temperature: float = 0.2,
        proj_hidden_dim: int = 512,
        proj_dim: int = 128,
        tau_base: float = TAU_BASE,
        weight_decay: float = 0.1,
        recipe: Recipe = SIMCLR_CIFAR,
    ):
        super().__init__()
        name = vit or VIT_FOR_BACKBONE.get(spec.backbone, spec.backbone)
        if name not in VITS:
            raise ValueError(
                f"MoCo v3 needs a ViT: vit must be one of {VITS} (or None for the profile's "
                f"size, {VIT_FOR_BACKBONE}); got {name!r}"
            )
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        check_momentum("tau_base", tau_base, "0 copies the base encoder, 1 freezes the momentum encoder")
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay}")
        self.encoder = spec.build_backbone(name)
        if frozen_patch:
            self.encoder.freeze_patch_projection()
        # The paper's heads (4096 hidden, 256 out) at this book's SimCLR width; BN in every layer.
        self.projector = projection_mlp(
            self.encoder.out_dim, proj_hidden_dim, proj_dim, num_layers=3, last_bn=True
        )
        self.predictor = projection_mlp(proj_dim, proj_hidden_dim, proj_dim, num_layers=2)
        self.momentum_encoder = momentum_copy(self.encoder, self.projector)
        self.frozen_patch, self.temperature, self.tau_base = frozen_patch, temperature, tau_base
        self.recipe = recipe
        self.adamw_weight_decay = weight_decay  # the paper's 0.1; the loop then builds AdamW
        self.register_buffer("momentum", torch.tensor(float(tau_base), dtype=torch.float64))

    def _watch_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Record ||dL/dE|| for the patch tokens E when backward reaches them."""
        if not torch.is_grad_enabled():
            return tokens
        if not tokens.requires_grad:  # a frozen projection's output: make it a leaf that receives a gradient
            tokens = tokens.detach().requires_grad_()
        # Each rank's loss is the global batch's, so its gradient here is world_size times its share.
        tokens.register_hook(
            lambda g: self.log("token_grad_norm", g.float().norm() / world_size(), every_step=True)
        )
        return tokens

    def loss(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """Augmented views (N, C, H, W) -> ctr(q1, k2) + ctr(q2, k1)."""
        z1, z2 = _project(self.encoder, self.projector, x1, x2, watch=self._watch_tokens)
        q1, q2 = gather_with_grad(self.predictor(z1)), gather_with_grad(self.predictor(z2))
        with torch.no_grad():  # the momentum encoder is never trained by gradient
            k1, k2 = (concat_all_gather(k) for k in _project(*self.momentum_encoder, x1, x2))
        loss = mocov3_loss(q1, k2, self.temperature) + mocov3_loss(q2, k1, self.temperature)
        self.log_step(q1, k2, loss)
        return loss

    @torch.no_grad()
    def log_step(self, q1: torch.Tensor, k2: torch.Tensor, loss: torch.Tensor) -> None:
        """The loss of every step, and instance discrimination: is a query's own key the nearest?"""
        nearest = (q1.float() @ k2.float().T).argmax(1)
        self.log("instance_accuracy", (nearest == torch.arange(len(q1), device=q1.device)).float().mean())
        self.log("step_loss", loss, every_step=True)

    def forward(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) uint8 -> the symmetrised loss of two views (the indices are not needed)."""
        return self.loss(augment(images, self.recipe), augment(images, self.recipe))

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """Record the patch projection's gradient norm, then theta_k <- m theta_k + (1 - m) theta_q."""
        grad = self.encoder.patch_embed.weight.grad
        if grad is not None:  # the loop calls this after backward and step, before the next zero_grad
            self.log("patch_grad_norm", grad.float().norm(), every_step=True)
        m = cosine_momentum(step, total_steps, self.tau_base)
        self.momentum.fill_(m)
        ema_update(
            self.momentum_encoder.parameters(), [*self.encoder.parameters(), *self.projector.parameters()], m
        )

    def epoch_metrics(self) -> dict:
        """Per step: `step_loss`, `token_grad_norm` and (trained projection only) `patch_grad_norm`;
        per epoch: `instance_accuracy` (top-1 of q1 against the batch's keys) and `momentum` now."""
        return {"momentum": self.momentum.item(), **super().epoch_metrics()}
