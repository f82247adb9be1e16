"""Shared fixtures: compose the real Hydra config with fast overrides, and a session-wide teacher cache."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from omegaconf import DictConfig

from kd_lightning.config.conf_files import compose_run
from kd_lightning.data.generate import write_cifar  # noqa: F401  (the tests import it from here)

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
    return compose_run(overrides, out_dir, cache_dir, cwd=ROOT)


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
    """Reads the run's results.json in every training epoch after the first (at its end, as a user watching
    a sweep would read it at any time: the run writes it once an epoch's checkpoints are written), into
    `SEEN`."""

    SEEN: list[dict] = []

    def on_train_epoch_end(self, trainer, pl_module):
        import json

        if trainer.current_epoch > 0:
            ReadResultsDuringFit.SEEN.append(
                json.loads((Path(trainer.default_root_dir) / "results.json").read_text())
            )
