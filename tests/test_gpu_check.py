"""make gpu-check's smoke mode (`bench/gpu_check.py --cpu`): every case it will run on a GPU runs here,
tiny, so that the first lent GPU minutes are not spent on a broken script; and a case that goes wrong fails
the check."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from .conftest import ROOT


def _gpu_check(*args: str, tmp_path) -> subprocess.CompletedProcess:
    env = {**os.environ, "KD_CACHE_DIR": str(tmp_path / "cache")}
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "gpu_check.py"), "--cpu", *args],
        cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip


def test_gpu_check_smoke_mode_runs_every_case(tmp_path):
    report = tmp_path / "GPU_CHECK.md"
    done = _gpu_check("--report", str(report), tmp_path=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    cases = re.findall(r"^gpu_check\.(\S+): images_per_s=(\d+)  teacher", done.stdout, re.M)
    names = [n for n, _ in cases]
    assert len(names) == 23 and all(int(v) > 0 for _, v in cases)
    hand = re.findall(r"^gpu_check\.hand/(\S+): images_per_s=(\d+)$", done.stdout, re.M)
    assert len(hand) == 6 and all(int(v) > 0 for _, v in hand)
    # the ceiling: every cifar case beside its hand-written loop, and the compiled student beside the eager one
    beside = re.findall(
        r"^gpu_check\.cifar/(\S+): framework/hand student=([\d.]+)  live=([\d.]+)  stored=([\d.]+)",
        done.stdout,
        re.M,
    )
    assert [b[0] for b in beside] == ["16-mixed", "bf16-mixed"] and all(
        float(v) > 0 for b in beside for v in b[1:]
    )
    for kind in ("student", "live"):  # the GPU default (CUDA graphs) beside the eager framework and hand loop
        assert re.search(
            rf"^gpu_check\.graphs/bf16-mixed/{kind}: graphs/eager=[\d.]+  framework/hand=[\d.]+",
            done.stdout,
            re.M,
        )
    for needed in (
        "cifar/16-mixed/stored", "cifar/bf16-mixed/stored+compile+channels_last", "views/stored",
        "views/stored+batched",
        "graphs/bf16-mixed/fitnet", "graphs/ddp/16-mixed/stored",
    ):  # fmt: skip
        assert needed in names
    assert re.search(r"^gpu_check\.ddp/16-mixed/stored: .*\(backend gloo\)$", done.stdout, re.M)
    ratios = re.findall(
        r"^gpu_check\.(\S+): stored/student=([\d.]+)  live/\(student\+teacher\)=([\d.]+)", done.stdout, re.M
    )
    assert [r[0] for r in ratios] == ["cifar/16-mixed", "cifar/bf16-mixed", "views"]
    assert re.search(r"^gpu_check\.views: stored\+batched/stored=[\d.]+ ", done.stdout, re.M)
    assert "23 cases in" in done.stdout and " 0 failed" in done.stdout
    assert report.read_text().startswith("# make gpu-check") and "on cpu (smoke mode)" in report.read_text()


@pytest.mark.slow
def test_gpu_check_fails_when_a_store_does_not_spare_the_teacher(tmp_path):
    """`stored` without its `fill` before it computes the teacher's outputs itself: the check must say so."""
    done = _gpu_check("--only", "cifar/16-mixed/stored", tmp_path=tmp_path)
    assert done.returncode == 1
    assert "gpu-check FAILED:" in done.stderr
    assert re.search(r"cifar/16-mixed/stored: the store was filled but \d+ teacher samples", done.stderr)
