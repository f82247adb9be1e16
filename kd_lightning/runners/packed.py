"""Packed jobs: several distill runs of one sweep trained together in one process (hydra/launcher=packed).

`plan_packs(requests)` groups the jobs that may pack (kd_lightning.engine.packing: same key, nothing that
needs a run of its own) and says why the others run alone. `run_pack(requests)` trains one group: each job
keeps its own run folder (claimed, checked for resume=auto and earlier work as a run alone does), its own
results.json (with `packed_with`, the folders it trained beside), student.pt and resolved config; the
students train fused (kd_lightning.core.packed), the union of their teachers runs once per batch (or is
read once from its stores). The pack's own checkpoint is `<sweep>/.packs/<key>/checkpoints/last.ckpt`:
resume=auto continues an interrupted pack from it, and a finished job is not repeated.
"""

from __future__ import annotations

import hashlib
import logging
import signal
import time
import traceback
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from kd_lightning.config.request import RunRequest
from kd_lightning.engine import run_folder
from kd_lightning.engine.packing import pack_key, why_not_packed
from kd_lightning.engine.resume import interruption, raise_on_sigterm, resume_mode
from kd_lightning.errors import ConfigError
from kd_lightning.plain import Plain
from kd_lightning.runners.registry import RunContext
from kd_lightning.runners.results import write_json_atomic
from kd_lightning.runners.run import (
    Opened,
    _stage0,
    check_accelerator,
    open_run,
    show_summary,
    stage_data,
    write_resolved_config,
)

log = logging.getLogger("kd_lightning")


@dataclass(frozen=True)
class PackPlan:
    packs: list[list[int]]  # the requests (by position) that train together, two or more each
    alone: dict[int, str]  # a request that runs by itself → why


def plan_packs(requests: Sequence[RunRequest]) -> PackPlan:
    """Group the requests that may train packed: the same pack key, and nothing that needs a run alone."""
    groups: dict[str, list[int]] = {}
    alone: dict[int, str] = {}
    for i, request in enumerate(requests):
        stage = _stage0(request)
        if stage.spec is None:
            alone[i] = f"its config does not parse ({stage.problem})"
            continue
        reason = why_not_packed(stage.spec)
        if reason is None:
            try:  # a job that would stop on its own options stops alone, not the pack it would join
                from kd_lightning.runners.distill import check_term_options

                check_term_options(stage.spec)
            except ConfigError as e:
                reason = f"its distillation terms are refused ({e})"
        if reason is not None:
            alone[i] = reason
            continue
        groups.setdefault(pack_key(stage.spec), []).append(i)
    packs = []
    for members in groups.values():
        if len(members) == 1:
            alone[members[0]] = (
                "no other job of the sweep shares its settings (only teachers and terms may differ)"
            )
        else:
            packs.append(members)
    return PackPlan(packs, alone)


def pack_folder(outs: Sequence[Path]) -> Path:
    """Where a pack keeps its checkpoint and scratch files: beside its jobs' folders, named by them."""
    digest = hashlib.sha1("\n".join(sorted(str(o) for o in outs)).encode()).hexdigest()[:12]
    return Path(outs[0]).parent / ".packs" / digest


def run_pack(requests: Sequence[RunRequest]) -> list[dict[str, Plain]]:
    """Train `requests` (one pack of `plan_packs`) together; each job's results, as `run` returns them."""
    outs = [r.output_dir for r in requests]
    claimed: list[Path] = []
    try:
        for out in outs:
            out.mkdir(parents=True, exist_ok=True)
            run_folder.claim(out)
            claimed.append(out)
        opened = [open_run(r, True, None) for r in requests]
        results: list[dict[str, Plain]] = [o if isinstance(o, dict) else o.results for o in opened]
        live = [(r, o) for r, o in zip(requests, opened, strict=True) if isinstance(o, Opened)]
        if live:
            folders = [str(r.output_dir) for r, _ in live]
            for request, job in live:
                job.results["packed_with"] = [f for f in folders if f != str(request.output_dir)]
                write_json_atomic(request.output_dir / "results.json", job.results)
            _execute_pack(live, pack_folder([r.output_dir for r, _ in live]))
            for request, job in live:
                show_summary(job.stage, job.results, request.output_dir)
        return results
    finally:
        for out in claimed:
            run_folder.release(out)


def _execute_pack(jobs: list[tuple[RunRequest, Opened]], folder: Path) -> None:
    """`_execute` for a pack: the data once, then the packed fit; every job's results.json says how it ended."""
    previous_sigterm = raise_on_sigterm()
    try:
        first = jobs[0][1].stage.spec
        assert first is not None
        check_accelerator(first)
        import pytorch_lightning as pl

        from kd_lightning.engine.build import resolve_pretrained_models
        from kd_lightning.engine.trainers import quiet_lightning
        from kd_lightning.runners.packed_fit import train_pack

        quiet_lightning(first.settings.verbose)
        pl.seed_everything(first.seed, workers=True)
        dm = stage_data(first)
        contexts = []
        for request, job in jobs:
            assert job.stage.spec is not None
            spec = resolve_pretrained_models(job.stage.spec)
            write_resolved_config(spec.resolved, request.output_dir)
            contexts.append(RunContext(spec, dm, request.output_dir, job.results, job.earlier))
        train_pack(contexts, folder, resume=resume_mode(jobs[0][0].resume))
        for _, job in jobs:
            if job.results["status"] == "running":
                job.results["status"] = "ok"
    except ConfigError as e:
        for _, job in jobs:
            job.results.update(status="config_error", error=str(e))
        raise
    except BaseException as e:
        _record_pack_failure(e, jobs, folder)
        raise
    finally:
        if previous_sigterm is not None:
            signal.signal(signal.SIGTERM, previous_sigterm)
        for request, job in jobs:
            job.results["run_ended"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
            write_json_atomic(request.output_dir / "results.json", job.results)


def _record_pack_failure(e: BaseException, jobs: list[tuple[RunRequest, Opened]], folder: Path) -> None:
    """An error or a stop signal, in every job's results.json (with the pack's last checkpoint)."""
    last = folder / "checkpoints" / "last.ckpt"
    stop = interruption(e)
    for _, job in jobs:
        job.results.update(
            status="failed" if stop is None else "interrupted",
            error=f"{type(e).__name__}: {e}" if stop is None else f"interrupted by {stop}",
            pack_checkpoint=str(last) if last.is_file() else None,
        )
        if stop is None:
            job.results["traceback"] = traceback.format_exc()
