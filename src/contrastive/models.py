"""Backbones and heads.

Three backbones, one per profile: a tiny ConvNet for smoke tests, a slim ConvNet
that learns visibly within minutes on a laptop CPU, and the CIFAR variant of
ResNet-18 (3x3 stem, no max-pool) for GPUs; and a small Vision Transformer in
three sizes, one per profile as well, for MoCo v3 and DINO. Every backbone maps
images (B, C, H, W) in [0, 1] to features (B, out_dim) and exposes `out_dim`; its
first step standardises the images with the training data's per-channel statistics
(`Standardize`), the one place the package normalises images. Evaluation always uses
these features, never the projection head's output.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .data import CIFAR10_MEAN, CIFAR10_STD


class Standardize(nn.Module):
    """x -> (x - mean) / std per channel, with the training images' statistics; the identity when
    `mean` is None (inputs the caller has scaled itself, as CMC's Lab channels)."""

    def __init__(self, mean: Sequence[float] | None = None, std: Sequence[float] | None = None):
        super().__init__()
        if (mean is None) != (std is None) or (mean is not None and (len(mean) != len(std) or min(std) <= 0)):
            raise ValueError(
                f"mean and std need one entry per channel each and a positive std (or both None); "
                f"got mean={mean}, std={std}"
            )
        self.active = mean is not None
        self.register_buffer("mean", torch.tensor(mean if self.active else [], dtype=torch.float32))
        self.register_buffer("std", torch.tensor(std if self.active else [], dtype=torch.float32))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.active:
            return x
        return (x - self.mean.to(x.dtype).view(1, -1, 1, 1)) / self.std.to(x.dtype).view(1, -1, 1, 1)


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ConvNet(nn.Module):
    """Blocks of conv3x3-BN-ReLU, each followed by a 2x2 max-pool, then global average pooling."""

    def __init__(
        self,
        widths: Sequence[int] = (24, 64, 128, 256),
        in_channels: int = 3,
        standardize: Standardize | None = None,
    ):
        super().__init__()
        self.standardize = standardize if standardize is not None else Standardize()
        blocks, c_in = [], in_channels
        for width in widths:
            blocks += [conv_bn_relu(c_in, width), nn.MaxPool2d(2)]
            c_in = width
        self.features = nn.Sequential(*blocks)
        self.out_dim = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(self.standardize(x)).mean(dim=(2, 3))


class BasicBlock(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int):
        super().__init__()
        self.conv1 = nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(c_out)
        self.conv2 = nn.Conv2d(c_out, c_out, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(c_out)
        self.shortcut = nn.Identity()
        if stride != 1 or c_in != c_out:
            self.shortcut = nn.Sequential(
                nn.Conv2d(c_in, c_out, 1, stride=stride, bias=False), nn.BatchNorm2d(c_out)
            )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = torch.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return torch.relu(out + self.shortcut(x))


class ResNet18(nn.Module):
    """ResNet-18 for 32x32 inputs: a 3x3 stride-1 stem and no max-pool, as SimCLR's CIFAR experiments."""

    def __init__(
        self,
        in_channels: int = 3,
        widths: Sequence[int] = (64, 128, 256, 512),
        standardize: Standardize | None = None,
    ):
        super().__init__()
        self.standardize = standardize if standardize is not None else Standardize()
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False),
            nn.BatchNorm2d(widths[0]),
            nn.ReLU(inplace=True),
        )
        layers, c_in = [], widths[0]
        for i, width in enumerate(widths):
            stride = 1 if i == 0 else 2
            layers += [BasicBlock(c_in, width, stride), BasicBlock(width, width, 1)]
            c_in = width
        self.layers = nn.Sequential(*layers)
        self.out_dim = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.stem(self.standardize(x))).mean(dim=(2, 3))


class Block(nn.Module):
    """A pre-norm transformer block: x + Attention(LN(x)), then x + MLP(LN(x)).

    `causal=True` lets each token attend only to itself and the tokens before it (CLIP's text encoder).
    """

    def __init__(self, dim: int, heads: int, mlp_ratio: float, causal: bool = False):
        super().__init__()
        self.heads, self.causal = heads, causal
        self.norm1 = nn.LayerNorm(dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        hidden = round(mlp_ratio * dim)
        self.mlp = nn.Sequential(nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(self.norm1(x)).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # softmax(q k^T / sqrt(d_head)) v per head, masked above the diagonal when causal
        attended = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        x = x + self.proj(attended.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp(self.norm2(x))


class ViT(nn.Module):
    """Vision Transformer for small images: patches -> tokens, a CLS token, pre-norm blocks, final LN.

    The patch projection is a convolution with kernel = stride = patch size, i.e. one
    shared linear map of every non-overlapping patch. Position embeddings are learned
    for `image_size`; other sizes (DINO's 16 px local crops) get them resampled
    bicubically to their patch grid, as in DINO. The feature is the CLS token's output.
    """

    def __init__(
        self,
        dim: int = 192,
        depth: int = 6,
        heads: int = 3,
        mlp_ratio: float = 4.0,
        patch_size: int = 4,
        image_size: int = 32,
        in_channels: int = 3,
        standardize: Standardize | None = None,
    ):
        super().__init__()
        self.standardize = standardize if standardize is not None else Standardize()
        if dim % heads:
            raise ValueError(f"dim {dim} must be a multiple of heads {heads}: every head gets dim / heads")
        if image_size % patch_size:
            raise ValueError(f"image_size {image_size} must be a multiple of patch_size {patch_size}")
        self.patch_size, self.grid = patch_size, image_size // patch_size
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + self.grid**2, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.out_dim = dim
        self._init_weights(in_channels)

    def _init_weights(self, in_channels: int) -> None:
        # MoCo v3's initialisation: Xavier-uniform for every linear map, the patch projection
        # included (seen as a linear map of the flattened patch), so a frozen random projection
        # keeps the scale of its input.
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        fan_in = in_channels * self.patch_size**2
        bound = math.sqrt(6.0 / (fan_in + self.out_dim))
        nn.init.uniform_(self.patch_embed.weight, -bound, bound)
        nn.init.zeros_(self.patch_embed.bias)
        nn.init.normal_(self.cls_token, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.02)

    def freeze_patch_projection(self) -> ViT:
        """Keep the patch projection at its random initialisation (MoCo v3's stabilising trick)."""
        self.patch_embed.requires_grad_(False)
        return self

    def _position_embedding(self, grid_h: int, grid_w: int) -> torch.Tensor:
        if (grid_h, grid_w) == (self.grid, self.grid):
            return self.pos_embed
        cls, patches = self.pos_embed[:, :1], self.pos_embed[:, 1:]
        patches = patches.reshape(1, self.grid, self.grid, -1).permute(0, 3, 1, 2)
        patches = F.interpolate(patches, size=(grid_h, grid_w), mode="bicubic", align_corners=False)
        return torch.cat([cls, patches.flatten(2).transpose(1, 2)], dim=1)

    def forward(
        self, x: torch.Tensor, watch: Callable[[torch.Tensor], torch.Tensor] | None = None
    ) -> torch.Tensor:
        """Images (B, C, H, W) -> CLS features (B, dim).

        `watch`, when given, receives the patch projection's output tokens (B, T, dim) and
        returns the tokens to use (MoCo v3 hooks the gradient that reaches them).
        """
        tokens = self.patch_embed(self.standardize(x))
        grid = tokens.shape[-2:]
        tokens = tokens.flatten(2).transpose(1, 2)
        if watch is not None:
            tokens = watch(tokens)
        cls = self.cls_token.expand(len(tokens), -1, -1)
        tokens = torch.cat([cls, tokens], dim=1) + self._position_embedding(*grid)
        return self.norm(self.blocks(tokens))[:, 0]


# ConvNets and the ResNet: the channel widths. ViTs (patch size 4): token dimension, depth, heads and MLP
# ratio. vit_small is ViT-S (the paper's MoCo v3 and DINO ViT); the two smaller ones are sized so that a
# MoCo v3 step costs about 2.5 x a SimCLR step of the ConvNet of the same profile on a CPU (their MLP ratio
# of 2 instead of 4 saves a third of the FLOPs).
BACKBONES: dict[str, tuple[type[nn.Module], dict]] = {
    "convnet_tiny": (ConvNet, dict(widths=(16, 32, 64))),
    "convnet_small": (ConvNet, dict(widths=(24, 64, 128, 256))),
    "resnet18": (ResNet18, dict(widths=(64, 128, 256, 512))),
    "vit_nano": (ViT, dict(dim=48, depth=2, heads=2, mlp_ratio=2.0)),
    "vit_tiny": (ViT, dict(dim=64, depth=4, heads=4, mlp_ratio=2.0)),
    "vit_small": (ViT, dict(dim=384, depth=12, heads=6, mlp_ratio=4.0)),
}

VITS = sorted(name for name, (cls, _) in BACKBONES.items() if cls is ViT)
# The ViT of the same profile as each backbone, for the methods that need a ViT (MoCo v3).
VIT_FOR_BACKBONE = {"convnet_tiny": "vit_nano", "convnet_small": "vit_tiny", "resnet18": "vit_small"}


def build_backbone(
    name: str,
    in_channels: int = 3,
    width: float = 1.0,
    mean: Sequence[float] | None = CIFAR10_MEAN,
    std: Sequence[float] | None = CIFAR10_STD,
) -> nn.Module:
    """Build a backbone by name; an unknown name is an error listing the valid ones.

    `width` multiplies every layer's channel count (CMC's half-width encoders use 0.5), or a
    ViT's token dimension, rounded to a multiple of its number of heads. The backbone reads
    images in [0, 1] and standardises them with `mean` and `std`, one entry per channel (the
    training data's, `ImageDataset.stats()`; CIFAR-10's by default); None leaves them as given.
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    if not width > 0:
        raise ValueError(f"width must be positive, got {width}")
    if mean is not None and len(mean) != in_channels:
        raise ValueError(
            f"mean and std need one entry per channel: {len(mean)} given for {in_channels} channels; "
            "pass the data's statistics (**data.stats()), or mean=None, std=None for inputs "
            "scaled already"
        )
    standardize = Standardize(mean, std)
    cls, config = BACKBONES[name]
    if cls is ViT:
        heads = config["heads"]
        dim = heads * max(1, round(width * config["dim"] / heads))
        return ViT(**{**config, "dim": dim}, in_channels=in_channels, standardize=standardize)
    widths = [max(1, round(width * w)) for w in config["widths"]]
    return cls(widths=widths, in_channels=in_channels, standardize=standardize)


def in_channels_of(backbone: nn.Module) -> int:
    """The number of image channels a backbone reads: its first convolution's input channels."""
    return next(m for m in backbone.modules() if isinstance(m, nn.Conv2d)).in_channels


def projection_mlp(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    num_layers: int = 2,
    last_bn: bool = False,
    batchnorm: bool = True,
) -> nn.Sequential:
    """The projection head g(h): Linear-BN-ReLU repeated, then a final Linear (optionally BN).

    `batchnorm=False` builds the same MLP with no BatchNorm anywhere (`last_bn` is then
    refused); its hidden Linears get the bias that BN's shift would otherwise provide.
    """
    if last_bn and not batchnorm:
        raise ValueError("last_bn=True asks for a BatchNorm that batchnorm=False removes")
    layers: list[nn.Module] = []
    dim = in_dim
    for _ in range(num_layers - 1):
        norm = [nn.BatchNorm1d(hidden_dim)] if batchnorm else []
        layers += [nn.Linear(dim, hidden_dim, bias=not batchnorm), *norm, nn.ReLU(True)]
        dim = hidden_dim
    layers.append(nn.Linear(dim, out_dim, bias=not last_bn))
    if last_bn:
        layers.append(nn.BatchNorm1d(out_dim, affine=False))
    return nn.Sequential(*layers)


def embedding_head(in_dim: int, out_dim: int) -> nn.Sequential:
    """A linear embedding followed by BatchNorm (InstDisc, CMC, InvaSpread).

    Backbone features are non-negative (ReLU, then pooling), so a bare linear map puts
    every embedding in one narrow cone (mean cosine about 0.9 at initialisation); the BN
    centres them.
    """
    return nn.Sequential(nn.Linear(in_dim, out_dim), nn.BatchNorm1d(out_dim))


class DINOHead(nn.Module):
    """DINO's head: an MLP to a bottleneck, L2-normalised, then a weight-normalised linear layer to K outputs.

    The last layer's gain is fixed at 1 (DINO's `norm_last_layer`), so logit k is the
    cosine between the bottleneck feature and the k-th row of the last weight.
    `batchnorm` adds BN after the hidden layers (DINO's `use_bn_in_head`).
    """

    def __init__(
        self,
        in_dim: int,
        out_dim: int,
        hidden_dim: int = 512,
        bottleneck_dim: int = 128,
        batchnorm: bool = False,
    ):
        super().__init__()
        layers: list[nn.Module] = []
        for dim in (in_dim, hidden_dim):
            norm = [nn.BatchNorm1d(hidden_dim)] if batchnorm else []
            layers += [nn.Linear(dim, hidden_dim), *norm, nn.GELU()]
        self.mlp = nn.Sequential(*layers, nn.Linear(hidden_dim, bottleneck_dim))
        self.last = nn.Parameter(torch.randn(out_dim, bottleneck_dim) / math.sqrt(bottleneck_dim))

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.mlp(h), dim=1) @ F.normalize(self.last, dim=1).T


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- BatchNorm per group of samples: MoCo's emulation of one BN per GPU ----------------------


class _SplitBatchNorm:
    """BatchNorm whose training-mode statistics are computed per group of consecutive samples.

    A batch of N samples is `num_splits` groups of N / num_splits, as if each group
    sat on its own GPU. The running statistics move towards the mean over groups of
    the group statistics: what averaging the BN buffers of `num_splits` GPUs gives,
    and the statistics the layer actually normalised with (the within-group ones).
    In eval mode the layer is ordinary BatchNorm.
    """

    num_splits: int

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training or self.num_splits == 1:
            return super().forward(x)
        n, c, rest = x.shape[0], x.shape[1], x.shape[2:]
        if n % self.num_splits:
            raise ValueError(
                f"a batch of {n} samples cannot be split into num_splits={self.num_splits} "
                f"equal BN groups; num_splits must divide {n}"
            )
        s = self.num_splits
        # (N, C, ...) -> (N / s, s * C, ...): group g's samples become channels g*C .. g*C + C - 1, so one
        # batch_norm call computes every group's statistics.
        grouped = x.reshape(s, n // s, c, *rest).transpose(0, 1).reshape(n // s, s * c, *rest)
        factor = self.momentum
        if self.track_running_stats:
            self.num_batches_tracked.add_(1)
            if factor is None:  # cumulative average, as nn.BatchNorm with momentum=None
                factor = 1.0 / self.num_batches_tracked.item()
        running_mean = self.running_mean.repeat(s) if self.track_running_stats else None
        running_var = self.running_var.repeat(s) if self.track_running_stats else None
        weight = self.weight.repeat(s) if self.affine else None
        bias = self.bias.repeat(s) if self.affine else None
        out = F.batch_norm(grouped, running_mean, running_var, weight, bias, True, factor or 0.0, self.eps)
        if self.track_running_stats:
            with torch.no_grad():
                self.running_mean.copy_(running_mean.view(s, c).mean(0))
                self.running_var.copy_(running_var.view(s, c).mean(0))
        return out.reshape(n // s, s, c, *rest).transpose(0, 1).reshape(n, c, *rest)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, num_splits={self.num_splits}"


class SplitBatchNorm2d(_SplitBatchNorm, nn.BatchNorm2d):
    def __init__(self, num_features: int, num_splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits


class SplitBatchNorm1d(_SplitBatchNorm, nn.BatchNorm1d):
    def __init__(self, num_features: int, num_splits: int, **kwargs):
        super().__init__(num_features, **kwargs)
        self.num_splits = num_splits


def split_batch_norm(module: nn.Module, num_splits: int) -> nn.Module:
    """Replace every BatchNorm1d/2d inside `module`, in place, by its split version with the same state.

    Returns `module` (for a bare BatchNorm layer, its replacement).
    """
    if isinstance(module, (nn.BatchNorm1d, nn.BatchNorm2d)):
        if isinstance(module, _SplitBatchNorm):
            module.num_splits = num_splits
            return module
        cls = SplitBatchNorm2d if isinstance(module, nn.BatchNorm2d) else SplitBatchNorm1d
        like = [t for t in (module.weight, module.running_mean) if t is not None]
        place = {"device": like[0].device, "dtype": like[0].dtype} if like else {}
        split = cls(
            module.num_features,
            num_splits,
            eps=module.eps,
            momentum=module.momentum,
            affine=module.affine,
            track_running_stats=module.track_running_stats,
            **place,
        )
        split.load_state_dict(module.state_dict())
        return split.train(module.training)
    for name, child in module.named_children():
        module.add_module(name, split_batch_norm(child, num_splits))
    return module
