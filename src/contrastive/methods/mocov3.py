"""MoCo v3 (Chen, Xie & He 2021): a ViT, in-batch keys from a momentum encoder, no queue.

Chapter: MoCo v3. The base encoder (ViT f, projector g, predictor q) embeds both
views; the momentum encoder, an EMA copy of f and g, gives the keys. The loss is
ctr(q1, k2) + ctr(q2, k1), ctr = `contrastive.losses.mocov3_loss`, InfoNCE over the
batch's keys scaled by 2 tau; under torchrun queries and keys are gathered from
every rank, so the negatives are the global batch. The momentum rises from
tau_base to 1 along BYOL's cosine (`target_momentum`). ViTs train with AdamW.

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

import copy

import torch
from torch import nn

from ..augment import SIMCLR_CIFAR, Recipe, augment
from ..distributed import concat_all_gather, gather_with_grad, world_size
from ..losses import mocov3_loss
from ..models import VIT_FOR_BACKBONE, VITS, build_backbone, in_channels_of, projection_mlp
from .byol import TAU_BASE, target_momentum


def _project(encoder: nn.Module, projector: nn.Module, x1: torch.Tensor, x2: torch.Tensor, **kwargs):
    """Both views through the ViT at once (it has no batch statistics), then the projector view by
    view, so its BN normalises each view with its own statistics, as the paper's code does."""
    h1, h2 = encoder(torch.cat([x1, x2]), **kwargs).chunk(2)
    return projector(h1), projector(h2)


class MoCoV3(nn.Module):
    lr_scale = 1e-3  # AdamW at 5e-4 for batch 256, against the profiles' SimCLR SGD rate 0.5
    epoch_scale = 0.4  # a step costs about 2.4 x SimCLR's (vit_tiny against convnet_small on a CPU)

    def __init__(
        self,
        backbone: nn.Module,
        backbone_name: str | None = None,
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
        name = vit or VIT_FOR_BACKBONE.get(backbone_name, backbone_name)
        if name not in VITS:
            raise ValueError(f"MoCo v3 needs a ViT: vit must be one of {VITS} (or None for the profile's "
                             f"size, {VIT_FOR_BACKBONE}); got {name!r}")  # fmt: skip
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if not 0.0 <= tau_base <= 1.0:
            raise ValueError(f"tau_base must be in [0, 1] (0 copies the base encoder, 1 freezes the "
                             f"momentum encoder), got {tau_base}")  # fmt: skip
        if not weight_decay >= 0:
            raise ValueError(f"weight_decay must be non-negative, got {weight_decay}")
        self.encoder = build_backbone(name, in_channels=in_channels_of(backbone))
        if frozen_patch:
            self.encoder.freeze_patch_projection()
        # The paper's heads (4096 hidden, 256 out) at this book's SimCLR width; BN in every layer.
        self.projector = projection_mlp(self.encoder.out_dim, proj_hidden_dim, proj_dim, num_layers=3,
                                        last_bn=True)  # fmt: skip
        self.predictor = projection_mlp(proj_dim, proj_hidden_dim, proj_dim, num_layers=2)
        self.momentum_encoder = copy.deepcopy(nn.Sequential(self.encoder, self.projector))
        self.momentum_encoder.requires_grad_(False)
        self.frozen_patch, self.temperature, self.tau_base = frozen_patch, temperature, tau_base
        self.recipe = recipe
        self.adamw_weight_decay = weight_decay  # the paper's 0.1; the loop then builds AdamW
        self.register_buffer("momentum", torch.tensor(float(tau_base), dtype=torch.float64))
        self._losses, self._token_grad, self._patch_grad, self._correct, self._total = [], [], [], 0, 0

    def _base_parameters(self) -> list[torch.Tensor]:
        """The base encoder's ViT and projector parameters, in the momentum encoder's order."""
        return [*self.encoder.parameters(), *self.projector.parameters()]

    def _watch_tokens(self, tokens: torch.Tensor) -> torch.Tensor:
        """Record ||dL/dE|| for the patch tokens E when backward reaches them."""
        if not torch.is_grad_enabled():
            return tokens
        if not tokens.requires_grad:  # a frozen projection's output: make it a leaf that receives a gradient
            tokens = tokens.detach().requires_grad_()
        # Each rank's loss is the global batch's, so its gradient here is world_size times its share.
        tokens.register_hook(lambda g: self._token_grad.append(g.detach().float().norm() / world_size()))
        return tokens

    def loss(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """Augmented views (N, C, H, W) -> ctr(q1, k2) + ctr(q2, k1)."""
        z1, z2 = _project(self.encoder, self.projector, x1, x2, watch=self._watch_tokens)
        q1, q2 = gather_with_grad(self.predictor(z1)), gather_with_grad(self.predictor(z2))
        with torch.no_grad():  # the momentum encoder is never trained by gradient
            k1, k2 = (concat_all_gather(k) for k in _project(*self.momentum_encoder, x1, x2))
        loss = mocov3_loss(q1, k2, self.temperature) + mocov3_loss(q2, k1, self.temperature)
        with torch.no_grad():  # instance discrimination: is a query's own key the nearest of the batch?
            nearest = (q1.float() @ k2.float().T).argmax(1)
            self._correct += (nearest == torch.arange(len(q1), device=q1.device)).sum().item()
            self._total += len(q1)
            self._losses.append(loss.detach().float())
        return loss

    def forward(self, images: torch.Tensor, indices: torch.Tensor | None = None) -> torch.Tensor:
        """The training step: images (N, C, H, W) uint8 -> the symmetrised loss (indices are not needed)."""
        return self.loss(augment(images, self.recipe), augment(images, self.recipe))

    training_step = forward

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """Record the patch projection's gradient norm, then theta_k <- m theta_k + (1 - m) theta_q."""
        grad = self.encoder.patch_embed.weight.grad
        if grad is not None:  # the loop calls this after backward and step, before the next zero_grad
            self._patch_grad.append(grad.float().norm())
        m = target_momentum(step, total_steps, self.tau_base)
        self.momentum.fill_(m)
        keys = list(self.momentum_encoder.parameters())
        torch._foreach_mul_(keys, m)
        torch._foreach_add_(keys, self._base_parameters(), alpha=1.0 - m)

    def epoch_metrics(self) -> dict:
        """Per step: `step_loss`, `token_grad_norm` and (trained projection only) `patch_grad_norm`;
        per epoch: `instance_accuracy` (top-1 of q1 against the batch's keys) and `momentum` now."""
        out = {"momentum": self.momentum.item()}
        if self._total:
            out["instance_accuracy"] = self._correct / self._total
        for key, rows in (("step_loss", self._losses), ("token_grad_norm", self._token_grad),
                          ("patch_grad_norm", self._patch_grad)):  # fmt: skip
            if rows:
                out[key] = torch.stack(rows).tolist()  # one transfer per epoch, none per step
        self._losses, self._token_grad, self._patch_grad, self._correct, self._total = [], [], [], 0, 0
        return out
