"""The distillation objective: w_ce · CE(student, y) + Σ_i w_i · term_i(student taps, teacher taps).

A term reads one student tap and one teacher tap (the same role in every teacher), adapts the
student feature to the teacher's shape and applies a distance. With several teachers (Landro et al.
2021) the term combines them in one of three ways:
- `concat`: the teachers' features concatenated along channels; one adapter maps the student to it.
- `mean`: the weighted mean of the teachers' features (shapes must match); one adapter.
- `per_teacher`: one adapter and one distance per teacher, summed with the teachers' weights.
- `gate`: one adapter and one distance per teacher, weighted per sample by a small gate on the input,
  softmax over the teachers of an MLP on the (pooled) input, trained with the student; the members'
  `weight` is not used. It needs a distance with per-sample values (`per_sample`: mse, l1, smooth_l1,
  cosine, kl). The gate learns from the term's own loss, so it moves weight towards the teachers the
  student matches best (our design; learned teacher weights, not a method of the seed papers).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping
from numbers import Real
from typing import Any, Protocol, TypedDict, runtime_checkable

import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.config.run_spec import as_distill
from kd_lightning.config.specs import LABEL_LOSSES, DistillSpec, TermSpec, parse
from kd_lightning.errors import ConfigError, choices
from kd_lightning.losses import create_loss, forward_extras, loss_class
from kd_lightning.losses.adapters import make_adapter
from kd_lightning.losses.protocol import PreStage
from kd_lightning.plain import Plain
from kd_lightning.tensors import add_all

Shape = tuple[int, ...]


class DataContext(TypedDict, total=False):
    """What some methods need from the data (kd_lightning.losses.registry injects it by name)."""

    num_samples: int  # the training split's size (CRD's memory)
    num_classes: int
    input_shape: tuple[int, ...]  # one sample's (combine=gate's network)


@runtime_checkable
class HasPreStage(Protocol):
    """A loss with a part trained before distillation (kd_lightning.losses.protocol)."""

    def pre_stage(self) -> PreStage: ...


def _per_sample(loss: nn.Module) -> Callable[..., torch.Tensor]:
    """The loss's distance per sample (combine=gate checks at build time that the distance has one)."""
    fn = getattr(loss, "per_sample", None)
    if not callable(fn):
        raise ConfigError(f"{type(loss).__name__} has no per_sample distance: combine=gate needs one")
    return fn


# Any: a term reads one tap's tensor (or shape), or for a list of taps (fsp, ReviewKD) the list of them,
# and hands it to its loss as it is
def read_tap(feats: Mapping[str, Any], tap: str | list[str]) -> Any:
    """A term's input: one tap's tensor (or shape), or the list of them for a list of taps."""
    return [feats[t] for t in tap] if isinstance(tap, list) else feats[tap]


def tap_names(tap: str | list[str]) -> list[str]:
    return list(tap) if isinstance(tap, list) else [tap]


def check_weight(where: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, Real):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    value = float(value)
    if value < 0 or value != value:
        raise ConfigError(f"{where} must be a non-negative number, got {value}")
    return value


class TeacherGate(nn.Module):
    """Per-sample teacher weights from the input: the input average-pooled to at most 8 positions per
    spatial side, flattened, Linear → ReLU → Linear to one logit per teacher, softmax (sizes our choice)."""

    def __init__(self, input_shape: Shape, teachers: int, hidden: int = 32):
        super().__init__()
        self.side = 8
        pooled = [min(int(n), self.side) for n in input_shape[1:]]
        self.mlp = nn.Sequential(
            nn.Linear(int(input_shape[0]) * math.prod(pooled), hidden), nn.ReLU(), nn.Linear(hidden, teachers)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        size = [min(int(n), self.side) for n in x.shape[2:]]
        pooled = (
            F.adaptive_avg_pool2d(x, (size[0], size[1]))
            if x.dim() == 4
            else F.adaptive_avg_pool1d(x, size[0])
            if x.dim() == 3
            else x
        )
        return self.mlp(pooled.flatten(1).float()).softmax(1)


class Term(nn.Module):
    # declared for the type checker (nn.Module's attribute lookup would type them Tensor | Module)
    student_tap: str | list[str]
    teacher_tap: str | list[str]
    weight: float
    adapters: nn.ModuleDict
    losses: nn.ModuleDict
    gate: TeacherGate | None

    def __init__(
        self,
        name: str,
        spec: TermSpec | Mapping[str, Plain],
        student_shape: Shape,
        teacher_shapes: Mapping[str, Shape],
        teacher_weights: Mapping[str, float],
        context: DataContext | None = None,
    ):
        super().__init__()
        spec = parse(TermSpec, spec, f"distill.terms.{name}")
        self.name = name
        self.weight = spec.weight
        self.student_tap = spec.student_tap
        self.teacher_tap = spec.tap
        self.combine = spec.combine
        loss_kwargs = dict(spec.options)
        distance = self.distance = spec.distance
        try:
            shape_free = bool(getattr(loss_class(distance), "shape_free", False))
        except ConfigError as e:
            raise ConfigError(f"distill.terms.{name}: {e}") from None
        self.teacher_weights = dict(teacher_weights)
        kind = spec.adapter
        # a list of taps: the loss reads the feature maps together
        if isinstance(student_shape, list) and (
            not shape_free or kind not in ("auto", "none") or self.combine != "per_teacher"
        ):
            raise ConfigError(
                f"distill.terms.{name}: a list of taps is for methods that read several features at once "
                f"(fsp), with adapter none and combine per_teacher; {distance!r} reads one tap"
            )
        members = list(teacher_shapes)
        self._check_logits(teacher_shapes, (context or {}).get("num_classes"))
        self.gate = self._gate(members, context) if self.combine == "gate" else None
        if self.combine in ("per_teacher", "gate"):
            targets = {m: teacher_shapes[m] for m in members}
        else:
            targets = {"combined": self._combined_shape(teacher_shapes)}
        self.adapters = nn.ModuleDict(
            {
                k: nn.Identity()
                if shape_free and kind in ("auto", "none")
                else make_adapter(student_shape, t, kind)
                for k, t in targets.items()
            }
        )
        self.losses = self._losses(targets, student_shape, loss_kwargs, context)
        self.extras = forward_extras(next(iter(self.losses.values()))) if len(self.losses) else ()
        stages = [st for _, st in self.pre_stages()]
        self.pre_stage_only = bool(stages) and all(st.only for st in stages)  # the fit skips this term

    def _check_logits(self, teacher_shapes: Mapping[str, Shape], classes: int | None) -> None:
        if classes is None or self.teacher_tap != "logits":
            return
        wrong = {m: tuple(v) for m, v in teacher_shapes.items() if tuple(v) != (int(classes),)}
        if wrong:
            raise ConfigError(
                f"distill.terms.{self.name} reads the teachers' logits, but {wrong} per sample do not match "
                f"the data's {classes} classes; give each teacher a head for this dataset"
            )

    def _gate(self, members: list[str], context: DataContext | None) -> TeacherGate:
        """combine=gate: the network that weighs each sample's teachers (Landro et al. 2021's gate)."""
        name, distance = self.name, self.distance
        if not hasattr(loss_class(distance), "per_sample"):
            raise ConfigError(
                f"distill.terms.{name}: combine=gate weighs each sample's distance, and {distance!r} has no "
                "per-sample values; use mse, l1, smooth_l1, cosine or kl, or another combine mode"
            )
        if len(members) < 2:
            raise ConfigError(f"distill.terms.{name}: combine=gate needs two or more teachers, got {members}")
        shape = (context or {}).get("input_shape")
        if shape is None:
            raise ConfigError(f"distill.terms.{name}: combine=gate needs context['input_shape'] (the data's)")
        return TeacherGate(tuple(shape), len(members))

    def _losses(
        self,
        targets: Mapping[str, Shape],
        student_shape: Shape,
        loss_kwargs: Mapping[str, object],
        context: DataContext | None,
    ) -> nn.ModuleDict:
        """One loss per target: methods with state (VID variances, CRD heads and memories) keep it per teacher."""
        losses = nn.ModuleDict()
        for k, t in targets.items():
            adapted = student_shape if isinstance(self.adapters[k], nn.Identity) else tuple(t)
            injected = {"student_shape": tuple(adapted), "teacher_shape": tuple(t), **dict(context or {})}
            try:
                losses[k] = create_loss(self.distance, injected, **loss_kwargs)
            except ConfigError as e:
                term_keys = [f for f in TermSpec.__dataclass_fields__ if f != "options"]
                who = f" (teacher {k!r})" if k != "combined" and len(targets) > 1 else ""
                raise ConfigError(
                    f"distill.terms.{self.name}{who}: {e} (term keys: {choices(term_keys)})"
                ) from None
        return losses

    def _combined_shape(self, shapes: Mapping[str, Shape]) -> Shape:
        distinct = set(shapes.values())
        if self.combine == "mean":
            if len(distinct) > 1:
                raise ConfigError(
                    f"distill.terms.{self.name}: combine=mean needs teacher features of one shape, got "
                    f"{dict(shapes)}; use combine=concat or combine=per_teacher"
                )
            return next(iter(distinct))
        first = next(iter(shapes.values()))
        if all(len(s) == 1 for s in shapes.values()):
            return (sum(s[0] for s in shapes.values()),)
        if any(s[1:] != first[1:] for s in shapes.values()):
            raise ConfigError(
                f"distill.terms.{self.name}: combine=concat needs feature maps of one spatial size, got "
                f"{dict(shapes)}; use combine=per_teacher"
            )
        return (sum(s[0] for s in shapes.values()), *first[1:])

    def forward(
        self,
        student: torch.Tensor,
        teachers: Mapping[str, torch.Tensor],
        ctx: Mapping[str, object] | None = None,
    ) -> torch.Tensor:
        kw = {k: (ctx or {}).get(k) for k in self.extras}
        if self.gate is not None:
            x = (ctx or {}).get("x")
            if not isinstance(x, torch.Tensor):
                raise ValueError("combine=gate weighs each sample's teachers from its input: ctx['x']")
            w = self.gate(x)  # (B, K)
            d = torch.stack(
                [
                    _per_sample(self.losses[m])(self.adapters[m](student), t, **kw)
                    for m, t in teachers.items()
                ],
                1,
            )
            return (w * d).sum(1).mean()
        if self.combine == "per_teacher":
            return add_all(
                self.teacher_weights[m] * self.losses[m](self.adapters[m](student), t, **kw)
                for m, t in teachers.items()
            )
        return self.losses["combined"](self.adapters["combined"](student), self._target(teachers), **kw)

    def _target(self, teachers: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """The combined teacher feature of `mean` and `concat`."""
        if self.combine == "mean":
            ts = list(teachers.values())
            w = [self.teacher_weights[m] for m in teachers]
            if len(set(w)) == 1:  # equal weights: one stack and one mean, not a multiply and add per teacher
                scale = w[0] * len(w)  # 1 for the ensemble's weights, which sum to one
                mean = torch.stack(ts).mean(0)
                return mean if scale == 1 else mean * scale
            return add_all(wi * t for wi, t in zip(w, ts, strict=True))
        ts = list(teachers.values())
        return torch.cat([t.flatten(1) for t in ts], 1) if ts[0].dim() == 2 else torch.cat(ts, 1)

    def pre_stages(self) -> list[tuple[str, PreStage]]:
        """(loss key, its pre-stage) for each of this term's losses that declares one (kd_lightning.engine.prestage)."""
        return [(k, loss.pre_stage()) for k, loss in self.losses.items() if isinstance(loss, HasPreStage)]

    def pre_stage_loss(
        self,
        key: str,
        stage: PreStage,
        student: Mapping[str, torch.Tensor],
        teachers: Mapping[str, Mapping[str, torch.Tensor]],
    ) -> torch.Tensor:
        """The pre-stage's loss on the features this term reads: per teacher, or the combined target."""
        ts = {m: read_tap(f, self.teacher_tap) for m, f in teachers.items()}
        target = ts[key] if self.combine in ("per_teacher", "gate") else self._target(ts)
        return stage.loss(self.adapters[key](read_tap(student, self.student_tap)), target)


class Objective(nn.Module):
    """Weighted sum of a label loss and distillation terms; owns the adapters.

    The label loss is cross-entropy, or `mse` between the logits and the one-hot labels (the least-squares
    setting of the kernel-regime analyses, Rahbar et al. 2020)."""

    def __init__(self, ce_weight: float, terms: Mapping[str, Term], label_loss: str = "ce"):
        super().__init__()
        self.ce_weight = check_weight("distill.ce_weight", ce_weight)
        if label_loss not in LABEL_LOSSES:  # also checked by DistillSpec; Objective is public
            raise ConfigError(f"distill.label_loss={label_loss!r}; valid: {', '.join(LABEL_LOSSES)}")
        self.label_loss = label_loss
        self.terms = nn.ModuleDict(dict(terms))
        self.term = dict(terms)  # the same modules, typed (the ModuleDict registers them)
        if self.ce_weight == 0 and not self.terms:
            raise ConfigError(
                "distill.ce_weight is 0 and there are no distillation terms: nothing to train on"
            )

    @staticmethod
    def student_taps(distill: DistillSpec | Mapping[str, Plain]) -> list[str]:
        return sorted({n for t in as_distill(distill).terms.values() for n in tap_names(t.student_tap)})

    @staticmethod
    def teacher_taps(distill: DistillSpec | Mapping[str, Plain]) -> list[str]:
        return sorted({n for t in as_distill(distill).terms.values() for n in tap_names(t.tap)})

    @property
    def uses_teachers(self) -> bool:
        """Whether the fit reads teacher features (a pre-stage-only term does not)."""
        return any(not t.pre_stage_only for t in self.term.values())

    def forward(
        self,
        student: Mapping[str, torch.Tensor],
        teachers: Mapping[str, Mapping[str, torch.Tensor]] | None,
        y: torch.Tensor,
        index: torch.Tensor | None = None,
        epoch: int = 0,
        x: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        parts: dict[str, torch.Tensor] = {}
        weighted: list[torch.Tensor] = []
        if self.ce_weight > 0:
            logits = student["logits"].float()
            if self.label_loss == "ce":
                label = parts["ce"] = F.cross_entropy(logits, y)
            else:
                label = parts["label_mse"] = F.mse_loss(logits, F.one_hot(y, logits.shape[1]).float())
            weighted.append(label if self.ce_weight == 1 else self.ce_weight * label)
        for name, term in self.term.items():
            if term.pre_stage_only:  # it acted in its pre-stage (kd_lightning.engine.prestage)
                continue
            if teachers is None:
                raise ValueError(f"distill.terms.{name} reads teacher features, and none were given")
            t_feats = {m: read_tap(feats, term.teacher_tap) for m, feats in teachers.items()}
            ctx = {"y": y, "index": index, "epoch": epoch, "x": x}
            parts[name] = term(read_tap(student, term.student_tap), t_feats, ctx)
            weighted.append(parts[name] if term.weight == 1 else term.weight * parts[name])
        if not weighted:  # every term acted in its pre-stage and there is no label loss
            return student["logits"].new_zeros((), dtype=torch.float32), parts
        total = weighted[0].float()
        for w in weighted[1:]:
            total = total + w
        return total, parts


def build_objective(
    distill: DistillSpec | Mapping[str, Plain],
    student_shapes: Mapping[str, Shape],
    teacher_shapes: Mapping[str, Mapping[str, Shape]] | None,
    teacher_weights: Mapping[str, float] | None,
    context: DataContext | None = None,
) -> Objective:
    """`context` holds what some methods need from the data: `num_samples` (train size), `num_classes`.

    `distill.rho` (optional, in [0, 1]) mixes the two sides: the label loss gets weight 1 − ρ and every
    term's weight is multiplied by ρ (ρ = 1: teachers only, ρ = 0: labels only)."""
    d = as_distill(distill)
    terms_cfg = dict(d.terms)
    ce_weight, rho = d.ce_weight, d.rho
    if rho is not None:
        ce_weight = 1.0 - rho
        terms_cfg = {k: dataclasses.replace(v, weight=rho * v.weight) for k, v in terms_cfg.items()}
    if terms_cfg and not teacher_shapes:
        raise ConfigError(
            f"distill has terms {sorted(terms_cfg)} but there are no teachers; use distill=none for "
            "training without teachers, or choose a teachers= set"
        )
    terms = {}
    for name, spec in terms_cfg.items():
        shapes = {m: read_tap(s, spec.tap) for m, s in (teacher_shapes or {}).items()}
        terms[name] = Term(
            name,
            spec,
            read_tap(student_shapes, spec.student_tap),
            shapes,
            teacher_weights or {},
            context,
        )
    return Objective(ce_weight, terms, d.label_loss)
