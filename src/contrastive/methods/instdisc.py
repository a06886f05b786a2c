"""InstDisc (Wu et al. 2018): every image is its own class, scored against a memory bank with NCE.

Chapter: InstDisc. Each image i keeps a unit vector v_i in a memory bank. A
step embeds one augmented view per image, f = normalise(W h), scores it against
its own entry v_i (the positive) and against m entries drawn uniformly (the
noise), and minimises the NCE loss `contrastive.losses.nce_loss`. The
normaliser Z is estimated once by Monte Carlo on the first batch and then held
fixed, as in the paper. Afterwards the entries of the batch move towards the
new features: v_i <- normalise(momentum * v_i + (1 - momentum) * f_i).
Two departures from the paper, both for short budgets, are explained where
they are made: a BatchNorm after the linear head, and a bank that starts from
the untrained encoder's features instead of random vectors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..augment import INSTDISC_CIFAR, Recipe, augment, eval_transform
from ..distributed import gather_with_grad
from ..losses import nce_loss
from ..models import embedding_head
from .base import Method, Spec


class InstDisc(Method):
    lr_scale = 0.06  # the paper's 0.03 at batch 256, against the profiles' SimCLR rate of 0.5

    def __init__(
        self,
        spec: Spec,
        feature_dim: int = 128,
        num_noise: int = 4096,
        temperature: float = 0.07,
        bank_momentum: float = 0.5,
        proximal: float = 0.0,
        recipe: Recipe = INSTDISC_CIFAR,
    ):
        super().__init__()
        if not 0 < num_noise:
            raise ValueError(f"num_noise must be positive, got {num_noise}")
        self.backbone = spec.build_backbone()
        self.head = embedding_head(self.backbone.out_dim, feature_dim)  # BN after the linear map: see there
        self.num_noise, self.temperature = num_noise, temperature
        self.bank_momentum, self.proximal, self.recipe = bank_momentum, proximal, recipe
        self.register_buffer("bank", F.normalize(torch.randn(spec.num_images, feature_dim), dim=1))
        self.register_buffer("normaliser", torch.zeros(()))  # 0 until estimated on the first batch

    @torch.no_grad()
    def setup(self, train_images: torch.Tensor, train_labels: torch.Tensor, batch_size: int = 1000) -> None:
        """Fill the bank with the untrained encoder's features of every training image.

        The paper starts from random vectors; with a budget of a few epochs the
        first epoch would then be spent fitting random targets, so the bank starts
        from the features the encoder already has (computed in training mode, so
        BN uses batch statistics as it will during training).
        """
        chunks = [
            F.normalize(self.head(self.backbone(eval_transform(train_images[i : i + batch_size]))), dim=1)
            for i in range(0, len(train_images), batch_size)
        ]
        self.bank.copy_(torch.cat(chunks).float())

    def forward(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) uint8 and their dataset indices -> NCE loss against the bank."""
        f = F.normalize(self.head(self.backbone(augment(images, self.recipe))), dim=1)
        n = len(self.bank)
        noise = torch.randint(0, n, (self.num_noise,), device=f.device)  # shared by the batch
        positive_sim = (f * self.bank[indices]).sum(1)
        noise_sim = f @ self.bank[noise].T
        self.estimate_normaliser(noise_sim)
        loss = nce_loss(positive_sim.float(), noise_sim.float(), self.temperature, self.normaliser, n)
        if self.proximal > 0:  # lambda ||v_i^(t) - v_i^(t-1)||^2 keeps an image's feature near its memory
            loss = loss + self.proximal * (f - self.bank[indices]).pow(2).sum(1).mean()
        self._update_bank(f.detach(), indices)
        return loss

    @torch.no_grad()
    def estimate_normaliser(self, noise_sim: torch.Tensor) -> None:
        """Z = sum_j exp(v_j.f / tau) ~ n * the mean over the noise samples (Monte Carlo); the first
        batch's estimate is kept as the fixed normaliser, every batch's is logged."""
        estimate = len(self.bank) * (noise_sim.float() / self.temperature).exp().mean()
        self.normaliser.copy_(torch.where(self.normaliser == 0, estimate, self.normaliser))
        self.log("normaliser_estimate", estimate)

    @torch.no_grad()
    def _update_bank(self, f: torch.Tensor, indices: torch.Tensor) -> None:
        """v_i <- normalise(momentum * v_i + (1 - momentum) * f_i) for the batch (all ranks' images)."""
        f, indices = gather_with_grad(f.float()), gather_with_grad(indices)
        mixed = self.bank_momentum * self.bank[indices] + (1 - self.bank_momentum) * f
        self.bank[indices] = F.normalize(mixed, dim=1)

    def epoch_metrics(self) -> dict:
        """The fixed normaliser and the mean of this epoch's Monte Carlo estimates."""
        return {"normaliser": self.normaliser.item(), **super().epoch_metrics()}
