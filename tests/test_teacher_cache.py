"""Teacher-output cache: the same losses as live teachers, keyed so that any change invalidates it."""

from __future__ import annotations

import pytest
import pytorch_lightning as pl
import torch

from kd_lightning.build import build_module, build_teacher_ensemble, instantiate_datamodule
from kd_lightning.data.batch import Batch
from kd_lightning.models import load_model, save_model
from kd_lightning.teacher_cache import TeacherOutputCache, cache_key


class RecordLosses(pl.Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _fit(make_cfg, *overrides: str, epochs: int = 2, hook=None):
    cfg = make_cfg(*overrides, "callbacks=none")
    pl.seed_everything(0)
    dm = instantiate_datamodule(cfg.data)
    dm.shuffle_seed = 0
    dm.prepare_data()
    dm.setup("fit")
    teachers = build_teacher_ensemble(cfg, dm, "digits")
    pl.seed_everything(0)
    module = build_module(cfg, dm, teachers)
    rec = RecordLosses()
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, limit_val_batches=0, callbacks=[rec], deterministic=True)  # fmt: skip
    calls = {"n": 0}
    forward = teachers.forward

    def counted(x):
        calls["n"] += len(x)  # samples the teachers ran on
        return forward(x)

    teachers.forward = counted
    if hook is not None:
        hook(module)
    trainer.fit(module, datamodule=dm)
    return rec.losses, calls["n"], module, len(dm.train_dataloader())


def test_cached_and_live_teachers_give_the_same_losses(make_cfg):
    live, live_calls, _, steps = _fit(make_cfg, "teacher_cache.mode=none", "distill=[feature,kd]")
    cached, cached_calls, module, _ = _fit(make_cfg, "teacher_cache.mode=memory", "distill=[feature,kd]")
    assert len(live) == len(cached) == 2 * steps
    assert torch.allclose(torch.tensor(live), torch.tensor(cached), rtol=1e-5, atol=1e-6)
    n = len(module.teacher_cache.filled)
    assert live_calls == 2 * n and cached_calls == n  # each sample once: the second epoch ran no teacher
    assert module.teacher_cache.complete and module.teacher_cache.hits == steps


def test_disk_cache_is_reused_and_invalidated_by_a_new_teacher_checkpoint(make_cfg, cache_dir, tmp_path):
    _, first_calls, module, steps = _fit(make_cfg, "teacher_cache.mode=disk", epochs=1)
    path = module.teacher_cache.path
    assert path is not None and path.is_file() and first_calls == len(module.teacher_cache.filled)
    _, again_calls, again, _ = _fit(make_cfg, "teacher_cache.mode=disk", epochs=1)
    assert again_calls == 0 and again.teacher_cache.path == path  # read from disk, no teacher on train data

    # another checkpoint file for cnn_s (weights changed) → another key, the old file is not used
    src = module.teachers.checkpoints["cnn_s"]
    model = load_model(src)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    changed = tmp_path / "cnn_s_changed.pt"
    save_model(model, changed, {"name": "cnn", "channels": [16, 32]}, 10, (1, 8, 8))
    _, calls, other, _ = _fit(
        make_cfg, "teacher_cache.mode=disk", f"teachers.members.cnn_s.checkpoint={changed}", epochs=1
    )
    assert other.teacher_cache.path != path and calls == first_calls


def test_key_changes_with_every_input(tmp_path):
    a, b = tmp_path / "a.pt", tmp_path / "b.pt"
    a.write_bytes(b"one")
    b.write_bytes(b"two")
    base = dict(
        data_identity={"x": 1},
        num_samples=10,
        checkpoints={"t": str(a)},
        taps={"t": ["embed"]},
        precision="32-true",
    )
    key = cache_key(**base)
    assert key == cache_key(**base)
    for change in (
        {"data_identity": {"x": 2}},
        {"num_samples": 11},
        {"checkpoints": {"t": str(b)}},
        {"taps": {"t": ["logits"]}},
        {"precision": "bf16-mixed"},
    ):
        assert cache_key(**{**base, **change}) != key, change


def test_partial_batches_fall_back_to_live():
    cache = TeacherOutputCache(4, "k")
    feats = {"t": {"embed": torch.arange(6.0).view(2, 3)}}
    cache.put(torch.tensor([0, 2]), feats)
    assert cache.get(torch.tensor([0, 1]), torch.device("cpu")) is None
    got = cache.get(torch.tensor([2, 0]), torch.device("cpu"))
    assert torch.equal(got["t"]["embed"], torch.tensor([[3.0, 4, 5], [0, 1, 2]]))


def test_augmentation_turns_the_cache_off(make_cfg, caplog):
    import logging

    caplog.set_level(logging.INFO)
    cfg = make_cfg("student=cnn", "+data.augment={crop_padding: 1, hflip: true}")
    dm = instantiate_datamodule(cfg.data)
    dm.prepare_data()
    dm.setup("fit")
    module = build_module(cfg, dm, build_teacher_ensemble(cfg, dm, "digits"))
    assert module.teacher_cache is None and "teachers run live" in caplog.text


AUG_VIEWS = ["student=cnn", "+data.augment={crop_padding: 1, hflip: true, views: 2}", "distill=[feature,kd]"]


def test_consistent_teaching_views_are_recorded_and_repeat(make_cfg):
    cfg = make_cfg(*AUG_VIEWS)
    dm = instantiate_datamodule(cfg.data)
    dm.shuffle_seed = 0
    dm.setup("fit")
    x, y, index, _ = dm.splits["train"].__getitems__(list(range(16)))
    views = {e: dm.epoch_views(e)[:16] for e in range(6)}
    assert len({tuple(v.tolist()) for v in views.values()}) > 1  # the view shown changes with the epoch

    class _T:  # the epoch the datamodule reads
        current_epoch = 0

    dm.trainer = _T()
    seen: dict[int, torch.Tensor] = {}
    for e in range(6):
        _T.current_epoch = e
        xb, _, _, slot = dm.prepare_batch(Batch(x.clone(), y, index), train=True)
        assert torch.equal(slot, index * 2 + views[e])
        for i, s in enumerate(slot.tolist()):
            if s in seen:
                assert torch.equal(seen[s], xb[i])  # the same (sample, view) is the same image
            seen[s] = xb[i]
    assert len(seen) > 16  # both views of some samples were shown


def test_cached_and_live_agree_under_consistent_teaching(make_cfg):
    live, live_calls, _, steps = _fit(make_cfg, "teacher_cache.mode=none", *AUG_VIEWS, epochs=3)
    cached, cached_calls, module, _ = _fit(make_cfg, "teacher_cache.mode=memory", *AUG_VIEWS, epochs=3)
    assert torch.allclose(torch.tensor(live), torch.tensor(cached), rtol=1e-5, atol=1e-6)
    slots = len(module.teacher_cache.filled)  # 2 views per sample
    assert live_calls == 3 * slots // 2  # every sample, every epoch
    assert cached_calls == int(module.teacher_cache.filled.sum()) < live_calls  # each (sample, view) once


def _nhwc(t: torch.Tensor) -> bool:
    """Stored channels-last (and not also plain-contiguous, as a tensor with one channel would be)."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _convs(model: torch.nn.Module) -> list[torch.nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1]


@pytest.mark.slow
def test_perf_switches_are_applied_to_student_and_teachers_and_keep_the_losses(make_cfg):
    from torch._dynamo.utils import counters

    base = ("student=cnn", "teachers.use=[cnn_s]", "teacher_cache.mode=none")
    eager, _, plain, _ = _fit(make_cfg, *base, epochs=1)
    assert _convs(plain.student) and not any(_nhwc(c.weight) for c in _convs(plain.student))
    torch._dynamo.reset()
    counters.clear()
    seen = []  # is the input of the student's second conv (16 channels) NHWC? every training step
    fast, _, module, _ = _fit(
        make_cfg,
        *base,
        "perf.compile=true",
        "perf.compile_backend=eager",  # dynamo traces as with inductor; no C++ build in the test
        "perf.channels_last=true",
        epochs=1,
        hook=lambda m: next(
            c for c in m.student.modules() if isinstance(c, torch.nn.Conv2d)
        ).register_forward_pre_hook(
            lambda _, inp: seen.append(inp[0].is_contiguous(memory_format=torch.channels_last))
        ),
    )
    models = [module.student, *module.teachers.members.values()]
    for m in models:  # weights in NHWC, forward compiled, for the student and every teacher
        assert all(_nhwc(c.weight) for c in _convs(m))
        assert hasattr(m.forward, "_torchdynamo_orig_callable"), type(m).__name__
    assert counters["stats"]["unique_graphs"] >= len(models)  # dynamo really captured their graphs
    assert seen and all(seen)  # inputs reach the student in NHWC as well
    assert torch.allclose(torch.tensor(eager), torch.tensor(fast), rtol=1e-3, atol=1e-4)
