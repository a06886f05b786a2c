"""MoCo's package pieces: the ring queue, the momentum encoder, split and shuffled BN, training and resume."""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import QUIET, random_views, step_on

from contrastive.methods import build_method
from contrastive.methods.moco import (
    MOCOV2_CIFAR,
    MoCo,
    MoCoV2,
    SplitBatchNorm1d,
    SplitBatchNorm2d,
    split_batch_norm,
)
from contrastive.models import build_backbone
from contrastive.train import train


def _moco(seed=0, name="moco", **options):
    torch.manual_seed(seed)
    options = {"queue_size": 16, "bn_splits": 2, **options}
    return build_method(name, "convnet_tiny", 0, **options)


def _tagged(tags, dim=4):
    """Keys whose every coordinate is their tag, so the queue shows which key sits where."""
    return torch.tensor(tags, dtype=torch.float32)[:, None].expand(-1, dim)


# ----------------------------------------------------------------------------------------------------------
# The queue
# ----------------------------------------------------------------------------------------------------------


def test_queue_is_a_ring_that_overwrites_the_oldest_keys_and_wraps_around():
    model = _moco(queue_size=10, feature_dim=4)
    model._enqueue(_tagged([0, 1, 2, 3]))
    assert model.queue_ptr.item() == 4 and model.queue[:4, 0].tolist() == [0, 1, 2, 3]
    model._enqueue(_tagged([4, 5, 6, 7]))
    assert model.queue_ptr.item() == 8
    model._enqueue(_tagged([8, 9, 10, 11]))  # 10 is not a multiple of 4: this batch wraps around
    assert model.queue[:, 0].tolist() == [10, 11, 2, 3, 4, 5, 6, 7, 8, 9]
    assert model.queue_ptr.item() == 2  # the pointer names the oldest entry
    sent = list(range(12))
    for start in range(12, 40, 4):
        model._enqueue(_tagged(list(range(start, start + 4))))
        sent += list(range(start, start + 4))
        # read from the pointer, the queue is the last ten keys in the order they were sent
        assert torch.roll(model.queue[:, 0], -model.queue_ptr.item()).tolist() == sent[-10:]


def test_a_batch_larger_than_the_queue_leaves_its_newest_keys():
    model = _moco(queue_size=3, feature_dim=4)
    model._enqueue(_tagged([0]))
    model._enqueue(_tagged([1, 2, 3, 4]))
    assert model.queue_ptr.item() == (1 + 4) % 3
    assert torch.roll(model.queue[:, 0], -model.queue_ptr.item()).tolist() == [2, 3, 4]


def test_a_step_enqueues_its_keys_and_the_loss_sees_the_queue_from_before():
    model = _moco(queue_size=12)
    x_q, x_k = random_views()
    before = model.queue.clone()
    torch.manual_seed(4)
    keys = model.keys(x_k)
    torch.manual_seed(4)
    loss = model.contrast(x_q, x_k)
    assert torch.equal(model.queue[:8], keys) and torch.equal(model.queue[8:], before[8:])
    assert model.queue_ptr.item() == 8
    with torch.no_grad():
        q = F.normalize(model.head(model.backbone(x_q)), dim=1)
        logits = torch.cat([(q * keys).sum(1, keepdim=True), q @ before.T], 1) / model.temperature
        expected = F.cross_entropy(logits, torch.zeros(8, dtype=torch.long))
        assert torch.allclose(loss, expected, atol=1e-6)
        # the queue after the step (holding the batch's own keys) gives another loss
        leaked = torch.cat([(q * keys).sum(1, keepdim=True), q @ model.queue.T], 1) / model.temperature
        assert not torch.allclose(loss, F.cross_entropy(leaked, torch.zeros(8, dtype=torch.long)), atol=1e-3)


# ----------------------------------------------------------------------------------------------------------
# The momentum encoder
# ----------------------------------------------------------------------------------------------------------


def _perturb_query(model, seed=2):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model._query_parameters():
            p.add_(torch.randn(p.shape, generator=gen))


def test_momentum_update_is_m_theta_k_plus_one_minus_m_theta_q_over_the_parameters():
    model = _moco(momentum=0.9)
    _perturb_query(model)
    k0 = [p.clone() for p in model.key_encoder.parameters()]
    q0 = [p.clone() for p in model._query_parameters()]
    buffers = [b.clone() for b in model.key_encoder.buffers()]
    model.on_step_end(0, 10)
    k1 = list(model.key_encoder.parameters())
    assert len(k1) == len(q0) > 0
    assert all(torch.allclose(b, 0.9 * a + 0.1 * q, rtol=0, atol=1e-6) for a, b, q in zip(k0, k1, q0))
    # the weights swapped (0.1 theta_k + 0.9 theta_q) do not match
    assert not all(torch.allclose(b, 0.1 * a + 0.9 * q, rtol=0, atol=1e-3) for a, b, q in zip(k0, k1, q0))
    # the BN running statistics are the key encoder's own, not averaged with the query's
    assert all(torch.equal(a, b) for a, b in zip(buffers, model.key_encoder.buffers()))


def test_momentum_zero_copies_the_query_encoder_and_one_freezes_the_key_encoder():
    copier, frozen = _moco(momentum=0.0), _moco(momentum=1.0)
    for model in (copier, frozen):
        _perturb_query(model)
    k0 = [p.clone() for p in frozen.key_encoder.parameters()]
    copier.on_step_end(0, 10)
    frozen.on_step_end(0, 10)
    assert all(torch.equal(k, q) for k, q in zip(copier.key_encoder.parameters(), copier._query_parameters()))
    assert all(torch.equal(k, a) for k, a in zip(frozen.key_encoder.parameters(), k0))


def test_encoder_distance_is_the_relative_gap_left_after_the_update():
    model = _moco(momentum=0.9)
    assert model.epoch_metrics()["encoder_distance"] == 0  # a fresh copy
    k0 = [p.clone() for p in model.key_encoder.parameters()]
    _perturb_query(model)
    model.on_step_end(0, 10)
    # theta_q - (0.9 theta_k + 0.1 theta_q) = 0.9 (theta_q - theta_k): the step Delta, shrunk by m
    delta = math.sqrt(sum((q - k).pow(2).sum().item() for q, k in zip(model._query_parameters(), k0)))
    norm = math.sqrt(sum(q.pow(2).sum().item() for q in model._query_parameters()))
    assert model.epoch_metrics()["encoder_distance"] == pytest.approx(0.9 * delta / norm, rel=1e-4)


def test_the_key_encoder_gets_no_gradient_and_the_optimizer_step_leaves_it_unchanged():
    model = _moco()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5, momentum=0.9, weight_decay=5e-4)
    keys_before = [p.clone() for p in model.key_encoder.parameters()]
    query_before = [p.clone() for p in model._query_parameters()]
    assert not any(p.requires_grad for p in model.key_encoder.parameters())
    model.contrast(*random_views()).backward()
    assert all(p.grad is None for p in model.key_encoder.parameters())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model._query_parameters())
    optimizer.step()  # weight decay and momentum included: a parameter without gradient is skipped
    assert all(torch.equal(a, b) for a, b in zip(keys_before, model.key_encoder.parameters()))
    assert not all(torch.equal(a, b) for a, b in zip(query_before, model._query_parameters()))


def test_state_dict_holds_queue_pointer_and_key_encoder_and_a_round_trip_reproduces_the_next_step():
    model = _moco(momentum=0.5)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
    model.contrast(*random_views(seed=1)).backward()
    optimizer.step()
    model.on_step_end(0, 10)
    state = model.state_dict()
    assert {"queue", "queue_ptr"} <= set(state) and state["queue_ptr"].item() == 8
    assert any(k.startswith("key_encoder.") and k.endswith("running_mean") for k in state)
    assert any(k.startswith("key_encoder.") and k.endswith("weight") for k in state)

    restored = _moco(seed=7, momentum=0.5)
    restored.load_state_dict(state)
    stranger = _moco(seed=7, momentum=0.5)
    losses = []
    for m in (model, restored, stranger):
        torch.manual_seed(3)  # the shuffle's permutation
        losses.append(m.contrast(*random_views(seed=2)).item())
    assert losses[0] == losses[1] and losses[0] != losses[2]
    assert torch.equal(model.queue, restored.queue) and model.queue_ptr == restored.queue_ptr


# ----------------------------------------------------------------------------------------------------------
# Split BatchNorm
# ----------------------------------------------------------------------------------------------------------


def _randomise(bn, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        bn.weight.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
        bn.bias.copy_(torch.randn(bn.num_features, generator=gen))
        bn.running_mean.copy_(torch.randn(bn.num_features, generator=gen))
        bn.running_var.copy_(torch.rand(bn.num_features, generator=gen) + 0.5)
    return bn


@pytest.mark.parametrize("shape", [(12, 4, 5, 5), (12, 6)], ids=["2d", "1d"])
def test_split_batch_norm_normalises_each_group_of_consecutive_samples_by_its_own_statistics(shape):
    splits = 3
    cls = SplitBatchNorm2d if len(shape) == 4 else SplitBatchNorm1d
    bn = _randomise(cls(shape[1], splits))
    mean0, var0 = bn.running_mean.clone(), bn.running_var.clone()
    x = torch.randn(shape) * 3 + torch.arange(shape[0]).view(-1, *[1] * (len(shape) - 1))  # groups differ
    groups = x.chunk(splits)
    expected = torch.cat([F.batch_norm(g, None, None, bn.weight, bn.bias, True, 0.0, bn.eps) for g in groups])
    assert torch.allclose(bn(x), expected, atol=1e-5)
    if len(shape) == 4:  # the training loop makes everything channels_last
        bn2 = _randomise(cls(shape[1], splits))
        assert torch.allclose(bn2(x.to(memory_format=torch.channels_last)), expected, atol=1e-5)
    whole = F.batch_norm(x, None, None, bn.weight, bn.bias, True, 0.0, bn.eps)
    assert not torch.allclose(bn(x), whole, atol=1e-2)  # one set of statistics for the batch is another layer
    # running statistics: the mean over groups of each group's (unbiased) statistics, at momentum 0.1
    dims = [0] + list(range(2, len(shape)))
    group_mean = torch.stack([g.mean(dims) for g in groups]).mean(0)
    group_var = torch.stack([g.var(dims, unbiased=True) for g in groups]).mean(0)
    after_one = 0.9 * mean0 + 0.1 * group_mean
    bn2 = _randomise(cls(shape[1], splits))
    bn2(x)
    assert torch.allclose(bn2.running_mean, after_one, atol=1e-5)
    assert torch.allclose(bn2.running_var, 0.9 * var0 + 0.1 * group_var, atol=1e-5)
    assert bn2.num_batches_tracked.item() == 1


def test_split_batch_norm_in_eval_mode_is_ordinary_batch_norm():
    bn = _randomise(SplitBatchNorm2d(4, 2)).eval()
    ordinary = torch.nn.BatchNorm2d(4)
    ordinary.load_state_dict(bn.state_dict())
    ordinary.eval()
    x = torch.randn(5, 4, 3, 3)  # an odd batch is fine: no groups in eval mode
    assert torch.equal(bn(x), ordinary(x))
    with pytest.raises(ValueError, match="batch of 5 samples.*num_splits=2"):
        bn.train()(x)


def test_converting_a_backbone_keeps_its_state_and_one_split_is_ordinary_batch_norm():
    torch.manual_seed(0)
    backbone = build_backbone("convnet_tiny")
    for m in backbone.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            _randomise(m)
    x = torch.randn(8, 3, 32, 32)
    ordinary, state = backbone(x), {k: v.clone() for k, v in backbone.state_dict().items()}
    converted = split_batch_norm(backbone, 1)
    assert converted is backbone  # in place: evaluation reads the same object
    bns = [m for m in backbone.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(bns) == 3 and all(isinstance(m, SplitBatchNorm2d) for m in bns)
    assert state.keys() == backbone.state_dict().keys()
    assert all(torch.equal(state[k], v) for k, v in backbone.state_dict().items())
    assert torch.allclose(backbone(x), ordinary, atol=1e-6)
    split_batch_norm(backbone, 4)
    assert all(m.num_splits == 4 for m in bns) and not torch.allclose(backbone(x), ordinary, atol=1e-3)


# ----------------------------------------------------------------------------------------------------------
# Shuffling BN
# ----------------------------------------------------------------------------------------------------------


def test_shuffled_keys_are_aligned_with_their_images_and_differ_from_unshuffled_keys():
    model = _moco(bn_splits=4)
    _, x_k = random_views()
    torch.manual_seed(3)
    keys = model.keys(x_k)
    torch.manual_seed(3)
    perm = torch.randperm(8)
    with torch.no_grad():
        in_shuffled_order = F.normalize(model.key_encoder(x_k[perm]), dim=1)
    assert torch.allclose(keys, in_shuffled_order[torch.argsort(perm)], atol=1e-6)
    assert not torch.allclose(keys, in_shuffled_order, atol=1e-3)  # forgetting to un-permute is caught
    model.shuffle_bn = False
    assert not torch.allclose(keys, model.keys(x_k), atol=1e-3)  # other BN groups, other keys

    # With one BN group the statistics do not depend on the order, so shuffling must change nothing:
    # row i of the shuffled keys is image i's key whatever the permutation.
    whole = _moco(bn_splits=1)
    unshuffled = whole.keys(x_k)
    whole.shuffle_bn = True
    for seed in range(3):
        torch.manual_seed(seed)
        assert torch.allclose(whole.keys(x_k), unshuffled, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Options and errors
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "options, message",
    [
        ({"queue_size": 0}, "queue_size must be a positive integer"),
        ({"queue_size": -5}, "queue_size must be a positive integer"),
        ({"momentum": -0.1}, r"momentum must be in \[0, 1\]"),
        ({"momentum": 1.5}, r"momentum must be in \[0, 1\]"),
        ({"temperature": 0.0}, "temperature must be positive"),
        ({"bn_splits": 0}, "bn_splits must be a positive integer"),
        ({"queue": 5}, "moco has no option 'queue'; its options are .*queue_size"),
    ],
)
def test_bad_options_are_rejected_with_the_valid_values(options, message):
    with pytest.raises(ValueError, match=message):
        _moco(**options)


def test_a_batch_that_bn_splits_does_not_divide_is_rejected_at_the_step():
    model, images = _moco(bn_splits=3), torch.randint(0, 256, (8, 3, 32, 32), dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"batch of 8 images .* bn_splits=3 .* one of \[1, 2, 4, 8\]"):
        step_on(model, images)
    assert model.queue_ptr.item() == 0  # nothing was enqueued
    assert torch.isfinite(step_on(_moco(bn_splits=4), images))


def test_mocov2_is_moco_with_an_mlp_head_blur_and_a_warmer_temperature():
    v1, v2 = _moco(), _moco(name="mocov2")
    assert type(v1) is MoCo and type(v2) is MoCoV2
    assert isinstance(v1.head, torch.nn.Linear) and isinstance(v2.head, torch.nn.Sequential)
    assert any(isinstance(m, SplitBatchNorm1d) and m.num_splits == 2 for m in v2.head.modules())
    assert (v1.temperature, v2.temperature) == (0.1, 0.2)
    assert v1.recipe.blur_p == 0 and v2.recipe == MOCOV2_CIFAR and v2.recipe.blur_p == 0.5
    assert v2.recipe.blur_kernel == 3
    assert _moco(name="mocov2", mlp_head=False, temperature=0.1).temperature == 0.1


def test_instance_accuracy_asks_whether_the_positive_beats_every_queue_entry():
    x, _ = random_views()
    # Same view, same weights, one BN group in both encoders: every query equals its key, q.k = 1.
    model = _moco(queue_size=8, bn_splits=1, shuffle_bn=False)
    with torch.no_grad():
        keys = model.keys(x)
        model.queue.copy_(2 * keys)  # each query meets 2 q.k = 2 > 1 in the queue: never right
        model.contrast(x, x)
        assert model.epoch_metrics()["instance_accuracy"] == 0
        model.queue.copy_(-keys)  # every negative scores below 1: always right
        model.contrast(x, x)
        assert model.epoch_metrics()["instance_accuracy"] == 1
        # a random queue against a reference computed from the definition
        model = _moco(queue_size=64, bn_splits=2)
        x_q, x_k = random_views(seed=5)
        queue = model.queue.clone()
        torch.manual_seed(0)
        k = model.keys(x_k)
        q = F.normalize(model.head(model.backbone(x_q)), dim=1)
        torch.manual_seed(0)
        model.contrast(x_q, x_k)
        expected = ((q * k).sum(1) > (q @ queue.T).amax(1)).float().mean().item()
        assert model.epoch_metrics()["instance_accuracy"] == pytest.approx(expected)


# ----------------------------------------------------------------------------------------------------------
# Training through the common loop
# ----------------------------------------------------------------------------------------------------------

SMALL = {"queue_size": 128, "bn_splits": 2}


def _check_metrics(run, steps, batch):
    assert all(math.isfinite(row["loss"]) for row in run.metrics)
    for row in run.metrics:
        assert 0 <= row["instance_accuracy"] <= 1
        assert 0 < row["encoder_distance"] < 1  # the key encoder lags, but only by a little
    assert run.method.queue_ptr.item() == steps * batch % 128


def test_mocov2_trains_through_the_common_loop(tiny_data, tiny_profile):
    run = train("mocov2", tiny_profile, data=tiny_data, epochs=1, method_options=SMALL, **QUIET)
    _check_metrics(run, steps=4, batch=50)
    assert isinstance(run.method, MoCoV2)


def test_default_bn_splits_is_eight_or_the_largest_divisor_leaving_two_samples_per_group():
    torch.manual_seed(0)
    model = build_method("moco", "convnet_tiny", 10, queue_size=512)
    for batch, expected in ((16, 8), (12, 6), (10, 5), (7, 1), (11, 1), (4, 2)):
        step_on(model, torch.randint(0, 256, (batch, 3, 32, 32), dtype=torch.uint8))
        groups = {m.num_splits for m in model.modules() if hasattr(m, "num_splits")}
        assert groups == {expected}, (batch, groups)
