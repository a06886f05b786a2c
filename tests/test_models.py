import pytest
import torch

from contrastive.models import build_backbone, count_parameters, projection_mlp


@pytest.mark.parametrize("name, out_dim", [("convnet_tiny", 64), ("convnet_small", 256), ("resnet18", 512)])
@pytest.mark.parametrize("channels", [1, 3])
def test_backbones_map_images_to_out_dim_features(name, out_dim, channels):
    net = build_backbone(name, in_channels=channels)
    assert net.out_dim == out_dim
    assert net(torch.randn(2, channels, 32, 32)).shape == (2, out_dim)
    assert net(torch.randn(2, channels, 28, 28)).shape == (2, out_dim)  # MedMNIST size


def test_parameter_counts_match_the_profile_sizing():
    assert 0.35e6 < count_parameters(build_backbone("convnet_small")) < 0.45e6
    assert 11.0e6 < count_parameters(build_backbone("resnet18")) < 11.3e6  # the CIFAR ResNet-18


def test_cifar_resnet18_keeps_full_resolution_in_its_stem():
    net = build_backbone("resnet18")
    assert net.stem(torch.randn(1, 3, 32, 32)).shape[-2:] == (32, 32)  # 3x3 stride-1 stem, no max-pool


def test_unknown_backbone_lists_the_valid_names():
    with pytest.raises(ValueError, match="convnet_small"):
        build_backbone("vgg")


def test_projection_head_shapes():
    head = projection_mlp(256, 512, 128, num_layers=3, last_bn=True)
    assert head(torch.randn(4, 256)).shape == (4, 128)
    assert sum(isinstance(m, torch.nn.Linear) for m in head) == 3
