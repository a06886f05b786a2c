"""InstDisc's package pieces: the NCE loss, the memory bank, the normaliser."""

import pytest
import torch
import torch.nn.functional as F

from contrastive.augment import eval_transform
from contrastive.losses import nce_loss
from contrastive.methods import build_method
from contrastive.train import train


def nce_reference(pos, noise, tau, z, n):
    """h = P / (P + m/n) with P = exp(s/tau) / Z, written with plain probabilities."""
    m = noise.shape[1]
    p_pos, p_noise = (pos / tau).exp() / z, (noise / tau).exp() / z
    h_pos, h_noise = p_pos / (p_pos + m / n), p_noise / (p_noise + m / n)
    return -(h_pos.log() + (1 - h_noise).log().sum(1)).mean()


def test_nce_loss_matches_the_posterior_formula():
    gen = torch.Generator().manual_seed(0)
    pos, noise = (
        torch.rand(8, generator=gen, dtype=torch.float64),
        torch.rand(8, 32, generator=gen, dtype=torch.float64),
    )
    for tau, z, n in [(0.07, 5e4, 1000), (0.5, 300.0, 100), (1.0, 1e3, 10_000)]:
        assert torch.allclose(
            nce_loss(pos, noise, tau, z, n), nce_reference(pos, noise, tau, z, n), rtol=1e-10
        )


def test_nce_loss_gradient_is_one_minus_h_on_the_positive_and_h_on_the_noise():
    gen = torch.Generator().manual_seed(1)
    pos = torch.rand(4, generator=gen, dtype=torch.float64).requires_grad_(True)
    noise = torch.rand(4, 16, generator=gen, dtype=torch.float64).requires_grad_(True)
    tau, z, n = 0.1, 2e4, 500
    nce_loss(pos, noise, tau, z, n).backward()
    with torch.no_grad():
        p_pos, p_noise = (pos / tau).exp() / z, (noise / tau).exp() / z
        h_pos, h_noise = p_pos / (p_pos + 16 / n), p_noise / (p_noise + 16 / n)
        assert torch.allclose(pos.grad, -(1 - h_pos) / tau / 4)
        assert torch.allclose(noise.grad, h_noise / tau / 4)


def test_nce_loss_rejects_mismatched_shapes():
    with pytest.raises(ValueError, match=r"\(B,\)"):
        nce_loss(torch.rand(4), torch.rand(5, 3), 0.1, 10.0, 100)


def test_memory_bank_moves_the_batch_entries_only_and_keeps_them_on_the_sphere():
    torch.manual_seed(0)
    method = build_method("instdisc", "convnet_tiny", num_images=50, num_noise=16, bank_momentum=0.5)
    before = method.bank.clone()
    images = torch.randint(0, 256, (6, 3, 32, 32), dtype=torch.uint8)
    indices = torch.tensor([3, 7, 11, 20, 21, 40])
    captured = {}  # the step's features f = normalise(W h), read at the head's output
    method.head.register_forward_hook(lambda _, __, out: captured.setdefault("f", F.normalize(out, dim=1)))
    method(images, indices)
    expected = F.normalize(0.5 * before[indices] + 0.5 * captured["f"].detach(), dim=1)
    assert torch.allclose(method.bank[indices], expected, atol=1e-6)
    untouched = torch.ones(50, dtype=torch.bool)
    untouched[indices] = False
    assert torch.equal(method.bank[untouched], before[untouched])
    assert torch.allclose(method.bank.norm(dim=1), torch.ones(50), atol=1e-6)


def test_normaliser_is_estimated_on_the_first_batch_then_held_fixed():
    torch.manual_seed(0)
    method = build_method("instdisc", "convnet_tiny", num_images=40, num_noise=8)
    images = torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    assert method.normaliser.item() == 0
    method(images, torch.arange(8))
    first = method.normaliser.item()
    assert first > 0 and first == pytest.approx(method._logged["normaliser_estimate"][0].item())
    method(images, torch.arange(8, 16))
    assert method.normaliser.item() == first
    estimates = [e.item() for e in method._logged["normaliser_estimate"]]
    assert len(estimates) == 2 and estimates[1] != first  # the estimate is still taken on every batch
    metrics = method.epoch_metrics()
    assert metrics["normaliser"] == first
    assert metrics["normaliser_estimate"] == pytest.approx(sum(estimates) / 2)
    assert method.epoch_metrics() == {"normaliser": first}  # the estimates were reset


def test_instdisc_runs_through_the_training_loop_and_reports_its_normaliser(tiny_data, tiny_profile):
    quiet = dict(data=tiny_data, progress=False, log=lambda *_: None, linear_probe=False)
    run = train("instdisc", tiny_profile, method_options={"num_noise": 64}, **quiet)
    assert all(m["normaliser"] > 0 and m["normaliser_estimate"] > 0 for m in run.metrics)
    assert run.method.bank.shape == (200, 128)


def test_setup_fills_the_bank_with_the_untrained_encoders_centred_features():
    torch.manual_seed(0)
    method = build_method("instdisc", "convnet_small", num_images=300, num_noise=16)
    images = torch.randint(0, 256, (300, 3, 32, 32), dtype=torch.uint8)
    random_bank = method.bank.clone()
    method.setup(images, torch.arange(300) % 10, batch_size=100)  # the labels are not used
    assert not torch.allclose(method.bank, random_bank)
    assert torch.allclose(method.bank.norm(dim=1), torch.ones(300), atol=1e-5)
    sims = method.bank @ method.bank.T
    mean_cos = (sims.sum() - sims.trace()) / (300 * 299)
    assert abs(mean_cos) < 0.05  # BatchNorm in the head centres the embeddings
    f = F.normalize(method.head(method.backbone(eval_transform(images[:100]))), dim=1)
    assert torch.allclose(method.bank[:100], f, atol=1e-5)  # the same features, first chunk
