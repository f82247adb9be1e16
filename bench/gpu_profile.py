"""Where a training step's time goes, for the framework and the hand-written loop side by side.

    python bench/gpu_profile.py --out DIR [--cases student,live,stored] [--cpu]

For each cifar case of bench/gpu_check.py (bf16-mixed: the student alone, KD with the teacher live, KD from
a store of 4 recorded views) and its hand loop, three windows of `--steps` training steps each, early in
the first epoch, after `--start` steps of warm-up:
  1. torch.profiler (CPU and, on a GPU, CUDA activity): DIR/<case>.<who>.ops.txt, the operators by their
     own CPU time, and the counts per step of operators, kernel launches and synchronisations;
  2. cProfile: DIR/<case>.<who>.python.txt, the Python functions by their own time and by cumulative time;
  3. nothing but a clock: milliseconds per step (synchronised at both ends of the window).
Then one line per case: framework and hand milliseconds per step, launches and Python calls per step.
The windows lie inside one epoch (no validation, no checkpoint); perf.check_syncs is off here (the
windows synchronise at their ends).
"""

from __future__ import annotations

import argparse
import cProfile
import io
import logging
import pstats
import sys
import tempfile
import time
import warnings
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))

import gpu_check  # noqa: E402
import pytorch_lightning as pl  # noqa: E402
import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

from kd_lightning.config.conf_files import compose_run  # noqa: E402
from kd_lightning.runners.run import run  # noqa: E402


class Windows:
    """Profiles steps [start, start + n) with torch.profiler, the next n with cProfile, and times the next
    n; `at(step)` is called before every step."""

    def __init__(self, start: int, n: int, out: Path, cuda: bool):
        self.start, self.n, self.out, self.cuda = start, n, out, cuda
        self.prof: profile | None = None
        self.py: cProfile.Profile | None = None
        self.t0 = 0.0
        self.summary: dict[str, float] = {}

    def _sync(self) -> None:
        if self.cuda:
            torch.cuda.synchronize()

    def at(self, step: int) -> None:
        s, n = self.start, self.n
        if step not in (s, s + n, s + 2 * n, s + 3 * n):
            return
        self._sync()
        if step == s:
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if self.cuda else [])
            self.prof = profile(activities=acts)
            self.prof.__enter__()
        elif step == s + n:
            assert self.prof is not None
            self.prof.__exit__(None, None, None)
            self._write_ops(self.prof)
            self.py = cProfile.Profile()
            self.py.enable()
        elif step == s + 2 * n:
            assert self.py is not None
            self.py.disable()
            self._write_python(self.py)
            self.t0 = time.perf_counter()
        else:
            self.summary["ms_per_step"] = (time.perf_counter() - self.t0) * 1000 / n

    def _write_ops(self, prof: profile) -> None:
        events = prof.key_averages()
        count = {e.key: e.count for e in events}
        launches = sum(
            c for k, c in count.items() if k in ("cudaLaunchKernel", "cuLaunchKernel", "cudaLaunchKernelExC")
        )
        syncs = sum(
            c
            for k, c in count.items()
            if "Synchronize" in k or k in ("cudaMemcpy", "aten::_local_scalar_dense")
        )
        ops = sum(c for k, c in count.items() if k.startswith("aten::"))
        self.summary.update(
            launches_per_step=launches / self.n, syncs_per_step=syncs / self.n, aten_ops_per_step=ops / self.n
        )
        table = events.table(sort_by="self_cpu_time_total", row_limit=45, max_name_column_width=60)
        self.out.with_suffix(".ops.txt").write_text(
            f"{self.n} steps; per step: {launches / self.n:.1f} kernel launches, {syncs / self.n:.2f} syncs, "
            f"{ops / self.n:.1f} aten ops\n\n{table}\n"
        )

    def _write_python(self, py: cProfile.Profile) -> None:
        buf = io.StringIO()
        stats = pstats.Stats(py, stream=buf)
        self.summary["python_calls_per_step"] = stats.total_calls / self.n  # type: ignore[attr-defined]
        stats.sort_stats("tottime").print_stats(40)
        stats.sort_stats("cumulative").print_stats(60)
        self.out.with_suffix(".python.txt").write_text(buf.getvalue())


class WindowsCallback(pl.Callback):
    def __init__(self, windows: Windows):
        self.windows = windows

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):  # noqa: ANN001
        if trainer.current_epoch == 0:
            self.windows.at(batch_idx)


def _with_callback(cb: pl.Callback):  # noqa: ANN202
    """pl.Trainer, built by the run, gets `cb` among its callbacks (a profiling hook for this script only)."""
    original = pl.Trainer.__init__

    def init(self, *args, **kwargs):  # noqa: ANN001, ANN002, ANN003
        kwargs["callbacks"] = [*(kwargs.get("callbacks") or []), cb]
        original(self, *args, **kwargs)

    pl.Trainer.__init__ = init
    return original


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--cases", default="student,live,stored")
    p.add_argument("--cpu", action="store_true", help="tiny, on the CPU (a smoke test of this script)")
    p.add_argument("--start", type=int, default=20)
    p.add_argument("--steps", type=int, default=20)
    a = p.parse_args()
    mode = "cpu" if a.cpu else "gpu"
    cuda = mode == "gpu"
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_fabric").setLevel(logging.ERROR)
    a.out.mkdir(parents=True, exist_ok=True)
    start, n = (a.start, a.steps) if cuda else (1, 1)
    if not cuda:
        gpu_check.SIZES["cpu"]["cifar_train"] = 320  # 10 steps of 32
    kinds = [k for k in a.cases.split(",") if k]
    lines = []
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp)
        gpu_check.write_data(mode, data)
        by_name = dict(gpu_check.cases(mode, data))
        for kind in kinds:
            names = [f"cifar/bf16-mixed/{kind}"]
            if kind == "stored":
                names.insert(0, "cifar/bf16-mixed/fill")
            for name in names:
                overrides = [
                    o for o in by_name[name] if not o.startswith(("perf.check_syncs", "trainer.max_epochs"))
                ]
                overrides.append("trainer.max_epochs=1")
                w = Windows(start, n, a.out / f"{kind}-framework", cuda)
                original = _with_callback(WindowsCallback(w))
                try:
                    r = run(compose_run(overrides, data / "runs" / name.replace("/", "_"), data / "cache"))
                finally:
                    pl.Trainer.__init__ = original
                if r.get("status") != "ok":
                    raise SystemExit(f"{name}: {r.get('status')} {r.get('error', '')}")
            h = Windows(start, n, a.out / f"{kind}-hand", cuda)
            gpu_check.hand_loop(kind, "bf16-mixed", mode, data, on_step=h.at, epochs=1)
            f, hs = w.summary, h.summary
            line = (
                f"gpu_profile.{kind}: ms_per_step framework={f.get('ms_per_step', 0):.2f} hand={hs.get('ms_per_step', 0):.2f}  "
                + "  ".join(
                    f"{k}: framework={f.get(k, 0):.1f} hand={hs.get(k, 0):.1f}"
                    for k in (
                        "launches_per_step",
                        "syncs_per_step",
                        "aten_ops_per_step",
                        "python_calls_per_step",
                    )
                )
            )
            print(line, flush=True)
            lines.append(line)
    (a.out / "summary.txt").write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
