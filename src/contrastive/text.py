"""Text for CLIP: captions computed from CIFAR-10 images, a word-level tokenizer, a small text encoder.

Chapter: CLIP. CIFAR-10 has no captions, so each training image gets a few
generated ones: a template, a synonym of its class, and attributes measured on
the image itself (the colour of its centre and of its border, its brightness,
contrast and saturation). The text side therefore carries more than the label:
two cats get different captions when one is dark and orange and the other a
gray cat on a green background, and the image encoder is asked to see that.

The attribute rules, all computed batched on the uint8 images (B, 3, H, W):

- Pixel colour names: HSV of every pixel. A pixel is chromatic when its chroma
  max - min is at least 0.08 and its saturation (max - min) / max at least 0.2;
  it is then named by its hue (red below 15 or from 345 degrees, orange 15-45,
  yellow 45-70, green 70-170, blue 170-260, purple 260-300, pink 300-345), and a
  red, orange or yellow pixel with value below 0.55 is brown. Other pixels are
  black (value below 0.2), white (above 0.8) or gray. CIFAR's colours are muted:
  nearest-palette naming in CIELAB calls two thirds of the images gray, these
  hue bins call a pale sky blue and dry grass brown, as a person would.
- `color`: the most frequent pixel name in the central region (the middle half
  of each side, where CIFAR's objects sit); `background`: the most frequent
  name in the border frame (an eighth of the side wide, 4 px at 32 px). Ties go
  to the name listed first in `COLORS`.
- `light`: "dark" when the mean luma (ITU-R 601) is below 0.35, "bright" above
  0.6, nothing between (about 13% and 17% of CIFAR-10 images).
- `contrast`: "low contrast" when the luma's standard deviation is below 0.12,
  "high contrast" above 0.27, nothing between (about 11% each).
- `tone`: "muted" when the mean chroma max - min is below 0.05, "colorful" above
  0.22, nothing between (about 13% each). Chroma, not HSV saturation: the
  saturation of a dark pixel is noise divided by a small value, and would call
  dark images colorful.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .augment import _gray, hue_chroma_value, to_float
from .models import Block

# ----------------------------------------------------------------------------------------------------------
# Captions
# ----------------------------------------------------------------------------------------------------------

CIFAR10_CLASSES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")

# The first synonym is the CIFAR-10 name, so zero-shot prompts with the class names use known words.
SYNONYMS: dict[str, tuple[str, ...]] = {
    "airplane": ("airplane", "plane", "aeroplane", "jet", "aircraft"),
    "automobile": ("automobile", "car", "sedan"),
    "bird": ("bird", "songbird", "fowl"),
    "cat": ("cat", "kitten", "kitty", "feline"),
    "deer": ("deer", "stag", "doe", "fawn"),
    "dog": ("dog", "puppy", "hound", "pup"),
    "frog": ("frog", "toad", "tree frog"),
    "horse": ("horse", "pony", "stallion", "mare"),
    "ship": ("ship", "boat", "vessel", "freighter"),
    "truck": ("truck", "lorry", "big rig"),
}

# Berlin and Kay's eleven basic colour terms; the order breaks ties in `dominant_color`.
COLORS = ("gray", "black", "white", "red", "orange", "yellow", "green", "blue", "purple", "pink", "brown")
_HUE_EDGES = (15.0, 45.0, 70.0, 170.0, 260.0, 300.0, 345.0)  # degrees; the bins wrap round to red
_HUE_NAMES = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "red")

# Three levels per scalar attribute: below the low threshold, between, above the high one.
LEVEL_WORDS = {
    "light": ("dark", "", "bright"),
    "contrast": ("low contrast", "", "high contrast"),
    "tone": ("muted", "", "colorful"),
}
THRESHOLDS = {"light": (0.35, 0.6), "contrast": (0.12, 0.27), "tone": (0.05, 0.22)}

# Slots: {noun} a synonym of the class, {color} and {background} always a colour name, {light},
# {contrast} and {tone} a word or nothing (the spaces then collapse and "a" becomes "an" where due).
# Every template names at least one colour, so no caption is the class name alone.
TRAIN_TEMPLATES = (
    "a {light} photo of a {color} {noun}",
    "a {color} {noun} on a {background} background",
    "a {tone} picture of a {noun} in front of {background}",
    "a {contrast} image of a {color} {noun}",
    "this {light} image shows a {color} {noun}",
    "a {color} {noun} against a {background} backdrop",
    "a {tone} {light} photograph of a {noun} with {background} around it",
    "a {noun} that looks {color}",
)

# Held out of training: never used to make a training caption, and no rendering of one for any class
# is a training caption (a training "photo of a" always names a colour). Some words are new to the
# vocabulary ("the", "blurry", "my", ...) and become the unknown token, as in any held-out phrasing.
ZERO_SHOT_TEMPLATES = (
    "a photo of a {}",
    "a picture of the {}",
    "an image showing a {}",
    "a blurry photo of a {}",
    "there is a {} in this photograph",
    "a close-up photo of my {}",
)


def _check_color_images(images: torch.Tensor) -> None:
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] == 0:
        raise ValueError(
            f"captions describe colour images: expected (B, 3, H, W) with B > 0, "
            f"got shape {tuple(images.shape)}"
        )


def pixel_color_names(images: torch.Tensor) -> torch.Tensor:
    """Index into `COLORS` of every pixel, (B, H, W), by the HSV rule in the module docstring."""
    _check_color_images(images)
    x = to_float(images)
    hue6, chroma, value = (t.squeeze(1) for t in hue_chroma_value(x))  # grays are named by value below
    saturation = chroma / value.clamp_min(1e-12)
    hue = (60 * hue6).remainder(360)
    index = {name: COLORS.index(name) for name in COLORS}
    hue_bin = torch.bucketize(hue, torch.tensor(_HUE_EDGES, device=x.device), right=True)
    named = torch.tensor([index[n] for n in _HUE_NAMES], device=x.device)[hue_bin]
    warm = (named == index["red"]) | (named == index["orange"]) | (named == index["yellow"])
    named = torch.where(warm & (value < 0.55), index["brown"], named)
    light = torch.where(value > 0.8, index["white"], index["gray"])
    achromatic = torch.where(value < 0.2, index["black"], light)
    chromatic = (chroma >= 0.08) & (saturation >= 0.2)
    return torch.where(chromatic, named, achromatic)


def dominant_color(names: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The most frequent colour index (B,) among the pixels where `mask` (H, W) is True."""
    counts = F.one_hot(names[:, mask], len(COLORS)).sum(dim=1)
    return counts.argmax(dim=1)  # argmax returns the first maximum: ties go to the earlier name


def _regions(height: int, width: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    centre = torch.zeros(height, width, dtype=torch.bool, device=device)
    centre[height // 4 : height - height // 4, width // 4 : width - width // 4] = True
    border = torch.ones(height, width, dtype=torch.bool, device=device)
    fh, fw = max(1, height // 8), max(1, width // 8)
    border[fh : height - fh, fw : width - fw] = False
    return centre, border


def _level(values: torch.Tensor, name: str) -> torch.Tensor:
    low, high = THRESHOLDS[name]
    return (values >= low).long() + (values > high).long()  # 0 below low, 1 between, 2 above high


def image_attributes(images: torch.Tensor) -> dict[str, torch.Tensor]:
    """Attributes of uint8 images (B, 3, H, W), each a LongTensor (B,): `color` and `background` index
    `COLORS`; `light`, `contrast` and `tone` are levels 0, 1, 2 indexing `LEVEL_WORDS` (rules above)."""
    names = pixel_color_names(images)
    centre, border = _regions(images.shape[2], images.shape[3], images.device)
    x = to_float(images)
    luma = _gray(x).flatten(1)
    chroma = (x.amax(dim=1) - x.amin(dim=1)).flatten(1)
    return {
        "color": dominant_color(names, centre),
        "background": dominant_color(names, border),
        "light": _level(luma.mean(1), "light"),
        "contrast": _level(luma.std(1), "contrast"),
        "tone": _level(chroma.mean(1), "tone"),
    }


def tidy(text: str) -> str:
    """Collapse runs of spaces left by empty slots and write "an" before a vowel, "a" otherwise."""
    words = text.split()
    for i, word in enumerate(words[:-1]):
        if word in ("a", "an"):
            words[i] = "an" if words[i + 1][0] in "aeiou" else "a"
    return " ".join(words)


def prompt(template: str, class_name: str) -> str:
    """A zero-shot prompt: the template's "{}" filled with the class name, tidied."""
    return tidy(template.format(class_name))


def generate_captions(
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: Sequence[str] = CIFAR10_CLASSES,
    num_captions: int = 1,
    generator: torch.Generator | None = None,
    templates: Sequence[str] = TRAIN_TEMPLATES,
    batch_size: int = 1000,
) -> list[list[str]]:
    """`num_captions` captions per image: a random template and class synonym per caption, filled with
    the image's attributes; a class without synonyms is named by its name. Same generator seed, same
    captions."""
    if len(images) != len(labels):
        raise ValueError(f"images and labels must be the same length, got {len(images)} and {len(labels)}")
    if len(labels) and not 0 <= int(labels.min()) <= int(labels.max()) < len(classes):
        raise ValueError(
            f"labels must index the {len(classes)} classes, got values from "
            f"{int(labels.min())} to {int(labels.max())}"
        )
    if num_captions < 1:
        raise ValueError(f"num_captions must be at least 1, got {num_captions}")
    if len(images) == 0:
        return []
    parts = [image_attributes(images[i : i + batch_size]) for i in range(0, len(images), batch_size)]
    attributes = {key: torch.cat([p[key] for p in parts]).tolist() for key in parts[0]}
    n = len(images)
    template_draw = torch.randint(len(templates), (n, num_captions), generator=generator).tolist()
    synonym_draw = torch.rand(n, num_captions, generator=generator).tolist()
    captions = []
    for i, label in enumerate(labels.tolist()):
        nouns = SYNONYMS.get(classes[label], (classes[label],))
        slots = {
            "color": COLORS[attributes["color"][i]],
            "background": COLORS[attributes["background"][i]],
            **{key: LEVEL_WORDS[key][attributes[key][i]] for key in LEVEL_WORDS},
        }
        captions.append(
            [
                tidy(templates[t].format(noun=nouns[int(u * len(nouns))], **slots))
                for t, u in zip(template_draw[i], synonym_draw[i])
            ]
        )
    return captions


# ----------------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------------

PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<bos>", "<eos>"
SPECIALS = (PAD, UNK, BOS, EOS)
PAD_ID, UNK_ID, BOS_ID, EOS_ID = range(4)
_WORD = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*|[^\sa-z0-9]")


class Tokenizer:
    """Words to ids: the four special tokens, then the vocabulary, most frequent training word first.

    Text is lowercased and split into words ("close-up" and "it's" stay whole) and single
    punctuation marks; a word outside the vocabulary becomes <unk>. `encode` writes
    <bos> words <eos> and pads with <pad> to a fixed length.
    """

    def __init__(self, words: Sequence[str]):
        words = list(words)
        if len(set(words)) != len(words) or set(words) & set(SPECIALS):
            raise ValueError(
                f"the vocabulary must list distinct words and none of the special tokens {SPECIALS}"
            )
        self.itos = [*SPECIALS, *words]
        self.stoi = {word: i for i, word in enumerate(self.itos)}

    @staticmethod
    def split(text: str) -> list[str]:
        return _WORD.findall(text.lower())

    @classmethod
    def build(cls, texts: Sequence[str], max_size: int | None = None, min_count: int = 1) -> Tokenizer:
        """The vocabulary of `texts`: words seen at least `min_count` times, by falling count, then
        alphabetically (so the result does not depend on the order of the texts), at most `max_size`
        tokens in all, the specials included."""
        if max_size is not None and max_size < len(SPECIALS):
            raise ValueError(
                f"max_size must leave room for the {len(SPECIALS)} special tokens, got {max_size}"
            )
        counts = Counter(word for text in texts for word in cls.split(text))
        words = sorted((w for w, c in counts.items() if c >= min_count), key=lambda w: (-counts[w], w))
        return cls(words[: None if max_size is None else max_size - len(SPECIALS)])

    def __len__(self) -> int:
        return len(self.itos)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Tokenizer) and self.itos == other.itos

    def unknown_words(self, text: str) -> list[str]:
        """The words of `text` that `encode` turns into <unk>."""
        return [w for w in self.split(text) if w not in self.stoi]

    def encode(self, texts: str | Sequence[str], context_length: int) -> torch.Tensor:
        """LongTensor (B, context_length): <bos> ids <eos> <pad>...; longer texts are cut and still end
        with <eos>, where the text encoder reads its feature."""
        if context_length < 3:
            raise ValueError(f"context_length must hold <bos>, a word and <eos>, got {context_length}")
        texts = [texts] if isinstance(texts, str) else list(texts)
        out = torch.full((len(texts), context_length), PAD_ID, dtype=torch.long)
        for row, text in enumerate(texts):
            ids = [self.stoi.get(w, UNK_ID) for w in self.split(text)][: context_length - 2]
            out[row, : len(ids) + 2] = torch.tensor([BOS_ID, *ids, EOS_ID])
        return out

    def decode(self, ids: torch.Tensor) -> str | list[str]:
        """Ids (L,) or (B, L) back to text, up to the first <eos>, without <bos> and <pad>."""
        if ids.dim() == 2:
            return [self.decode(row) for row in ids]
        words = []
        for i in ids.tolist():
            if i == EOS_ID:
                break
            if i not in (PAD_ID, BOS_ID):
                words.append(self.itos[i])
        return " ".join(words)

    def to_dict(self) -> dict:
        """A JSON-compatible description; `Tokenizer.from_dict` rebuilds it."""
        return {"specials": list(SPECIALS), "words": self.itos[len(SPECIALS) :]}

    @classmethod
    def from_dict(cls, state: dict) -> Tokenizer:
        if list(state.get("specials", [])) != list(SPECIALS):
            raise ValueError(f"expected the special tokens {list(SPECIALS)}, got {state.get('specials')}")
        return cls(state["words"])

    def to_tensor(self, rows: int, width: int = 24) -> torch.Tensor:
        """uint8 (rows, width): token i's UTF-8 bytes in row i, zero-padded; zero rows after the last.

        A fixed-shape tensor a method can keep as a buffer, so its vocabulary travels in its
        state_dict and loads with `torch.load(weights_only=True)`.
        """
        if rows < len(self):
            raise ValueError(f"{len(self)} tokens do not fit in {rows} rows")
        table = torch.zeros(rows, width, dtype=torch.uint8)
        for i, token in enumerate(self.itos):
            data = token.encode()
            if len(data) > width:
                raise ValueError(f"token {token!r} is {len(data)} bytes, longer than the width {width}")
            table[i, : len(data)] = torch.tensor(list(data), dtype=torch.uint8)
        return table

    @classmethod
    def from_tensor(cls, table: torch.Tensor) -> Tokenizer:
        tokens = [bytes(row[row != 0].tolist()).decode() for row in table.cpu()]
        tokens = tokens[: tokens.index("")] if "" in tokens else tokens
        return cls.from_dict({"specials": tokens[: len(SPECIALS)], "words": tokens[len(SPECIALS) :]})


# ----------------------------------------------------------------------------------------------------------
# Text encoder
# ----------------------------------------------------------------------------------------------------------


class TextEncoder(nn.Module):
    """Token ids (B, L) -> text features (B, out_dim): token + position embeddings, causal pre-norm blocks,
    a final LayerNorm, and a linear projection of the state at <eos> (CLIP's text transformer).

    The causal mask doubles as the padding mask: <pad> tokens come after <eos>, and a token
    attends only to those before it, so the <eos> state never sees padding.
    """

    def __init__(
        self,
        vocab_size: int,
        context_length: int = 16,
        dim: int = 128,
        depth: int = 3,
        heads: int = 4,
        out_dim: int = 128,
        mlp_ratio: float = 4.0,
    ):
        super().__init__()
        if dim % heads:
            raise ValueError(f"dim {dim} must be a multiple of heads {heads}: every head gets dim / heads")
        self.context_length = context_length
        self.token_embed = nn.Embedding(vocab_size, dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, context_length, dim))
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio, causal=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim)
        self.projection = nn.Linear(dim, out_dim, bias=False)
        # CLIP's initialisation of the embeddings.
        nn.init.normal_(self.token_embed.weight, std=0.02)
        nn.init.normal_(self.pos_embed, std=0.01)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if tokens.dim() != 2 or tokens.shape[1] != self.context_length:
            raise ValueError(f"tokens must be (B, {self.context_length}), got {tuple(tokens.shape)}")
        has_end = tokens == EOS_ID
        # Checked on the CPU only: on a GPU the answer would make the host wait for the device every step.
        if tokens.device.type == "cpu" and not has_end.any(dim=1).all():
            raise ValueError(
                "every row of tokens needs the end token <eos> (Tokenizer.encode writes it); "
                "rows without one are not captions: was the method's setup run?"
            )
        x = self.token_embed(tokens.long()) + self.pos_embed
        x = self.norm(self.blocks(x))
        end = has_end.int().argmax(dim=1)  # the first <eos> of each row
        return self.projection(x[torch.arange(len(x), device=x.device), end])
