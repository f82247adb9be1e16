"""Data files of random content in the formats the datamodules read: CIFAR python batches and ImageFolder
trees of PNGs. For the tests, the benchmarks and `make gpu-check`, which must not download anything."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np


def write_cifar(root: Path, classes: int, n_train: int = 10, n_test: int = 6, seed: int = 0) -> Path:
    """CIFAR-10/100 python batches (the format torchvision downloads) of random pixels and labels under
    `root`; each file's first label is the last class, so that the class count reads right."""
    rng = np.random.default_rng(seed)
    if classes == 10:
        folder = root / "cifar-10-batches-py"
        files = {f"data_batch_{i}": n_train for i in range(1, 6)} | {"test_batch": n_test}
        key = b"labels"
    else:
        folder = root / "cifar-100-python"
        files = {"train": n_train, "test": n_test}
        key = b"fine_labels"
    folder.mkdir(parents=True)
    for name, n in files.items():
        labels = list(rng.integers(0, classes, n))
        labels[0] = classes - 1
        batch = {b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), key: labels}
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)
    return root


def write_image_folder(
    root: Path, images: int, size: int, classes: int, used: int | None = None, seed: int = 0
) -> Path:
    """`classes` class folders (`n00000000`, ...) and `images` PNGs of size × size spread over the first
    `used` of them (all by default; fewer for an ImageNet-shaped tree of 1000 folders). Each class has its own
    mean colour, so that it can be learnt."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    used = classes if used is None else used
    for c in range(classes):
        (root / f"n{c:08d}").mkdir(parents=True, exist_ok=True)
    for i in range(images):
        c = i % used
        base = np.array([(37 * c) % 256, (91 * c) % 256, (151 * c) % 256], dtype=np.float32)
        img = np.clip(base + rng.normal(0, 40, (size, size, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(img).save(root / f"n{c:08d}" / f"{i}.png")
    return root
