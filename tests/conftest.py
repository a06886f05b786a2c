import pytest
import torch

import contrastive.train as train_module
from contrastive.data import ImageDataset
from contrastive.profiles import get_profile

# The summary.json keys ARCHITECTURE.md's CLI contract names.
CONTRACT_KEYS = {
    "method",
    "profile",
    "epochs",
    "knn_top1",
    "knn_top1_random_init",
    "seconds",
    "images_per_second",
    "device",
    "torch",
    "commit",
}

# Keyword arguments that keep a test's training run quiet and short: no progress bar, no log, no probe.
QUIET = dict(progress=False, log=lambda *_: None, linear_probe=False)


def random_views(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    """Two batches of n float "views" (N(0, 1) pixels), as a method's loss takes them after augmentation."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=gen), torch.randn(n, 3, 32, 32, generator=gen)


def random_images(n: int = 8, seed: int = 5) -> torch.Tensor:
    """n uint8 images of CIFAR's shape, as a training step takes them."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (n, 3, 32, 32), generator=gen, dtype=torch.uint8)


def step_on(model, images: torch.Tensor) -> torch.Tensor:
    """A method's training step on `images`, with their dataset indices 0 .. n-1."""
    return model(images, torch.arange(len(images)))


@pytest.fixture
def tiny_data() -> ImageDataset:
    """A synthetic 10-class image set whose classes differ in mean colour; trains in seconds."""
    gen = torch.Generator().manual_seed(0)
    palette = torch.rand(10, 3, 1, 1, generator=gen) * 160 + 40

    def split(n):
        labels = torch.arange(10).repeat(n // 10)
        noise = torch.randn(n, 3, 32, 32, generator=gen) * 30
        images = (palette[labels] + noise).clamp(0, 255).to(torch.uint8)
        return images, labels

    (xtr, ytr), (xte, yte) = split(200), split(100)
    return ImageDataset(
        xtr, ytr, xte, yte, classes=[f"c{i}" for i in range(10)], name="tiny", source="synthetic test data"
    )


@pytest.fixture
def tiny_profile():
    return get_profile("smoke", train_size=None, test_size=None, batch_size=50, epochs=2, eval_batch_size=100)


@pytest.fixture
def interrupted_and_resumed(tmp_path, monkeypatch):
    """run(method, profile, step, **train_kwargs) -> (uninterrupted run, run interrupted at global `step`
    by a KeyboardInterrupt and then resumed from its last checkpoint)."""

    def run(method, profile, step, **kwargs):
        full = train_module.train(method, profile, out_dir=tmp_path / "full", **kwargs)
        real_lr_at = train_module.lr_at

        def interrupt(at, *args):
            if at == step:
                raise KeyboardInterrupt
            return real_lr_at(at, *args)

        monkeypatch.setattr(train_module, "lr_at", interrupt)
        with pytest.raises(KeyboardInterrupt):
            train_module.train(method, profile, out_dir=tmp_path / "resumed", **kwargs)
        monkeypatch.setattr(train_module, "lr_at", real_lr_at)
        resumed = train_module.train(method, profile, out_dir=tmp_path / "resumed", resume=True, **kwargs)
        return full, resumed

    return run


class Keep:
    """A forward hook that keeps a module's outputs with their gradients."""

    def __init__(self):
        self.outputs = []

    def __call__(self, module, inputs, output):
        output.retain_grad()
        self.outputs.append(output)
