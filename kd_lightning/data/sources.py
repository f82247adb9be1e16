"""Datasets that need no network: scikit-learn digits, MNIST-1D (generated locally), synthetic blobs."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np

from kd_lightning.config.resolvers import user_cache_dir
from kd_lightning.data.base import TensorDataModule
from kd_lightning.errors import ConfigError, as_float, as_int, as_seed
from kd_lightning.files import atomic_write


class DigitsDataModule(TensorDataModule):
    """scikit-learn's bundled 8×8 digits (1,797 images, 10 classes) as (1, 8, 8) images."""

    name = "digits"

    def __init__(self, test_fraction: float = 0.25, **kwargs):
        super().__init__(**kwargs)
        self.test_fraction = as_float(
            "data.test_fraction", test_fraction, 0.0, 1.0, open_low=True, open_high=True
        )

    def load(self) -> dict[str, np.ndarray]:
        from sklearn.datasets import load_digits
        from sklearn.model_selection import train_test_split

        d = load_digits()
        x = (d.data / 16.0).astype(np.float32).reshape(-1, 1, 8, 8)
        y = d.target.astype(np.int64)
        n, k = len(y), len(np.unique(y))
        n_test = math.ceil(self.test_fraction * n)
        if n_test < k or n - n_test < k:
            raise ConfigError(
                f"data.test_fraction={self.test_fraction} leaves {n_test} test and {n - n_test} train samples "
                f"of {n}; a stratified split needs at least {k} (one per class) in each: use a value in "
                f"[{k / n:.4f}, {1 - k / n:.4f}]"
            )
        x_tr, x_te, y_tr, y_te = train_test_split(
            x, y, test_size=self.test_fraction, random_state=self.split_seed, stratify=y
        )
        return {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te}


class MNIST1DDataModule(TensorDataModule):
    """MNIST-1D (Greydanus 2020) generated locally with `mnist1d.data.make_dataset`, cached as .npz."""

    name = "mnist1d"

    def __init__(
        self,
        num_samples: int = 10000,
        data_seed: int = 42,
        train_split: float = 0.8,
        shuffle_seq: bool = False,
        cache_dir: str | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.args = {
            "num_samples": as_int("data.num_samples", num_samples, 20),
            "seed": as_seed("data.data_seed", data_seed),
            "train_split": as_float("data.train_split", train_split, 0.0, 1.0, open_low=True, open_high=True),
            "shuffle_seq": bool(shuffle_seq),
        }
        self.cache_dir = Path(cache_dir if cache_dir is not None else user_cache_dir())

    def cache_path(self) -> Path:
        key = hashlib.sha1(json.dumps(self.args, sort_keys=True).encode()).hexdigest()[:12]
        return self.cache_dir / "mnist1d" / f"mnist1d-{key}.npz"

    def load(self) -> dict[str, np.ndarray]:
        path = self.cache_path()
        if path.is_file():
            with np.load(path, allow_pickle=False) as f:
                return {k: f[k] for k in f.files}
        from mnist1d.data import get_dataset_args, make_dataset

        args = get_dataset_args()
        for k, v in self.args.items():
            setattr(args, k, v)
        d = make_dataset(args)
        arrays = {
            "x_train": d["x"].astype(np.float32)[:, None, :],
            "y_train": d["y"].astype(np.int64),
            "x_test": d["x_test"].astype(np.float32)[:, None, :],
            "y_test": d["y_test"].astype(np.int64),
        }
        atomic_write(path, lambda tmp: np.savez(tmp, **arrays), suffix=".npz")
        return arrays


class SyntheticDataModule(TensorDataModule):
    """Gaussian class clusters in `dim` dimensions: instant, deterministic, for tests and theory checks."""

    name = "synthetic"

    def __init__(
        self,
        num_train: int = 1000,
        num_test: int = 500,
        dim: int = 20,
        num_classes: int = 4,
        separation: float = 2.0,
        data_seed: int = 0,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.cfg = dict(
            num_train=as_int("data.num_train", num_train, 1),
            num_test=as_int("data.num_test", num_test, 1),
            dim=as_int("data.dim", dim, 1),
            classes=as_int("data.num_classes", num_classes, 2),
        )
        self.separation = as_float("data.separation", separation, 0.0)
        self.data_seed = as_seed("data.data_seed", data_seed)

    def load(self) -> dict[str, np.ndarray]:
        rng = np.random.default_rng(self.data_seed)
        c = self.cfg
        centers = rng.normal(size=(c["classes"], c["dim"])) * self.separation / np.sqrt(c["dim"]) * 2

        def sample(n: int) -> tuple[np.ndarray, np.ndarray]:
            y = np.arange(n) % c["classes"]
            rng.shuffle(y)
            x = centers[y] + rng.normal(size=(n, c["dim"]))
            return x.astype(np.float32), y.astype(np.int64)

        x_tr, y_tr = sample(c["num_train"])
        x_te, y_te = sample(c["num_test"])
        return {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te}
