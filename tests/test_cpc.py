"""CPC's package pieces: the patch grid, the causal context, the pooled encoder, the per-offset accuracy."""

import torch

from contrastive.methods import build_method
from contrastive.methods.cpc import PATCH, STRIDE, patch_grid
from contrastive.train import train


def test_patch_grid_cuts_overlapping_16px_patches_at_stride_8():
    x = torch.arange(2 * 3 * 32 * 32, dtype=torch.float32).view(2, 3, 32, 32)
    grid = patch_grid(x)
    assert grid.shape == (2, 3, 3, 3, PATCH, PATCH)
    for r in range(3):
        for c in range(3):
            window = x[:, :, r * STRIDE : r * STRIDE + PATCH, c * STRIDE : c * STRIDE + PATCH]
            assert torch.equal(grid[:, r, c], window)


def test_context_at_a_row_never_sees_the_rows_below():
    torch.manual_seed(0)
    method = build_method("cpc", "convnet_tiny", num_images=10)
    z = torch.randn(4, 3, method.context.input_size)  # (columns, rows, D)
    changed = z.clone()
    changed[:, 2] += 10.0  # alter the last row only
    before, after = method.context(z)[0], method.context(changed)[0]
    assert torch.allclose(before[:, :2], after[:, :2]) and not torch.allclose(before[:, 2], after[:, 2])


def test_the_evaluated_encoder_is_the_mean_of_patch_features():
    torch.manual_seed(0)
    method = build_method("cpc", "convnet_tiny", num_images=10).eval()
    x = torch.randn(2, 3, 32, 32)
    per_patch = method.encoder.patch_features(x)
    assert per_patch.shape == (2, 3, 3, 64)
    assert torch.allclose(method.encoder(x), per_patch.mean(dim=(1, 2)))


def test_cpc_trains_through_the_loop_and_reports_accuracy_per_offset(tiny_data, tiny_profile):
    quiet = dict(data=tiny_data, progress=False, log=lambda *_: None, linear_probe=False)
    run = train("cpc", tiny_profile, method_options={"num_negatives": 64}, **quiet)
    for row in run.metrics:
        assert 0 <= row["cpc_accuracy_k1"] <= 1 and 0 <= row["cpc_accuracy_k2"] <= 1
    assert run.metrics[-1]["loss"] < run.metrics[0]["loss"]
