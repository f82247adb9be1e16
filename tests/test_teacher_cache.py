"""Teacher-output stores: the same losses as live teachers, one store per teacher and tap, keyed so that
any change invalidates it and nothing else does, filled once and completed after a kill."""

from __future__ import annotations

from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from kd_lightning.data.batch import Batch
from kd_lightning.engine.build import build_module, build_teacher_ensemble
from kd_lightning.models import load_model, save_model
from kd_lightning.teachers.outputs import Ranks, TeacherOutputs
from kd_lightning.teachers.precompute import TeacherPrecompute
from kd_lightning.teachers.slots import Slots
from kd_lightning.teachers.store import TapStore, store_key

from .conftest import built_data


class RecordLosses(pl.Callback):
    def __init__(self):
        self.losses: list[float] = []

    def on_train_batch_end(self, trainer, module, outputs, batch, batch_idx):
        self.losses.append(float(outputs["loss"]))


def _fit(make_cfg, *overrides: str, epochs: int = 2, hook=None):
    cfg = make_cfg(*overrides, "callbacks=none")
    spec, dm = built_data(cfg, shuffle_seed=0)
    teachers = build_teacher_ensemble(spec, dm)
    pl.seed_everything(0)
    module = build_module(spec, dm, teachers)
    rec = RecordLosses()
    precompute = TeacherPrecompute(module.feed)  # what a run adds to its Trainer: fills the stores, counts
    trainer = pl.Trainer(max_epochs=epochs, accelerator="cpu", logger=False, enable_checkpointing=False,
                         enable_progress_bar=False, limit_val_batches=0, callbacks=[rec, precompute],
                         deterministic=True)  # fmt: skip
    calls = {"n": 0}
    forward = teachers.forward

    def counted(x, names=None):
        calls["n"] += len(x) * (len(names) if names is not None else len(teachers.names))  # per teacher
        return forward(x, names)

    teachers.forward = counted
    if hook is not None:
        hook(module)
    trainer.fit(module, datamodule=dm)
    module.precompute = precompute
    return rec.losses, calls["n"], module, len(dm.train_dataloader())


def test_stored_and_live_teachers_give_the_same_losses(make_cfg):
    live, live_calls, _, steps = _fit(make_cfg, "teacher_cache.mode=none", "distill=[feature,kd]")
    cached, cached_calls, module, _ = _fit(make_cfg, "teacher_cache.mode=memory", "distill=[feature,kd]")
    assert len(live) == len(cached) == 2 * steps
    assert torch.allclose(torch.tensor(live), torch.tensor(cached), rtol=1e-5, atol=1e-6)
    n = module.teacher_outputs.all()[0].shape[0]
    assert live_calls == 2 * 2 * n  # two epochs, two teachers, every sample
    assert cached_calls == 2 * n and module.feed.live_samples == 0  # each teacher once, before the fit
    assert module.precompute.forward_by_rank == [2 * n]
    assert {tuple(sorted(t)) for t in module.teacher_outputs.stores.values()} == {("embed", "logits")}


def test_disk_stores_are_per_teacher_reused_and_invalidated_by_a_new_checkpoint(make_cfg, tmp_path):
    store_dir = f"teacher_cache.dir={tmp_path / 'stores'}"
    _, first_calls, module, _ = _fit(make_cfg, "teacher_cache.mode=disk", store_dir, epochs=1)
    files = module.teacher_outputs.files()
    n = module.teacher_outputs.all()[0].shape[0]
    assert len(files) == 2 and all(Path(f).is_file() for f in files) and first_calls == 2 * n
    _, again_calls, again, _ = _fit(make_cfg, "teacher_cache.mode=disk", store_dir, epochs=1)
    assert again_calls == 0 and again.teacher_outputs.files() == files  # read from disk, no teacher run

    # another checkpoint for cnn_s (weights changed): its store is rebuilt, cnn_l's is reused
    src = module.teachers.checkpoints["cnn_s"]
    model = load_model(src)
    with torch.no_grad():
        next(model.parameters()).add_(0.01)
    changed = tmp_path / "cnn_s_changed.pt"
    save_model(model, changed, {"name": "cnn", "channels": [16, 32]}, 10, (1, 8, 8))
    _, calls, other, _ = _fit(
        make_cfg,
        "teacher_cache.mode=disk",
        store_dir,
        f"teachers.members.cnn_s.checkpoint={changed}",
        epochs=1,
    )
    assert calls == n  # cnn_s only
    assert len(set(other.teacher_outputs.files()) & set(files)) == 1


def test_store_key_changes_with_what_the_outputs_depend_on_and_nothing_else():
    base = dict(
        data_identity={"x": 1},
        slots=10,
        checkpoint_digest="abc",
        tap="embed",
        module="fc:input",
        dtype="float32",
        precision="32-true",
    )
    key = store_key(**base)
    assert key == store_key(**base)
    for change in (
        {"data_identity": {"x": 2}},
        {"slots": 11},
        {"checkpoint_digest": "abd"},
        {"tap": "logits"},
        {"module": "features.3"},
        {"dtype": "float16"},
        {"precision": "bf16-mixed"},
    ):
        assert store_key(**{**base, **change}) != key, change


def _key(slots: int = 6) -> dict:
    return store_key({"d": 1}, slots, "abc", "embed", "fc:input", "float32", "32-true")


def test_slots_put_the_views_of_a_sample_side_by_side_and_give_them_back():
    slots = Slots(samples=5, views=3)
    index, view = torch.tensor([0, 4, 2, 2]), torch.tensor([0, 2, 1, 2])
    rows = slots.rows(index, view)
    assert rows.tolist() == [0, 14, 7, 8] and slots.count == 15
    back_index, back_view = slots.keys(torch.arange(slots.count))
    assert back_view is not None and torch.equal(slots.rows(back_index, back_view), torch.arange(15))
    assert Slots(5).keys(torch.arange(5))[1] is None and torch.equal(Slots(5).rows(index, None), index)
    with pytest.raises(ValueError, match="3 recorded views per sample"):
        slots.rows(index, None)


def test_a_store_killed_half_way_is_completed_and_equals_an_uninterrupted_one(tmp_path):
    values = torch.randn(6, 3)
    runs = {"n": 0}

    def run_teacher(x, member):
        runs["n"] += len(x)
        return {"embed": values[x.long().flatten()]}

    def outputs(folder):
        return TeacherOutputs({"t": {"embed": TapStore(_key(), (3,), folder, "t-embed")}}, Slots(6))

    whole = outputs(tmp_path / "a")
    whole.fill(run_teacher, lambda chunks: (i.float().view(-1, 1) for i, _ in chunks), batch_size=4)
    assert whole.complete and runs["n"] == 6

    killed = outputs(tmp_path / "b").stores["t"]["embed"]  # a writer that died after 3 rows
    killed.write(torch.tensor([0, 1, 2]), values[:3])
    del killed
    runs["n"] = 0
    again = outputs(tmp_path / "b")
    assert not again.complete  # never read as complete
    again.fill(run_teacher, lambda chunks: (i.float().view(-1, 1) for i, _ in chunks), batch_size=4)
    assert runs["n"] == 3 and again.complete  # only the missing rows
    torch.testing.assert_close(again.get(torch.arange(6), None, "cpu")["t"]["embed"], values)
    torch.testing.assert_close(whole.get(torch.arange(6), None, "cpu")["t"]["embed"], values)


def test_teachers_missing_the_same_rows_share_each_chunk_of_inputs_and_others_get_their_own():
    values = {m: torch.randn(6, 3) for m in ("a", "b", "c")}
    outs = TeacherOutputs(
        {m: {"embed": TapStore(_key(), (3,), None, f"{m}-embed")} for m in values}, Slots(6)
    )
    outs.stores["c"]["embed"].write(torch.tensor([0, 1, 2]), values["c"][:3])  # c misses other rows
    made = []

    def view_batches(chunks):
        for i, view in chunks:
            assert view is None  # no recorded views: a slot is a sample
            made.append(i.tolist())
            yield i.float().view(-1, 1)

    outs.fill(lambda x, m: {"embed": values[m][x.long().flatten()]}, view_batches, batch_size=4)
    assert made == [[0, 1, 2, 3], [4, 5], [3, 4, 5]]  # a and b read rows 0-5 once; c its own three
    assert outs.computed == 6 + 6 + 3 and outs.complete
    for m in values:
        torch.testing.assert_close(outs.get(torch.arange(6), None, "cpu")[m]["embed"], values[m])


def test_a_corrupt_or_mismatched_store_is_reported_and_rebuilt(tmp_path, caplog):
    import logging

    store = TapStore(_key(), (3,), tmp_path, "t-embed")
    store.write(torch.arange(6), torch.ones(6, 3))
    store.mark_complete()
    store.meta_path.write_text("{not json")
    caplog.set_level(logging.WARNING)
    again = TapStore(_key(), (3,), tmp_path, "t-embed")
    assert not again.complete and "unreadable" in caplog.text and len(again.missing_slots()) == 6
    again.write(torch.arange(6), torch.ones(6, 3))
    again.mark_complete()
    again.path.write_bytes(b"short")  # truncated rows file
    caplog.clear()
    third = TapStore(_key(), (3,), tmp_path, "t-embed")
    assert not third.complete and "does not match its key or size" in caplog.text


def test_float16_and_bfloat16_storage_round_trip_within_their_precision(tmp_path):
    x = torch.randn(6, 4) * 10
    for dtype, rel in (("float16", 1e-3), ("bfloat16", 8e-3)):
        key = store_key({"d": 1}, 6, "abc", "embed", "fc:input", dtype, "32-true")
        s = TapStore(key, (4,), tmp_path, f"t-{dtype}")
        s.write(torch.arange(6), x)
        got = s.read(torch.arange(6), "cpu")
        assert got.dtype == torch.float32 and s.rows.dtype == getattr(torch, dtype)
        assert s.path.stat().st_size == 6 * 4 * s.rows.element_size()
        torch.testing.assert_close(got, x, rtol=rel, atol=0.0)


def test_ranks_split_the_missing_rows():
    store = TapStore(_key(8), (1,), None, "t-embed")
    outs = TeacherOutputs({"t": {"embed": store}}, Slots(8))
    seen = []

    def run_teacher(x, member):
        seen.append(x.flatten().long().tolist())
        return {"embed": x}

    outs.fill(
        run_teacher,
        lambda chunks: (i.float().view(-1, 1) for i, _ in chunks),
        Ranks(rank=1, world=2),
        batch_size=8,
    )
    assert seen == [[1, 3, 5, 7]]  # rank 1 of 2: every second missing row


def test_augmentation_turns_the_cache_off(make_cfg, caplog):
    import logging

    caplog.set_level(logging.INFO)
    cfg = make_cfg("student=cnn", "+data.augment={crop_padding: 1, hflip: true}")
    spec, dm = built_data(cfg)
    module = build_module(spec, dm, build_teacher_ensemble(spec, dm))
    assert module.teacher_outputs is None and "teachers run live" in caplog.text


AUG_VIEWS = ["student=cnn", "+data.augment={crop_padding: 1, hflip: true, views: 2}", "distill=[feature,kd]"]


def test_consistent_teaching_views_are_recorded_and_repeat(make_cfg):
    cfg = make_cfg(*AUG_VIEWS)
    _, dm = built_data(cfg, shuffle_seed=0)
    x, y, index, *_ = dm.splits["train"].__getitems__(list(range(16)))
    views = {e: dm.epoch_views(e)[:16] for e in range(6)}
    assert len({tuple(v.tolist()) for v in views.values()}) > 1  # the view shown changes with the epoch

    class _T:  # the epoch the datamodule reads
        current_epoch = 0

    dm.trainer = _T()
    seen: dict[tuple[int, int], torch.Tensor] = {}
    for e in range(6):
        _T.current_epoch = e
        prepared = dm.prepare_batch(Batch(x.clone(), y, index), train=True)
        xb, view = prepared.x, prepared.view
        assert torch.equal(view, views[e])
        for i, key in enumerate(zip(index.tolist(), view.tolist(), strict=True)):
            if key in seen:
                assert torch.equal(seen[key], xb[i])  # the same (sample, view) is the same image
            seen[key] = xb[i]
    assert len(seen) > 16  # both views of some samples were shown


def test_cached_and_live_agree_under_consistent_teaching(make_cfg):
    live, live_calls, _, steps = _fit(make_cfg, "teacher_cache.mode=none", *AUG_VIEWS, epochs=3)
    cached, cached_calls, module, _ = _fit(make_cfg, "teacher_cache.mode=memory", *AUG_VIEWS, epochs=3)
    assert torch.allclose(torch.tensor(live), torch.tensor(cached), rtol=1e-5, atol=1e-6)
    slots = module.teacher_outputs.all()[0].shape[0]  # 2 views per sample
    assert live_calls == 3 * (slots // 2) * 2  # every sample, every epoch, two teachers
    assert cached_calls == 2 * slots < live_calls  # each (sample, view) once per teacher


def _nhwc(t: torch.Tensor) -> bool:
    """Stored channels-last (and not also plain-contiguous, as a tensor with one channel would be)."""
    return t.is_contiguous(memory_format=torch.channels_last) and not t.is_contiguous()


def _convs(model: torch.nn.Module) -> list[torch.nn.Conv2d]:
    return [m for m in model.modules() if isinstance(m, torch.nn.Conv2d) and m.in_channels > 1]


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


def test_a_model_compiled_after_another_of_its_class_records_its_own_taps():
    """The jobs of a sweep run one after another in one process: a teacher compiled for a feature method
    after a logits-only job must not reuse that job's compiled forward, which lacks the taps' hooks (torch
    does not guard on hooks)."""
    from kd_lightning.config.specs import PerfSpec
    from kd_lightning.engine.build import apply_perf
    from kd_lightning.models import create_model
    from kd_lightning.models.taps import FeatureTaps

    perf = PerfSpec(compile=True, compile_backend="eager")
    x = torch.randn(4, 1, 8, 8)
    earlier = create_model({"name": "cnn"}, 10, (1, 8, 8))
    apply_perf(perf, [earlier], images=True)
    earlier(x)
    model = create_model({"name": "cnn"}, 10, (1, 8, 8))
    taps = FeatureTaps(model, ["embed", "stage1"])
    apply_perf(perf, [model], images=True)
    assert sorted(taps(x)) == ["embed", "logits", "stage1"]


def test_kd_cache_fills_the_stores_and_the_run_after_it_runs_no_teacher(tmp_path, cache_dir):
    import json

    from .conftest import FAST, ROOT, run_cli

    env = {"KD_CACHE_DIR": str(cache_dir), "KD_OUTPUT_ROOT": str(tmp_path / "out")}
    stores = [f"teacher_cache.dir={tmp_path / 'stores'}", "teacher_cache.mode=disk"]
    filled = run_cli(*FAST, *stores, cwd=ROOT, env=env, module="kd_lightning.cli.cache")
    assert filled.returncode == 0, filled.stderr[-3000:]
    assert "teacher passes computed" in filled.stdout and len(list((tmp_path / "stores").rglob("*.bin"))) == 2
    run = run_cli(*FAST, *stores, f"hydra.run.dir={tmp_path / 'run'}", cwd=ROOT, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    assert json.loads((tmp_path / "run" / "results.json").read_text())["teacher_forward_samples"] == 0
    # Bytes flipped in the middle of a store's data file: kd-cache --verify finds them and recomputes them.
    victim = sorted((tmp_path / "stores").rglob("*.bin"))[0]
    raw = bytearray(victim.read_bytes())
    raw[len(raw) // 2 : len(raw) // 2 + 8] = bytes(b ^ 0x5A for b in raw[len(raw) // 2 : len(raw) // 2 + 8])
    victim.write_bytes(bytes(raw))
    verified = run_cli("--verify", *FAST, *stores, cwd=ROOT, env=env, module="kd_lightning.cli.cache")
    assert verified.returncode == 0, verified.stderr[-3000:]
    assert "1 block(s) did not match their checksums and were recomputed" in verified.stdout
    assert "blocks do not match their checksums" in verified.stdout + verified.stderr  # the one line
    clean = run_cli("--verify", *FAST, *stores, cwd=ROOT, env=env, module="kd_lightning.cli.cache")
    assert "all match" in clean.stdout and "0 teacher passes computed" in clean.stdout
    wrong = run_cli(*FAST, cwd=ROOT, env=env, module="kd_lightning.cli.cache")  # mode memory
    assert wrong.returncode == 2 and "set teacher_cache.mode=disk" in wrong.stderr


# The bounds docs/STORE.md states, on fitted teachers' outputs (digits; the weaker teacher as the student).
BOUNDS = {"float16": 2e-3, "bfloat16": 1e-2}


def test_compact_stores_change_each_loss_within_the_documented_bounds(make_cfg):
    from kd_lightning.losses import create_loss
    from kd_lightning.teachers.store import stored_as

    cfg = make_cfg()
    spec, dm = built_data(cfg)
    teachers = build_teacher_ensemble(spec, dm)
    teachers.configure_taps(["embed"])
    batch = dm.prepare_batch(next(dm.iter_split("train", batch_size=256)), train=False)
    x, y = batch.x, batch.y  # one batch of 256 (RKD's angle term is cubic in the batch size)
    feats = teachers(x)
    t, s = feats["cnn_l"], feats["cnn_s"]
    proj = torch.randn(s["embed"].shape[1], t["embed"].shape[1], generator=torch.Generator().manual_seed(0))
    s_embed = s["embed"] @ proj / s["embed"].shape[1] ** 0.5
    shape = {"student_shape": tuple(t["embed"].shape[1:]), "teacher_shape": tuple(t["embed"].shape[1:])}

    def change(fn, student, teacher, stored, *args):
        exact = float(fn(student, teacher, *args))
        return abs(float(fn(student, stored, *args)) - exact) / exact

    for dtype, bound in BOUNDS.items():
        for name, kw in (("kl", {"temperature": 4.0}), ("dkd", {"warmup": 0}), ("soft_mse", {})):
            args = (y,) if name == "dkd" else ()
            fn = create_loss(name, {}, **kw)
            assert change(fn, s["logits"], t["logits"], stored_as(t["logits"], dtype), *args) < bound, (
                name,
                dtype,
            )
        for name in ("mse", "cosine", "sp", "rkd", "pkt", "cc"):
            fn = create_loss(name, shape)
            assert change(fn, s_embed, t["embed"], stored_as(t["embed"], dtype)) < bound, (name, dtype)
    # top-K keeps the K largest logits: exact at T = 1 up to the tail's shape, coarser at higher T
    kd1, kd4 = create_loss("kl", {}, temperature=1.0), create_loss("kl", {}, temperature=4.0)
    assert change(kd1, s["logits"], t["logits"], stored_as(t["logits"], topk=5)) < 1e-2
    assert change(kd4, s["logits"], t["logits"], stored_as(t["logits"], topk=5)) < 0.15
    rebuilt = stored_as(t["logits"], topk=3)
    top = t["logits"].topk(3, dim=1)
    torch.testing.assert_close(rebuilt.gather(1, top.indices), top.values)  # the K kept exactly
    p, q = t["logits"].softmax(1), rebuilt.softmax(1)  # at T = 1: the K probabilities exact, the rest even
    torch.testing.assert_close(q.gather(1, top.indices), p.gather(1, top.indices), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(q.sum(1), torch.ones(len(q)))


def test_topk_store_round_trip_and_refuses_feature_taps(make_cfg, tmp_path):
    from kd_lightning.errors import ConfigError
    from kd_lightning.runners.run import run
    from kd_lightning.teachers.store import TopKLogitsStore, stored_as

    logits = torch.randn(6, 10) * 3
    store = TopKLogitsStore(_key(), 10, 3, tmp_path, "t-logits")
    store.write(torch.arange(6), logits)
    store.mark_complete()
    again = TopKLogitsStore(_key(), 10, 3, tmp_path, "t-logits")
    assert again.complete and len(again.files()) == 3
    torch.testing.assert_close(again.read(torch.arange(6), "cpu"), stored_as(logits, topk=3))
    assert again.indices.rows.dtype == torch.int16
    with pytest.raises(ConfigError, match="logits_topk=3 keeps logits only.*'embed'"):
        run(make_cfg("teacher_cache.logits_topk=3", "dry_run=true"))
    with pytest.raises(ConfigError, match="must be smaller than the class count"):
        run(make_cfg("distill=kd", "teacher_cache.logits_topk=10", "dry_run=true"))
    assert run(make_cfg("distill=kd", "teacher_cache.logits_topk=3"))["status"] == "ok"


def test_sigkill_during_the_precompute_then_a_rerun_completes_the_same_store(tmp_path, cache_dir):
    """kd-cache is killed (SIGKILL) half-way through filling a store; the rerun computes only the missing
    rows, and the store equals one filled without interruption."""
    import os
    import re
    import signal
    import subprocess
    import sys
    import time

    from .conftest import ROOT

    args = [
        "data=synthetic",
        "data.num_train=40000",
        "data.num_test=100",
        "+data.eval_batch_size=32",
        "teachers=synthetic_mlp",
        "teachers.members.mlp64.fit.max_epochs=1",
        "distill=kd",
        "teacher_cache.mode=disk",
        "trainer.enable_progress_bar=false",
    ]
    env = {**os.environ, "KD_CACHE_DIR": str(cache_dir), "KD_OUTPUT_ROOT": str(tmp_path / "out")}

    def kd_cache(folder, **kw):
        cmd = [sys.executable, "-m", "kd_lightning.cli.cache", *args, f"teacher_cache.dir={folder}"]
        return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, **kw)

    whole = kd_cache(tmp_path / "whole")
    assert whole.wait(timeout=600) == 0, whole.stderr.read()[-3000:]
    [reference] = list((tmp_path / "whole").rglob("*.bin"))

    victim = kd_cache(tmp_path / "killed")
    deadline, filled = time.time() + 600, 0.0
    while time.time() < deadline and victim.poll() is None:
        flags = list((tmp_path / "killed").rglob("*.filled"))
        if flags:
            data = flags[0].read_bytes()
            filled = sum(data) / max(1, len(data))
            if 0.05 < filled < 0.8:
                victim.send_signal(signal.SIGKILL)
                break
        time.sleep(0.02)
    assert victim.wait(timeout=60) == -signal.SIGKILL, f"not killed mid-way (filled {filled:.2f})"
    [meta] = list((tmp_path / "killed").rglob("*.json"))
    assert '"complete": false' in meta.read_text()  # never read as complete

    rerun = kd_cache(tmp_path / "killed")
    out, err = rerun.communicate(timeout=600)
    assert rerun.returncode == 0, err[-3000:]
    computed = int(re.search(r"(\d+) teacher passes computed", out.decode()).group(1))
    n = len(reference.with_suffix(".filled").read_bytes())
    assert 0 < computed < n  # only the rows the killed run had not written
    [completed] = list((tmp_path / "killed").rglob("*.bin"))
    a = torch.from_file(str(reference), size=reference.stat().st_size // 4, dtype=torch.float32)
    b = torch.from_file(str(completed), size=completed.stat().st_size // 4, dtype=torch.float32)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_a_slow_rank_still_fills_its_share_when_the_other_rank_has_written_first(tmp_path):
    """Two ranks (threads) on one disk store. Rank 0 reads the missing rows late, after rank 1 could have
    written its share: the split must come from what both read before anyone wrote, or rows stay empty."""
    import threading
    import time

    barrier = threading.Barrier(2)
    stores = [TapStore(_key(16), (1,), tmp_path, "t-embed") for _ in range(2)]  # one per rank, same files
    slow = stores[0].missing_slots
    stores[0].missing_slots = lambda: (time.sleep(0.5), slow())[1]
    errors = []

    def rank(r: int) -> None:
        try:
            outs = TeacherOutputs({"t": {"embed": stores[r]}}, Slots(16))
            outs.fill(lambda x, m: {"embed": x}, lambda chunks: (i.float().view(-1, 1) for i, _ in chunks),
                      Ranks(rank=r, world=2, barrier=lambda: barrier.wait(timeout=30)), batch_size=4)  # fmt: skip
        except Exception as e:  # noqa: BLE001  (reported by the assertion below)
            errors.append(e)
            barrier.abort()

    threads = [threading.Thread(target=rank, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    assert stores[0].complete and bool((stores[0].filled == 1).all())
    torch.testing.assert_close(stores[0].read(torch.arange(16), "cpu").flatten(), torch.arange(16).float())


def test_a_disk_store_that_does_not_fit_is_one_clear_error_before_anything_is_mapped(tmp_path, monkeypatch):
    """Space is reserved before the files are mapped: no SIGBUS on first touch, no file left half-made."""
    import errno
    import os

    from kd_lightning.teachers.store import StoreSpaceError

    from .conftest import small_filesystem

    key = store_key({"d": 1}, 100_000, "abc", "embed", "fc:input", "float32", "32")
    try:  # a real full filesystem where one can be mounted, a refused allocation otherwise
        small = small_filesystem(tmp_path / "small")
        folder = small.__enter__()
    except pytest.skip.Exception:
        small, folder = None, tmp_path / "small"

        def full(fd, offset, length):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        monkeypatch.setattr(os, "posix_fallocate", full)
    try:
        with pytest.raises(
            StoreSpaceError, match=r"t-embed needs 25\.6 MB in .*small but that filesystem has"
        ):
            TapStore(key, (64,), folder, "t-embed")
        assert not list(folder.glob("*.bin")) and not list(folder.glob("*.filled"))
    finally:
        if small is not None:
            small.__exit__(None, None, None)


@pytest.mark.multiprocess
def test_a_sweep_job_whose_store_does_not_fit_fails_clearly_and_the_others_run(tmp_path, cache_dir):
    import json
    import os
    import subprocess
    import sys

    from .conftest import FAST, ROOT, small_filesystem

    with small_filesystem(tmp_path / "small") as small:
        sweep = tmp_path / "sweep"
        env = {**os.environ, "KD_CACHE_DIR": str(cache_dir), "PYTHONWARNINGS": "ignore"}
        cmd = [sys.executable, "-m", "kd_lightning.train", "-m", *FAST, "teacher_cache.mode=disk",
               f"teacher_cache.dir={small},{tmp_path / 'roomy'}", f"hydra.sweep.dir={sweep}"]  # fmt: skip
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode != 0 and proc.returncode != -7  # a failed job, not a SIGBUS (-7)
    results = [json.loads(p.read_text()) for p in sorted(sweep.glob("*/results.json"))]
    assert [r["status"] for r in results] == ["config_error", "ok"], proc.stderr[-2000:]
    assert "needs" in results[0]["error"] and str(small) in results[0]["error"]


def test_flipped_bytes_in_a_store_are_caught_and_only_their_block_recomputed(tmp_path, monkeypatch, caplog):
    import logging

    import kd_lightning.teachers.store as store_module

    monkeypatch.setattr(store_module, "BLOCK_BYTES", 4 * 3 * 4)  # 4 rows of 3 float32 a block: 3 blocks
    values = torch.randn(10, 3)

    def outputs():
        return TeacherOutputs({"t": {"embed": TapStore(_key(10), (3,), tmp_path, "t-embed")}}, Slots(10))

    def run_teacher(x, member):
        runs.append(len(x))
        return {"embed": values[x.long().flatten()]}

    runs: list[int] = []
    first = outputs()
    first.fill(run_teacher, lambda chunks: (i.float().view(-1, 1) for i, _ in chunks))
    path = first.stores["t"]["embed"].path
    del first
    raw = bytearray(path.read_bytes())
    raw[len(raw) // 2] ^= 0xFF  # one byte in the middle of the data file: row 5, the second block
    path.write_bytes(bytes(raw))
    caplog.set_level(logging.WARNING)
    runs.clear()
    again = outputs()
    assert not again.complete and "1 of 3 blocks do not match their checksums (rows 4-7)" in caplog.text
    again.fill(run_teacher, lambda chunks: (i.float().view(-1, 1) for i, _ in chunks))
    assert runs == [4] and again.complete  # that block's rows only
    torch.testing.assert_close(again.get(torch.arange(10), None, "cpu")["t"]["embed"], values)
    caplog.clear()
    assert outputs().complete and "checksums" not in caplog.text  # repaired for good


def test_a_byte_that_changes_before_the_store_is_sealed_is_computed_again_not_sealed(tmp_path):
    """A row is written, then a byte of it changes in the file (a failing disk, another process) before the
    fill seals the store: the row reads back otherwise than it was written, so it is computed again and the
    sealed store holds the teacher's outputs."""
    key = store_key({"data": "x"}, 64, "t", "logits", "logits", "float32", "32-true")
    store = TapStore(key, (10,), tmp_path, "t-logits")
    outputs = TeacherOutputs({"t": {"logits": store}}, Slots(64))
    inputs = torch.randn(64, 10)

    def teacher(x, member):
        return {"logits": x * 2}

    flipped = []

    def batches(chunks):
        for chunk, _ in chunks:
            yield inputs[chunk]
            if not flipped and store.filled.sum() == 64:  # every row written, nothing sealed yet
                with open(store.path, "r+b") as f:
                    f.seek(5 * 40 + 3)  # a byte of row 5
                    byte = f.read(1)
                    f.seek(5 * 40 + 3)
                    f.write(bytes([byte[0] ^ 0x10]))
                flipped.append(5)

    done = outputs.fill(teacher, batches, batch_size=16)
    assert flipped == [5] and store.complete and done == 64 + 1  # every row, then row 5 once more
    assert torch.equal(store.rows, inputs * 2) and store.check(full=True) == []
    reopened = TapStore(key, (10,), tmp_path, "t-logits")
    assert reopened.complete and torch.equal(reopened.rows, inputs * 2)
