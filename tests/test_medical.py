"""Chapter 13 (biomedical): modality recipes, ROC AUC and accuracy, label fractions, the baseline, data."""

import colorsys
import dataclasses
import math
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from contrastive.augment import augment, to_float
from contrastive.data import ImageDataset, load_medmnist
from contrastive.medical import (
    HISTOLOGY,
    XRAY,
    accuracy,
    dihedral,
    first_tiles,
    label_subset,
    load_chapter_data,
    mean_spread,
    pca_2d,
    probe,
    results_table,
    roc_auc,
    supervised_baseline,
    synthetic_stand_in,
)
from contrastive.models import build_backbone
from contrastive.profiles import get_profile
from contrastive.train import train

FEW = settings(max_examples=15, deadline=None)


def gray_images(n, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 1, 28, 28), dtype=torch.uint8, generator=g)


def pink_tiles(n):
    """H&E-like tiles: a pink field with purple blobs, all the same image."""
    tile = torch.empty(3, 28, 28)
    tile[0], tile[1], tile[2] = 0.65, 0.42, 0.56
    tile[:, 8:16, 6:14] = torch.tensor([0.4, 0.28, 0.55]).view(3, 1, 1)
    return (tile * 255).round().to(torch.uint8).expand(n, -1, -1, -1).contiguous()


def direct_auc(scores, positive):
    """The definition: P(s+ > s-) + P(s+ = s-) / 2 over every positive-negative pair, O(n^2)."""
    pos, neg = scores[positive], scores[~positive]
    wins = (pos[:, None] > neg[None, :]).double() + 0.5 * (pos[:, None] == neg[None, :]).double()
    return wins.mean().item()


# ---- recipes ------------------------------------------------------------------------------


@FEW
@given(batch=st.integers(1, 9), seed=st.integers(0, 2**16))
def test_xray_recipe_keeps_one_channel_shape_float_dtype_and_unit_range(batch, seed):
    torch.manual_seed(seed)
    out = augment(gray_images(batch, seed), XRAY)
    assert out.shape == (batch, 1, 28, 28) and out.dtype == torch.float32
    pixels = out  # views stay in [0, 1]: the encoder standardises
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


@FEW
@given(seed=st.integers(0, 2**16))
def test_histology_recipe_keeps_three_channels_shape_and_unit_range(seed):
    torch.manual_seed(seed)
    out = augment(pink_tiles(6), HISTOLOGY)
    assert out.shape == (6, 3, 28, 28) and out.dtype == torch.float32
    pixels = out
    assert pixels.min() >= -1e-5 and pixels.max() <= 1 + 1e-5


def test_xray_recipe_has_no_hue_saturation_or_grayscale_and_no_flip_by_default():
    brightness, contrast, saturation, hue = XRAY.jitter
    assert saturation == hue == 0 and XRAY.gray_p == 0 and XRAY.flip_p == 0
    assert brightness > 0 and contrast > 0


def test_xray_recipe_keeps_a_gray_image_gray_when_fed_as_three_channels():
    gray = gray_images(32)
    torch.manual_seed(0)
    pixels = augment(gray.expand(-1, 3, -1, -1), XRAY)
    torch.testing.assert_close(pixels[:, 0], pixels[:, 1], atol=1e-5, rtol=0)
    torch.testing.assert_close(pixels[:, 0], pixels[:, 2], atol=1e-5, rtol=0)


def test_xray_recipe_never_mirrors_while_the_flip_option_does():
    """Left half bright, right half dark; with full-image crops only a flip can put the dark side left."""
    image = torch.full((64, 1, 28, 28), 40, dtype=torch.uint8)
    image[..., :14] = 200
    whole = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0))

    def left_brighter(recipe):
        torch.manual_seed(0)
        out = augment(image, recipe)
        return out[..., :14].mean(dim=(1, 2, 3)) > out[..., 14:].mean(dim=(1, 2, 3))

    assert left_brighter(dataclasses.replace(XRAY, **whole)).all()
    flipped = ~left_brighter(dataclasses.replace(XRAY, flip_p=0.5, **whole))
    assert 10 < int(flipped.sum()) < 54


def test_histology_hue_jitter_changes_the_hue_and_nothing_else_in_the_recipe_does():
    tiles = pink_tiles(64)
    whole = dict(scale=(1.0, 1.0), ratio=(1.0, 1.0), flip_p=0.0, jitter_p=1.0)

    def hue_spread(recipe):
        torch.manual_seed(0)
        pixels = augment(tiles, recipe)
        field = pixels[:, :, 20:, 20:].mean(dim=(2, 3)).clamp(0, 1)  # the flat pink background of each view
        hues = torch.tensor([colorsys.rgb_to_hsv(*rgb)[0] for rgb in field.tolist()])
        return hues.std().item()

    assert hue_spread(dataclasses.replace(HISTOLOGY, **whole)) > 0.01
    no_hue = dataclasses.replace(HISTOLOGY, jitter=(*HISTOLOGY.jitter[:3], 0.0), **whole)
    assert hue_spread(no_hue) < 1e-4  # brightness, contrast and saturation keep the hue (no clipping here)


def test_dihedral_draws_all_eight_orientations_and_only_those():
    x = torch.arange(16.0).view(1, 1, 4, 4).expand(400, -1, -1, -1)
    out = dihedral(x, torch.Generator().manual_seed(0))
    base = x[0]
    group = [base.rot90(k, dims=(-2, -1)) for k in range(4)]
    group += [g.flip(-1) for g in group]
    which = [next(i for i, g in enumerate(group) if torch.equal(o, g)) for o in out]
    assert sorted(set(which)) == list(range(8))
    counts = torch.bincount(torch.tensor(which), minlength=8)
    assert counts.min() > 25  # about 50 each out of 400
    torch.testing.assert_close(dihedral(x, torch.Generator().manual_seed(0)), out)


def test_dihedral_refuses_non_square_images():
    with pytest.raises(ValueError, match="square"):
        dihedral(torch.zeros(2, 3, 4, 5))


def test_a_data_set_standardises_with_its_own_statistics_measured_on_its_training_split():
    images = gray_images(50)
    zeros = torch.zeros(50, dtype=torch.long)
    data = ImageDataset(images, zeros, images[:2], zeros[:2], ["a"])
    pixels = images.double() / 255
    stats = data.stats()
    assert stats["mean"] == pytest.approx((pixels.mean().item(),)) and stats["std"] == pytest.approx(
        (pixels.std().item(),)
    )
    fixed = dataclasses.replace(data, mean=(0.5,), std=(0.25,))
    assert fixed.stats() == {"mean": (0.5,), "std": (0.25,)}  # a data set's published statistics win
    backbone = build_backbone("convnet_tiny", in_channels=1, **stats).eval()
    x = to_float(images)
    reference = build_backbone("convnet_tiny", in_channels=1, mean=None, std=None).eval()
    reference.load_state_dict(
        {k: v for k, v in backbone.state_dict().items() if not k.startswith("standardize.")}, strict=False
    )
    standardised = (x - stats["mean"][0]) / stats["std"][0]
    torch.testing.assert_close(backbone(x), reference(standardised.float()), atol=1e-5, rtol=1e-5)


# ---- ROC AUC and accuracy -------------------------------------------------------------------


@FEW
@given(n=st.integers(2, 60), levels=st.integers(1, 6), seed=st.integers(0, 2**16))
def test_binary_auc_equals_the_pair_counting_definition_with_ties(n, levels, seed):
    g = torch.Generator().manual_seed(seed)
    scores = torch.randint(0, levels, (n,), generator=g).float()  # few levels: many ties
    labels = torch.randint(0, 2, (n,), generator=g)
    labels[0], labels[1] = 0, 1
    assert roc_auc(scores, labels) == pytest.approx(direct_auc(scores, labels == 1), abs=1e-12)


def test_auc_of_perfect_reversed_and_constant_scores():
    labels = torch.tensor([0, 0, 0, 1, 1])
    scores = torch.tensor([0.1, 0.2, 0.3, 0.8, 0.9])
    assert roc_auc(scores, labels) == 1.0
    assert roc_auc(-scores, labels) == 0.0
    assert roc_auc(torch.full((5,), 0.7), labels) == 0.5


def test_binary_auc_from_two_class_scores_reads_the_positive_column():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(40, 2, generator=g).softmax(1)
    labels = torch.randint(0, 2, (40,), generator=g)
    assert roc_auc(probs, labels) == pytest.approx(direct_auc(probs[:, 1], labels == 1))


def test_multiclass_auc_is_the_macro_average_of_one_vs_rest():
    g = torch.Generator().manual_seed(1)
    scores = torch.randint(0, 5, (90, 4), generator=g).float()
    labels = torch.arange(4).repeat(23)[:90]
    expected = sum(direct_auc(scores[:, c], labels == c) for c in range(4)) / 4
    assert roc_auc(scores, labels) == pytest.approx(expected, abs=1e-12)
    assert roc_auc(torch.eye(4)[labels], labels) == 1.0


def test_auc_refuses_a_single_class_and_mismatched_lengths():
    with pytest.raises(ValueError, match="positive and one negative"):
        roc_auc(torch.rand(5), torch.ones(5, dtype=torch.long))
    with pytest.raises(ValueError, match="same length"):
        roc_auc(torch.rand(5), torch.ones(4, dtype=torch.long))


def test_accuracy_of_class_scores_and_of_probabilities_of_class_one():
    labels = torch.tensor([0, 1, 2, 1])
    scores = torch.tensor([[3.0, 1, 0], [0, 2, 1], [0, 3, 1], [0, 1, 0]])
    assert accuracy(scores, labels) == 0.75
    assert accuracy(torch.tensor([0.2, 0.6, 0.51, 0.4]), torch.tensor([0, 1, 0, 0])) == 0.75


# ---- label fractions and splits -------------------------------------------------------------


@FEW
@given(fraction=st.floats(0.005, 1.0), seed=st.integers(0, 100))
def test_label_subset_is_stratified_with_at_least_one_image_per_class(fraction, seed):
    sizes = torch.tensor([300, 90, 10])
    labels = torch.repeat_interleave(torch.arange(3), sizes)[torch.randperm(400, generator=torch.Generator())]
    idx = label_subset(labels, fraction, seed)
    counts = torch.bincount(labels[idx], minlength=3)
    n = max(round(fraction * 400), 3)
    assert n <= len(idx) <= n + 2  # a class lifted from 0 to 1 image adds at most one image each
    assert len(set(idx.tolist())) == len(idx) and torch.equal(idx, idx.sort().values)
    assert counts.min() >= 1
    share = sizes * n / 400
    assert (((counts - share).abs() <= 1) | (counts == 1)).all()


def test_label_subset_is_seeded():
    labels = torch.arange(10).repeat(50)
    a, b, c = (label_subset(labels, 0.1, s) for s in (3, 3, 4))
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(label_subset(labels, 1.0, 0), torch.arange(500))


def test_label_subset_refuses_fractions_outside_zero_one():
    for bad in (0.0, -0.1, 1.5):
        with pytest.raises(ValueError, match="fraction"):
            label_subset(torch.zeros(10, dtype=torch.long), bad, 0)


def test_first_tiles_splits_the_first_n_images_stratified_and_disjoint():
    data = synthetic_stand_in("pathmnist", 400, 0, seed=3)
    tiles = first_tiles(data, 300, 0.3, seed=0)
    assert len(tiles.train_images) + len(tiles.test_images) == 300 and len(tiles.test_images) == 90
    first = {tuple(x.flatten().tolist()) for x in data.train_images[:300]}
    seen = [tuple(x.flatten().tolist()) for x in torch.cat([tiles.train_images, tiles.test_images])]
    assert set(seen) == first and len(seen) == 300
    held_out = torch.bincount(tiles.test_labels, minlength=9)
    share = held_out / torch.bincount(data.train_labels[:300], minlength=9)
    assert (share - 0.3).abs().max() < 0.05  # one tile in a class of about 33 is 0.03


# ---- probe and baseline ---------------------------------------------------------------------


def test_probe_separates_separable_features_and_reports_the_label_count():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 3, (600,), generator=g)
    feats = torch.randn(600, 16, generator=g) + 4 * torch.eye(3, 16)[labels]
    out = probe(feats[:500], labels[:500], feats[500:], labels[500:], fraction=0.1, seed=0)
    assert out["acc"] > 0.95 and out["auc"] > 0.99 and out["labels"] == 50
    assert probe(feats[:500], labels[:500], feats[500:], labels[500:], fraction=0.1, seed=0) == out


def test_probe_refuses_a_fraction_that_leaves_one_image_in_a_class():
    labels = torch.arange(9).repeat(20)
    with pytest.raises(ValueError, match="fewer than 2"):
        probe(torch.randn(180, 4), labels, torch.randn(18, 4), labels[:18], fraction=0.01)


def separable_xrays(n, seed):
    """Dark versus bright gray images: brightness jitter of 0.4 cannot make one look like the other."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    level = torch.where(labels == 1, 190.0, 50.0).view(-1, 1, 1, 1)
    images = (level + 12 * torch.randn(n, 1, 28, 28, generator=g)).clamp(0, 255).to(torch.uint8)
    return images, labels


def test_supervised_baseline_learns_a_trivially_separable_problem_and_is_seeded():
    (xtr, ytr), (xte, yte) = separable_xrays(128, 0), separable_xrays(64, 1)
    data = ImageDataset(xtr, ytr, xte, yte, ["normal", "pneumonia"])
    run = lambda seed: supervised_baseline(
        data,
        torch.arange(0, 128, 2),
        "convnet_tiny",
        epochs=1,
        seed=seed,
        recipe=XRAY,
        batch_size=32,
        min_steps=25,
    )
    first = run(0)
    assert first["acc"] > 0.9 and first["auc"] > 0.95
    assert first["labels"] == 64 and first["steps"] == 25
    again = run(0)
    assert (again["acc"], again["auc"]) == (first["acc"], first["auc"])


def test_simclr_trains_on_one_channel_xrays_standardised_with_their_own_statistics():
    (xtr, ytr), (xte, yte) = separable_xrays(64, 0), separable_xrays(32, 1)
    xrays = ImageDataset(xtr, ytr, xte, yte, ["normal", "pneumonia"])
    profile = get_profile(
        "smoke", train_size=None, test_size=None, batch_size=32, epochs=1, eval_batch_size=64
    )
    run = train(
        "simclr",
        profile,
        data=xrays,
        method_options={"recipe": XRAY},
        linear_probe=False,
        log=lambda *_: None,
        progress=False,
    )
    assert run.method.recipe == XRAY and run.summary["train_images"] == 64
    assert math.isfinite(run.metrics[-1]["loss"]) and 0 <= run.summary["knn_top1"] <= 1
    standardize = run.method.backbone.standardize
    assert standardize.mean.tolist() == pytest.approx(list(xrays.stats()["mean"]))
    assert standardize.std.tolist() == pytest.approx(list(xrays.stats()["std"]))


# ---- data -----------------------------------------------------------------------------------


def _write_npz(root, name, **arrays):
    path = Path(root) / "medmnist" / f"{name}.npz"
    path.parent.mkdir(parents=True, exist_ok=True)
    np.savez(path, **arrays)


def test_load_medmnist_gives_one_channel_xrays_and_three_channel_tiles(tmp_path):
    rng = np.random.default_rng(0)
    gray = lambda n: rng.integers(0, 256, (n, 28, 28), dtype=np.uint8)
    labels = lambda n, k: rng.integers(0, k, (n, 1)).astype(np.uint8)
    _write_npz(
        tmp_path,
        "pneumoniamnist",
        train_images=gray(20),
        train_labels=labels(20, 2),
        test_images=gray(6),
        test_labels=labels(6, 2),
    )
    _write_npz(
        tmp_path,
        "pathmnist",
        train_images=rng.integers(0, 256, (30, 28, 28, 3), dtype=np.uint8),
        train_labels=labels(30, 9),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # not the official md5, as expected
        xrays = load_medmnist("pneumoniamnist", tmp_path, download=False)
        tiles = load_chapter_data("pathmnist", get_profile("smoke"), tmp_path, download=False)
    assert xrays.train_images.shape == (20, 1, 28, 28) and xrays.test_images.shape == (6, 1, 28, 28)
    assert tiles.train_images.shape == (30, 3, 28, 28) and tiles.test_images is None
    assert "SYNTHETIC" not in tiles.source and tiles.name == "pathmnist"


def test_smoke_profile_without_the_file_uses_a_stand_in_that_says_it_is_synthetic(tmp_path):
    with pytest.warns(UserWarning, match="SYNTHETIC STAND-IN"):
        xrays = load_chapter_data("pneumoniamnist", get_profile("smoke"), tmp_path)
    assert xrays.train_images.shape[1:] == (1, 28, 28) and xrays.train_images.dtype == torch.uint8
    assert "SYNTHETIC" in xrays.source and xrays.name.startswith("synthetic")
    assert all(c.startswith("synthetic ") for c in xrays.classes)
    assert not (tmp_path / "medmnist").exists()  # nothing written, nothing downloaded


def test_other_profiles_never_fall_back_to_the_stand_in(tmp_path):
    with pytest.raises(FileNotFoundError, match="pneumoniamnist"):
        load_chapter_data("pneumoniamnist", get_profile("cpu"), tmp_path, download=False)


def test_synthetic_stand_in_is_seeded_and_shaped_like_the_real_sets():
    a, b = synthetic_stand_in("pathmnist", 50, 20, seed=1), synthetic_stand_in("pathmnist", 50, 20, seed=1)
    assert torch.equal(a.train_images, b.train_images) and torch.equal(a.test_labels, b.test_labels)
    assert a.train_images.shape == (50, 3, 28, 28) and len(a.classes) == 9
    assert to_float(a.train_images).std() > 0.05
    with pytest.raises(ValueError, match="stand-in"):
        synthetic_stand_in("chestmnist", 5, 5)


# ---- reporting ------------------------------------------------------------------------------


def test_pca_2d_finds_the_direction_of_largest_variance_with_a_fixed_sign():
    g = torch.Generator().manual_seed(0)
    y = torch.randn(500, 5, generator=g)
    y[:, 1] = 2 * y[:, 0] + 0.05 * y[:, 1]  # columns 0 and 1 almost collinear: the first component
    pcs = pca_2d(y)
    assert pcs.shape == (500, 2)
    assert torch.corrcoef(torch.stack([pcs[:, 0], y[:, 0]]))[0, 1].abs() > 0.99
    assert pcs[:, 0].var() > 1.8 and pcs[:, 1].var() < 1.3  # about 2 and about 1: standardised columns
    torch.testing.assert_close(pca_2d(-y), -pcs)  # the sign follows the data, not the SVD's whim


def test_results_table_shows_spread_for_several_seeds_and_the_papers_row():
    results = {
        ("SimCLR + probe", 0.1): [
            {"acc": 0.8, "auc": 0.9, "labels": 47},
            {"acc": 0.9, "auc": 0.9, "labels": 47},
        ],
        ("SimCLR + probe", 1.0): [{"acc": 0.85, "auc": 0.95, "labels": 470}],
    }
    text = results_table(
        results, (0.1, 1.0), {"name": "MedMNIST v2 ResNet-18 (paper)", "acc": 0.854, "auc": 0.944}
    )
    assert "±0.071" in text and "0.850" in text and "0.854" in text and "(paper)" in text
    assert mean_spread([0.8, 0.9]) == pytest.approx((0.85, 0.0707106781))
    assert mean_spread([0.5]) == (0.5, 0.0)


# ---- negative controls of the chapter's checks ---------------------------------------------


def test_ordinal_ranks_or_ties_counted_zero_miss_the_auc_that_mid_ranks_give():
    g = torch.Generator().manual_seed(2)
    scores = torch.randint(0, 3, (200,), generator=g).double()  # three levels: many ties
    positive = torch.randint(0, 2, (200,), generator=g) == 1
    ranks = torch.empty(200, dtype=torch.float64)
    ranks[scores.argsort(stable=True)] = torch.arange(1, 201, dtype=torch.float64)  # ties broken by position
    n_pos = int(positive.sum())
    ordinal = ((ranks[positive].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * (200 - n_pos))).item()
    ties_zero = (scores[positive][:, None] > scores[~positive]).double().mean().item()
    assert roc_auc(scores, positive.long()) == pytest.approx(direct_auc(scores, positive), abs=1e-12)
    assert abs(ordinal - direct_auc(scores, positive)) > 1e-3
    assert abs(ties_zero - direct_auc(scores, positive)) > 1e-3


def test_the_xray_checks_reject_the_histology_and_cifar_recipes_and_vice_versa():
    from contrastive.augment import SIMCLR_CIFAR

    def safe_for_xrays(recipe):
        return recipe.jitter[2:] == (0.0, 0.0) and recipe.flip_p == 0.0 and recipe.gray_p == 0.0

    def safe_for_tiles(recipe):
        return recipe.jitter[2] > 0 and recipe.jitter[3] > 0 and recipe.flip_p == 0.5 and recipe.gray_p == 0.0

    assert safe_for_xrays(XRAY) and safe_for_tiles(HISTOLOGY)
    assert not safe_for_xrays(HISTOLOGY) and not safe_for_xrays(SIMCLR_CIFAR)
    assert not safe_for_tiles(XRAY) and not safe_for_tiles(SIMCLR_CIFAR)


def test_the_chapters_rebuilt_random_init_is_the_backbone_the_loop_builds_and_another_seed_is_not():
    # The chapter seeds with the run's seed and builds the backbone, as `train` does before its method.
    from contrastive.methods import build_method

    stats = {"mean": (0.5,), "std": (0.25,)}
    torch.manual_seed(0)
    method = build_method("simclr", "convnet_tiny", 64, 1, stats)
    rebuilt = {}
    for seed in (0, 1):
        torch.manual_seed(seed)
        rebuilt[seed] = build_backbone("convnet_tiny", in_channels=1, **stats).state_dict()
    loop = method.backbone.state_dict()
    assert all(torch.equal(loop[k], rebuilt[0][k]) for k in loop)
    assert not all(torch.equal(loop[k], rebuilt[1][k]) for k in loop)


def test_a_shift_of_the_class_prior_multiplies_the_posterior_odds_and_moves_the_right_threshold():
    # PneumoniaMNIST: 3,494 of 4,707 training X-rays and 390 of 624 test X-rays show pneumonia.
    train_prior, test_prior = 3494 / 4707, 390 / 624
    ratio = (test_prior / (1 - test_prior)) / (train_prior / (1 - train_prior))
    x = torch.linspace(-3, 3, 61, dtype=torch.float64)
    likelihood = {1: torch.exp(-((x - 1) ** 2) / 2), 0: torch.exp(-((x + 1) ** 2) / 2)}

    def posterior(prior):  # Bayes' rule with the two classes' likelihoods
        return prior * likelihood[1] / (prior * likelihood[1] + (1 - prior) * likelihood[0])

    odds = {p: posterior(p) / (1 - posterior(p)) for p in (train_prior, test_prior)}
    assert torch.allclose(odds[test_prior], ratio * odds[train_prior], rtol=1e-12, atol=0)
    assert not torch.allclose(odds[test_prior], odds[train_prior] / ratio, rtol=1e-3, atol=0)  # inverted
    # the chapter's numbers: a score of 1/2 means about 0.37 on the test split; the right cut-off is 0.63
    assert (
        round(ratio, 2) == 0.58
        and round(ratio / (1 + ratio), 2) == 0.37
        and round(1 / (1 + ratio), 2) == 0.63
    )
