"""bench/methods.py keeps the seeds it ran: a seed that diverges is reported as diverged, and any other
failure still fails the row."""

from __future__ import annotations

import importlib.util
import sys

from tests.conftest import FAST, ROOT


def _bench():
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location("bench_methods", ROOT / "bench" / "methods.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_a_diverged_seed_is_named_and_the_others_kept(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("KD_CACHE_DIR", str(cache_dir))
    bench = _bench()
    # weight 1e39 overflows float32: that job stops on a non-finite loss at its first step
    overrides = [*FAST, "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "distill=kd",
                 "distill.terms.kd.weight=1,1e39"]  # fmt: skip
    assert bench._kd_train(overrides, tmp_path / "kept", 1, diverged_ok=True)
    runs = bench._results(tmp_path / "kept")
    assert sorted(r["status"] for r in runs) == ["failed", "ok"]
    assert [bench._diverged(r) for r in runs].count(True) == 1
    row = bench._row(
        {"label": "kd", "method": "kd", "chosen": ["w=1"], "val": 0.5, "test": [0.9], "diverged": [3]}, None
    )
    assert "1 (seed 3 diverged)" in row


def test_a_failure_that_is_not_divergence_fails_the_row(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("KD_CACHE_DIR", str(cache_dir))
    bench = _bench()
    overrides = [*FAST, "trainer.max_epochs=1", "+trainer.limit_train_batches=2", "distill=kd",
                 "distill.terms.kd.weight=1e39,-1"]  # fmt: skip
    assert not bench._kd_train(overrides, tmp_path / "bad", 1, diverged_ok=True)
    assert sorted(r["status"] for r in bench._results(tmp_path / "bad")) == ["config_error", "failed"]
