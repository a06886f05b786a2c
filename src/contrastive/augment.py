"""Batched augmentations: random per sample, computed as whole-batch tensor ops.

CIFAR-10 stays uint8 on the training device; a step slices a batch by index and
calls `augment` on it. Every sample draws its own parameters (crop box, flip,
jitter factors and order, ...), but the work is a handful of batched kernels on
the tensor's own device instead of a Python loop over images, which is what
makes SimCLR-style two-view training fast on a GPU and bearable on a CPU.

All ops take float images (B, C, H, W) in [0, 1] with C = 1 or 3, and draw every
random number from `generator` (the global RNG when None), so a seeded generator
reproduces a batch exactly. Draws happen on the generator's device and are then
moved to the images' device, so a CPU generator also drives CUDA batches.
"""

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F
from torch import Tensor

# ITU-R 601-2 luma, the weights torchvision and PIL use for grayscale.
_LUMA = (0.299, 0.587, 0.114)


def _check_images(x: Tensor) -> None:
    if x.ndim != 4 or x.shape[1] not in (1, 3) or not x.is_floating_point():
        raise ValueError(
            f"expected float images (B, C, H, W) with C = 1 or 3, got {x.dtype} of shape "
            f"{tuple(x.shape)}; convert uint8 images with to_float first"
        )


def _check_probability(p: float) -> None:
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"p is a probability and must be in [0, 1], got {p}")


def _rand(shape: Sequence[int], generator: torch.Generator | None, device: torch.device) -> Tensor:
    source = generator.device if generator is not None else device
    return torch.rand(shape, generator=generator, device=source).to(device)


def _uniform(
    low: float, high: float, n: int, generator: torch.Generator | None, device: torch.device
) -> Tensor:
    return low + (high - low) * _rand((n,), generator, device)


def _coin(p: float, n: int, generator: torch.Generator | None, device: torch.device) -> Tensor:
    """Per-sample Bernoulli(p) mask; rand is in [0, 1), so p=1 selects every sample."""
    return _rand((n,), generator, device) < p


def _per_sample(values: Tensor) -> Tensor:
    return values.view(-1, 1, 1, 1)


def to_float(images: Tensor) -> Tensor:
    """uint8 images in [0, 255] -> float32 in [0, 1]; float input is returned as float32."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    if images.is_floating_point():
        return images.float()
    raise ValueError(f"expected uint8 or float images, got {images.dtype}")


def sample_crop_boxes(
    batch: int,
    height: int,
    width: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Crop boxes (top, left, h, w) in pixels, drawn as torchvision's RandomResizedCrop does.

    Area fraction uniform in `scale`, aspect ratio w/h log-uniform in `ratio`; ten
    candidates per sample, the first that fits wins, else the central crop of the
    whole image clipped to `ratio`. Unlike torchvision the box is not rounded to
    whole pixels: the bilinear resample handles fractional boxes, so the areas
    follow the requested distribution exactly.
    """
    if not 0.0 < scale[0] <= scale[1] <= 1.0:
        raise ValueError(f"scale must satisfy 0 < scale[0] <= scale[1] <= 1, got {scale}")
    if not 0.0 < ratio[0] <= ratio[1]:
        raise ValueError(f"ratio must satisfy 0 < ratio[0] <= ratio[1], got {ratio}")
    device = torch.device(device)
    tries = 10  # torchvision's number of attempts before the central-crop fallback
    fraction = scale[0] + (scale[1] - scale[0]) * _rand((batch, tries), generator, device)
    area = height * width * fraction
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * _rand((batch, tries), generator, device))
    w, h = torch.sqrt(area * aspect), torch.sqrt(area / aspect)
    fits = (w <= width) & (h <= height)
    first = fits.float().argmax(dim=1, keepdim=True)  # argmax returns the first maximum
    w, h = w.gather(1, first).squeeze(1), h.gather(1, first).squeeze(1)

    in_ratio = width / height
    fallback_w, fallback_h = float(width), float(height)
    if in_ratio < ratio[0]:
        fallback_h = width / ratio[0]
    elif in_ratio > ratio[1]:
        fallback_w = height * ratio[1]
    found = fits.any(dim=1)
    w = torch.where(found, w, torch.full_like(w, fallback_w))
    h = torch.where(found, h, torch.full_like(h, fallback_h))
    position = torch.where(found[:, None], _rand((batch, 2), generator, device), 0.5)
    top, left = (height - h) * position[:, 0], (width - w) * position[:, 1]
    return top, left, h, w


def random_resized_crop(
    x: Tensor,
    size: int,
    scale: tuple[float, float] = (0.08, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    generator: torch.Generator | None = None,
) -> Tensor:
    """Crop a random box per sample and resize it to (size, size), in one batched resample.

    Bilinear without antialiasing: fine when crops are upsampled (CIFAR crops of a
    32 x 32 image back to 32), aliasing when a large image is shrunk a lot.
    """
    _check_images(x)
    if size < 1:
        raise ValueError(f"size must be a positive number of pixels, got {size}")
    batch, channels, height, width = x.shape
    top, left, h, w = sample_crop_boxes(batch, height, width, scale, ratio, generator, x.device)
    # Map output coordinates in [-1, 1] onto the box in input coordinates in [-1, 1]
    # (align_corners=False: -1 and 1 are the outer edges of the border pixels).
    theta = torch.zeros(batch, 2, 3, dtype=x.dtype, device=x.device)
    theta[:, 0, 0] = w / width
    theta[:, 0, 2] = (2 * left + w) / width - 1
    theta[:, 1, 1] = h / height
    theta[:, 1, 2] = (2 * top + h) / height - 1
    grid = F.affine_grid(theta, [batch, channels, size, size], align_corners=False)
    # "border" only matters for the half pixel next to the image edge, as in a resize.
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)


def horizontal_flip(x: Tensor, p: float = 0.5, generator: torch.Generator | None = None) -> Tensor:
    """Mirror each sample left-right with probability p."""
    _check_images(x)
    _check_probability(p)
    if p == 0:
        return x
    flip = _coin(p, x.shape[0], generator, x.device)
    return torch.where(_per_sample(flip), x.flip(-1), x)


def _gray(x: Tensor) -> Tensor:
    """(B, 1, H, W) luma; a one-channel image is its own grayscale."""
    if x.shape[1] == 1:
        return x
    weights = torch.tensor(_LUMA, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    return (x * weights).sum(dim=1, keepdim=True)


def _blend(x: Tensor, other: Tensor, factor: Tensor) -> Tensor:
    return torch.lerp(other.expand_as(x), x, _per_sample(factor)).clamp_(0, 1)


# The four jitter ops with explicit per-sample parameters (shape (B,)), as in
# torchvision.transforms.functional; color_jitter draws the parameters.


def adjust_brightness(x: Tensor, factor: Tensor) -> Tensor:
    """Scale every pixel by the sample's factor (0 gives black, 1 the image)."""
    return (x * _per_sample(factor)).clamp(0, 1)


def adjust_contrast(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with the sample's mean gray level (0 gives a flat gray image)."""
    return _blend(x, _gray(x).mean(dim=(1, 2, 3), keepdim=True), factor)


def adjust_saturation(x: Tensor, factor: Tensor) -> Tensor:
    """Blend with the sample's grayscale (0 gives the grayscale image); RGB only."""
    return _blend(x, _gray(x), factor)


def hue_chroma_value(x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """HSV's hue in sixths of a turn (in [-1, 5)), chroma and value of RGB images (B, 3, H, W), each
    (B, 1, H, W). Grays (chroma 0) get hue 0, which any use must ignore."""
    r, g, b = x[:, 0:1], x[:, 1:2], x[:, 2:3]
    value = x.amax(dim=1, keepdim=True)
    chroma = value - x.amin(dim=1, keepdim=True)
    safe = chroma.clamp_min(1e-12)
    # Where two channels tie for the maximum both formulas agree.
    hue6 = torch.where(
        r == value, (g - b) / safe, torch.where(g == value, (b - r) / safe + 2, (r - g) / safe + 4)
    )
    return hue6, chroma, value


def adjust_hue(x: Tensor, shift: Tensor) -> Tensor:
    """Rotate the HSV hue by `shift` turns (in [-0.5, 0.5]), RGB -> HSV -> RGB batched."""
    hue6, chroma, value = hue_chroma_value(x)
    hue6 = hue6 + 6 * _per_sample(shift)
    # HSV -> RGB without branches: channel n is V - C * clamp(min(k, 4 - k), 0, 1),
    # k = (n + hue6) mod 6 with n = 5, 3, 1 for R, G, B.
    offsets = torch.tensor([5.0, 3.0, 1.0], dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    k = (offsets + hue6).remainder_(6)
    return torch.addcmul(value, chroma, torch.minimum(k, 4 - k).clamp_(0, 1), value=-1)


@torch.compiler.disable  # its random order of operations would make torch.compile recompile per order
def color_jitter(
    x: Tensor,
    brightness: float = 0.4,
    contrast: float = 0.4,
    saturation: float = 0.4,
    hue: float = 0.1,
    p: float = 0.8,
    generator: torch.Generator | None = None,
) -> Tensor:
    """torchvision's ColorJitter wrapped in RandomApply(p): per-sample factors, one random op order per call.

    Brightness, contrast and saturation factors are uniform in [max(0, 1 - s), 1 + s],
    the hue shift uniform in [-hue, hue] turns. One-channel images get brightness and
    contrast only. The result is clamped to [0, 1] after every op, as torchvision does.
    """
    _check_images(x)
    _check_probability(p)
    if min(brightness, contrast, saturation) < 0:
        raise ValueError(
            "jitter strengths must be non-negative, got "
            f"brightness={brightness}, contrast={contrast}, saturation={saturation}"
        )
    if not 0.0 <= hue <= 0.5:
        raise ValueError(f"hue is a shift in turns and must be in [0, 0.5], got {hue}")
    if p == 0:
        return x
    batch, device = x.shape[0], x.device
    color = x.shape[1] == 3
    strengths = (brightness, contrast, saturation if color else 0.0, hue if color else 0.0)
    ops: list[Callable[[Tensor, Tensor], Tensor] | None] = [
        op if s > 0 else None
        for op, s in zip(
            (adjust_brightness, adjust_contrast, adjust_saturation, adjust_hue),
            strengths,
            strict=True,
        )
    ]
    factors = torch.stack(
        [_uniform(max(0.0, 1 - s), 1 + s, batch, generator, device) for s in strengths[:3]]
        + [_uniform(-strengths[3], strengths[3], batch, generator, device)],
        dim=1,
    )
    applied = _coin(p, batch, generator, device)
    # torchvision draws an order of the four ops per image; here one random order is
    # drawn per call and shared by the batch. A per-image order costs a gather and a
    # scatter of the whole batch per op position, a third of the jitter's time on a
    # CPU, while over an epoch of batches every order still occurs equally often.
    # The order is drawn on the CPU (the generator's device, if given), so reading it waits for nothing.
    order = _rand((4,), generator, generator.device if generator is not None else "cpu").argsort().tolist()
    if device.type != "cpu":
        # Selecting the chosen rows would make the host wait for the device (their number decides the
        # shapes); on a GPU every row is jittered and torch.where keeps the chosen ones.
        piece = x
        for j in order:
            if ops[j] is not None:
                piece = ops[j](piece, factors[:, j])
        return torch.where(_per_sample(applied), piece, x)
    rows = applied.nonzero().squeeze(1)  # on a CPU only the chosen rows are computed
    piece = x[rows]
    for j in order:
        if ops[j] is not None and len(piece):
            piece = ops[j](piece, factors[rows, j])
    out = x.clone()
    out[rows] = piece
    return out


def random_grayscale(x: Tensor, p: float = 0.2, generator: torch.Generator | None = None) -> Tensor:
    """Replace a sample by its luma in all three channels with probability p."""
    _check_images(x)
    _check_probability(p)
    if p == 0 or x.shape[1] == 1:
        return x
    gray = _coin(p, x.shape[0], generator, x.device)
    return torch.where(_per_sample(gray), _gray(x).expand_as(x), x)


def _check_kernel(kernel_size: int, height: int, width: int) -> None:
    if kernel_size < 1 or kernel_size % 2 == 0:
        raise ValueError(f"kernel_size must be a positive odd integer, got {kernel_size}")
    if kernel_size // 2 >= min(height, width):
        raise ValueError(f"kernel_size {kernel_size} is too large for {height} x {width} images")


def blur(x: Tensor, kernel_size: int, sigma: Tensor) -> Tensor:
    """Gaussian blur with one sigma per sample (shape (B,)), reflect padding.

    Separable and depthwise: the batch is folded into channels, (1, B*C, H, W), so one
    grouped convolution per axis applies B*C different kernels at once.
    """
    _check_images(x)
    batch, channels, height, width = x.shape
    _check_kernel(kernel_size, height, width)
    half = kernel_size // 2
    taps = torch.arange(-half, half + 1, dtype=x.dtype, device=x.device)
    kernels = torch.exp(-0.5 * (taps[None, :] / sigma.to(x)[:, None]) ** 2)
    kernels = (kernels / kernels.sum(dim=1, keepdim=True)).repeat_interleave(channels, dim=0)
    folded = F.pad(x.reshape(1, batch * channels, height, width), [half] * 4, mode="reflect")
    folded = F.conv2d(folded, kernels.view(-1, 1, kernel_size, 1), groups=batch * channels)
    folded = F.conv2d(folded, kernels.view(-1, 1, 1, kernel_size), groups=batch * channels)
    return folded.view(batch, channels, height, width)


def gaussian_blur(
    x: Tensor,
    kernel_size: int,
    sigma: tuple[float, float] = (0.1, 2.0),
    p: float = 0.5,
    generator: torch.Generator | None = None,
) -> Tensor:
    """With probability p per sample, blur with a sigma drawn uniformly from `sigma`."""
    _check_images(x)
    _check_probability(p)
    _check_kernel(kernel_size, x.shape[2], x.shape[3])
    if not 0.0 < sigma[0] <= sigma[1]:
        raise ValueError(f"sigma must satisfy 0 < sigma[0] <= sigma[1], got {sigma}")
    if p == 0:
        return x
    sigmas = _uniform(sigma[0], sigma[1], x.shape[0], generator, x.device)
    chosen = _coin(p, x.shape[0], generator, x.device)
    return torch.where(_per_sample(chosen), blur(x, kernel_size, sigmas), x)


def solarize(
    x: Tensor, threshold: float = 0.5, p: float = 0.0, generator: torch.Generator | None = None
) -> Tensor:
    """With probability p per sample, invert every pixel at or above `threshold`."""
    _check_images(x)
    _check_probability(p)
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    if p == 0:
        return x
    chosen = _per_sample(_coin(p, x.shape[0], generator, x.device))
    # 1 - x clamped: a pixel a float rounding above 1 (after blur or jitter) must not invert below 0
    return torch.where(chosen & (x >= threshold), (1 - x).clamp_min(0.0), x)


@dataclass(frozen=True)
class Recipe:
    """One view's augmentation: crop -> flip -> jitter -> grayscale -> blur -> solarize."""

    size: int = 32
    scale: tuple[float, float] = (0.08, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    jitter: tuple[float, float, float, float] = (0.4, 0.4, 0.4, 0.1)
    jitter_p: float = 0.8
    gray_p: float = 0.2
    blur_p: float = 0.0
    blur_kernel: int = 3
    blur_sigma: tuple[float, float] = (0.1, 2.0)
    solarize_p: float = 0.0


# SimCLR's CIFAR-10 recipe (Chen et al. 2020, appendix B.9): colour strength s = 0.5,
# i.e. ColorJitter(0.8s, 0.8s, 0.8s, 0.2s), and no blur on 32 x 32 images.
SIMCLR_CIFAR = Recipe()

# The recipes of the other methods, all here so that no method imports another.
# InstDisc's CIFAR/ImageNet recipe, milder than SimCLR's (crops of at least 20%, jitter always on);
# InvaSpread and MoCo v1 adopted it.
INSTDISC_CIFAR = Recipe(scale=(0.2, 1.0), jitter=(0.4, 0.4, 0.4, 0.4), jitter_p=1.0, gray_p=0.2)
# MoCo v2: SimCLR's recipe plus a blur.
MOCOV2_CIFAR = replace(SIMCLR_CIFAR, blur_p=0.5, blur_kernel=3)
# CMC: random crop and flip only; colour is one of its views.
CMC_CIFAR = Recipe(scale=(0.2, 1.0), jitter_p=0.0, gray_p=0.0)
# CPC: mild augmentation of the whole image; predicting unseen patches is the pretext task.
CPC_CIFAR = Recipe(scale=(0.5, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, gray_p=0.2)
# DINO's crops: global ones cover 40-100% of the image, local ones 5-40%, at half the size.
DINO_GLOBAL = Recipe(scale=(0.4, 1.0), jitter=(0.4, 0.4, 0.2, 0.1))
DINO_LOCAL = Recipe(size=16, scale=(0.05, 0.4), jitter=(0.4, 0.4, 0.2, 0.1))
# CLIP: crops of at least half the image and flips; no colour change, since the captions name colours.
CLIP_CIFAR = Recipe(scale=(0.5, 1.0), jitter_p=0.0, gray_p=0.0)


def augment(images: Tensor, recipe: Recipe, generator: torch.Generator | None = None) -> Tensor:
    """One random view of each image: uint8 or float (B, C, H, W) -> float (B, C, size, size) in
    [0, 1], on the images' device. The encoder standardises it (`models.Standardize`)."""
    x = to_float(images)
    x = random_resized_crop(x, recipe.size, recipe.scale, recipe.ratio, generator)
    x = horizontal_flip(x, recipe.flip_p, generator)
    x = color_jitter(x, *recipe.jitter, p=recipe.jitter_p, generator=generator)
    x = random_grayscale(x, recipe.gray_p, generator)
    x = gaussian_blur(x, recipe.blur_kernel, recipe.blur_sigma, recipe.blur_p, generator)
    return solarize(x, p=recipe.solarize_p, generator=generator)


def eval_transform(images: Tensor) -> Tensor:
    """The deterministic transform for evaluation: uint8 -> float in [0, 1] (the encoder standardises)."""
    return to_float(images)


# CIE Lab (D65 white), the colour space CMC splits into a lightness view L and a colour view ab.
_RGB_TO_XYZ = (
    (0.4124564, 0.3575761, 0.1804375),
    (0.2126729, 0.7151522, 0.0721750),
    (0.0193339, 0.1191920, 0.9503041),
)
# The white point is the image of RGB white, the row sums of the matrix (0.95046, 1.0, 1.08883),
# so grays map to a = b = 0 exactly.
_WHITE_D65 = tuple(sum(row) for row in _RGB_TO_XYZ)
_LAB_EPSILON, _LAB_KAPPA = 216 / 24389, 24389 / 27


def rgb_to_lab(x: Tensor) -> Tensor:
    """sRGB images (B, 3, H, W) in [0, 1] -> CIE Lab (L in [0, 100], a and b roughly in [-128, 127])."""
    _check_images(x)
    linear = torch.where(x <= 0.04045, x / 12.92, ((x + 0.055) / 1.055) ** 2.4)
    matrix = torch.tensor(_RGB_TO_XYZ, dtype=x.dtype, device=x.device)
    xyz = torch.einsum("ij,bjhw->bihw", matrix, linear)
    xyz = xyz / torch.tensor(_WHITE_D65, dtype=x.dtype, device=x.device).view(1, 3, 1, 1)
    f = torch.where(xyz > _LAB_EPSILON, xyz.clamp_min(1e-12) ** (1 / 3), (_LAB_KAPPA * xyz + 16) / 116)
    return torch.stack([116 * f[:, 1] - 16, 500 * (f[:, 0] - f[:, 1]), 200 * (f[:, 1] - f[:, 2])], dim=1)


def lab_to_rgb(lab: Tensor) -> Tensor:
    """The inverse of `rgb_to_lab` (values outside the sRGB gamut are not clipped)."""
    fy = (lab[:, 0] + 16) / 116
    f = torch.stack([fy + lab[:, 1] / 500, fy, fy - lab[:, 2] / 200], dim=1)
    xyz = torch.where(f**3 > _LAB_EPSILON, f**3, (116 * f - 16) / _LAB_KAPPA)
    xyz = xyz * torch.tensor(_WHITE_D65, dtype=lab.dtype, device=lab.device).view(1, 3, 1, 1)
    inverse = torch.linalg.inv(torch.tensor(_RGB_TO_XYZ, dtype=torch.float64)).to(lab.dtype).to(lab.device)
    linear = torch.einsum("ij,bjhw->bihw", inverse, xyz)
    return torch.where(linear <= 0.0031308, 12.92 * linear, 1.055 * linear.clamp_min(0) ** (1 / 2.4) - 0.055)
