"""optim and scheduler are Hydra partials: any torch.optim class, the field's schedules, errors named."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import torch

from kd_lightning.config.optim import OptimSetup, build_optim
from kd_lightning.data import DigitsDataModule
from kd_lightning.errors import ConfigError
from kd_lightning.runners.run import run

from .conftest import compose_cfg

NO_TEACHERS = ("teachers=none", "distill=none", "logger=csv", "callbacks=none")
LR_MONITOR = (
    "+callbacks.lr._target_=pytorch_lightning.callbacks.LearningRateMonitor",
    "+callbacks.lr.logging_interval=epoch",
)


def _lrs(setup: OptimSetup, epochs: int) -> list[float]:
    """The learning rate in each epoch when the schedule steps once per epoch."""
    opt = setup.optimizer([torch.nn.Parameter(torch.zeros(1))])
    sched = setup.scheduler(opt)
    out = []
    for _ in range(epochs):
        out.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return out


def _epoch_lrs(run_dir: Path) -> list[float]:
    with open(run_dir / "csv" / "metrics.csv") as f:
        return [float(r["lr-SGD"]) for r in csv.DictReader(f) if r.get("lr-SGD")]


def test_sgd_multistep_run_has_the_expected_lr_in_every_epoch(make_cfg):
    cfg = make_cfg(
        *NO_TEACHERS,
        *LR_MONITOR,
        "optim=sgd",
        "optim.lr=0.1",
        "scheduler=multistep",
        "scheduler.milestones=[2,4]",
        "trainer.max_epochs=5",
    )
    res = run(cfg)
    assert res["status"] == "ok" and res["optim"] == "sgd" and res["scheduler"] == "multistep"
    assert _epoch_lrs(Path(cfg.paths.output_dir)) == pytest.approx([0.1, 0.1, 0.01, 0.01, 0.001])


def test_the_default_multistep_is_repdistillers_cifar_protocol(tmp_path, cache_dir):
    cfg = compose_cfg(["optim=sgd", "scheduler=multistep"], tmp_path, cache_dir)
    assert list(cfg.scheduler.milestones) == [150, 180, 210] and cfg.scheduler.gamma == 0.1
    assert cfg.optim.momentum == 0.9 and cfg.optim.weight_decay == 5e-4
    lrs = _lrs(build_optim(cfg.optim, cfg.scheduler), 240)
    lr = cfg.optim.lr
    for epoch, factor in ((0, 1), (149, 1), (150, 0.1), (179, 0.1), (180, 0.01), (209, 0.01), (210, 0.001)):
        assert lrs[epoch] == pytest.approx(lr * factor), epoch


def test_warmup_cosine_rises_then_anneals(tmp_path, cache_dir):
    cfg = compose_cfg(
        ["scheduler=warmup_cosine", "trainer.max_epochs=20", "scheduler.warmup_epochs=4", "optim.lr=0.01"],
        tmp_path,
        cache_dir,
    )
    lrs = _lrs(build_optim(cfg.optim, cfg.scheduler), 20)
    assert lrs[0] == pytest.approx(0.01 * cfg.scheduler.start_factor)
    assert all(a < b for a, b in zip(lrs[:4], lrs[1:5], strict=True))  # warm-up
    assert lrs[4] == pytest.approx(0.01) and lrs[-1] < 0.001  # then cosine towards eta_min = 0


class OneCycleSpy(torch.optim.lr_scheduler.OneCycleLR):
    """OneCycleLR that records the total_steps it was built with (the last instance wins)."""

    built: list[int] = []

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        OneCycleSpy.built.append(self.total_steps)


def test_onecycle_spans_exactly_the_runs_optimiser_steps(make_cfg):
    cfg = make_cfg(
        *NO_TEACHERS,
        "scheduler=onecycle",
        f"scheduler._target_={__name__}.OneCycleSpy",
        "trainer.max_epochs=2",
    )
    res = run(cfg)
    dm = DigitsDataModule(batch_size=cfg.data.batch_size)
    dm.setup()
    assert res["status"] == "ok" and OneCycleSpy.built[-1] == 2 * dm.steps_per_epoch()


def test_any_torch_optimizer_by_target(make_cfg):
    res = run(make_cfg(*NO_TEACHERS, "optim._target_=torch.optim.RMSprop", "+optim.alpha=0.9"))
    assert res["status"] == "ok"


@pytest.mark.parametrize(
    "optim,scheduler,message",
    [
        ({"name": "adam", "lr": 0.1}, None, r"optim.name is no longer a key: use optim=<adam\|adamw\|sgd>"),
        ({"_target_": "torch.optim.Adam", "lr": 0.1, "step_size": 3}, None, "optim.step_size is no longer"),
        ({"lr": 0.1}, None, "optim has no _target_"),
        ({"_target_": "torch.optim.Nope"}, None, r"optim._target_='torch.optim.Nope' cannot be built"),
        ({"_target_": "torch.optim.SGD", "lr": 0.0}, None, r"optim.lr must be in \(0.0, inf\)"),
        ({"_target_": "torch.optim.Adam", "lr": 0.1}, {"step_size": 3}, "scheduler has no _target_"),
    ],
)
def test_bad_optim_or_scheduler_is_named(optim, scheduler, message):
    with pytest.raises(ConfigError, match=message):
        build_optim({"_partial_": True, **optim}, scheduler)


@pytest.mark.parametrize("skipped", [0, 2])
def test_a_primed_fused_sgd_equals_torch_sgd_when_the_gradient_scaler_skips_a_step(skipped):
    """16-mixed: the scaler skips a step whose gradients overflowed, often the first. A fused SGD left to
    itself keeps uninitialised momentum buffers then (NaN weights a step later); primed, it gives torch's
    unfused SGD's numbers (to float rounding: the fused kernel unscales inside)."""
    import functools

    from kd_lightning.config.optim import OptimSetup

    def train(fused: bool) -> tuple[torch.Tensor, torch.Tensor]:
        torch.manual_seed(0)
        p = torch.nn.Parameter(torch.randn(300))
        make = functools.partial(torch.optim.SGD, lr=0.1, momentum=0.9, weight_decay=5e-4, fused=fused)
        opt = OptimSetup(make).configure([p], total_steps=4)
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16)
        for k in range(4):
            opt.zero_grad()
            scaler.scale((p * (float("inf") if k == skipped else 1.0)).sum()).backward()
            scaler.step(opt)
            scaler.update()
        return p.detach(), opt.state[p]["momentum_buffer"]

    (p_fused, m_fused), (p_plain, m_plain) = train(True), train(False)
    torch.testing.assert_close(p_fused, p_plain, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(m_fused, m_plain, rtol=1e-6, atol=1e-7)
