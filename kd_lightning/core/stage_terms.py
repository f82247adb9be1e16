"""Terms over a model's stages: `stages` (one term per stage), `all_stages`, and the `stage*` / `preact*`
wildcards in tap lists, expanded to the stages the student and every teacher have."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

from torch import nn

from kd_lightning.config.run_spec import as_distill
from kd_lightning.config.specs import DistillSpec, TermSpec
from kd_lightning.errors import ConfigError
from kd_lightning.models.taps import stages
from kd_lightning.plain import Plain
from kd_lightning.teachers.ensemble import TeacherEnsemble


def expand_stage_terms(
    distill: DistillSpec | Mapping[str, Plain], student: nn.Module, teachers: TeacherEnsemble | None
) -> DistillSpec:
    """A term whose taps are `stages` becomes one term per stage, `<name>1` … `<name>K`, each with the
    term's weight: RepDistiller sums AT's and NST's per-stage losses and weighs the sum. K is the fewest
    stages among the student and the teachers (RepDistiller zips the two lists); a model that declares no
    stages has one, its last feature map (kd_lightning.models.taps.stages). A term whose taps are
    `all_stages` stays one term and reads the list [stem, stage1, …, stageK] (FSP's consecutive pairs). In
    a list of taps, `stage*` and `preact*` become stage1 … stageK and preact1 … preactK (ReviewKD, AB)."""
    distill = as_distill(distill)

    def wildcard(tap: str | list[str] | None) -> bool:
        return isinstance(tap, list) and any(str(x).endswith("*") for x in tap)

    staged = [
        n
        for n, t in distill.terms.items()
        if any(tap in ("stages", "all_stages") or wildcard(tap) for tap in (t.student_tap, t.teacher_tap))
    ]
    if not staged:
        return distill
    models = [student, *(teachers.members.values() if teachers is not None else [])]
    n_stages = min(len(stages(m)) for m in models)
    expanded: dict[str, TermSpec] = {}
    for name, term in distill.terms.items():
        if name not in staged:
            expanded[name] = term
            continue
        if wildcard(term.student_tap) or wildcard(term.teacher_tap):
            expanded[name] = replace(
                term,
                student_tap=_expand_taps(term.student_tap, "student_tap", name, n_stages),
                teacher_tap=None
                if term.teacher_tap is None
                else _expand_taps(term.teacher_tap, "teacher_tap", name, n_stages),
            )
            continue
        if term.student_tap == "all_stages":  # one term reading [stem, stage1, …, stageK] (FSP)
            if (term.teacher_tap or "all_stages") != "all_stages":
                raise ConfigError(
                    f"distill.terms.{name}: student_tap all_stages needs teacher_tap all_stages, got "
                    f"{term.teacher_tap!r}"
                )
            taps = ["stem", *(f"stage{i}" for i in range(1, n_stages + 1))]
            expanded[name] = replace(term, student_tap=taps, teacher_tap=taps)
            continue
        if (term.student_tap, term.teacher_tap or "stages") != ("stages", "stages"):
            raise ConfigError(
                f"distill.terms.{name}: student_tap and teacher_tap must both be 'stages' (one term per stage), "
                f"got {term.student_tap!r} and {term.teacher_tap!r}"
            )
        for i in range(1, n_stages + 1):
            expanded[f"{name}{i}"] = replace(term, student_tap=f"stage{i}", teacher_tap=f"stage{i}")
    return replace(distill, terms=expanded)


_WILDCARDS = ("stage*", "preact*")


def _expand_taps(taps: str | list[str], key: str, name: str, k: int) -> list[str]:
    if isinstance(taps, str):
        raise ConfigError(
            f"distill.terms.{name}.{key}={taps!r}: the other tap is a list with stage* or preact*; make this one "
            "a list too"
        )
    out: list[str] = []
    for tap in map(str, taps):
        if tap.endswith("*"):
            if tap not in _WILDCARDS:
                raise ConfigError(
                    f"distill.terms.{name}.{key}: unknown wildcard {tap!r}; valid: {', '.join(_WILDCARDS)}"
                )
            out += [f"{tap[:-1]}{i}" for i in range(1, k + 1)]
        else:
            out.append(tap)
    return out
