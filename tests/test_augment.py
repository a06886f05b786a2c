"""Properties of the batched augmentations in contrastive.augment (and their benchmark)."""

import colorsys
import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from contrastive.augment import (
    SIMCLR_CIFAR,
    Recipe,
    adjust_brightness,
    adjust_contrast,
    adjust_hue,
    adjust_saturation,
    augment,
    blur,
    color_jitter,
    eval_transform,
    gaussian_blur,
    horizontal_flip,
    random_grayscale,
    random_resized_crop,
    sample_crop_boxes,
    solarize,
    to_float,
)
from contrastive.bench import bench_augment, format_table

FEW = settings(max_examples=12, deadline=None)

# Every op with a probability, called with that probability and a generator.
RANDOM_OPS = {
    "flip": lambda x, p, g: horizontal_flip(x, p=p, generator=g),
    "jitter": lambda x, p, g: color_jitter(x, p=p, generator=g),
    "grayscale": lambda x, p, g: random_grayscale(x, p=p, generator=g),
    "blur": lambda x, p, g: gaussian_blur(x, 3, p=p, generator=g),
    "solarize": lambda x, p, g: solarize(x, p=p, generator=g),
}


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def images(batch: int, channels: int, height: int, width: int, seed: int = 0) -> torch.Tensor:
    return torch.rand(batch, channels, height, width, generator=seeded(seed))


def recipe_for(channels: int, size: int) -> Recipe:
    return Recipe(size=size, blur_p=0.5, solarize_p=0.5)  # one recipe serves 1 and 3 channels


shapes = st.tuples(st.integers(1, 9), st.sampled_from([1, 3]), st.integers(8, 32), st.integers(8, 32))


@FEW
@given(shape=shapes, size=st.integers(8, 32), seed=st.integers(0, 2**16))
def test_every_op_keeps_batch_channels_dtype_and_device(shape, size, seed):
    x = images(*shape, seed=seed)
    g = seeded(seed)
    for name, op in RANDOM_OPS.items():
        out = op(x, 0.5, g)
        assert out.shape == x.shape and out.dtype == torch.float32, name
        assert out.device == x.device, name
    crop = random_resized_crop(x, size, generator=g)
    assert crop.shape == (shape[0], shape[1], size, size) and crop.dtype == torch.float32
    uint8 = (x * 255).to(torch.uint8)
    view = augment(uint8, recipe_for(shape[1], size), generator=g)
    assert view.shape == (shape[0], shape[1], size, size) and view.dtype == torch.float32
    assert view.device == uint8.device and 0 <= view.min() and view.max() <= 1  # the encoder standardises


@FEW
@given(shape=shapes, size=st.integers(8, 32), seed=st.integers(0, 2**16))
def test_every_op_keeps_values_in_unit_interval(shape, size, seed):
    x = images(*shape, seed=seed)
    g = seeded(seed)
    outputs = {name: op(x, 1.0, g) for name, op in RANDOM_OPS.items()}
    outputs["crop"] = random_resized_crop(x, size, generator=g)
    for name, out in outputs.items():
        assert out.min() >= 0 and out.max() <= 1, name


@pytest.mark.parametrize("name", RANDOM_OPS)
@pytest.mark.parametrize("channels", [1, 3])
def test_probability_zero_is_the_bitwise_identity(name, channels):
    x = images(16, channels, 12, 12)
    out = RANDOM_OPS[name](x, 0.0, seeded())
    assert torch.equal(out, x)


def test_flip_with_probability_one_mirrors_every_sample():
    x = images(8, 3, 10, 10)
    assert torch.equal(horizontal_flip(x, p=1.0, generator=seeded()), x.flip(-1))


def test_solarize_with_probability_one_inverts_pixels_at_or_above_threshold():
    x = images(8, 3, 10, 10)
    x[0, 0, 0, 0] = 0.5  # the threshold itself is inverted
    expected = torch.where(x >= 0.5, 1 - x, x)
    assert torch.equal(solarize(x, threshold=0.5, p=1.0, generator=seeded()), expected)


def test_grayscale_with_probability_one_is_the_luma_in_all_three_channels():
    x = images(8, 3, 10, 10)
    out = random_grayscale(x, p=1.0, generator=seeded())
    luma = 0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]
    for channel in range(3):
        torch.testing.assert_close(out[:, channel], luma)


def test_jitter_with_probability_one_changes_every_sample():
    x = torch.full((32, 3, 6, 6), 0.5)
    out = color_jitter(x, brightness=0.5, contrast=0, saturation=0, hue=0, p=1.0)
    assert (out != x).flatten(1).all(dim=1).all()


def test_jitter_applies_to_about_p_of_the_samples():
    x = torch.full((2000, 3, 2, 2), 0.5)
    out = color_jitter(x, brightness=0.5, contrast=0, saturation=0, hue=0, p=0.3, generator=seeded())
    changed = (out != x).flatten(1).any(dim=1).float().mean().item()
    assert abs(changed - 0.3) < 0.05


def test_crop_of_whole_square_image_at_same_size_reproduces_input():
    x = images(5, 3, 16, 16)
    out = random_resized_crop(x, 16, scale=(1.0, 1.0), ratio=(1.0, 1.0), generator=seeded())
    torch.testing.assert_close(out, x, atol=1e-5, rtol=0)


@FEW
@given(
    low=st.floats(0.05, 0.5),
    high=st.floats(0.05, 0.5),
    log_ratio=st.floats(0.0, 0.3),
    seed=st.integers(0, 2**16),
)
def test_crop_boxes_have_requested_area_fraction_and_aspect_ratio(low, high, log_ratio, seed):
    scale, ratio = (min(low, high), max(low, high)), (math.exp(-log_ratio), math.exp(log_ratio))
    top, left, h, w = sample_crop_boxes(256, 32, 32, scale, ratio, generator=seeded(seed))
    # The widest allowed box, sqrt(0.5 * 1024 * 1.35) ~ 26 pixels, always fits a 32 x 32 image.
    area = h * w / (32 * 32)
    assert area.min() >= scale[0] - 1e-6 and area.max() <= scale[1] + 1e-6
    aspect = w / h
    assert aspect.min() >= ratio[0] - 1e-6 and aspect.max() <= ratio[1] + 1e-6
    assert top.min() >= 0 and (top + h).max() <= 32 + 1e-4
    assert left.min() >= 0 and (left + w).max() <= 32 + 1e-4


def test_crop_boxes_fall_back_to_central_crop_when_nothing_fits():
    # A 2:1 box covering the whole of a square image cannot exist.
    top, left, h, w = sample_crop_boxes(4, 32, 32, (1.0, 1.0), (2.0, 2.0), generator=seeded())
    assert torch.equal(w, torch.full((4,), 32.0)) and torch.equal(h, torch.full((4,), 16.0))
    assert torch.equal(top, torch.full((4,), 8.0)) and torch.equal(left, torch.zeros(4))


def test_copies_of_one_image_get_independent_views():
    one = (images(1, 3, 32, 32) * 255).to(torch.uint8)
    views = augment(one.expand(64, -1, -1, -1), SIMCLR_CIFAR, generator=seeded())
    flat = views.flatten(1)
    distinct = torch.cdist(flat, flat) > 1e-3
    pairs = 64 * 63
    assert distinct.sum().item() >= 0.95 * pairs


def test_same_seed_gives_identical_views_and_different_seeds_differ():
    x = (images(16, 3, 32, 32) * 255).to(torch.uint8)
    a = augment(x, SIMCLR_CIFAR, generator=seeded(1))
    b = augment(x, SIMCLR_CIFAR, generator=seeded(1))
    c = augment(x, SIMCLR_CIFAR, generator=seeded(2))
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


def test_augment_treats_uint8_and_float_input_alike():
    x = (images(8, 3, 32, 32) * 255).to(torch.uint8)
    a = augment(x, SIMCLR_CIFAR, generator=seeded(3))
    b = augment(to_float(x), SIMCLR_CIFAR, generator=seeded(3))
    assert torch.equal(a, b)


@FEW
@given(value=st.floats(0, 1), factor=st.floats(0, 2))
def test_brightness_factor_scales_a_constant_image_and_clamps(value, factor):
    x = torch.full((1, 3, 4, 4), value)
    out = adjust_brightness(x, torch.tensor([factor]))
    torch.testing.assert_close(out, torch.full_like(x, min(1.0, factor * value)))


def test_weak_jitter_keeps_each_sample_close_to_its_own_input():
    # The ops run on the gathered subset of applied samples; a row mix-up would show as a big change.
    x = images(64, 3, 8, 8)
    out = color_jitter(x, 0.02, 0.02, 0.02, 0.005, p=1.0, generator=seeded())
    assert (out - x).abs().max() < 0.1
    assert (out != x).flatten(1).any(dim=1).all()


def test_jitter_brightness_factor_lies_within_strength():
    x = torch.full((500, 3, 2, 2), 0.4)
    out = color_jitter(x, brightness=0.3, contrast=0, saturation=0, hue=0, p=1.0)
    factor = out / 0.4
    assert factor.min() >= 0.7 - 1e-5 and factor.max() <= 1.3 + 1e-5
    # a constant image stays constant: one factor per sample
    assert torch.equal(out.amin(dim=(1, 2, 3)), out.amax(dim=(1, 2, 3)))


def test_contrast_and_saturation_zero_give_mean_gray_and_grayscale():
    x = images(4, 3, 6, 6)
    luma = (0.299 * x[:, 0] + 0.587 * x[:, 1] + 0.114 * x[:, 2]).unsqueeze(1)
    zero = torch.zeros(4)
    gray = adjust_saturation(x, zero)
    torch.testing.assert_close(gray, luma.expand_as(x))
    flat = adjust_contrast(x, zero)
    torch.testing.assert_close(flat, luma.mean(dim=(1, 2, 3), keepdim=True).expand_as(x))


def test_hue_shift_of_zero_leaves_the_image_unchanged():
    x = images(6, 3, 8, 8)
    torch.testing.assert_close(adjust_hue(x, torch.zeros(6)), x, atol=1e-5, rtol=0)


def test_hue_shift_and_its_inverse_return_a_saturated_image():
    x = images(6, 3, 8, 8)
    x[:, 0] = 1.0  # fully saturated: one channel at 1, one at 0
    x[:, 2] = 0.0
    shift = torch.linspace(-0.5, 0.5, 6)
    back = adjust_hue(adjust_hue(x, shift), -shift)
    torch.testing.assert_close(back, x, atol=1e-5, rtol=0)


def test_hue_shift_matches_colorsys_pixel_by_pixel():
    x = images(3, 3, 4, 4)
    shift = torch.tensor([0.13, -0.37, 0.5])
    out = adjust_hue(x, shift)
    for i in range(3):
        for row in range(4):
            for col in range(4):
                h, s, v = colorsys.rgb_to_hsv(*x[i, :, row, col].tolist())
                rgb = colorsys.hsv_to_rgb((h + shift[i].item()) % 1.0, s, v)
                torch.testing.assert_close(out[i, :, row, col], torch.tensor(rgb), atol=1e-5, rtol=0)


def test_gaussian_blur_preserves_a_constant_image():
    x = torch.full((4, 3, 9, 9), 0.3)
    out = gaussian_blur(x, 5, sigma=(0.1, 3.0), p=1.0, generator=seeded())
    torch.testing.assert_close(out, x)


def test_batched_blur_matches_blurring_one_image_at_a_time():
    x = images(5, 3, 12, 10)
    sigmas = torch.tensor([0.2, 0.7, 1.0, 1.6, 2.5])
    out = blur(x, 5, sigmas)
    taps = torch.arange(-2, 3, dtype=torch.float32)
    for i, sigma in enumerate(sigmas):
        kernel = torch.exp(-(taps**2) / (2 * sigma**2))
        kernel = torch.outer(kernel, kernel) / kernel.sum() ** 2
        padded = F.pad(x[i : i + 1], [2, 2, 2, 2], mode="reflect")
        reference = F.conv2d(padded, kernel.expand(3, 1, 5, 5), groups=3)
        torch.testing.assert_close(out[i : i + 1], reference)
    fixed = gaussian_blur(x, 5, sigma=(1.0, 1.0), p=1.0, generator=seeded())
    torch.testing.assert_close(fixed, blur(x, 5, torch.ones(5)))


def test_eval_transform_gives_floats_in_the_unit_interval_and_leaves_standardising_to_the_encoder():
    x = torch.randint(0, 256, (4, 3, 8, 8), dtype=torch.uint8)
    torch.testing.assert_close(eval_transform(x), x.float() / 255)
    assert not torch.equal(eval_transform(x), (x.float() / 255 - 0.5) / 0.25)  # nothing else is applied


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda x: random_resized_crop(x, 8, scale=(0.0, 1.0)), "scale"),
        (lambda x: random_resized_crop(x, 8, scale=(0.5, 1.2)), "scale"),
        (lambda x: random_resized_crop(x, 8, ratio=(2.0, 1.0)), "ratio"),
        (lambda x: horizontal_flip(x, p=1.5), "probability"),
        (lambda x: color_jitter(x, p=-0.1), "probability"),
        (lambda x: color_jitter(x, brightness=-0.1), "non-negative"),
        (lambda x: color_jitter(x, hue=0.6), "hue"),
        (lambda x: gaussian_blur(x, 4), "odd"),
        (lambda x: gaussian_blur(x, 3, sigma=(0.0, 1.0)), "sigma"),
        (lambda x: solarize(x, threshold=1.5, p=1.0), "threshold"),
        (lambda x: horizontal_flip(x[0]), "B, C, H, W"),
        (lambda x: to_float(x.long()), "uint8 or float"),
    ],
)
def test_invalid_arguments_raise_value_error_naming_the_problem(call, message):
    with pytest.raises(ValueError, match=message):
        call(images(2, 3, 8, 8))


def test_bench_augment_reports_a_positive_rate_for_each_pipeline():
    rows = bench_augment(batch_sizes=(8,), seconds=0.05)
    pipelines = {row["pipeline"] for row in rows}
    assert {"batched", "per_image_loop"} <= pipelines
    for row in rows:
        assert set(row) == {
            "pipeline",
            "batch_size",
            "images_per_second",
            "device",
            "torch",
            "torchvision",
        }
        assert row["batch_size"] == 8 and row["images_per_second"] > 0
    table = format_table(rows)
    assert "batched" in table and "per_image_loop" in table


def test_solarize_keeps_a_pixel_rounded_above_one_inside_the_unit_interval():
    x = torch.tensor([1.0 + 2**-23, 0.75, 0.25]).view(1, 1, 1, 3)  # one float step above 1, as after blur
    out = solarize(x, p=1.0, generator=seeded())
    assert out.min() >= 0 and torch.allclose(out, torch.tensor([0.0, 0.25, 0.25]).view(1, 1, 1, 3))
    assert (1 - x).min() < 0  # control: the unclamped inversion leaves the interval
