"""Backbones and heads.

Three backbones, one per profile: a tiny ConvNet for smoke tests, a slim ConvNet
that learns visibly within minutes on a laptop CPU, and the CIFAR variant of
ResNet-18 (3x3 stem, no max-pool) for GPUs. Every backbone maps images
(B, C, H, W) to features (B, out_dim) and exposes `out_dim`; evaluation always
uses these features, never the projection head's output.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def conv_bn_relu(c_in: int, c_out: int, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1, bias=False),
        nn.BatchNorm2d(c_out),
        nn.ReLU(inplace=True),
    )


class ConvNet(nn.Module):
    """Blocks of conv3x3-BN-ReLU, each followed by a 2x2 max-pool, then global average pooling."""

    def __init__(self, widths: Sequence[int] = (24, 64, 128, 256), in_channels: int = 3):
        super().__init__()
        blocks, c_in = [], in_channels
        for width in widths:
            blocks += [conv_bn_relu(c_in, width), nn.MaxPool2d(2)]
            c_in = width
        self.features = nn.Sequential(*blocks)
        self.out_dim = c_in

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x).mean(dim=(2, 3))


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

    def __init__(self, in_channels: int = 3, widths: Sequence[int] = (64, 128, 256, 512)):
        super().__init__()
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
        return self.layers(self.stem(x)).mean(dim=(2, 3))


BACKBONES = {
    "convnet_tiny": (ConvNet, (16, 32, 64)),
    "convnet_small": (ConvNet, (24, 64, 128, 256)),
    "resnet18": (ResNet18, (64, 128, 256, 512)),
}


def build_backbone(name: str, in_channels: int = 3, width: float = 1.0) -> nn.Module:
    """Build a backbone by name; an unknown name is an error listing the valid ones.

    `width` multiplies every layer's channel count (CMC's half-width encoders use 0.5).
    """
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {sorted(BACKBONES)}")
    if not width > 0:
        raise ValueError(f"width must be positive, got {width}")
    cls, widths = BACKBONES[name]
    return cls(widths=[max(1, round(width * w)) for w in widths], in_channels=in_channels)


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


def count_parameters(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())
