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


def _scored_negatives(monkeypatch, num_negatives, images=8):
    """Run one CPC step and return, per offset, (targets, negatives, excluded) as InfoNCE saw them."""
    import contrastive.methods.cpc as cpc_module

    seen = []
    original = cpc_module.info_nce

    def spy(query, target, negatives, temperature, exclude=None):
        excluded = torch.zeros(len(query), len(negatives), dtype=torch.bool) if exclude is None else exclude
        seen.append((target.detach(), negatives.detach(), excluded))
        return original(query, target, negatives, temperature, exclude=exclude)

    monkeypatch.setattr(cpc_module, "info_nce", spy)
    torch.manual_seed(0)
    method = build_method("cpc", "convnet_tiny", num_negatives=num_negatives)
    images = torch.randint(0, 256, (images, 3, 32, 32), dtype=torch.uint8)
    method(images, torch.arange(len(images)))
    return seen


def test_no_query_is_scored_against_its_own_target_and_each_keeps_num_negatives(monkeypatch):
    # 8 images: 72 patches, 64 negatives. A sampler that draws from every patch (the query's own target
    # included) scores most queries against their own positive; this one never does.
    seen = _scored_negatives(monkeypatch, num_negatives=64)
    assert len(seen) == 2  # offsets k = 1, 2
    for target, negatives, excluded in seen:
        same = (target.unsqueeze(1) == negatives.unsqueeze(0)).all(-1)  # (queries, drawn): identical patch
        assert not (same & ~excluded).any(), "a query was scored against its own target"
        assert torch.equal((~excluded).sum(1), torch.full((len(target),), 64))


def test_with_fewer_patches_than_negatives_every_other_patch_is_a_negative(monkeypatch):
    for target, negatives, excluded in _scored_negatives(monkeypatch, num_negatives=1024, images=4):
        assert len(negatives) == 36  # the whole pool: 4 images x 9 patches
        assert torch.equal((~excluded).sum(1), torch.full((len(target),), 35))


def test_the_kept_negatives_are_a_uniform_draw_from_the_patches_other_than_the_target():
    from contrastive.methods.cpc import own_target_excluded

    pool, m, target, draws = 10, 4, 3, 20_000
    gen = torch.Generator().manual_seed(0)
    counts = torch.zeros(pool)
    for _ in range(draws):
        drawn = torch.randperm(pool, generator=gen)[: m + 1]
        kept = drawn[~own_target_excluded(drawn, torch.tensor([target]), m)[0]]
        assert len(kept) == m and target not in kept.tolist()
        counts[kept] += 1
    share = counts / draws
    p = m / (pool - 1)
    se = (p * (1 - p) / draws) ** 0.5
    others = torch.arange(pool) != target
    assert share[target] == 0
    assert ((share[others] - p).abs() < 5 * se).all(), share  # each other patch with probability m / (P - 1)


def test_info_nce_leaves_out_exactly_the_excluded_negatives():
    from contrastive.losses import info_nce

    gen = torch.Generator().manual_seed(1)
    q, k, negs = (torch.randn(n, 5, generator=gen, dtype=torch.float64) for n in (3, 3, 6))
    exclude = torch.zeros(3, 6, dtype=torch.bool)
    exclude[0, 2] = exclude[2, 0] = exclude[2, 5] = True
    expected = []
    for i in range(3):
        kept = [negs[j] for j in range(6) if not exclude[i, j]]
        logits = torch.stack([q[i] @ k[i]] + [q[i] @ n for n in kept]) / 0.5
        expected.append(-torch.log_softmax(logits, 0)[0])
    got = info_nce(q, k, negs, 0.5, exclude=exclude)
    assert torch.allclose(got.double(), torch.stack(expected).mean(), atol=1e-6)
    assert not torch.allclose(info_nce(q, k, negs, 0.5).double(), torch.stack(expected).mean(), atol=1e-3)
