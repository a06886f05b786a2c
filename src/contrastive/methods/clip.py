"""CLIP (Radford et al. 2021): language as the other view.

Chapter: CLIP. The image encoder (the profile's backbone and a linear map) and the
text encoder (`contrastive.text.TextEncoder`) embed N image-caption pairs into one
space; the loss is `clip_loss`, the symmetric cross-entropy over the N x N cosine
similarities times a learned logit scale s = exp(min(log s, log 100)) = 1/tau,
started at 1/0.07 as in the paper. `on_step_end` clamps the log-scale itself at
log 100 as well (the paper's clipping), so it cannot drift above the cap where the
clamp would hide its gradient. The cap is a buffer in the parameter's own dtype: the
clipped parameter then equals the cap exactly, and the clamp passes its gradient
there whatever precision torch compares a tensor and a Python float in.

Captions: CIFAR-10 has none, so `setup` writes five per training image
(`contrastive.text.generate_captions`: templates, class synonyms and attributes
measured on the image), builds the word-level tokenizer from them and keeps both as
buffers, the captions as token ids and the vocabulary as a byte table, so they are
part of the state_dict. They stay fixed for the run, like COCO's five captions per
image, and every step pairs each image with one of its five drawn at random: over
the epochs an image meets all of them, and a resumed run continues on the very same
pairs. `setup` needs the labels, since a caption names the class.

Augmentation: crops of at least half the image and horizontal flips, and no colour
jitter or grayscale, because the captions name colours, brightness and saturation
and a jittered view would contradict its own caption. Flips are safe since no caption
says left or right; half the area keeps the centre and most of the border in view.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ..augment import CLIP_CIFAR, Recipe, augment
from ..distributed import gather_with_grad
from ..evaluate import extract_features
from ..losses import clip_loss
from ..text import CIFAR10_CLASSES, TextEncoder, Tokenizer, generate_captions
from .base import Method, Spec


class CLIP(Method):
    lr_scale = 1e-3  # AdamW at 5e-4 for batch 256 (the paper's rate), against the profiles' SGD rate 0.5
    adamw_weight_decay = 0.1  # a transformer trains with AdamW; the paper uses 0.2 at a far larger scale

    def __init__(
        self,
        spec: Spec,
        embed_dim: int = 128,
        captions_per_image: int = 5,
        vocab_size: int = 256,
        context_length: int = 16,
        text_dim: int = 128,
        text_depth: int = 3,
        text_heads: int = 4,
        init_temperature: float = 0.07,
        max_logit_scale: float = 100.0,
        caption_seed: int = 0,
        classes: Sequence[str] = CIFAR10_CLASSES,
        recipe: Recipe = CLIP_CIFAR,
    ):
        super().__init__()
        if not (init_temperature > 0 and 1 < 1 / init_temperature <= max_logit_scale):
            raise ValueError(
                f"1/init_temperature must be above 1 and at most max_logit_scale "
                f"{max_logit_scale}; got init_temperature {init_temperature}"
            )
        if captions_per_image < 1:
            raise ValueError(f"captions_per_image must be at least 1, got {captions_per_image}")
        self.backbone = spec.build_backbone()
        self.image_projection = nn.Linear(self.backbone.out_dim, embed_dim, bias=False)
        self.text_encoder = TextEncoder(
            vocab_size, context_length, text_dim, text_depth, text_heads, out_dim=embed_dim
        )
        self.log_logit_scale = nn.Parameter(torch.tensor(math.log(1 / init_temperature)))
        self.register_buffer("log_scale_cap", torch.tensor(math.log(max_logit_scale)))
        self.caption_seed, self.classes, self.recipe = caption_seed, tuple(classes), recipe
        # Fixed shapes, filled by setup: they must exist before load_state_dict on a resume.
        self.register_buffer(
            "caption_tokens",
            torch.zeros(spec.num_images, captions_per_image, context_length, dtype=torch.int32),
        )
        self.register_buffer("vocabulary", torch.zeros(vocab_size, 24, dtype=torch.uint8))

    @torch.no_grad()
    def setup(self, train_images: torch.Tensor, train_labels: torch.Tensor, batch_size: int = 1000) -> None:
        """Write the captions of every training image, build the tokenizer, store both as buffers."""
        n, k, length = self.caption_tokens.shape
        if len(train_images) != n or len(train_labels) != n:
            raise ValueError(
                f"this CLIP was built for {n} training images, got {len(train_images)} images "
                f"and {len(train_labels)} labels"
            )
        generator = torch.Generator().manual_seed(self.caption_seed)
        captions = generate_captions(
            train_images, train_labels, self.classes, k, generator, batch_size=batch_size
        )
        flat = [caption for per_image in captions for caption in per_image]
        tokenizer = Tokenizer.build(flat, max_size=len(self.vocabulary))
        self.vocabulary.copy_(tokenizer.to_tensor(*self.vocabulary.shape))
        self.caption_tokens.copy_(tokenizer.encode(flat, length).view(n, k, length))

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer `setup` built, read back from the `vocabulary` buffer."""
        if not self.vocabulary.any():
            raise RuntimeError(
                "CLIP has no vocabulary yet: call setup(train_images, train_labels) or load a "
                "trained state_dict first"
            )
        return Tokenizer.from_tensor(self.vocabulary)

    def logit_scale(self) -> torch.Tensor:
        """s = exp(min(log s, log max_logit_scale)) = 1/temperature, with its gradient up to the cap."""
        return self.log_logit_scale.clamp(max=self.log_scale_cap).exp()

    def forward(self, images: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
        """Uint8 images (B, C, H, W) and their dataset indices -> the CLIP loss against one caption each."""
        choice = torch.randint(self.caption_tokens.shape[1], (len(indices),), device=indices.device)
        tokens = self.caption_tokens[indices, choice]
        image_emb = self.image_projection(self.backbone(augment(images, self.recipe)))
        text_emb = self.text_encoder(tokens)
        image_emb, text_emb = gather_with_grad(image_emb), gather_with_grad(text_emb)
        scale = self.logit_scale()
        self.log_directions(image_emb, text_emb, scale)
        return clip_loss(image_emb, text_emb, scale)

    @torch.no_grad()
    def log_directions(self, image_emb: torch.Tensor, text_emb: torch.Tensor, scale: torch.Tensor) -> None:
        """Each direction's cross-entropy: image -> text (rows) and text -> image (columns)."""
        logits = scale * F.normalize(image_emb.float(), dim=1) @ F.normalize(text_emb.float(), dim=1).T
        targets = torch.arange(len(logits), device=logits.device)
        self.log("loss_image_to_text", F.cross_entropy(logits, targets))
        self.log("loss_text_to_image", F.cross_entropy(logits.T, targets))

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """Clip the learned log-scale at log max_logit_scale, as the paper does after each update."""
        self.log_logit_scale.clamp_(max=self.log_scale_cap)

    def epoch_metrics(self) -> dict:
        """The logit scale and temperature now, and each direction's loss, mean over the epoch's steps."""
        scale = self.logit_scale().item()
        return {"logit_scale": scale, "temperature": 1 / scale, **super().epoch_metrics()}

    @torch.no_grad()
    def encode_image(self, images: torch.Tensor, batch_size: int = 1024) -> torch.Tensor:
        """Unit image embeddings (N, embed_dim) of uint8 images, non-augmented, encoder in eval mode."""
        return F.normalize(self.image_projection(extract_features(self.backbone, images, batch_size)), dim=1)

    @torch.no_grad()
    def encode_text(self, texts: Sequence[str], batch_size: int = 1024) -> torch.Tensor:
        """Unit text embeddings (N, embed_dim); words outside the vocabulary become <unk>."""
        tokens = self.tokenizer.encode(list(texts), self.text_encoder.context_length)
        tokens = tokens.to(self.vocabulary.device)
        chunks = [self.text_encoder(tokens[i : i + batch_size]) for i in range(0, len(tokens), batch_size)]
        return F.normalize(torch.cat(chunks).float(), dim=1)
