"""MoCo (He et al. 2020) and MoCo v2 (Chen et al. 2020): a queue of keys from a momentum encoder.

Chapter: MoCo. A query encoder (backbone and head) embeds one view of each
image, q; a key encoder, a copy of it that is never trained by gradient,
embeds another view, k, and after every optimiser step follows the query
encoder as theta_k <- m theta_k + (1 - m) theta_q. The loss is InfoNCE,
`contrastive.losses.info_nce`, with k as the positive and a queue of the K
most recent keys as the negatives; after the step the batch's keys replace
the oldest ones. The queue decouples the number of negatives from the batch
size, and the slow key encoder keeps its entries consistent with each other.

Shuffling BN: when a query and its key are normalised with the statistics of
the same samples, those statistics help tell the positive apart, and the model
can lower the loss through them instead of through the image (the paper's
"cheating"). MoCo computes BN per GPU and hands each GPU a shuffled share of the
keys. On one device `SplitBatchNorm2d` emulates `bn_splits` GPUs (by default 8,
or the largest divisor of the batch below 8 that leaves two samples per group; each group of
consecutive samples gets its own statistics, in both encoders) and the key batch
is permuted before the key encoder and restored after it; under torchrun the
permutation runs over all ranks' keys, `distributed.batch_shuffle`, and
`bn_splits` splits each rank's share. `shuffle_bn=False` keeps the key batch in
order, the setting in which the cheating is possible.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..augment import INSTDISC_CIFAR, MOCOV2_CIFAR, Recipe, augment
from ..distributed import batch_shuffle, batch_unshuffle, concat_all_gather
from ..losses import info_nce
from ..models import SplitBatchNorm1d, SplitBatchNorm2d, _SplitBatchNorm, projection_mlp, split_batch_norm
from .base import Method, Spec
from .momentum import check_momentum, ema_update, momentum_copy

__all__ = ["MoCo", "MoCoV2", "SplitBatchNorm1d", "SplitBatchNorm2d", "split_batch_norm"]

# Starting points, all in one place: queue, momentum and BN splits are those of the official CIFAR-10
# demo (its ImageNet settings are K = 65536 and m = 0.999); v1 and v2 differ in head, temperature
# and augmentation only.
QUEUE_SIZE, MOMENTUM, FEATURE_DIM, BN_SPLITS = 4096, 0.99, 128, 8
# MoCo v1 adopted InstDisc's augmentation; v2 takes SimCLR's and adds a blur.
MOCO_CIFAR = INSTDISC_CIFAR


class MoCo(Method):
    # MoCo's 0.03 at batch 256 (the CIFAR demo's 0.06 at 512), against the profiles' SimCLR 0.5 at 256.
    lr_scale = 0.06
    sync_bn_allowed = False  # BN statistics over the global batch would span a query's own key

    def __init__(
        self,
        spec: Spec,
        queue_size: int = QUEUE_SIZE,
        momentum: float = MOMENTUM,
        temperature: float = 0.1,
        feature_dim: int = FEATURE_DIM,
        mlp_head: bool = False,
        shuffle_bn: bool = True,
        bn_splits: int | None = None,
        recipe: Recipe = MOCO_CIFAR,
    ):
        super().__init__()
        if not (isinstance(queue_size, int) and queue_size > 0):
            raise ValueError(f"queue_size must be a positive integer, got {queue_size!r}")
        check_momentum("momentum", momentum, "0 copies the query encoder, 1 freezes the key encoder")
        if not temperature > 0:
            raise ValueError(f"temperature must be positive, got {temperature}")
        if not (isinstance(feature_dim, int) and feature_dim > 0):
            raise ValueError(f"feature_dim must be a positive integer, got {feature_dim!r}")
        if bn_splits is not None and not (isinstance(bn_splits, int) and bn_splits > 0):
            raise ValueError(f"bn_splits must be a positive integer dividing the batch, got {bn_splits!r}")
        self.momentum, self.temperature, self.recipe = momentum, temperature, recipe
        # None: BN_SPLITS groups when the batch allows it, else the largest divisor of the batch below that.
        self.shuffle_bn, self.auto_splits = shuffle_bn, bn_splits is None
        self.bn_splits = bn_splits or 1
        self.backbone = split_batch_norm(spec.build_backbone(), self.bn_splits)
        dim = self.backbone.out_dim
        # v1: a linear map to the embedding; v2: the MLP (hidden width = feature width, as in the paper).
        head = projection_mlp(dim, dim, feature_dim) if mlp_head else nn.Linear(dim, feature_dim)
        self.head = split_batch_norm(head, self.bn_splits)
        self.key_encoder = momentum_copy(self.backbone, self.head)
        self.register_buffer("queue", F.normalize(torch.randn(queue_size, feature_dim), dim=1))
        self.register_buffer("queue_ptr", torch.zeros((), dtype=torch.long))  # the oldest entry

    def _query_parameters(self) -> list[torch.Tensor]:
        """The query encoder's parameters in the key encoder's order."""
        return [*self.backbone.parameters(), *self.head.parameters()]

    def _check_batch(self, n: int) -> None:
        if self.auto_splits:
            # at least two samples per group, so every group has a batch statistic to compute
            splits = max(d for d in range(1, min(BN_SPLITS, n // 2) + 1) if n % d == 0) if n > 1 else 1
            if splits != self.bn_splits:
                self.bn_splits = splits
                for layer in self.modules():
                    if isinstance(layer, _SplitBatchNorm):
                        layer.num_splits = splits
        if n % self.bn_splits:
            divisors = [d for d in range(1, n + 1) if n % d == 0]
            raise ValueError(
                f"this step's batch of {n} images cannot be split into bn_splits={self.bn_splits} equal "
                f"BN groups; bn_splits must be one of {divisors}"
            )

    @torch.no_grad()
    def keys(self, x_k: torch.Tensor) -> torch.Tensor:
        """Normalised keys (B, feature_dim) of the key views, row i from x_k[i].

        With `shuffle_bn` the key encoder sees the batch in a random order (over all
        ranks when distributed), so a key's BN group is not its query's.
        """
        if not self.shuffle_bn:
            return F.normalize(self.key_encoder(x_k), dim=1)
        shuffled, unshuffle = batch_shuffle(x_k)
        return batch_unshuffle(F.normalize(self.key_encoder(shuffled), dim=1), unshuffle)

    def contrast(self, x_q: torch.Tensor, x_k: torch.Tensor) -> torch.Tensor:
        """Augmented views (B, C, H, W) -> InfoNCE of the queries against their keys and the queue.

        The batch's keys (all ranks' when distributed) are enqueued afterwards.
        """
        self._check_batch(len(x_q))
        q = F.normalize(self.head(self.backbone(x_q)), dim=1)
        k = self.keys(x_k)
        # A copy: the enqueue below writes the queue in place, and autograd keeps it for q's gradient.
        queue = self.queue.clone().detach()
        loss = info_nce(q, k, queue, self.temperature)
        self.log_instance_accuracy(q, k, queue)
        self._enqueue(concat_all_gather(k))
        return loss

    def forward(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Images (B, C, H, W) uint8 -> InfoNCE of a query view against its key view and the queue."""
        return self.contrast(augment(images, self.recipe), augment(images, self.recipe))

    @torch.no_grad()
    def log_instance_accuracy(self, q: torch.Tensor, k: torch.Tensor, queue: torch.Tensor) -> None:
        """Instance discrimination: the share of queries whose positive outscores every queue entry."""
        positive = (q.float() * k.float()).sum(1)
        hardest = (q.float() @ queue.float().T).amax(1)
        self.log("instance_accuracy", (positive > hardest).float().mean())

    @torch.no_grad()
    def _enqueue(self, keys: torch.Tensor) -> None:
        """Write `keys` over the oldest entries, wrapping around the end of the queue."""
        size, n = len(self.queue), len(keys)
        positions = (self.queue_ptr + torch.arange(n, device=self.queue.device)) % size
        if n > size:  # only the newest `size` keys survive; repeated positions would make the write ambiguous
            positions, keys = positions[-size:], keys[-size:]
        self.queue.index_copy_(0, positions, keys.to(self.queue.dtype))
        self.queue_ptr.copy_((self.queue_ptr + n) % size)

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """theta_k <- m theta_k + (1 - m) theta_q over the parameters.

        The BN running statistics are not averaged, as in the official code: the key
        encoder always runs in training mode, so they never enter the loss, and its
        own forward passes give statistics that match its own weights, which is what
        evaluating the key encoder would need; the query's would belong to other weights.
        """
        ema_update(self.key_encoder.parameters(), self._query_parameters(), self.momentum)

    def epoch_metrics(self) -> dict:
        """Top-1 of the positive key against the queue, mean over the epoch's steps (`instance_accuracy`),
        and ||theta_q - theta_k|| / ||theta_q|| now (`encoder_distance`)."""
        with torch.no_grad():
            query, key = self._query_parameters(), self.key_encoder.parameters()
            gap = sum((a.float() - b.float()).pow(2).sum() for a, b in zip(query, key))
            norm = sum(a.float().pow(2).sum() for a in query)
        return {"encoder_distance": (gap.sqrt() / norm.sqrt()).item(), **super().epoch_metrics()}


class MoCoV2(MoCo):
    """MoCo v2: an MLP head, blur added to SimCLR's augmentation, tau = 0.2.

    The paper's third change, a cosine learning-rate schedule, is the training
    loop's for every method.
    """

    def __init__(
        self,
        spec: Spec,
        queue_size: int = QUEUE_SIZE,
        momentum: float = MOMENTUM,
        temperature: float = 0.2,
        feature_dim: int = FEATURE_DIM,
        mlp_head: bool = True,
        shuffle_bn: bool = True,
        bn_splits: int | None = None,
        recipe: Recipe = MOCOV2_CIFAR,
    ):
        super().__init__(
            spec,
            queue_size=queue_size,
            momentum=momentum,
            temperature=temperature,
            feature_dim=feature_dim,
            mlp_head=mlp_head,
            shuffle_bn=shuffle_bn,
            bn_splits=bn_splits,
            recipe=recipe,
        )
