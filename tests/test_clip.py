"""CLIP's package pieces: the loss, captions from image attributes, the tokenizer, the text encoder,
the method's step and state, and the zero-shot and retrieval read-outs."""

import io
import json
import math
import string
from itertools import product

import pytest
import torch

from contrastive.losses import clip_loss
from contrastive.methods import Spec
from contrastive.methods.clip import CLIP
from contrastive.text import (
    CIFAR10_CLASSES,
    COLORS,
    EOS_ID,
    LEVEL_WORDS,
    PAD_ID,
    SYNONYMS,
    TRAIN_TEMPLATES,
    UNK_ID,
    ZERO_SHOT_TEMPLATES,
    TextEncoder,
    Tokenizer,
    generate_captions,
    image_attributes,
    prompt,
    tidy,
)
from contrastive.zeroshot import caption_retrieval, retrieval_recall, zero_shot_accuracy


def solid(rgb, size=32) -> torch.Tensor:
    """One uint8 image (1, 3, size, size) of a single colour."""
    return torch.tensor(rgb, dtype=torch.uint8).view(1, 3, 1, 1).expand(1, 3, size, size).clone()


# ----------------------------------------------------------------------------------------------------------
# clip_loss
# ----------------------------------------------------------------------------------------------------------


def clip_loss_loop(image, text, s):
    """Term by term: -log e^{s S_ii} / sum_j e^{s S_ij} and -log e^{s S_jj} / sum_i e^{s S_ij}, averaged."""
    n = len(image)
    u = [v / v.norm() for v in image]
    w = [v / v.norm() for v in text]
    sim = [[float(u[i] @ w[j]) for j in range(n)] for i in range(n)]
    rows = [
        -math.log(math.exp(s * sim[i][i]) / sum(math.exp(s * sim[i][j]) for j in range(n))) for i in range(n)
    ]
    cols = [
        -math.log(math.exp(s * sim[j][j]) / sum(math.exp(s * sim[i][j]) for i in range(n))) for j in range(n)
    ]
    return (sum(rows) / n + sum(cols) / n) / 2


def test_clip_loss_matches_a_direct_loop_over_the_pairs():
    gen = torch.Generator().manual_seed(0)
    image = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    text = torch.randn(6, 4, generator=gen, dtype=torch.float64)
    for s in (1.0, 1 / 0.07, 100.0):
        assert clip_loss(image, text, s).item() == pytest.approx(clip_loss_loop(image, text, s), rel=1e-10)


def test_clip_loss_takes_a_0d_tensor_scale_and_passes_it_a_gradient():
    image, text = torch.randn(5, 3), torch.randn(5, 3)
    log_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    loss = clip_loss(image, text, log_scale.exp())
    loss.backward()
    assert loss.item() == pytest.approx(clip_loss(image, text, 1 / 0.07).item(), rel=1e-5)
    assert log_scale.grad is not None and log_scale.grad.abs() > 0


def test_clip_loss_of_bf16_embeddings_is_computed_in_float32():
    image, text = torch.randn(8, 16), torch.randn(8, 16)
    loss = clip_loss(image.bfloat16(), text.bfloat16(), 50.0)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(
        clip_loss(image.bfloat16().float(), text.bfloat16().float(), 50.0).item()
    )


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf"), torch.tensor([1.0, 2.0])])
def test_clip_loss_refuses_a_scale_that_is_not_a_positive_finite_number(bad):
    with pytest.raises(ValueError, match="logit_scale"):
        clip_loss(torch.randn(4, 3), torch.randn(4, 3), bad)


def test_clip_loss_refuses_unpaired_embeddings():
    with pytest.raises(ValueError, match="same non-empty"):
        clip_loss(torch.randn(4, 3), torch.randn(5, 3), 10.0)


# ----------------------------------------------------------------------------------------------------------
# Attributes and captions
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "rgb, name",
    [
        ((255, 0, 0), "red"),
        ((255, 140, 0), "orange"),
        ((250, 230, 30), "yellow"),
        ((0, 200, 0), "green"),
        ((20, 40, 230), "blue"),
        ((150, 40, 200), "purple"),
        ((255, 120, 200), "pink"),
        ((120, 70, 20), "brown"),
        ((0, 0, 0), "black"),
        ((255, 255, 255), "white"),
        ((128, 128, 128), "gray"),
        ((140, 150, 160), "gray"),
    ],
)
def test_a_single_colour_image_is_called_by_its_colour(rgb, name):
    attributes = image_attributes(solid(rgb))
    assert COLORS[attributes["color"].item()] == name
    assert COLORS[attributes["background"].item()] == name


def test_object_colour_comes_from_the_centre_and_background_from_the_border():
    image = solid((40, 60, 220))  # blue all over ...
    image[:, :, 8:24, 8:24] = torch.tensor([230, 20, 20], dtype=torch.uint8).view(3, 1, 1)  # ... a red centre
    attributes = image_attributes(image)
    assert COLORS[attributes["color"].item()] == "red"
    assert COLORS[attributes["background"].item()] == "blue"


def test_brightness_contrast_and_saturation_levels_follow_the_thresholds():
    dark, mid, bright = solid((30, 30, 30)), solid((128, 128, 128)), solid((230, 230, 230))
    checker = ((torch.arange(32)[:, None] + torch.arange(32)[None, :]) % 2 * 255).to(torch.uint8)
    high_contrast = checker.expand(1, 3, 32, 32).clone()
    red = solid((220, 20, 20))
    a = image_attributes(torch.cat([dark, mid, bright, high_contrast, red]))
    light = [LEVEL_WORDS["light"][i] for i in a["light"].tolist()]
    contrast = [LEVEL_WORDS["contrast"][i] for i in a["contrast"].tolist()]
    tone = [LEVEL_WORDS["tone"][i] for i in a["tone"].tolist()]
    assert light[:3] == ["dark", "", "bright"]
    assert contrast[:3] == ["low contrast"] * 3 and contrast[3] == "high contrast"
    assert tone[:4] == ["muted"] * 4 and tone[4] == "colorful"


def test_captions_name_the_class_by_a_synonym_and_the_measured_colours():
    image = solid((40, 60, 220))
    image[:, :, 8:24, 8:24] = torch.tensor([230, 20, 20], dtype=torch.uint8).view(3, 1, 1)
    (captions,) = generate_captions(
        image, torch.tensor([1]), num_captions=40, generator=torch.Generator().manual_seed(0)
    )
    words = [set(Tokenizer.split(c)) for c in captions]
    assert all(w & {"automobile", "car", "sedan"} for w in words)
    assert all("red" in w or "blue" in w for w in words)  # every template names a colour
    assert not any(w & {"green", "yellow", "cat"} for w in words)
    assert {"red", "blue"} <= set().union(*words)


def test_captions_depend_on_the_image_not_only_on_the_label():
    images = torch.cat([solid((230, 20, 20)), solid((20, 180, 30))])
    red, green = generate_captions(
        images, torch.tensor([3, 3]), num_captions=30, generator=torch.Generator().manual_seed(0)
    )
    assert not set(red) & set(green)
    assert all("green" not in c for c in red) and all("red" not in c for c in green)


def test_captions_are_reproducible_from_the_seed_and_change_with_it():
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (20, 3, 32, 32), dtype=torch.uint8, generator=gen)
    labels = torch.arange(20) % 10

    def draw(seed):
        return generate_captions(
            images, labels, num_captions=3, generator=torch.Generator().manual_seed(seed)
        )

    assert draw(5) == draw(5)
    assert draw(5) != draw(6)


def test_generate_captions_refuses_labels_outside_the_classes():
    with pytest.raises(ValueError, match="index the 10 classes"):
        generate_captions(solid((0, 0, 0)), torch.tensor([10]))


def test_tidy_collapses_empty_slots_and_chooses_the_article():
    assert tidy("a  photo of a orange  cat") == "a photo of an orange cat"
    assert tidy("an  photo of an red airplane") == "a photo of a red airplane"


def _every_rendering(template: str):
    """Every caption a training template can produce, whatever the class, colours and levels."""
    fields = {name for _, name, _, _ in string.Formatter().parse(template) if name}
    choices = {
        "noun": [noun for nouns in SYNONYMS.values() for noun in nouns],
        "color": COLORS,
        "background": COLORS,
        **LEVEL_WORDS,
    }
    names = sorted(fields)
    for values in product(*(choices[n] for n in names)):
        yield tidy(template.format(**dict(zip(names, values))))


def test_held_out_prompts_are_never_training_captions():
    assert not set(ZERO_SHOT_TEMPLATES) & set(TRAIN_TEMPLATES)
    training = {caption for template in TRAIN_TEMPLATES for caption in _every_rendering(template)}
    prompts = {prompt(template, name) for template in ZERO_SHOT_TEMPLATES for name in CIFAR10_CLASSES}
    assert len(training) > 10_000 and len(prompts) == len(ZERO_SHOT_TEMPLATES) * 10
    assert not prompts & training
    # A template that leaves out every attribute would collide: the check above can fail.
    assert prompt("a photo of a {}", "cat") in {
        tidy(t.format(noun="cat", color="", light="")) for t in ["a {light} photo of a {color} {noun}"]
    }


# ----------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------


@pytest.fixture
def captions() -> list[str]:
    gen = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (50, 3, 32, 32), dtype=torch.uint8, generator=gen)
    per_image = generate_captions(images, torch.arange(50) % 10, num_captions=4, generator=gen)
    return [c for cs in per_image for c in cs]


def test_tokenizer_round_trips_every_training_caption(captions):
    tokenizer = Tokenizer.build(captions)
    ids = tokenizer.encode(captions, context_length=16)
    assert tokenizer.decode(ids) == captions
    assert UNK_ID not in ids


def test_unknown_words_become_the_unknown_token_and_are_reported():
    tokenizer = Tokenizer.build(["a photo of a cat", "a dog"])
    ids = tokenizer.encode("a blurry photo of my cat", context_length=10)[0]
    assert tokenizer.decode(ids) == "a <unk> photo of <unk> cat"
    assert (ids == UNK_ID).sum() == 2
    assert tokenizer.unknown_words("A blurry photo of my cat") == ["blurry", "my"]


def test_encode_writes_begin_words_end_then_padding_to_the_context_length():
    tokenizer = Tokenizer.build(["a red cat"])
    ids = tokenizer.encode(["a red cat", "cat"], context_length=8)
    assert ids.shape == (2, 8) and ids.dtype == torch.long
    a, red, cat = (tokenizer.stoi[w] for w in ("a", "red", "cat"))
    assert ids[0].tolist() == [2, a, red, cat, EOS_ID, PAD_ID, PAD_ID, PAD_ID]
    assert ids[1].tolist() == [2, cat, EOS_ID] + [PAD_ID] * 5


def test_encode_cuts_long_texts_and_still_ends_them_with_the_end_token():
    tokenizer = Tokenizer.build(["one two three four five six"])
    ids = tokenizer.encode("one two three four five six", context_length=5)[0]
    assert ids[-1] == EOS_ID
    assert tokenizer.decode(ids) == "one two three"


def test_vocabulary_is_ordered_by_count_then_alphabet_and_capped():
    texts = ["b a", "a c", "c a d"]
    tokenizer = Tokenizer.build(texts)
    assert tokenizer.itos[4:] == ["a", "c", "b", "d"]
    assert Tokenizer.build(list(reversed(texts))) == tokenizer
    capped = Tokenizer.build(texts, max_size=6)
    assert capped.itos[4:] == ["a", "c"] and capped.encode("b", 3)[0, 1] == UNK_ID


def test_split_keeps_hyphenated_words_and_separates_punctuation():
    assert Tokenizer.split("A close-up, of IT's tail.") == ["a", "close-up", ",", "of", "it's", "tail", "."]


def test_tokenizer_survives_json_and_a_byte_tensor(captions):
    tokenizer = Tokenizer.build(captions)
    assert Tokenizer.from_dict(json.loads(json.dumps(tokenizer.to_dict()))) == tokenizer
    table = tokenizer.to_tensor(rows=200)
    assert table.shape == (200, 24) and table.dtype == torch.uint8
    assert Tokenizer.from_tensor(table) == tokenizer
    with pytest.raises(ValueError, match="do not fit"):
        tokenizer.to_tensor(rows=len(tokenizer) - 1)


# ----------------------------------------------------------------------------------------------------------
# Text encoder
# ----------------------------------------------------------------------------------------------------------


def test_text_feature_ignores_whatever_follows_the_end_token():
    torch.manual_seed(0)
    encoder = TextEncoder(vocab_size=20, context_length=8, dim=32, depth=2, heads=4, out_dim=16)
    tokens = torch.tensor([[2, 5, 6, 7, EOS_ID, PAD_ID, PAD_ID, PAD_ID]])
    after = tokens.clone()
    after[0, 5:] = torch.tensor([9, 10, 11])  # words after <eos>: the causal mask hides them
    before = tokens.clone()
    before[0, 2] = 12  # a word before <eos> changes the feature
    out, out_after, out_before = encoder(torch.cat([tokens, after, before]))
    assert torch.allclose(out, out_after, atol=1e-6)
    assert not torch.allclose(out, out_before, atol=1e-3)


def test_text_encoder_refuses_rows_without_an_end_token():
    encoder = TextEncoder(vocab_size=20, context_length=6, dim=16, depth=1, heads=2, out_dim=8)
    with pytest.raises(ValueError, match="setup"):
        encoder(torch.zeros(2, 6, dtype=torch.long))


# ----------------------------------------------------------------------------------------------------------
# The method
# ----------------------------------------------------------------------------------------------------------


def small_clip(num_images: int, **options) -> CLIP:
    spec = Spec(backbone="convnet_tiny", num_images=num_images)
    return CLIP(spec, embed_dim=32, text_dim=32, text_depth=2, text_heads=2, **options)


@pytest.fixture
def clip(tiny_data) -> CLIP:
    torch.manual_seed(0)
    method = small_clip(len(tiny_data.train_images))
    method.setup(tiny_data.train_images, tiny_data.train_labels, batch_size=100)
    return method


def test_setup_stores_every_images_captions_and_the_vocabulary(clip, tiny_data):
    assert clip.caption_tokens.shape == (200, 5, 16)
    assert ((clip.caption_tokens == EOS_ID).sum(-1) == 1).all()
    again = generate_captions(
        tiny_data.train_images,
        tiny_data.train_labels,
        num_captions=5,
        generator=torch.Generator().manual_seed(0),
        batch_size=100,
    )
    assert clip.tokenizer.decode(clip.caption_tokens[7]) == again[7]
    assert "<unk>" not in " ".join(clip.tokenizer.decode(clip.caption_tokens.flatten(0, 1)))


def test_setup_refuses_a_label_count_other_than_the_image_count_and_the_step_needs_setup(tiny_data):
    method = small_clip(len(tiny_data.train_images))
    with pytest.raises(ValueError, match="built for 200 training images, got 200 images and 199 labels"):
        method.setup(tiny_data.train_images, tiny_data.train_labels[:-1])
    assert not method.vocabulary.any() and not method.caption_tokens.any()  # nothing was written
    with pytest.raises(ValueError, match="setup"):
        method(tiny_data.train_images[:4], torch.arange(4))
    with pytest.raises(RuntimeError, match="setup"):
        method.encode_text(["a cat"])


def test_step_gives_a_finite_loss_near_log_n_and_records_both_directions(clip, tiny_data):
    loss = clip(tiny_data.train_images[:32], torch.arange(32))
    assert loss.dim() == 0 and math.isfinite(loss.item())
    assert abs(loss.item() - math.log(32)) < 1.5  # untrained: about chance
    metrics = clip.epoch_metrics()
    assert metrics["logit_scale"] == pytest.approx(1 / 0.07, rel=1e-5)
    assert metrics["temperature"] == pytest.approx(0.07, rel=1e-5)
    mean = (metrics["loss_image_to_text"] + metrics["loss_text_to_image"]) / 2
    assert mean == pytest.approx(loss.item(), rel=1e-5)


def test_loss_falls_over_a_few_steps_on_a_fixed_batch(clip, tiny_data):
    optimizer = torch.optim.AdamW(clip.parameters(), lr=2e-3, weight_decay=0.0)
    images, indices = tiny_data.train_images[:40], torch.arange(40)
    losses = []
    for step in range(30):
        loss = clip(images, indices)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        clip.on_step_end(step, 30)
        losses.append(loss.item())
    assert sum(losses[-5:]) / 5 < sum(losses[:5]) / 5 - 1.0


def test_logit_scale_is_clamped_at_100_and_keeps_its_gradient_at_the_cap(clip, tiny_data):
    images, indices = tiny_data.train_images[:16], torch.arange(16)
    with torch.no_grad():
        clip.log_logit_scale.fill_(math.log(1000.0))
    assert clip.logit_scale().item() == pytest.approx(100.0)
    clip(images, indices).backward()
    assert clip.log_logit_scale.grad == 0  # above the cap the clamp hides the gradient ...
    clip.on_step_end(0, 1)
    assert clip.log_logit_scale.item() == pytest.approx(math.log(100.0))
    clip.zero_grad()
    clip(images, indices).backward()
    assert clip.log_logit_scale.grad != 0  # ... so on_step_end clips the parameter itself to the cap


def test_state_dict_round_trip_reproduces_the_next_step(clip, tiny_data):
    optimizer = torch.optim.AdamW(clip.parameters(), lr=1e-3)
    for _ in range(2):
        loss = clip(tiny_data.train_images[:20], torch.arange(20))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    buffer = io.BytesIO()
    torch.save(clip.state_dict(), buffer)
    buffer.seek(0)
    fresh = small_clip(len(tiny_data.train_images))  # no setup: everything comes from the state
    fresh.load_state_dict(torch.load(buffer, weights_only=True))
    assert fresh.tokenizer == clip.tokenizer
    indices = torch.arange(50, 80)
    losses = []
    for method in (clip, fresh):
        torch.manual_seed(3)
        losses.append(method(tiny_data.train_images[indices], indices).item())
    assert losses[0] == losses[1]
    assert torch.allclose(fresh.encode_text(["a photo of a cat"]), clip.encode_text(["a photo of a cat"]))


def test_encoders_give_unit_embeddings_in_the_joint_space(clip, tiny_data):
    image_emb = clip.encode_image(tiny_data.test_images[:10])
    text_emb = clip.encode_text(["a photo of a cat", "a dark photograph of a blurry dog"])
    assert image_emb.shape == (10, 32) and text_emb.shape == (2, 32)
    assert torch.allclose(image_emb.norm(dim=1), torch.ones(10), atol=1e-5)
    assert torch.allclose(text_emb.norm(dim=1), torch.ones(2), atol=1e-5)


# ----------------------------------------------------------------------------------------------------------
# Zero-shot and retrieval
# ----------------------------------------------------------------------------------------------------------


class KnownEmbeddings:
    """A stand-in method: image i embeds to e_{label}; a prompt embeds to e_c for the class it names,
    except under the template "a swapped {}", where classes 0 and 1 trade places."""

    classes = ("cat", "dog", "frog")

    def __init__(self, labels):
        self.labels = labels

    def encode_image(self, images, batch_size=1024):
        return torch.eye(3)[self.labels[images[:, 0, 0, 0].long()]]

    def encode_text(self, texts):
        rows = []
        for text in texts:
            c = next(i for i, name in enumerate(self.classes) if name in text.split())
            if "swapped" in text and c < 2:
                c = 1 - c
            rows.append(torch.eye(3)[c] + (0.4 * torch.ones(3) if "swapped" in text else 0))
        return torch.nn.functional.normalize(torch.stack(rows), dim=1)


def test_zero_shot_accuracy_per_template_and_for_the_ensemble_on_known_embeddings():
    labels = torch.tensor([0, 0, 1, 1, 2, 2, 2, 0])
    images = torch.arange(8, dtype=torch.uint8).view(8, 1, 1, 1).expand(8, 3, 2, 2)  # pixel = index
    method = KnownEmbeddings(labels)
    result = zero_shot_accuracy(
        method, images, labels, KnownEmbeddings.classes, ["a photo of a {}", "a swapped {}"]
    )
    assert result["templates"]["a photo of a {}"] == 1.0
    assert result["templates"]["a swapped {}"] == pytest.approx(3 / 8)  # only the frogs are right
    # Ensemble: class 0's mean is (e0 + unit(e1 + 0.4 * 1)) / 2 ..., and every image still picks its class.
    assert result["ensemble"] == 1.0


def test_retrieval_recall_counts_ties_against_the_positive():
    image = torch.eye(4)
    text = torch.eye(4)[[0, 1, 3, 2]]  # pairs 2 and 3 got each other's captions
    recall = retrieval_recall(image, text, ks=(1, 2, 3, 4))
    # Pairs 0 and 1 are found first; for pairs 2 and 3 the positive scores 0, tied with two other
    # candidates and beaten by one, so it is ranked last of four.
    assert recall["image_to_text"] == {1: 0.5, 2: 0.5, 3: 0.5, 4: 1.0}
    assert recall["text_to_image"] == {1: 0.5, 2: 0.5, 3: 0.5, 4: 1.0}
    collapsed = retrieval_recall(torch.ones(5, 3), torch.ones(5, 3), ks=(1, 4))
    assert collapsed["image_to_text"] == {1: 0.0, 4: 0.0}


def test_retrieval_recall_is_one_for_matching_pairs_and_asymmetric_in_general():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(30, 8, generator=gen)
    assert retrieval_recall(x, x.clone(), ks=(1,))["image_to_text"] == {1: 1.0}
    hub = torch.cat([x[:1].expand(5, 8), torch.randn(25, 8, generator=gen)])  # five images, one direction
    recall = retrieval_recall(hub, x, ks=(1,))
    assert recall["image_to_text"][1] != recall["text_to_image"][1]


def test_zero_shot_and_caption_retrieval_run_on_a_clip_and_return_fractions(clip, tiny_data):
    result = zero_shot_accuracy(clip, tiny_data.test_images, tiny_data.test_labels, CIFAR10_CLASSES)
    assert list(result["templates"]) == list(ZERO_SHOT_TEMPLATES)
    assert all(0 <= v <= 1 for v in [*result["templates"].values(), result["ensemble"]])
    retrieval = caption_retrieval(clip, tiny_data.test_images, tiny_data.test_labels, num_pairs=40)
    assert 0 < retrieval["num_pairs"] <= 40
    for direction in ("image_to_text", "text_to_image"):
        recalls = [retrieval[direction][k] for k in (1, 5, 10)]
        assert recalls == sorted(recalls) and all(0 <= r <= 1 for r in recalls)


# ----------------------------------------------------------------------------------------------------------
# The common training loop
# ----------------------------------------------------------------------------------------------------------

SMALL = dict(embed_dim=32, text_dim=32, text_depth=2, text_heads=2)
