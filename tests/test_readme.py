"""Every command in the README's ```bash blocks, run as far as this machine allows, so a doc command cannot rot.

kd-train commands compose as written (the first job of a multirun), then run with dry_run=true (which
builds data, teachers, student and trainer and fits nothing); a GPU trainer on a machine without a GPU
must end in the one-line configuration error; a command that needs the network or a cluster is composed
only. make targets must exist; the other entry points must exist and know the options the README uses.
"""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest
import torch

from kd_lightning.config.conf_files import CONF_DIR, _first_job, check_composition
from kd_lightning.errors import ConfigError
from kd_lightning.runners.run import run

from .conftest import ROOT, compose_cfg

QUIET = ["print_summary=false", "trainer.enable_progress_bar=false", "logger=none"]


def readme_commands() -> list[str]:
    text = (ROOT / "README.md").read_text()
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", text, flags=re.S):
        for line in block.replace("\\\n", " ").splitlines():
            words = shlex.split(line, comments=True)
            if words:
                commands.append(shlex.join(words))
    return commands


COMMANDS = readme_commands()


def test_the_readme_has_commands_for_every_entry_point():
    heads = {shlex.split(c)[0] for c in COMMANDS}
    assert {"make", "kd-train", "kd-report", "kd-eval"} <= heads, heads


def _env_and_words(command: str) -> tuple[dict[str, str], list[str]]:
    words = shlex.split(command)
    env = {}
    while words and re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", words[0]):
        key, value = words.pop(0).split("=", 1)
        env[key] = value
    return env, words


SHELL_SETUP = re.compile(r"source|[A-Z_][A-Z0-9_]*=\$\(.*")  # an sbatch script's own lines (first word)


def _unwrap(words: list[str]) -> list[str]:
    """The command that `srun` (an sbatch script) starts on every task: `srun kd-train ...`, or `srun bash -c
    '<command>'`."""
    if words and words[0] == "srun":
        words = words[1:]
        if words[:2] == ["bash", "-c"]:
            return _env_and_words(words[2])[1]
    return words


def _train_args(words: list[str]) -> list[str] | None:
    """The kd-train overrides of a kd-train or `torchrun ... -m kd_lightning.train` command."""
    words = _unwrap(words)
    if words[0] == "kd-train":
        return words[1:]
    if words[0] == "torchrun" and "kd_lightning.train" in words:
        return words[words.index("kd_lightning.train") + 1 :]
    return None


def _users_file(override: str) -> bool:
    """An override naming an absolute path that this machine does not have: the user's data or teachers."""
    value = override.partition("=")[2]
    return value.startswith("/") and not Path(value).exists()


@pytest.mark.parametrize("command", COMMANDS, ids=[c[:70] for c in COMMANDS])
def test_readme_command(command, tmp_path, cache_dir, monkeypatch):
    if SHELL_SETUP.fullmatch(shlex.split(command)[0]):
        return  # activating the environment, naming the master node: the script's own shell lines
    env, words = _env_and_words(command)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    if words[0] == "make":
        makefile = (ROOT / "Makefile").read_text()
        for target in words[1:]:
            assert re.search(rf"^{re.escape(target)}:", makefile, flags=re.M), f"no make target {target}"
        return  # `make train` / `make test` are what CI itself runs
    args = _train_args(words)
    if args is None:  # kd-report, kd-eval, kd-cache: the entry point exists and knows the options used
        scripts = (ROOT / "pyproject.toml").read_text()
        assert re.search(rf'^{re.escape(words[0])} = "', scripts, flags=re.M), f"no entry point {words[0]}"
        module = {"kd-report": "report", "kd-eval": "eval", "kd-cache": "cache"}[words[0]]
        source = (ROOT / "kd_lightning" / "cli" / f"{module}.py").read_text()
        for option in re.findall(r"--[a-z][a-z-]*", command):
            assert f'"{option}"' in source, f"{words[0]} does not accept {option}"
        return
    overrides = [a for a in args if a not in ("-m", "--multirun")]
    check_composition(args, CONF_DIR)  # as written, e.g. a misspelt key or an override that is not a key
    job = _first_job(overrides)
    assert job is not None
    if any(o.startswith("hydra/launcher=slurm") for o in job) or "data.download=true" in job:
        return  # a cluster or the network: composing it is what can be checked here
    job = [o for o in job if not o.startswith(("hydra.", "hydra/"))]
    if any(_users_file(o) for o in job):
        return  # the user's own data or checkpoints (tests/test_cifar100.py runs those recipes on fixtures)
    cfg = compose_cfg([*job, *QUIET, "dry_run=true"], tmp_path / "run", cache_dir)
    gpu = str(cfg.trainer.accelerator) in ("gpu", "cuda")
    if gpu and not torch.cuda.is_available():
        with pytest.raises(ConfigError, match="no CUDA GPU"):
            run(cfg)
        return
    assert run(cfg)["status"] == "dry_run"
