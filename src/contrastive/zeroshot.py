"""CLIP's own read-outs: zero-shot classification with prompts, and image-text retrieval.

Chapter: CLIP. A trained CLIP classifies without a classifier: each class c gets
the text embedding t_c of a prompt ("a photo of a {}" filled with its name), and
an image x is assigned argmax_c cos(f(x), t_c). The prompts are held out of
training (`contrastive.text.ZERO_SHOT_TEMPLATES`), so a high score means the
encoders learned what the class words mean, not a template by heart. Retrieval
ranks the captions of held-out pairs for each image (image -> text) and the images
for each caption (text -> image).

A method used here needs `encode_image(images)` and `encode_text(texts)`, both
returning unit-norm embeddings (`contrastive.methods.clip.CLIP` has them).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F

from .text import CIFAR10_CLASSES, ZERO_SHOT_TEMPLATES, generate_captions, prompt


@torch.no_grad()
def class_embeddings(method, classes: Sequence[str], templates: Sequence[str]) -> torch.Tensor:
    """Unit text embeddings (T, C, D) of every template filled with every class name."""
    texts = [prompt(template, name) for template in templates for name in classes]
    return method.encode_text(texts).view(len(templates), len(classes), -1)


@torch.no_grad()
def zero_shot_accuracy(
    method,
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: Sequence[str],
    templates: Sequence[str] = ZERO_SHOT_TEMPLATES,
    batch_size: int = 1024,
) -> dict:
    """Top-1 of argmax_c cos(f(x), t_c) for each template alone, and for the ensemble.

    The ensemble's t_c is the mean over templates of the unit embeddings of class c's
    prompts, normalised again (CLIP's prompt ensembling). Returns
    {"templates": {template: top1}, "ensemble": top1}.
    """
    if len(images) != len(labels) or len(images) == 0:
        raise ValueError(
            f"need as many labels as images, and at least one; got {len(images)} images "
            f"and {len(labels)} labels"
        )
    if not templates or any("{}" not in t for t in templates):
        raise ValueError(f"every template needs a '{{}}' where the class name goes; got {list(templates)}")
    image_emb = method.encode_image(images, batch_size)
    text_emb = class_embeddings(method, classes, templates).to(image_emb.device)
    labels = labels.to(image_emb.device)
    ensemble = F.normalize(text_emb.mean(0), dim=1)

    def top1(class_emb: torch.Tensor) -> float:
        return (image_emb @ class_emb.T).argmax(1).eq(labels).float().mean().item()

    return {
        "templates": {template: top1(text_emb[i]) for i, template in enumerate(templates)},
        "ensemble": top1(ensemble),
    }


@torch.no_grad()
def retrieval_recall(image_emb: torch.Tensor, text_emb: torch.Tensor, ks: Sequence[int] = (1, 5, 10)) -> dict:
    """Recall@k both ways for N pairs, row i of each embedding from pair i (normalised here).

    Image -> text: the fraction of images whose own caption is among the k most similar of
    the N captions; text -> image the same with the roles swapped. A tie with the positive
    counts against it (rank = the number of other candidates at least as similar), so a
    collapsed model, every similarity equal, scores 0 rather than 1. Returns
    {"image_to_text": {k: recall}, "text_to_image": {k: recall}}.
    """
    if image_emb.dim() != 2 or image_emb.shape != text_emb.shape or len(image_emb) == 0:
        raise ValueError(
            f"image_emb and text_emb must be the same non-empty (N, D), got "
            f"{tuple(image_emb.shape)} and {tuple(text_emb.shape)}"
        )
    sims = F.normalize(image_emb.float(), dim=1) @ F.normalize(text_emb.float(), dim=1).T
    positive = sims.diagonal()
    others = ~torch.eye(len(sims), dtype=torch.bool, device=sims.device)
    rank_of_text = ((sims >= positive[:, None]) & others).sum(1)  # per image, among the captions
    rank_of_image = ((sims >= positive[None, :]) & others).sum(0)  # per caption, among the images
    return {
        "image_to_text": {k: (rank_of_text < k).float().mean().item() for k in ks},
        "text_to_image": {k: (rank_of_image < k).float().mean().item() for k in ks},
    }


@torch.no_grad()
def caption_retrieval(
    method,
    images: torch.Tensor,
    labels: torch.Tensor,
    classes: Sequence[str] = CIFAR10_CLASSES,
    num_pairs: int = 1000,
    seed: int = 1,
    ks: Sequence[int] = (1, 5, 10),
) -> dict:
    """Recall@k on held-out pairs: images the method never trained on, one fresh caption each.

    The captions come from the training templates (held-out images, not held-out phrasing);
    the first `num_pairs` images whose captions are all different are kept, so an image's
    caption never has an identical twin among the candidates. Returns `retrieval_recall`'s
    dict and `num_pairs`, the number of pairs actually used.
    """
    generator = torch.Generator().manual_seed(seed)
    captions = [c[0] for c in generate_captions(images, labels, classes, 1, generator)]
    first: dict[str, int] = {}
    for i, caption in enumerate(captions):
        if len(first) < num_pairs:
            first.setdefault(caption, i)
    keep = list(first.values())
    image_emb = method.encode_image(images[torch.tensor(keep, device=images.device)])
    text_emb = method.encode_text([captions[i] for i in keep]).to(image_emb.device)
    return {**retrieval_recall(image_emb, text_emb, ks), "num_pairs": len(keep)}


def evaluate_clip(
    method, data, templates: Sequence[str] = ZERO_SHOT_TEMPLATES, num_pairs: int = 1000
) -> dict:
    """The chapter's read-outs on the test split: zero-shot accuracy (each template and the
    ensemble) and caption retrieval recall@1/5/10 both ways."""
    return {
        "zero_shot": zero_shot_accuracy(method, data.test_images, data.test_labels, data.classes, templates),
        "retrieval": caption_retrieval(method, data.test_images, data.test_labels, data.classes, num_pairs),
    }
