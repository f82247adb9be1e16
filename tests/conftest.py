"""Shared fixtures: compose the real Hydra config with fast overrides, and a session-wide teacher cache."""

from __future__ import annotations

import contextlib
import os
import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import pytorch_lightning as pl
import torch
from hydra import compose, initialize_config_dir
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, open_dict

ROOT = Path(__file__).resolve().parents[1]
CONF = ROOT / "conf"

# Small but real: two teachers on digits fitted for a few epochs, a couple of epochs of KD.
FAST_TRAINER = [
    "trainer.max_epochs=2",
    "trainer.enable_progress_bar=false",
    "logger=none",
    "print_summary=false",
]
FAST_TEACHERS = ["teachers.members.cnn_s.fit.max_epochs=3", "teachers.members.cnn_l.fit.max_epochs=3"]
FAST = FAST_TRAINER + FAST_TEACHERS


def fast_overrides(overrides: list[str]) -> list[str]:
    """FAST, minus the digits-teacher settings when another teacher set is chosen."""
    other_teachers = any(o.startswith("teachers=") for o in overrides)
    return FAST_TRAINER + ([] if other_teachers else FAST_TEACHERS)


def compose_cfg(overrides: list[str], out_dir: Path, cache_dir: Path) -> DictConfig:
    with initialize_config_dir(config_dir=str(CONF), version_base="1.3"):
        cfg = compose("train", overrides=overrides, return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.output_dir = str(out_dir)
        cfg.paths.cache_dir = str(cache_dir)
        cfg.hydra.runtime.output_dir = str(out_dir)
        cfg.hydra.runtime.cwd = str(ROOT)
    HydraConfig.instance().set_config(cfg)
    return cfg


@pytest.fixture(scope="session")
def cache_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("kd_cache")


@pytest.fixture
def make_cfg(tmp_path: Path, cache_dir: Path):
    """Each call composes a run with its own folder (`run`, then `run-2`, ...), as kd-train gives every run
    its own; `out="run"` puts it in a given one (resume tests continue a run in its folder)."""
    calls = []

    def _make(*overrides: str, fast: bool = True, out: str | None = None) -> DictConfig:
        calls.append(out)
        folder = out or ("run" if len(calls) == 1 else f"run-{len(calls)}")
        return compose_cfg(
            [*(fast_overrides(list(overrides)) if fast else []), *overrides], tmp_path / folder, cache_dir
        )

    return _make


def run_cli(
    *args: str, cwd: Path, env: dict | None = None, timeout: int = 600, module: str = "kd_lightning.train"
) -> subprocess.CompletedProcess:
    """Run a console entry point in a fresh process, as a user would."""
    full_env = {**os.environ, "PYTHONWARNINGS": "ignore", **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", module, *args],
        cwd=cwd,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# Injected into runs through the config: +callbacks.poison._target_=tests.conftest.PoisonWeightsAtEpoch
class PoisonWeightsAtEpoch(pl.Callback):
    """Make the student's weights NaN at the start of `epoch`, as a diverging run would."""

    def __init__(self, epoch: int = 1):
        self.epoch = epoch

    def on_train_epoch_start(self, trainer, pl_module):
        if trainer.current_epoch == self.epoch:
            with torch.no_grad():
                for p in pl_module.student.parameters():
                    p.fill_(float("nan"))


def write_cifar(root: Path, classes: int, n_train: int = 10, n_test: int = 6) -> None:
    """CIFAR-10/100 python batches (the format torchvision downloads) of random pixels and labels; each file's
    first label is the last class, so that the class count reads right."""
    rng = np.random.default_rng(0)
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
        batch = {
            b"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8),
            key: list(rng.integers(0, classes, n)),
        }
        batch[key][0] = classes - 1
        with open(folder / name, "wb") as f:
            pickle.dump(batch, f)


def built_module(cfg, data: str):
    """The distillation module a run would train (seeded), and its data module set up for fitting."""
    import pytorch_lightning as pl

    from kd_lightning.engine.build import build_module, build_teacher_ensemble

    spec, dm = built_data(cfg)
    pl.seed_everything(0)
    return build_module(spec, dm, build_teacher_ensemble(spec, dm)), dm


def built_data(cfg, shuffle_seed: int | None = None):
    """The run's spec (stage 0) and its datamodule, set up; the datamodule shuffled by `shuffle_seed`
    (None: torch's initial seed, as a datamodule built outside a run)."""
    import pytorch_lightning as pl

    from kd_lightning.config.run_spec import parse_run
    from kd_lightning.data.from_config import instantiate_datamodule

    spec = parse_run(cfg)
    pl.seed_everything(0)
    dm = instantiate_datamodule(spec.data.config, shuffle_seed=shuffle_seed)
    dm.prepare_data()
    dm.setup("fit")
    return spec, dm


@contextlib.contextmanager
def small_filesystem(path: Path, size: str = "64k"):
    """A real filesystem of `size` bytes mounted at `path` (tmpfs; needs root), unmounted afterwards; the
    test is skipped where mounting is not allowed."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({done.stderr.decode().strip()[:80]})")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


class ReadResultsDuringFit(pl.Callback):
    """Reads the run's results.json at the start of every training epoch after the first, as a user
    watching a sweep would (into `SEEN`)."""

    SEEN: list[dict] = []

    def on_train_epoch_start(self, trainer, pl_module):
        import json

        if trainer.current_epoch > 0:
            ReadResultsDuringFit.SEEN.append(
                json.loads((Path(trainer.default_root_dir) / "results.json").read_text())
            )
