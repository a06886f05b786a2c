"""Every objective of the book as a pure function, in the book's symbols.

Each docstring gives the equation in one line and the chapter that derives it.
Embeddings are rows; `temperature` is the book's tau.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


class NonFiniteInputError(ValueError):
    """A loss received NaN or infinite entries; the message names the argument."""


def _check_temperature(temperature: float, name: str = "temperature") -> None:
    if not 1e-6 < temperature < math.inf:
        raise ValueError(
            f"{name} must be positive and finite (got {temperature}); values near 0 overflow the softmax"
        )


def _values_checked(x: torch.Tensor) -> bool:
    """Whether the checks that read a tensor's values run: only on the CPU, where the read is cheap.

    On a GPU, reading the answer would make the host wait for the device at every call (DINO
    calls a loss ten times a step); there the training loop's check of the loss, read once per
    interval, stands in. Shapes are checked everywhere.
    """
    return x.device.type == "cpu" and not torch.compiler.is_compiling()


def _check_finite(name: str, x: torch.Tensor) -> None:
    """Refuse NaN or infinite entries, naming the argument, its shape and how many entries are bad."""
    if _values_checked(x) and not torch.isfinite(x).all():
        bad = x.numel() - int(torch.isfinite(x).sum())
        raise NonFiniteInputError(
            f"{name} {tuple(x.shape)} has {bad} non-finite (NaN or infinite) entries of {x.numel()}"
        )


def _check_embeddings(**tensors: torch.Tensor) -> None:
    """Refuse tensors that are not all the same non-empty (N, D), or that hold NaN or infinite entries."""
    shapes = {name: tuple(t.shape) for name, t in tensors.items()}
    first = next(iter(shapes.values()))
    if len(first) != 2 or first[0] == 0 or len(set(shapes.values())) != 1:
        *rest, last = shapes
        got = ", ".join(f"{name} {shape}" for name, shape in shapes.items())
        raise ValueError(f"{', '.join(rest)} and {last} must be the same non-empty (N, D); got {got}")
    for name, t in tensors.items():
        _check_finite(name, t)


def triplet_loss(
    anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor, margin: float = 0.2
) -> torch.Tensor:
    """max(0, ||a - p||^2 - ||a - n||^2 + alpha), mean over the batch (Introduction; FaceNet)."""
    _check_embeddings(anchor=anchor, positive=positive, negative=negative)
    d_pos = (anchor - positive).pow(2).sum(-1)
    d_neg = (anchor - negative).pow(2).sum(-1)
    return torch.relu(d_pos - d_neg + margin).mean()


def smooth_max(scores: torch.Tensor, temperature: float) -> torch.Tensor:
    """tau * log sum_k exp(s_k / tau) over the last dim; tends to max_k s_k as tau -> 0 (Introduction)."""
    _check_temperature(temperature)
    if scores.dim() > 0 and scores.shape[-1] == 0:
        raise ValueError(f"scores must have at least one entry in the last dim; got {tuple(scores.shape)}")
    _check_finite("scores", scores)
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
    _check_embeddings(z1=z1, z2=z2)
    n = z1.shape[0]
    z = F.normalize(torch.cat([z1, z2]), dim=1)
    logits = (z @ z.T) / temperature
    # An anchor is never its own negative: remove the diagonal from the softmax.
    self_mask = torch.eye(2 * n, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(self_mask, float("-inf"))
    targets = torch.cat([torch.arange(n, 2 * n), torch.arange(0, n)]).to(z.device)
    return F.cross_entropy(logits.float(), targets)


def nce_loss(
    positive_sim: torch.Tensor,
    noise_sim: torch.Tensor,
    temperature: float,
    normaliser: float | torch.Tensor,
    num_data: int,
) -> torch.Tensor:
    """InstDisc's NCE loss: -log h(i, v) - sum_j log(1 - h(j, v)), mean over the batch (InstDisc chapter).

    P(i|v) = exp(s_i / tau) / Z and h = P / (P + m / n): the posterior that a
    sample came from the data rather than from the uniform noise p_n = 1/n,
    with m noise samples per data sample. positive_sim (B,) holds each
    anchor's similarity to its own memory entry, noise_sim (B, m) the
    similarities to m noise entries; Z is the (Monte Carlo) normaliser.
    Computed in log space, so tiny probabilities do not underflow.
    """
    _check_temperature(temperature)
    shapes_ok = positive_sim.dim() == 1 and noise_sim.dim() == 2 and len(positive_sim) == len(noise_sim)
    if not shapes_ok or len(positive_sim) == 0:
        raise ValueError(
            f"positive_sim must be (B,) and noise_sim (B, m) with B > 0; got {tuple(positive_sim.shape)} "
            f"and {tuple(noise_sim.shape)}"
        )
    _check_finite("positive_sim", positive_sim)
    _check_finite("noise_sim", noise_sim)
    if not num_data > 0:
        raise ValueError(f"num_data must be positive; got {num_data}")
    z = torch.as_tensor(normaliser, dtype=positive_sim.dtype, device=positive_sim.device)
    if _values_checked(z) and not ((z > 0) & (z < math.inf)).all():
        raise ValueError(f"normaliser must be positive and finite; got {normaliser}")
    m = noise_sim.shape[1]
    log_z = torch.log(z)
    log_noise = torch.log(torch.tensor(m / num_data, dtype=positive_sim.dtype, device=positive_sim.device))
    log_p_pos = positive_sim / temperature - log_z
    log_p_noise = noise_sim / temperature - log_z
    log_h_pos = log_p_pos - torch.logaddexp(log_p_pos, log_noise)
    log_one_minus_h_noise = log_noise - torch.logaddexp(log_p_noise, log_noise)
    return -(log_h_pos + log_one_minus_h_noise.sum(1)).mean()


def info_nce(
    query: torch.Tensor,
    positive: torch.Tensor,
    negatives: torch.Tensor,
    temperature: float,
    exclude: torch.Tensor | None = None,
) -> torch.Tensor:
    """InfoNCE: -log exp(q.k+/tau) / (exp(q.k+/tau) + sum_j exp(q.k_j/tau)), mean over N (CPC, MoCo chapters).

    query, positive: (N, D), row i of each forming a positive pair; negatives:
    (K, D) shared by the whole batch (a queue, a memory, other samples). The
    scores are plain dot products: callers that compare directions (MoCo)
    normalise first, callers with a learned critic (CPC) pass its outputs.
    `exclude`, a boolean (N, K), leaves negative j out of query i's sum where
    it is True (CPC: a query's own target drawn among the shared negatives).
    """
    _check_temperature(temperature)
    _check_embeddings(query=query, positive=positive)
    if negatives.dim() != 2 or negatives.shape[1] != query.shape[1]:
        raise ValueError(f"negatives must be (K, {query.shape[1]}); got {tuple(negatives.shape)}")
    _check_finite("negatives", negatives)
    positive_logit = (query * positive).sum(1, keepdim=True)
    negative_logits = query @ negatives.T
    if exclude is not None:
        if exclude.shape != negative_logits.shape or exclude.dtype != torch.bool:
            raise ValueError(
                f"exclude must be a boolean {tuple(negative_logits.shape)}; "
                f"got {exclude.dtype} {tuple(exclude.shape)}"
            )
        negative_logits = negative_logits.masked_fill(exclude, float("-inf"))
    logits = torch.cat([positive_logit, negative_logits], dim=1) / temperature
    return F.cross_entropy(logits.float(), torch.zeros(len(query), dtype=torch.long, device=query.device))


def multiview_info_nce(
    views: list[torch.Tensor] | tuple[torch.Tensor, ...], temperature: float = 0.07, graph: str = "full"
) -> torch.Tensor:
    """sum over view pairs (i, j) of L(v_i -> v_j) + L(v_j -> v_i), in-batch InfoNCE (CMC chapter).

    views: M >= 2 tensors (N, D), normalised here; row n of every view comes from
    image n. L(v_i -> v_j) is the mean over anchors n of
    -log exp(z_i[n].z_j[n]/tau) / sum_m exp(z_i[n].z_j[m]/tau): each anchor in
    view i picks its partner among the N rows of view j. `graph="core"` sums the
    pairs (1, j) with the first view as the core; `graph="full"` sums all
    M(M-1)/2 pairs. For two views both graphs are the symmetric two-view loss.
    """
    _check_temperature(temperature)
    if graph not in ("core", "full"):
        raise ValueError(f"graph must be 'core' or 'full', got {graph!r}")
    if len(views) < 2:
        raise ValueError(f"need at least two views, got {len(views)}")
    shapes = {tuple(v.shape) for v in views}
    if len(shapes) != 1 or views[0].dim() != 2 or len(views[0]) == 0:
        got = [tuple(v.shape) for v in views]
        raise ValueError(f"every view must be the same non-empty (N, D); got {got}")
    for i, v in enumerate(views):
        _check_finite(f"views[{i}]", v)
    z = [F.normalize(v.float(), dim=1) for v in views]
    targets = torch.arange(len(z[0]), device=z[0].device)
    pairs = (
        [(0, j) for j in range(1, len(z))]
        if graph == "core"
        else [(i, j) for i in range(len(z)) for j in range(i + 1, len(z))]
    )
    loss = z[0].new_zeros(())
    for i, j in pairs:
        logits = z[i] @ z[j].T / temperature
        loss = loss + F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)
    return loss


def invaspread_loss(f: torch.Tensor, f_hat: torch.Tensor, temperature: float = 0.1) -> torch.Tensor:
    """-sum_i log P(i|x^_i) - sum_i sum_{j != i} log(1 - P(i|x_j)), divided by N (InvaSpread chapter).

    f: (N, D) embeddings of the images x_j, f_hat: (N, D) of their augmented
    copies x^_j; both are normalised here. The batch's f are the instance
    weights: P(i|x^_i) = exp(f_i.f^_i/tau) / sum_k exp(f_k.f^_i/tau) asks the
    augmented copy to be recognised as its own instance (invariance), and
    P(i|x_j) = exp(f_i.f_j/tau) / sum_k exp(f_k.f_j/tau), j != i, asks image j
    not to be mistaken for instance i (spreading). The k = j term exp(1/tau) is
    the largest of column j, so every P(i|x_j) with i != j is at most 1/2 and
    log1p(-P) is accurate.
    """
    _check_temperature(temperature)
    _check_embeddings(f=f, f_hat=f_hat)
    n, dtype = len(f), torch.promote_types(f.dtype, torch.float32)
    f, f_hat = F.normalize(f.to(dtype), dim=1), F.normalize(f_hat.to(dtype), dim=1)
    log_p_hat = (f @ f_hat.T / temperature).log_softmax(0)  # [i, j]: log P(i | x^_j)
    log_p = (f @ f.T / temperature).log_softmax(0)  # [i, j]: log P(i | x_j)
    off_diagonal = ~torch.eye(n, dtype=torch.bool, device=f.device)
    spreading = torch.log1p(-log_p[off_diagonal].exp()).sum()
    return -(log_p_hat.diagonal().sum() + spreading) / n


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """D(p, z) = -p.z / (||p|| ||z||), mean over the batch; in [-1, 1] (BYOL and SimSiam chapters).

    p: (N, D) predictions, z: (N, D) targets, row i of each from image i. The
    stop-gradient is the caller's: pass `z.detach()` (or a target network's
    output) to keep the gradient from flowing through the target. For unit
    vectors ||p - z||^2 = 2 - 2 cos, so BYOL's normalised MSE is 2 + 2 D.

    >>> negative_cosine(torch.tensor([[1.0, 0.0]]), torch.tensor([[-2.0, 0.0]]))
    tensor(1.)
    """
    _check_embeddings(p=p, z=z)
    dtype = torch.promote_types(p.dtype, torch.float32)  # bf16 under autocast: normalise in float32
    p, z = F.normalize(p.to(dtype), dim=1), F.normalize(z.to(dtype), dim=1)
    return -(p * z).sum(1).mean()


def mocov3_loss(q: torch.Tensor, k: torch.Tensor, temperature: float = 0.2) -> torch.Tensor:
    """ctr(q, k) = -2 tau mean_i log exp(q_i.k_i/tau) / sum_j exp(q_i.k_j/tau) (MoCo v3 chapter).

    q: (N, D) queries (predictor outputs), k: (N, D) keys from the momentum encoder,
    both normalised here; row i of k is q_i's positive, the other N - 1 keys its
    negatives. The factor 2 tau cancels the 1/tau of the gradient with respect to the
    similarities s_ij = q_i.k_j: d ctr / d s_ij = 2 (softmax(s_i / tau)_j - [i = j]) / N.
    The stop-gradient on k is the caller's; the method sums ctr(q1, k2) + ctr(q2, k1).
    """
    _check_temperature(temperature)
    _check_embeddings(q=q, k=k)
    dtype = torch.promote_types(q.dtype, torch.float32)
    q, k = F.normalize(q.to(dtype), dim=1), F.normalize(k.to(dtype), dim=1)
    targets = torch.arange(len(q), device=q.device)
    return 2 * temperature * F.cross_entropy(q @ k.T / temperature, targets)


def dino_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    center: torch.Tensor,
    student_temp: float = 0.1,
    teacher_temp: float = 0.04,
) -> torch.Tensor:
    """H(P_t, P_s) = -sum_k P_t[k] log P_s[k], mean over the batch (DINO chapter).

    P_t = softmax((t - c) / tau_t), P_s = softmax(s / tau_s): student_logits s and
    teacher_logits t are (N, K), row i of each from two crops of image i; center c
    is (K,) or (1, K), subtracted from every teacher row (centering), and tau_t below
    tau_s sharpens the teacher. The stop-gradient on the teacher is the caller's:
    pass its logits computed without gradient, as DINO's EMA teacher gives them.
    """
    _check_temperature(student_temp, "student_temp")
    _check_temperature(teacher_temp, "teacher_temp")
    _check_embeddings(student_logits=student_logits, teacher_logits=teacher_logits)
    k = student_logits.shape[1]
    if tuple(center.shape) not in ((k,), (1, k)):
        raise ValueError(
            f"center must be ({k},) or (1, {k}), one entry per output; got {tuple(center.shape)}"
        )
    _check_finite("center", center)
    dtype = torch.promote_types(student_logits.dtype, torch.float32)  # bf16 under autocast: softmax in fp32
    log_p_s = F.log_softmax(student_logits.to(dtype) / student_temp, dim=1)
    p_t = F.softmax((teacher_logits.to(dtype) - center.to(dtype).view(1, k)) / teacher_temp, dim=1)
    return -(p_t * log_p_s).sum(1).mean()


def clip_loss(
    image_emb: torch.Tensor, text_emb: torch.Tensor, logit_scale: float | torch.Tensor
) -> torch.Tensor:
    """(CE(s I T^T, diag) + CE(s T I^T, diag)) / 2 over normalised rows I, T; s = 1/tau (CLIP chapter).

    image_emb, text_emb: (N, D), row i of each from the same pair, unnormalised
    (normalised here). The N x N similarities scaled by `logit_scale` s are read
    row-wise (each image picks its caption among the N) and column-wise (each
    caption picks its image): the mean of two InfoNCE losses, one per direction.
    `logit_scale` is a positive number or a 0-d tensor, so a learned scale gets
    its gradient; the caller exponentiates its log-scale and clamps it at 100.

    >>> clip_loss(torch.eye(3), torch.eye(3), 100.0) < 1e-6
    tensor(True)
    """
    _check_embeddings(image_emb=image_emb, text_emb=text_emb)
    # A Python float stays exact in float64 until it meets the embeddings' dtype; a tensor keeps its graph.
    scale = (
        logit_scale if torch.is_tensor(logit_scale) else torch.tensor(float(logit_scale), dtype=torch.float64)
    )
    if scale.dim() != 0:
        raise ValueError(f"logit_scale must be a number or a 0-d tensor, got shape {tuple(scale.shape)}")
    _check_finite("logit_scale", scale)
    if _values_checked(scale) and not float(scale.detach()) > 0:
        raise ValueError(
            f"logit_scale must be positive (got {float(scale.detach())}); it is 1/temperature, "
            "so pass the exponential of the learned log-scale"
        )
    dtype = torch.promote_types(image_emb.dtype, torch.float32)  # bf16 under autocast: softmax in fp32
    image = F.normalize(image_emb.to(dtype), dim=1)
    text = F.normalize(text_emb.to(dtype), dim=1)
    logits = scale.to(dtype) * (image @ text.T)
    targets = torch.arange(len(logits), device=logits.device)
    return (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2
