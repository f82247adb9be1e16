"""perf.check_syncs=true: fail a run whose training steps read values on the host.

On a GPU a host read (`.item()`, `float(t)`, `if t:`, `.cpu()`, `.tolist()`, a data-dependent shape such as
`nonzero`) makes the CPU wait until the GPU has run everything queued, so the GPU idles while the next step
is queued: a small model runs at a fraction of its speed. A training step of kd_lightning reads nothing on
the host (kd_lightning.core.tally reads the loss every `trainer.log_every_n_steps` steps); this check keeps
it so for the methods, losses and callbacks a user adds.

What is checked: each training step after the first `warmup` (a method may read a value once, CRD its
normalising constant), from the end of the previous step to the end of this one: the batch's fetch and
transfer, its augmentation, the step, the backward pass and the optimiser. Left out: the steps at which the
module reads its tally anyway (a logging step), and a step that ends the epoch, validates or saves a
checkpoint. Torch's optimisers keep their step counts on the host by design; their reads are not counted.
- on a CUDA device: torch.cuda.set_sync_debug_mode("error"), so the first synchronising call raises where
  it happens;
- elsewhere: every host read is counted (a TorchFunctionMode for the tensor methods that read, a
  TorchDispatchMode for the operators that do), and the fit fails at its end naming where they were made.
Slow on the CPU (Python runs for every operator): for tests and for checking a new method, not for runs.
"""

from __future__ import annotations

import collections
import traceback
from typing import Any

import pytorch_lightning as pl
import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

from kd_lightning.core.tally import log_every

# tensor methods that copy values to the host, and the operators that read one value (`.item()`, `float(t)`,
# `if t:` all run `_local_scalar_dense`) or whose output size depends on the values
HOST_METHODS = {"tolist", "cpu", "numpy"}
HOST_OPS = {
    "_local_scalar_dense", "nonzero", "_unique2", "unique_dim", "unique_consecutive", "masked_select",
    "repeat_interleave",
}  # fmt: skip
_SKIP_FRAMES = ("kd_lightning/engine/sync_check.py", "torch/_compile.py", "torch/_dynamo/", "torch/utils/_")


def _where() -> str | None:
    """file:line of the call that read, None when torch's optimisers did (their step counts live on the host)."""
    frames = [f for f in traceback.extract_stack()[:-2] if not any(s in f.filename for s in _SKIP_FRAMES)]
    if not frames:
        return "?"
    last = frames[-1]
    if "/torch/optim/" in last.filename:
        return None
    return f"{last.filename}:{last.lineno} ({last.line})"


class _Reads(TorchFunctionMode):
    def __init__(self, sink: collections.Counter):
        super().__init__()
        self.sink = sink

    # Any: torch's mode protocol passes any op and its arguments through
    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        if getattr(func, "__name__", "") in HOST_METHODS:
            where = _where()
            if where is not None:
                self.sink[f"{func.__name__}() at {where}"] += 1
        return func(*args, **(kwargs or {}))


class _Ops(TorchDispatchMode):
    def __init__(self, sink: collections.Counter):
        super().__init__()
        self.sink = sink

    # Any: torch's mode protocol passes any op and its arguments through
    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = func.overloadpacket.__name__
        if name in HOST_OPS:
            where = _where()
            if where is not None:
                self.sink[f"{name} at {where}"] += 1
        return func(*args, **(kwargs or {}))


class SyncCheck(pl.Callback):
    def __init__(self, warmup: int = 2):
        self.warmup = warmup
        self.steps = 0  # training steps checked
        self.reads: collections.Counter = collections.Counter()
        self._open: list[Any] | None = None
        self._cuda = False

    def on_train_batch_end(
        self,
        trainer: pl.Trainer,
        pl_module: pl.LightningModule,
        outputs: object,
        batch: object,
        batch_idx: int,
    ) -> None:
        if self._close():
            self.steps += 1
        last = batch_idx + 1 >= trainer.num_training_batches
        reads_tally = trainer.global_step % log_every(trainer) == 0  # the next step logs
        if batch_idx + 1 >= self.warmup and not last and not reads_tally:
            self._start(pl_module.device)

    def _start(self, device: torch.device) -> None:
        self._cuda = device.type == "cuda"
        if self._cuda:
            torch.cuda.set_sync_debug_mode("error")
            self._open = []
            return
        self._open = [_Reads(self.reads), _Ops(self.reads)]
        for mode in self._open:
            mode.__enter__()

    def _close(self) -> bool:
        """End the open window; whether one was open."""
        if self._open is None:
            return False
        if self._cuda:
            torch.cuda.set_sync_debug_mode("default")
        for mode in reversed(self._open):
            mode.__exit__(None, None, None)
        self._open = None
        return True

    # a window that validation or a checkpoint interrupts is not a plain step: it is not counted
    def on_validation_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_save_checkpoint(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, checkpoint: dict[str, object]
    ) -> None:
        self._close()

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()

    def on_exception(
        self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException
    ) -> None:
        self._close()

    def on_fit_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._close()
        if self.reads:
            found = "; ".join(f"{n}× {where}" for where, n in self.reads.most_common(8))
            raise RuntimeError(
                f"perf.check_syncs: {sum(self.reads.values())} host read(s) in {self.steps} checked training "
                f"steps: {found}. Each one makes a GPU wait for Python: keep the values on the device "
                "(kd_lightning/engine/sync_check.py says what is checked)"
            )

    def summary(self) -> dict[str, int]:
        return {"steps_checked": self.steps, "host_reads": sum(self.reads.values())}
