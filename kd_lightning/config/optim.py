"""Optimiser and learning-rate schedule, composed by Hydra: `optim` and `scheduler` are `_partial_` configs.

    optim:     {_target_: torch.optim.SGD, _partial_: true, lr: 0.05, momentum: 0.9, weight_decay: 5e-4}
    scheduler: {_target_: torch.optim.lr_scheduler.MultiStepLR, _partial_: true, milestones: [150, 180, 210],
                gamma: 0.1, interval: epoch}

Any `torch.optim` class (or any callable taking the parameters) and any scheduler (a callable taking the
optimiser) can be named. Two keys are ours: `interval` (epoch | step: when Lightning steps the scheduler)
and `total_steps: auto` (the run's optimiser steps, e.g. for OneCycleLR). Both are tried on a dummy
parameter while the run is built, so a wrong argument fails before training.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import cast

import torch
from pytorch_lightning.utilities.types import OptimizerLRScheduler
from torch.optim import Optimizer
from torch.optim.lr_scheduler import CosineAnnealingLR, LinearLR, LRScheduler, SequentialLR

from kd_lightning.errors import ConfigError, as_float
from kd_lightning.plain import Plain

OptimizerFn = Callable[[Iterable[torch.nn.Parameter]], Optimizer]
SchedulerFn = Callable[..., LRScheduler]

# The spellings of the hand-written table this replaced, and what to use instead.
REPLACED = {
    "name": "optim=<adam|adamw|sgd> (a file of conf/optim) or optim._target_=<any torch.optim class>",
    "scheduler": "the scheduler group: scheduler=<none|cosine|step|multistep|warmup_cosine|onecycle>",
    "step_size": "scheduler=step scheduler.step_size=N",
    "gamma": "scheduler=step|multistep scheduler.gamma=G",
}
INTERVALS = ("epoch", "step")


@dataclass
class OptimSetup:
    """How the student's (and adapters') parameters are optimised; handed to the LightningModule."""

    optimizer: OptimizerFn
    scheduler: SchedulerFn | None = None
    interval: str = "epoch"
    needs_total_steps: bool = False

    def configure(self, params: Iterable[torch.nn.Parameter], total_steps: int) -> OptimizerLRScheduler:
        """What `LightningModule.configure_optimizers` returns."""
        params = list(params)
        opt = prime_fused_sgd(self.optimizer(params, **fused_on_gpu(self.optimizer, params)))
        if self.scheduler is None:
            return opt
        kw = {"total_steps": max(1, int(total_steps))} if self.needs_total_steps else {}
        sched = self.scheduler(opt, **kw)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": self.interval}}


def fused_on_gpu(make: OptimizerFn, params: list[torch.nn.Parameter]) -> dict[str, bool]:
    """`fused=True` for a torch optimiser that has it (SGD, Adam, AdamW, ...) when the parameters are on a GPU
    and the config chose neither `fused` nor `foreach` (our choice). One kernel per step instead of several
    per parameter, and under 16-mixed the gradient scaler then checks for infinities on the device instead
    of reading a flag on the host at every step."""
    import functools
    import inspect

    if not params or not all(p.is_cuda for p in params) or not isinstance(make, functools.partial):
        return {}
    if "fused" in make.keywords or "foreach" in make.keywords:
        return {}
    try:
        accepts = "fused" in inspect.signature(make.func).parameters
    except (TypeError, ValueError):
        return {}
    if not accepts:
        return {}
    if issubclass_safe(make.func, torch.optim.SGD) and float(make.keywords.get("dampening", 0)) != 0:
        return {}  # prime_fused_sgd cannot make a fused SGD with dampening exact
    return {"fused": True}


def issubclass_safe(obj: object, cls: type) -> bool:
    return isinstance(obj, type) and issubclass(obj, cls)


def prime_fused_sgd(opt: Optimizer) -> Optimizer:
    """A fused SGD with momentum gets zero momentum buffers before its first step. Torch's fused SGD makes
    them with `empty_like` at its first step and fills them in the kernel; when the gradient scaler skips
    that step (16-mixed: the first steps often overflow), the kernel returns early and the buffers keep
    whatever the memory held, so the weights turn NaN a step later (torch 2.11-2.14; reported in LibreYOLO
    PR #771). With zero buffers and no dampening, m·0 + g is what the first step computes anyway: the same
    numbers as torch's unfused SGD, skipped steps included (tests/test_optim.py)."""
    if not isinstance(opt, torch.optim.SGD):
        return opt
    for group in opt.param_groups:
        if not group.get("fused") or group.get("momentum", 0) == 0:
            continue
        for p in group["params"]:
            opt.state[p].setdefault(
                "momentum_buffer", torch.zeros_like(p, memory_format=torch.preserve_format)
            )
    return opt


def warmup_cosine(
    optimizer: Optimizer,
    max_epochs: int,
    warmup_epochs: int = 5,
    start_factor: float = 0.01,
    eta_min: float = 0.0,
) -> LRScheduler:
    """Linear warm-up from `start_factor`·lr over `warmup_epochs`, then cosine to `eta_min` (torch has the
    two parts but no scheduler that chains them from a config)."""
    warmup_epochs = min(int(warmup_epochs), max(0, int(max_epochs) - 1))
    cosine = CosineAnnealingLR(optimizer, T_max=max(1, int(max_epochs) - warmup_epochs), eta_min=eta_min)
    if warmup_epochs == 0:
        return cosine
    warm = LinearLR(optimizer, start_factor=start_factor, end_factor=1.0, total_iters=warmup_epochs)
    return SequentialLR(optimizer, [warm, cosine], milestones=[warmup_epochs])


def _instantiate(node: Mapping[str, Plain], where: str) -> Callable[..., object]:
    import hydra

    try:
        fn = hydra.utils.instantiate(dict(node), _partial_=True)
    except Exception as e:  # an unknown class or module
        raise ConfigError(f"{where}._target_={node.get('_target_')!r} cannot be built: {_cause(e)}") from None
    return fn


def _cause(e: BaseException) -> str:
    while e.__cause__ is not None:
        e = e.__cause__
    return f"{type(e).__name__}: {e}".replace("\n", " ")


def build_optim(optim: Mapping[str, Plain] | None, scheduler: Mapping[str, Plain] | None) -> OptimSetup:
    """The run's OptimSetup from `optim` and `scheduler`; every mistake is a ConfigError naming the key."""
    optim = dict(optim or {})
    old = sorted(k for k in optim if k in REPLACED)
    if old:
        raise ConfigError(
            f"optim.{old[0]} is no longer a key: use {REPLACED[old[0]]}"
            + (f" (also replaced: {', '.join('optim.' + k for k in old[1:])})" if len(old) > 1 else "")
        )
    if "_target_" not in optim:
        raise ConfigError(
            "optim has no _target_: choose optim=adam|adamw|sgd, or set optim._target_ to a torch.optim class"
        )
    for key, low in (("lr", 0.0), ("weight_decay", None)):
        if key in optim:  # the two numbers every torch optimiser takes, checked with their key's name
            as_float(f"optim.{key}", optim[key], low if low is not None else 0.0, open_low=low is not None)
    make_opt = _instantiate(optim, "optim")
    probe = torch.nn.Parameter(torch.zeros(1))
    try:
        opt = make_opt([probe])
    except (TypeError, ValueError) as e:
        raise ConfigError(f"optim ({optim['_target_']}): {e}") from None
    if not isinstance(opt, Optimizer):
        raise ConfigError(
            f"optim._target_={optim['_target_']!r} builds a {type(opt).__name__}, not a torch optimiser"
        )
    # the builders as what they were just seen to make (hydra's partials are typed by nothing else)
    optimizer = cast(OptimizerFn, make_opt)
    sched = dict(scheduler or {})
    if not sched:
        return OptimSetup(optimizer)
    interval = sched.pop("interval", "epoch")
    if interval not in INTERVALS:
        raise ConfigError(f"scheduler.interval={interval!r}; valid: {', '.join(INTERVALS)}")
    if "_target_" not in sched:
        raise ConfigError(
            "scheduler has no _target_: choose scheduler=none|cosine|step|multistep|warmup_cosine|onecycle"
        )
    needs_total = sched.get("total_steps") == "auto"
    if needs_total:
        sched.pop("total_steps")
    make_sched = _instantiate(sched, "scheduler")
    try:
        make_sched(opt, **({"total_steps": 10} if needs_total else {}))
    except (TypeError, ValueError, KeyError) as e:
        raise ConfigError(f"scheduler ({sched['_target_']}): {e}") from None
    return OptimSetup(optimizer, cast(SchedulerFn, make_sched), str(interval), needs_total)


def adam_cosine(lr: float, weight_decay: float, max_epochs: int) -> OptimSetup:
    """Teacher and source-task fits: Adam with a cosine schedule over the fit's epochs."""

    def make_opt(params: Iterable[torch.nn.Parameter]) -> Optimizer:
        return torch.optim.Adam(params, lr=lr, weight_decay=weight_decay)

    def make_sched(opt: Optimizer) -> LRScheduler:
        return CosineAnnealingLR(opt, T_max=max(1, max_epochs))

    return OptimSetup(make_opt, make_sched, "epoch")
