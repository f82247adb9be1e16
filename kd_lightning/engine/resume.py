"""Continuing a run: which checkpoint, whether the config still describes the same run, interruptions.

- `resume=auto` continues from the run folder's newest checkpoint (`checkpoints/last.ckpt`, rewritten at
  the end of every epoch, or a SLURM requeue checkpoint `hpc_ckpt_N.ckpt` that Lightning wrote on
  SIGUSR1). A job that SLURM requeued (SLURM_RESTART_COUNT ≥ 1) resumes so by itself.
- The new config is compared with the run's `config.resolved.yaml`: a difference in anything that
  changes the run is an error listing the keys, unless `resume_accept` names them (e.g. to extend
  `trainer.max_epochs` of a finished run, which then continues instead of being skipped).
- SIGINT / SIGTERM (and a cluster's requeue exit) end a run with status "interrupted", the command that
  resumes it, and exit code 128 + the signal number.
"""

from __future__ import annotations

import logging
import os
import shlex
import signal
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

from omegaconf import OmegaConf

from kd_lightning.config.hydra import to_plain
from kd_lightning.errors import ConfigError
from kd_lightning.plain import Plain, as_plain, plain_map

log = logging.getLogger("kd_lightning")

# Keys that do not change what a run computes: they may differ between a run and its resumption.
NEUTRAL_KEYS = (
    "resume", "resume_accept", "overwrite", "print_summary", "print_config", "verbose", "dry_run", "paths", "logger",
    "callbacks.progress_bar", "trainer.enable_progress_bar", "trainer.enable_model_summary",
    "trainer.log_every_n_steps", "teacher_cache.mode", "teacher_cache.dir", "data.num_workers", "data.on_device",
    "data.download", "data.cache_dir", "perf", "jobs_per_gpu",
)  # fmt: skip


class RunInterrupted(Exception):
    """The run was stopped by a signal; `exit_code` is 128 + its number."""

    def __init__(self, signum: int, how: str):
        super().__init__(how)
        self.signum = signum
        self.exit_code = 128 + signum


def requeued_by_slurm() -> bool:
    return int(os.environ.get("SLURM_RESTART_COUNT") or 0) >= 1


def resume_mode(resume: str | None) -> str | None:
    """`resume`, with a SLURM requeue of a run that did not say `resume` treated as `auto`."""
    if resume is None and requeued_by_slurm():
        log.info(
            "SLURM requeued this job (SLURM_RESTART_COUNT=%s): resuming it", os.environ["SLURM_RESTART_COUNT"]
        )
        return "auto"
    return resume


def newest_checkpoint(out: Path) -> Path | None:
    """The run folder's newest resumable checkpoint: last.ckpt or a SLURM requeue checkpoint."""
    found = [p for p in [out / "checkpoints" / "last.ckpt", *out.glob("hpc_ckpt_*.ckpt")] if p.is_file()]
    return max(found, key=lambda p: p.stat().st_mtime) if found else None


_MISSING = object()


Change = tuple[str, Plain, Plain]  # (key, the run's value, the new value)


def _diff(old: object, new: object, prefix: str, out: list[Change]) -> None:
    """Differing leaves; a subtree present on one side only is one entry (not one per leaf)."""
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        for k in sorted(set(old) | set(new), key=str):
            _diff(old.get(k, _MISSING), new.get(k, _MISSING), f"{prefix}{k}.", out)
    elif old != new:
        out.append((prefix[:-1], _leaf(old), _leaf(new)))


def _leaf(value: object) -> Plain:
    return None if value is _MISSING else as_plain(value)


def _short(value: Plain) -> str:
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _covered(key: str, prefixes: tuple[str, ...] | list[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def _relative_to_paths(value: Plain, paths: Mapping[str, Plain]) -> Plain:
    """`value` with every string under one of the `paths.*` folders written relative to it
    (`${paths.output_dir}/checkpoints`), so that a run folder that was moved compares equal to itself."""
    prefixes = sorted(
        ((str(v).rstrip("/"), k) for k, v in paths.items() if isinstance(v, str) and v.strip("/")),
        key=lambda p: -len(p[0]),
    )

    def rel(v: Plain) -> Plain:
        if isinstance(v, Mapping):
            return {k: rel(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [rel(x) for x in v]
        if isinstance(v, str):
            for prefix, key in prefixes:
                if v == prefix or v.startswith(prefix + "/"):
                    return "${paths." + key + "}" + v[len(prefix) :]
        return v

    return rel(value)


def comparable(plain: Mapping[str, Plain]) -> dict[str, Plain]:
    """A resolved config as resume=auto compares it: without the neutral keys, folders relative to `paths`."""
    given = plain.get("paths")
    paths = given if isinstance(given, Mapping) else {}

    def keep(value: Plain, prefix: str) -> Plain:
        if isinstance(value, Mapping):
            return {
                k: keep(v, f"{prefix}{k}.")
                for k, v in value.items()
                if not _covered(f"{prefix}{k}", NEUTRAL_KEYS)
            }
        return value

    out = keep({k: v for k, v in plain.items() if k != "hydra"}, "")
    return dict(plain_map(_relative_to_paths(out, paths), "config"))


def config_hash(plain: Mapping[str, Plain]) -> str:
    """What results.json records of the config it was made with: a hash of what resume=auto compares."""
    import hashlib
    import json

    text = json.dumps(comparable(plain), sort_keys=True, default=str)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def config_changes(new: Mapping[str, Plain], out: Path) -> list[Change]:
    """(key, the run's value, the new value) for every key of the resolved config `new` that differs from
    the run's recorded one and changes what the run computes. Empty when the run has no recorded config."""
    recorded = out / "config.resolved.yaml"
    if not recorded.is_file():
        return []
    old = to_plain(OmegaConf.load(recorded), str(recorded), resolve=False)
    if not isinstance(old, Mapping):
        return []
    diffs: list[Change] = []
    _diff(comparable(old), comparable(new), "", diffs)
    # A pretraining recipe ({data, fit, ...}) is recorded resolved, as the file it produced: not a change.
    return [
        (k, a, b)
        for k, a, b in diffs
        if not (k.endswith("pretrained") and isinstance(a, str) and isinstance(b, Mapping))
    ]


def check_resume(new: Mapping[str, Plain], accept: list[str], out: Path) -> list[str]:
    """resume=auto: refuse a config that changed what the run computes, unless `resume_accept` names the
    keys. Returns the accepted changes ("key: old → new"). Raised before anything is written."""
    changes = config_changes(new, out)
    refused = [c for c in changes if not _covered(c[0], list(accept))]
    if refused:
        lines = "; ".join(f"{k}: {_short(a)} (run) → {_short(b)} (now)" for k, a, b in refused[:12])
        more = f" (and {len(refused) - 12} more)" if len(refused) > 12 else ""
        keys = ",".join(k for k, _, _ in refused)
        raise ConfigError(
            f"resume=auto: this config differs from the run's own ({out / 'config.resolved.yaml'}) in {lines}{more}. "
            f"Repeat the run's values to continue it, start a new run in another folder, or accept the change "
            f"with resume_accept=[{keys}]"
        )
    return [f"{k}: {_short(a)} → {_short(b)}" for k, a, b in changes]


def interruption(e: BaseException) -> RunInterrupted | None:
    """The signal behind an exception that ended a fit, if it was an interruption rather than a failure.

    Lightning turns Ctrl-C into sys.exit(1) after its graceful shutdown, and SIGTERM into a
    SIGTERMException (a SystemExit); a cluster's requeue handler (submitit) also exits with SystemExit."""
    if isinstance(e, RunInterrupted):
        return e
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    if isinstance(e, SIGTERMException):
        return RunInterrupted(signal.SIGTERM, "SIGTERM")
    if isinstance(e, KeyboardInterrupt) or isinstance(e.__context__, KeyboardInterrupt):
        return RunInterrupted(signal.SIGINT, "SIGINT (Ctrl-C)")
    if isinstance(e, SystemExit):
        return RunInterrupted(signal.SIGTERM, f"exit requested ({e.code})")
    return None


def raise_on_sigterm() -> signal.Handlers | Callable[[int, FrameType | None], object] | int | None:
    """Outside the Lightning fit (which has its own handler), SIGTERM raises RunInterrupted, so that
    results.json records the interruption. Returns the previous handler (main thread only)."""

    def handler(signum, frame):
        raise RunInterrupted(signal.SIGTERM, "SIGTERM")

    try:
        return signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread
        return None


@contextmanager
def sigterm_to_lightning():
    """During a Lightning fit SIGTERM is Lightning's (it stops all ranks at the end of the batch and raises
    SIGTERMException): the default handler is put back for the fit, so Lightning does not chain ours."""
    try:
        ours = signal.signal(signal.SIGTERM, signal.SIG_DFL)
    except ValueError:  # not the main thread: signals are not ours to set
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, ours)


def resume_command(out: Path) -> str:
    """The command line that continues this run in its folder."""
    overrides: list[str] = []
    try:
        from hydra.core.hydra_config import HydraConfig

        overrides = list(HydraConfig.get().overrides.task)
    except Exception:  # composed through the API, without Hydra's runtime
        pass
    keep = [o for o in overrides if o.split("=", 1)[0].lstrip("+~") not in ("resume", "hydra.run.dir")]
    return shlex.join(["kd-train", *keep, "resume=auto", f"hydra.run.dir={out}"])
