import torch
import torch.nn.functional as F

from contrastive.evaluate import (
    _stratified_split,
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


def test_validation_split_is_stratified_disjoint_and_drawn_from_train_only():
    labels = torch.arange(5).repeat(40)
    fit, val = _stratified_split(labels, 0.1, seed=0)
    assert set(fit.tolist()).isdisjoint(val.tolist()) and len(fit) + len(val) == 200
    assert torch.bincount(labels[val]).tolist() == [4] * 5


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
