"""Every objective of the book as a pure function, in the book's symbols.

Each docstring gives the equation in one line and the chapter that derives it.
Embeddings are rows; `temperature` is the book's tau.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def _check_temperature(temperature: float) -> None:
    if not temperature > 1e-6:
        raise ValueError(
            f"temperature must be positive (got {temperature}); values near 0 overflow the softmax"
        )


def triplet_loss(
    anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float = 0.2
) -> torch.Tensor:
    """max(0, ||a - p||^2 - ||a - n||^2 + alpha), mean over the batch (Introduction; FaceNet)."""
    d_pos = (anchor - positive).pow(2).sum(-1)
    d_neg = (anchor - negative).pow(2).sum(-1)
    return torch.relu(d_pos - d_neg + margin).mean()


def smooth_max(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """tau * log sum_k exp(s_k / tau) over the last dim; tends to max_k s_k as tau -> 0 (Introduction)."""
    _check_temperature(temperature)
    return temperature * torch.logsumexp(scores / temperature, dim=-1)


def nt_xent(z1: torch.Tensor, z2: torch.Tensor, temperature: float = 0.5) -> torch.Tensor:
    """NT-Xent: -log exp(s_ij/tau) / sum_{k != i} exp(s_ik/tau), mean over the 2N anchors (SimCLR chapter).

    z1, z2: (N, D) projections of two views of the same N images, unnormalised
    (normalised here); row i of z1 and row i of z2 form the positive pair, the
    other 2N - 2 views are the negatives.

    >>> z1, z2 = torch.randn(8, 16), torch.randn(8, 16)
    >>> nt_xent(z1, z2, temperature=0.5).shape
    torch.Size([])
    """
    _check_temperature(temperature)
    if z1.shape != z2.shape or z1.dim() != 2:
        raise ValueError(f"z1 and z2 must both be (N, D); got {tuple(z1.shape)} and {tuple(z2.shape)}")
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = (z @ z.T) / temperature
    # An anchor is never its own negative: remove the diagonal from the softmax.
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits.float(), targets)
