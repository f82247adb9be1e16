"""Which jobs of a sweep may train packed together (kd_lightning.core.packed), and which may not, and why.

Jobs pack when they differ only in what a packed step can share: the teacher subset (`teachers.use`) and the
distillation terms (distance, weights, adapters). Everything else (data, student, optimiser, schedule,
trainer, seed, the teacher pool) is the pack's key: equal within a pack. Jobs with different seeds see
different batch orders (the data order follows the seed), so they pack per seed.
"""

from __future__ import annotations

from kd_lightning.config.run_spec import RunSpec
from kd_lightning.engine.launch import expected_world
from kd_lightning.engine.resume import comparable, config_hash
from kd_lightning.losses import loss_class
from kd_lightning.plain import plain_map

# the callbacks a packed fit stands in for: it keeps each student's best epoch and the pack's last.ckpt
PACKED_CALLBACKS = ("ModelCheckpoint", "LossProgressBar", "RichProgressBar", "TQDMProgressBar")


def why_not_packed(spec: RunSpec) -> str | None:
    """Why this job trains alone (None: it may pack)."""
    settings, options = spec.settings, spec.trainer.options
    if settings.runner != "distill":
        return f"runner={settings.runner} (packing trains distill runs)"
    if settings.dry_run:
        return "dry_run=true"
    if settings.test_each_epoch:
        return "test_each_epoch=true (a packed fit validates on the validation split only)"
    if expected_world(options) != 1:
        return "trainer.devices × trainer.num_nodes is not 1 (a pack trains in one process)"
    if options.get("gradient_clip_val"):
        return (
            "trainer.gradient_clip_val is set (one norm over every packed student would clip them together)"
        )
    if str(options.get("precision")) in ("16", "16-mixed"):
        return "precision 16-mixed (the gradient scaler would skip every student's step when one overflows)"
    if spec.perf.check_syncs:
        return "perf.check_syncs=true (checks one run's steps)"
    for name, term in spec.distill.terms.items():
        if hasattr(loss_class(term.distance), "pre_stage"):
            return f"distill.terms.{name} ({term.distance}) trains a pre-stage before the fit"
    for name, callback in spec.callbacks.items():
        target = (callback._target_ or "") if callback is not None else ""
        if target and target.rsplit(".", 1)[-1] not in PACKED_CALLBACKS:
            return f"callbacks.{name} ({target}) acts on one run's fit"
    return None


def pack_key(spec: RunSpec) -> str:
    """What every job of a pack shares, as a digest: the resolved config without the run folder, the teacher
    subset and the distillation terms."""
    plain = dict(comparable(spec.resolved))
    plain.pop("distill", None)
    teachers = dict(plain_map(plain.get("teachers"), "teachers"))
    teachers.pop("use", None)
    plain["teachers"] = teachers
    paths = dict(plain_map(plain.get("paths"), "paths"))
    paths.pop("output_dir", None)
    plain["paths"] = paths
    return config_hash(plain)
