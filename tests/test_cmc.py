"""CMC's package pieces: the multiview loss, the Lab split, the half-width encoders, options end to end."""

import math

import pytest
import torch
import torch.nn.functional as F

from contrastive.__main__ import main
from contrastive.augment import lab_to_rgb
from contrastive.losses import multiview_info_nce
from contrastive.methods import build_method
from contrastive.methods.cmc import split_lab
from contrastive.models import build_backbone, count_parameters
from contrastive.train import evaluate_checkpoint, train


def direction(a: torch.Tensor, b: torch.Tensor, tau: float) -> torch.Tensor:
    """-1/N sum_n log exp(a_n.b_n/tau) / sum_m exp(a_n.b_m/tau), written out with loops."""
    a, b = F.normalize(a, dim=1), F.normalize(b, dim=1)
    total = 0.0
    for n in range(len(a)):
        scores = [math.exp((a[n] @ b[m]).item() / tau) for m in range(len(b))]
        total += -math.log(scores[n] / sum(scores))
    return torch.tensor(total / len(a))


def test_two_view_loss_is_the_sum_of_both_directions():
    torch.manual_seed(0)
    v1, v2 = torch.randn(6, 5, dtype=torch.float64), torch.randn(6, 5, dtype=torch.float64)
    expected = direction(v1, v2, 0.3) + direction(v2, v1, 0.3)
    for graph in ("core", "full"):
        got = multiview_info_nce([v1, v2], temperature=0.3, graph=graph)
        assert torch.allclose(got.double(), expected.double(), atol=1e-5)
    one_way = direction(v1, v2, 0.3)
    assert not torch.allclose(multiview_info_nce([v1, v2], 0.3).double(), one_way.double(), atol=1e-3)


def test_core_view_sums_pairs_with_the_first_view_and_full_graph_sums_all_pairs():
    torch.manual_seed(1)
    views = [torch.randn(5, 4) for _ in range(3)]
    pair = lambda i, j: multiview_info_nce([views[i], views[j]], temperature=0.5)  # noqa: E731
    core = multiview_info_nce(views, temperature=0.5, graph="core")
    full = multiview_info_nce(views, temperature=0.5, graph="full")
    assert torch.allclose(core, pair(0, 1) + pair(0, 2), atol=1e-5)
    assert torch.allclose(full, pair(0, 1) + pair(0, 2) + pair(1, 2), atol=1e-5)
    assert not torch.allclose(core, full)


def test_multiview_loss_refuses_bad_input():
    v = torch.randn(4, 3)
    with pytest.raises(ValueError, match="at least two views"):
        multiview_info_nce([v], 0.1)
    with pytest.raises(ValueError, match=r"\(4, 3\).*\(5, 3\)"):
        multiview_info_nce([v, torch.randn(5, 3)], 0.1)
    with pytest.raises(ValueError, match="graph"):
        multiview_info_nce([v, v], 0.1, graph="star")
    with pytest.raises(ValueError, match="temperature"):
        multiview_info_nce([v, v], 0.0)


def test_split_lab_separates_lightness_from_colour():
    gray = torch.full((1, 3, 2, 2), 0.5)
    lightness, colour = split_lab(gray)
    assert lightness.shape == (1, 1, 2, 2) and colour.shape == (1, 2, 2, 2)
    assert torch.allclose(colour, torch.zeros_like(colour), atol=1e-5)  # a gray has no colour
    # Two images with the same L and different ab: identical lightness views, different colour views.
    lab = torch.zeros(2, 3, 4, 4)
    lab[:, 0] = 60
    lab[0, 1], lab[1, 2] = 20, -25
    rgb = lab_to_rgb(lab)
    assert rgb.min() > 0 and rgb.max() < 1  # inside the sRGB gamut, so nothing is clipped
    lightness, colour = split_lab(rgb)
    assert torch.allclose(lightness[0], lightness[1], atol=1e-4)
    assert (colour[0] - colour[1]).abs().max() > 0.1


def test_half_width_encoders_together_are_as_wide_as_the_single_view_encoder():
    torch.manual_seed(0)
    lab = build_method("cmc", "convnet_small", 10)
    rgb = build_method("cmc", "convnet_small", 10, views="rgb")
    assert lab.encoder.l_net.features[0][0].in_channels == 1
    assert lab.encoder.ab_net.features[0][0].in_channels == 2
    assert lab.encoder.l_net.out_dim == lab.encoder.ab_net.out_dim == 128
    assert lab.encoder.out_dim == rgb.encoder.out_dim == 256
    # Convolution weights scale with the square of the width: half as many parameters in all.
    ratio = count_parameters(lab.encoder) / count_parameters(rgb.encoder)
    assert 0.45 < ratio < 0.55


def test_lightness_features_ignore_colour():
    torch.manual_seed(0)
    method = build_method("cmc", "convnet_tiny", 10).eval()
    lab = torch.zeros(2, 3, 32, 32)
    lab[:, 0] = torch.linspace(30, 70, 32)
    lab[0, 1], lab[1, 1] = 15, -15
    x = lab_to_rgb(lab).clamp(0, 1)
    h_l, h_ab = method.encoder.views(x)
    assert torch.allclose(h_l[0], h_l[1], atol=1e-4)
    assert not torch.allclose(h_ab[0], h_ab[1], atol=1e-3)
    assert torch.allclose(method.encoder(x), torch.cat([h_l, h_ab], dim=1))


def test_build_width_and_option_errors():
    assert build_backbone("convnet_small", width=0.5).out_dim == 128
    with pytest.raises(ValueError, match="width"):
        build_backbone("convnet_small", width=0)
    with pytest.raises(ValueError, match="views"):
        build_method("cmc", "convnet_tiny", 10, views="hsv")
    with pytest.raises(ValueError, match="no option 'view'.*views"):
        build_method("cmc", "convnet_tiny", 10, view="rgb")
    # the half-width encoders are built from the backbone's name: an instance cannot be halved
    with pytest.raises(TypeError, match="backbone's name.*builds its own encoders"):
        build_method("cmc", build_backbone("convnet_tiny"), 10)


@pytest.mark.parametrize("views", ["lab", "rgb"])
def test_cmc_trains_and_reports_the_bound_below_log_batch(tiny_data, tiny_profile, views):
    quiet = dict(data=tiny_data, progress=False, log=lambda *_: None, linear_probe=False)
    run = train("cmc", tiny_profile, method_options={"views": views}, **quiet)
    assert run.summary["method_options"] == {"views": views}
    for row in run.metrics:
        assert 0 <= row["view_accuracy"] <= 1
        assert row["infonce_estimate"] <= math.log(tiny_profile.batch_size)
    assert run.metrics[-1]["loss"] < run.metrics[0]["loss"]


def test_options_are_kept_in_the_checkpoint_for_evaluation_and_resume(tiny_data, tiny_profile, tmp_path):
    quiet = dict(data=tiny_data, progress=False, log=lambda *_: None, linear_probe=False)
    train("cmc", tiny_profile, out_dir=tmp_path, method_options={"views": "rgb"}, **quiet)
    with pytest.raises(ValueError, match="options"):
        train("cmc", tiny_profile, out_dir=tmp_path, resume=True, epochs=3, **quiet)
    result = evaluate_checkpoint(tmp_path, data=tiny_data, linear_probe=False)
    assert 0 <= result["knn_top1"] <= 1


def test_cli_option_syntax_errors_exit_with_usage(capsys):
    with pytest.raises(SystemExit) as exc:
        main(["train", "--method", "cmc", "--option", "views"])
    assert exc.value.code == 2
    assert "KEY=VALUE" in capsys.readouterr().err
