"""DINO (Caron et al. 2021): self-distillation with no labels, centering and sharpening against collapse.

Chapter: DINO. A student (backbone f, DINO head h) and a teacher, an EMA copy of
both, output K logits per crop. Each image gives 2 global crops (32 px) and
`local_crops` local ones (16 px); the teacher sees only the global crops, and the
loss averages H(P_t(global i), P_s(crop j)) over the pairs i != j (`losses.dino_loss`).

Collapse: centering (subtract c, c <- m c + (1 - m) mean of the teacher's logits)
keeps one dimension from dominating but pushes P_t towards uniform; sharpening (a
teacher temperature below the student's) pushes it towards one-hot. `centering=False`
and `sharpening=False` (teacher at the student's temperature) remove one of them; the
center is tracked either way. Per epoch, means over its steps: `teacher_entropy` H(P_t)
(log K when uniform), `teacher_student_kl` KL(P_t || P_s) = H(P_t, P_s) - H(P_t),
`teacher_marginal_entropy` H(mean P_t) (0 when every image gets the same one-hot);
and `center_norm` ||c||. The backbone is the profile's; `vit="vit_tiny"` trains a ViT.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..augment import DINO_GLOBAL, DINO_LOCAL, Recipe, augment
from ..distributed import concat_all_gather
from ..losses import dino_loss
from ..models import VITS, DINOHead
from .base import Method, Spec
from .momentum import TAU_BASE, check_momentum, cosine_momentum, ema_update, momentum_copy


def update_center(center: torch.Tensor, teacher_logits: torch.Tensor, momentum: float) -> torch.Tensor:
    """c <- m c + (1 - m) mean_i t_i: the running mean of the teacher's logits, one entry per output."""
    return momentum * center + (1.0 - momentum) * teacher_logits.to(center.dtype).mean(0, keepdim=True)


class DINO(Method):
    epoch_scale = 0.5  # a step costs about twice SimCLR's on a CPU (six crops and a teacher forward)

    def __init__(
        self,
        spec: Spec,
        vit: str | None = None,
        out_dim: int = 1024,
        local_crops: int = 4,
        student_temp: float = 0.1,
        teacher_temp: float = 0.04,
        center_momentum: float = 0.9,
        centering: bool = True,
        sharpening: bool = True,
        head_bn: bool | None = None,
        tau_base: float = TAU_BASE,
        global_recipe: Recipe = DINO_GLOBAL,
        local_recipe: Recipe = DINO_LOCAL,
    ):
        super().__init__()
        for name, value, least in (
            ("out_dim (K, the number of outputs)", out_dim, 2),
            ("local_crops", local_crops, 0),
        ):
            if not (isinstance(value, int) and value >= least):
                raise ValueError(f"{name} must be an integer >= {least}, got {value!r}")
        if not (student_temp > 0 and teacher_temp > 0):
            raise ValueError(
                f"temperatures must be positive, got student_temp={student_temp}, teacher_temp={teacher_temp}"
            )
        if sharpening and not teacher_temp < student_temp:
            raise ValueError(
                f"sharpening=True needs teacher_temp below student_temp, got {teacher_temp} >= "
                f"{student_temp}; sharpening=False puts the teacher at the student's "
                "temperature"
            )
        check_momentum("center_momentum", center_momentum)
        check_momentum("tau_base", tau_base)
        if vit is not None and vit not in VITS:
            raise ValueError(
                f"vit must name a ViT, one of {VITS}, or be None for the profile's backbone; got {vit!r}"
            )
        self.encoder = spec.build_backbone(vit)
        # ConvNet features are non-negative and start in a narrow cone: every image gets nearly the same
        # logits, the centered teacher is then almost uniform and stays so (H(P_t) 6.4 of log K = 6.9 after
        # 240 convnet_tiny steps); BN in the head spreads them (H(P_t) about 5). None: BN unless a ViT.
        self.head_bn = not vit if head_bn is None else head_bn
        self.head = DINOHead(self.encoder.out_dim, out_dim, batchnorm=self.head_bn)
        self.teacher = momentum_copy(self.encoder, self.head)
        self.local_crops, self.student_temp, self.center_momentum = local_crops, student_temp, center_momentum
        self.teacher_temp = teacher_temp if sharpening else student_temp
        self.centering, self.sharpening, self.tau_base = centering, sharpening, tau_base
        self.global_recipe, self.local_recipe = global_recipe, local_recipe
        if vit:  # DINO's ViT recipe: AdamW at 5e-4 for batch 256, weight decay 0.04
            self.lr_scale, self.adamw_weight_decay = 1e-3, 0.04
        else:  # SGD at SimSiam's rate, as BYOL, the other EMA-teacher method of the book
            self.lr_scale = 0.1
        self.register_buffer("center", torch.zeros(1, out_dim))
        self._teacher_logits: torch.Tensor | None = None

    def loss(self, global_crops: list[torch.Tensor], local_crops: list[torch.Tensor]) -> torch.Tensor:
        """2 global and L local crops, each (N, C, H, W) -> the mean of H(P_t(i), P_s(j)) over i != j."""
        student = list(self.head(self.encoder(torch.cat(global_crops))).chunk(2))
        if local_crops:  # one pass per crop size: a batch must share its height and width
            student += self.head(self.encoder(torch.cat(local_crops))).chunk(len(local_crops))
        with torch.no_grad():  # the teacher is never trained by gradient
            teacher_logits = self.teacher(torch.cat(global_crops))
        teacher = teacher_logits.chunk(2)
        center = self.center if self.centering else torch.zeros_like(self.center)
        pairs = [(i, j) for i in range(2) for j in range(len(student)) if j != i]
        loss = sum(
            dino_loss(student[j], teacher[i], center, self.student_temp, self.teacher_temp) for i, j in pairs
        ) / len(pairs)
        self.log_teacher(teacher_logits, center, loss)
        self._teacher_logits = concat_all_gather(teacher_logits.float())  # for the centre's update
        return loss

    def forward(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Images (N, C, H, W) uint8 -> the multi-crop loss (the indices are not needed)."""
        global_crops = [augment(images, self.global_recipe) for _ in range(2)]
        local_crops = [augment(images, self.local_recipe) for _ in range(self.local_crops)]
        return self.loss(global_crops, local_crops)

    @torch.no_grad()
    def log_teacher(self, teacher_logits: torch.Tensor, center: torch.Tensor, loss: torch.Tensor) -> None:
        """H(P_t), KL(P_t || P_s) = H(P_t, P_s) - H(P_t), and H(mean P_t) of this step."""
        p_t = F.softmax((teacher_logits.float() - center) / self.teacher_temp, dim=1)
        entropy = torch.special.entr(p_t).sum(1).mean()  # entr(p) = -p log p, 0 at p = 0
        self.log("teacher_entropy", entropy)
        # Every teacher crop meets as many student crops, so the pairs' mean of H(P_t) is this entropy.
        self.log("teacher_student_kl", loss.detach().float() - entropy)
        self.log("teacher_marginal_entropy", torch.special.entr(p_t.mean(0)).sum())

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """c <- m c + (1 - m) mean of this step's teacher logits (all ranks), then the teacher EMA."""
        if self._teacher_logits is not None:
            self.center.copy_(update_center(self.center, self._teacher_logits, self.center_momentum))
            self._teacher_logits = None
        tau = cosine_momentum(step, total_steps, self.tau_base)
        ema_update(self.teacher.parameters(), [*self.encoder.parameters(), *self.head.parameters()], tau)

    def epoch_metrics(self) -> dict:
        """Means over the epoch's steps of H(P_t), KL(P_t || P_s) and H(mean P_t); ||c|| now."""
        return {"center_norm": self.center.norm().item(), **super().epoch_metrics()}
