"""The Lab conversion CMC uses to split an image into a lightness view and a colour view."""

import pytest
import torch

from contrastive.augment import lab_to_rgb, rgb_to_lab


def pixel(r, g, b):
    return torch.tensor([r, g, b], dtype=torch.float64).view(1, 3, 1, 1)


@pytest.mark.parametrize(
    "rgb, lab",
    [
        ((1.0, 1.0, 1.0), (100.0, 0.0, 0.0)),
        ((0.0, 0.0, 0.0), (0.0, 0.0, 0.0)),
        ((1.0, 0.0, 0.0), (53.2408, 80.0925, 67.2032)),  # sRGB red, D65
        ((0.0, 1.0, 0.0), (87.7347, -86.1827, 83.1793)),
        ((0.0, 0.0, 1.0), (32.2970, 79.1875, -107.8602)),
    ],
)
def test_reference_colours_have_their_published_lab_values(rgb, lab):
    assert torch.allclose(
        rgb_to_lab(pixel(*rgb)).flatten(), torch.tensor(lab, dtype=torch.float64), atol=2e-3
    )


def test_rgb_to_lab_and_back_is_the_identity_on_random_images():
    x = torch.rand(8, 3, 16, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert (lab_to_rgb(rgb_to_lab(x)) - x).abs().max() < 1e-9
    x32 = x.float()
    assert (lab_to_rgb(rgb_to_lab(x32)) - x32).abs().max() < 1e-4


def test_grays_have_no_colour():
    gray = torch.linspace(0, 1, 11, dtype=torch.float64).view(1, 1, 1, 11).expand(1, 3, 1, 11)
    lab = rgb_to_lab(gray.contiguous())
    assert lab[:, 1:].abs().max() < 1e-6
    assert torch.all(lab[0, 0, 0, 1:] > lab[0, 0, 0, :-1])  # lightness increases with the gray level
