"""A wheel carries the configs: installed outside the checkout, `kd-train` runs a job from another folder."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from .conftest import ROOT


def _sh(*cmd: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, (cmd, proc.stdout[-2000:], proc.stderr[-3000:])
    return proc


def test_wheel_installed_elsewhere_runs_a_one_batch_job(tmp_path: Path):
    wheels, target, elsewhere = tmp_path / "wheels", tmp_path / "site", tmp_path / "elsewhere"
    elsewhere.mkdir()
    pip = [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q"]
    # built from a copy of the tracked files, as a clean clone would: setuptools reuses a checkout's
    # build/ folder, and a stale one ships modules the source no longer has
    source = tmp_path / "source"
    tracked = _sh("git", "ls-files", cwd=ROOT).stdout.split()
    for rel in tracked:
        if (ROOT / rel).is_file():
            (source / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(ROOT / rel, source / rel)
    # no build isolation: the build needs only setuptools, which the environment has (no network)
    _sh(*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(wheels), str(source), cwd=tmp_path)
    [wheel] = list(wheels.glob("kd_lightning-*.whl"))
    shipped = {n for n in zipfile.ZipFile(wheel).namelist() if n.endswith(".py")}
    # the package, and the packed launcher where Hydra looks for launchers (hydra_plugins)
    packages = ("kd_lightning/", "hydra_plugins/")
    assert shipped == {r for r in tracked if r.startswith(packages) and r.endswith(".py")}
    _sh(*pip, "install", "--no-deps", "--target", str(target), str(wheel), cwd=tmp_path)
    assert (target / "kd_lightning" / "conf" / "train.yaml").is_file()
    assert (target / "kd_lightning" / "conf" / "scheduler" / "multistep.yaml").is_file()

    env = {**os.environ, "PYTHONPATH": str(target), "KD_OUTPUT_ROOT": str(elsewhere / "outputs")}
    env["KD_CACHE_DIR"] = str(tmp_path / "cache")
    where = _sh(
        sys.executable,
        "-c",
        "import kd_lightning.config.conf_files as c; print(c.CONF_DIR)",
        cwd=elsewhere,
        env=env,
    )
    assert (
        Path(where.stdout.strip()) == target / "kd_lightning" / "conf"
    )  # the wheel's copy, not the checkout's
    _sh(
        str(target / "bin" / "kd-train"),
        "teachers=none",
        "distill=none",
        "logger=none",
        "+trainer.fast_dev_run=true",
        "print_summary=false",
        cwd=elsewhere,
        env=env,
    )
    [results] = list((elsewhere / "outputs").rglob("results.json"))
    r = json.loads(results.read_text())
    assert r["status"] == "ok" and r["data"] == "digits" and (results.parent / "student.pt").is_file()
