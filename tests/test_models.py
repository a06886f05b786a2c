import pytest
import torch

from contrastive.models import ViT, build_backbone, count_parameters, projection_mlp


@pytest.mark.parametrize("name, out_dim", [("convnet_tiny", 64), ("convnet_small", 256), ("resnet18", 512)])
@pytest.mark.parametrize("channels", [1, 3])
def test_backbones_map_images_to_out_dim_features(name, out_dim, channels):
    net = build_backbone(name, in_channels=channels, mean=(0.5,) * channels, std=(0.25,) * channels)
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


# ---- the ViT ------------------------------------------------------------------------------

VITS = [("vit_nano", 48, 2), ("vit_tiny", 64, 4), ("vit_small", 384, 12)]


@pytest.mark.parametrize("name, dim, depth", VITS)
@pytest.mark.parametrize("channels", [1, 3])
def test_vits_map_global_and_local_crops_and_medmnist_images_to_cls_features(name, dim, depth, channels):
    net = build_backbone(name, in_channels=channels, mean=(0.5,) * channels, std=(0.25,) * channels)
    assert isinstance(net, ViT) and net.out_dim == dim and len(net.blocks) == depth
    assert net.pos_embed.shape == (1, 1 + 8 * 8, dim)  # 32 px / patch 4: an 8 x 8 grid and the CLS token
    for size in (32, 16, 28):  # global crops, DINO's local crops, MedMNIST
        out = net(torch.randn(2, channels, size, size))
        assert out.shape == (2, dim) and torch.isfinite(out).all()


def test_vit_parameter_counts():
    counts = {name: count_parameters(build_backbone(name)) for name, _, _ in VITS}
    assert counts == {"vit_nano": 43_536, "vit_tiny": 141_376, "vit_small": 21_338_496}
    # ViT-S: 12 blocks of 12 d^2 + 13 d weights (d = 384), patch projection, tokens and final LN
    d = 384
    assert counts["vit_small"] == 12 * (12 * d * d + 13 * d) + (48 * d + d) + d + 65 * d + 2 * d


def test_the_patch_projection_is_a_shared_linear_map_of_each_non_overlapping_4x4_patch():
    net = build_backbone("vit_nano")
    x = torch.randn(2, 3, 32, 32)
    tokens = net.patch_embed(x).flatten(2).transpose(1, 2)  # (B, 64, dim), row-major over the grid
    patches = x.unfold(2, 4, 4).unfold(3, 4, 4).permute(0, 2, 3, 1, 4, 5).reshape(2, 64, 48)
    by_hand = patches @ net.patch_embed.weight.reshape(net.out_dim, 48).T + net.patch_embed.bias
    assert torch.allclose(tokens, by_hand, atol=1e-5)


def test_position_embeddings_are_used_as_learned_at_32_px_and_resampled_for_other_sizes():
    net = build_backbone("vit_nano")
    assert net._position_embedding(8, 8) is net.pos_embed
    small = net._position_embedding(4, 4)
    assert small.shape == (1, 17, 48) and torch.equal(small[:, 0], net.pos_embed[:, 0])  # CLS kept
    with torch.no_grad():  # a constant embedding resamples to the same constant
        net.pos_embed[:, 1:] = 0.3
    assert torch.allclose(net._position_embedding(4, 4)[:, 1:], torch.full((1, 16, 48), 0.3), atol=1e-6)


def test_the_feature_is_the_cls_token_and_each_image_is_embedded_independently():
    net = build_backbone("vit_nano")
    x = torch.randn(4, 3, 32, 32)
    both = net(x)
    assert torch.allclose(both[:2], net(x[:2]), atol=1e-5)  # no batch statistics: rows do not interact
    assert torch.allclose(
        both,
        net.norm(
            net.blocks(
                torch.cat(
                    [
                        net.cls_token.expand(4, -1, -1),
                        net.patch_embed(net.standardize(x)).flatten(2).transpose(1, 2),
                    ],
                    1,
                )
                + net.pos_embed
            )
        )[:, 0],
        atol=1e-6,
    )


def test_width_scales_a_vits_token_dimension_to_a_multiple_of_its_heads():
    assert build_backbone("vit_tiny", width=0.5).out_dim == 32
    assert build_backbone("vit_tiny", width=0.3).out_dim == 20  # 19.2 -> 5 heads x 4
    with pytest.raises(ValueError, match="dim 30 must be a multiple of heads 4"):
        ViT(dim=30, heads=4)


def test_a_frozen_patch_projection_keeps_its_random_init_while_the_rest_of_the_vit_trains():
    torch.manual_seed(0)
    net = build_backbone("vit_nano").freeze_patch_projection()
    patch = [p.clone() for p in net.patch_embed.parameters()]
    rest = {n: p.clone() for n, p in net.named_parameters() if not n.startswith("patch_embed.")}
    assert not any(p.requires_grad for p in net.patch_embed.parameters())
    optimizer = torch.optim.AdamW(net.parameters(), lr=1e-2, weight_decay=0.1)
    for seed in range(3):
        optimizer.zero_grad()
        net(torch.randn(8, 3, 32, 32, generator=torch.Generator().manual_seed(seed))).pow(2).sum().backward()
        optimizer.step()
    assert net.patch_embed.weight.grad is None
    assert all(torch.equal(a, b) for a, b in zip(patch, net.patch_embed.parameters()))
    assert all(not torch.equal(rest[n], p) for n, p in net.named_parameters() if n in rest)


def test_a_backbone_standardises_its_input_with_the_data_statistics_and_nowhere_else():
    from contrastive.data import CIFAR10_MEAN, CIFAR10_STD

    torch.manual_seed(0)
    backbone = build_backbone("convnet_tiny").eval()  # CIFAR-10's statistics by default
    torch.manual_seed(0)
    plain = build_backbone("convnet_tiny", mean=None, std=None).eval()
    x = torch.rand(4, 3, 32, 32)
    mean, std = torch.tensor(CIFAR10_MEAN).view(1, 3, 1, 1), torch.tensor(CIFAR10_STD).view(1, 3, 1, 1)
    assert torch.equal(backbone(x), plain((x - mean) / std))
    assert not torch.allclose(backbone(x), plain(x))  # a wrong (missing) standardisation shows
    assert backbone.state_dict()["standardize.mean"].tolist() == pytest.approx(list(CIFAR10_MEAN))


def test_statistics_that_do_not_match_the_channels_are_refused_naming_what_to_pass():
    with pytest.raises(ValueError, match="one entry per channel: 3 given for 1 channels"):
        build_backbone("convnet_tiny", in_channels=1)
    with pytest.raises(ValueError, match="both None"):
        build_backbone("convnet_tiny", mean=(0.5, 0.5, 0.5), std=None)
