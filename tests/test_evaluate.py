import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from contrastive.data import stratified_indices
from contrastive.evaluate import (
    alignment,
    extract_features,
    knn_accuracy,
    linear_probe,
    uniformity,
)
from contrastive.models import build_backbone


def knn_reference(train_f, train_y, test_f, k, temperature, num_classes):
    train_f, test_f = F.normalize(train_f, dim=1), F.normalize(test_f, dim=1)
    preds = []
    for q in test_f:
        sims = train_f @ q
        order = sims.argsort(descending=True)[:k]
        votes = torch.zeros(num_classes, dtype=torch.float64)
        for i in order:
            votes[train_y[i]] += torch.exp(sims[i].double() / temperature)
        preds.append(votes.argmax())
    return torch.stack(preds)


def test_knn_matches_a_one_query_at_a_time_reference():
    gen = torch.Generator().manual_seed(0)
    train_f, test_f = torch.randn(300, 8, generator=gen), torch.randn(50, 8, generator=gen)
    train_y, test_y = torch.randint(0, 4, (300,), generator=gen), torch.randint(0, 4, (50,), generator=gen)
    ref = knn_reference(train_f, train_y, test_f, 20, 0.1, 4)
    expected = (ref == test_y).sum().item() / len(test_y)
    assert knn_accuracy(train_f, train_y, test_f, test_y, k=20, chunk_size=7) == expected


def test_knn_is_perfect_on_separated_clusters_and_chance_on_shuffled_labels():
    gen = torch.Generator().manual_seed(1)
    labels = torch.arange(4).repeat_interleave(100)
    feats = torch.eye(4)[labels] * 5 + torch.randn(400, 4, generator=gen) * 0.3
    assert knn_accuracy(feats[::2], labels[::2], feats[1::2], labels[1::2]) == 1.0
    shuffled = labels[torch.randperm(400, generator=gen)]
    assert abs(knn_accuracy(feats[::2], shuffled[::2], feats[1::2], shuffled[1::2]) - 0.25) < 0.1


def test_the_stratified_sampler_keeps_each_class_share_at_least_one_and_a_fixed_draw_per_seed():
    labels = torch.arange(5).repeat(40)
    val = stratified_indices(labels, 20, torch.Generator().manual_seed(0), minimum=1)
    assert torch.bincount(labels[val]).tolist() == [4] * 5 and val.tolist() == sorted(set(val.tolist()))
    again = stratified_indices(labels, 20, torch.Generator().manual_seed(0), minimum=1)
    assert torch.equal(val, again)
    skewed = torch.tensor([0] * 97 + [1] * 3)  # 1% of 100 would give class 1 nothing
    assert torch.bincount(skewed[stratified_indices(skewed, 2, torch.Generator(), minimum=1)]).tolist() == [
        1,
        1,
    ]
    plain = stratified_indices(skewed, 10, torch.Generator())  # without a minimum: largest remainders
    assert torch.bincount(skewed[plain], minlength=2).tolist() == [10, 0]


def test_the_probe_validates_on_a_stratified_tenth_of_train_and_scores_test_once():
    gen = torch.Generator().manual_seed(2)
    labels = torch.arange(5).repeat(40)
    feats = torch.eye(5)[labels] * 3 + torch.randn(200, 5, generator=gen)
    result = linear_probe(feats, labels, feats[:50], labels[:50])
    assert set(result["val_scores"]) == {"0.0", "1e-05", "0.0001", "0.001", "0.01"}
    assert result["test_scores"].shape == (50, 5)
    assert torch.allclose(result["test_scores"].sum(1), torch.ones(50))
    assert result["top1"] == (result["test_scores"].argmax(1) == labels[:50]).float().mean().item()


def test_linear_probe_separates_linearly_separable_classes():
    gen = torch.Generator().manual_seed(2)
    w = torch.randn(3, 16, generator=gen)
    x = torch.randn(600, 16, generator=gen)
    y = (x @ w.T).argmax(1)
    result = linear_probe(x[:400], y[:400], x[400:], y[400:])
    assert result["top1"] > 0.9
    assert result["weight_decay"] in (0.0, 1e-5, 1e-4, 1e-3, 1e-2)
    assert set(result["val_scores"]) == {"0.0", "1e-05", "0.0001", "0.001", "0.01"}


def test_linear_probe_is_at_chance_on_random_labels():
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(600, 16, generator=gen)
    y = torch.randint(0, 2, (600,), generator=gen)
    assert abs(linear_probe(x[:400], y[:400], x[400:], y[400:])["top1"] - 0.5) < 0.12


def test_feature_extraction_is_in_eval_mode_and_independent_of_batch_size():
    net = build_backbone("convnet_tiny")
    net.train()
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8)
    a = extract_features(net, images, batch_size=20)
    b = extract_features(net, images, batch_size=3)
    assert net.training  # restored afterwards
    assert a.shape == (20, 64) and torch.allclose(a, b, atol=1e-5)


def test_alignment_and_uniformity_extremes():
    z = F.normalize(torch.randn(64, 8), dim=1)
    assert alignment(z, z).item() < 1e-10
    collapsed = torch.ones(16, 8)
    assert abs(uniformity(collapsed).item()) < 1e-6  # all points equal: log E exp(0) = 0
    assert uniformity(z).item() < -1.0  # spread points are far apart on average


RESULTS = Path(__file__).resolve().parents[1] / "results"


def test_learned_passes_the_stored_simclr_run_and_fails_the_collapsed_simsiam_whose_loss_fell():
    from contrastive.bench import load_summary
    from contrastive.evaluate import learned

    simclr, collapsed = load_summary(RESULTS, "simclr_cpu"), load_summary(RESULTS, "simsiam_nosg_cpu")
    assert learned(simclr)
    assert not learned(collapsed)
    losses = [json.loads(line)["loss"] for line in (RESULTS / "simsiam_nosg_cpu/metrics.jsonl").open()]
    assert losses[-1] < losses[0]  # the loss-fell test, which it would pass


def test_learned_needs_more_than_the_margin_and_names_what_is_missing():
    from contrastive.bench import load_summary
    from contrastive.evaluate import LEARNED_MARGIN, learned

    assert learned({"knn_top1": 0.40 + LEARNED_MARGIN + 1e-3, "knn_top1_random_init": 0.40})
    assert not learned({"knn_top1": 0.40 + LEARNED_MARGIN - 1e-3, "knn_top1_random_init": 0.40})
    assert not learned({"knn_top1": 0.41, "knn_top1_random_init": 0.40})  # above init, within the spread
    with pytest.raises(KeyError, match="knn_top1_random_init"):
        learned({"knn_top1": 0.5})
    with pytest.raises(ValueError, match="margin"):
        learned({"knn_top1": 0.5, "knn_top1_random_init": 0.4}, margin=2)
    with pytest.raises(FileNotFoundError, match="no_such_run"):
        load_summary(RESULTS, "no_such_run")
