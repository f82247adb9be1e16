"""The teacher outputs a run reads: one store per (teacher, tap), filled before the fit, read by sample and view.

`build_outputs` holds every rule about which stores a run has and where they live (mode, fresh augmentation,
top-K, the folder, the key). `fill` is the precompute stage (driven by kd_lightning.teachers.precompute). It runs at the start of the fit on every rank: rank 0 takes the stores'
file locks (a parallel job of a sweep that is filling the same teacher's store makes it wait, and then
finds the store complete), every rank computes its 1/W share of the rows still missing, a barrier, rank 0
marks the stores complete. From then on no rank runs a teacher on training data: `get` is one gather
per store file. Samples the teachers were run on are counted (`teacher_forward_samples` in results.json).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Mapping
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import torch
from filelock import FileLock

from kd_lightning.config.specs import AUTO_TOPK, AUTO_TOPK_CLASSES, CacheSpec
from kd_lightning.data.base import TensorDataModule
from kd_lightning.data.device import fits_on_device
from kd_lightning.data.fingerprint import data_key
from kd_lightning.errors import ConfigError
from kd_lightning.plain import Plain
from kd_lightning.teachers.ensemble import TeacherEnsemble, TeacherFeatures
from kd_lightning.teachers.slots import Slots
from kd_lightning.teachers.store import (
    OutputStore,
    TapStore,
    TopKLogitsStore,
    file_digest,
    model_digest,
    store_key,
)

log = logging.getLogger(__name__)


@dataclass
class Ranks:
    """How the ranks of a fit talk to each other (a single process by default)."""

    rank: int = 0
    world: int = 1
    barrier: Callable[[], None] = lambda: None


# the inputs the teachers must see to fill chunks of slots: for each (samples, views) in turn, a batch
# (TensorDataModule.view_batches)
ViewBatches = Callable[[list[tuple[torch.Tensor, torch.Tensor | None]]], Iterable[torch.Tensor]]


class TeacherOutputs:
    """`stores[member][tap]`, each with a row per slot of `slots`; `complete` once every store is;
    `get(index, view)` → {member: {tap: tensor}}."""

    def __init__(
        self, stores: Mapping[str, Mapping[str, OutputStore]], slots: Slots, scratch: Path | None = None
    ):
        self.stores = {m: dict(taps) for m, taps in stores.items()}
        self.slots = slots
        self.scratch = scratch  # where RAM stores move to when several ranks must share them
        self.computed = 0  # samples this process ran a teacher on to fill the stores
        self._complete = all(s.complete for s in self.all())  # read on every training step

    def all(self) -> list[OutputStore]:
        return [s for taps in self.stores.values() for s in taps.values()]

    @property
    def complete(self) -> bool:
        return self._complete

    def check(self, full: bool = True) -> int:
        """Verify every complete store against its checksums (kd_lightning.store.TapStore.check); the rows
        of blocks that differ are marked missing for the next `fill`. Returns the number of such blocks."""
        bad = sum(len(s.check(full)) for s in self.all())
        self._complete = all(s.complete for s in self.all())
        return bad

    def files(self) -> list[str]:
        return sorted(f for s in self.all() for f in s.files())

    def get(
        self, index: torch.Tensor, view: torch.Tensor | None, device: torch.device | str
    ) -> TeacherFeatures:
        """The stored outputs for these samples in these views, on `device`."""
        rows = self.slots.rows(index, view)
        return {m: {tap: s.read(rows, device) for tap, s in taps.items()} for m, taps in self.stores.items()}

    def gather(
        self, index: torch.Tensor, view: torch.Tensor | None
    ) -> dict[str, dict[str, tuple[torch.Tensor, ...]]]:
        """The batch's rows as stored (in the loader's workers, for stores kept on the host)."""
        rows = self.slots.rows(index, view)
        return {m: {tap: s.gather(rows) for tap, s in taps.items()} for m, taps in self.stores.items()}

    def assemble(
        self, rows: Mapping[str, Mapping[str, tuple[torch.Tensor, ...]]], device: torch.device | str
    ) -> TeacherFeatures:
        """`gather`'s rows, moved with the batch, as the features the losses read."""
        return {
            m: {tap: s.assemble(rows[m][tap], device) for tap, s in taps.items()}
            for m, taps in self.stores.items()
        }

    def read_in_step(self, device: torch.device, world: int) -> bool:
        """Where the steps will read the rows, decided before the loaders are made: True when they are on
        `device` (a copy on a GPU when the stores take at most kd_lightning.data.device.DEVICE_SHARE of its
        free memory; RAM stores of one process on the CPU), False when the loader reads them beside the
        inputs (`gather`: stores too large for the GPU, or files: disk stores, and RAM stores that DDP ranks
        share through files)."""
        if device.type == "cpu":
            return world == 1 and all(s.path is None for s in self.all())
        return fits_on_device(sum(s.nbytes for s in self.all()), device)

    def keep_on(self, device: torch.device) -> None:
        """Copy the complete rows to `device` (a GPU) for the steps to gather there."""
        if device.type != "cpu":
            for s in self.all():
                s.keep_on(device)

    def share_between_ranks(self) -> None:
        """Under DDP, RAM stores become files in the run folder (`scratch`) that every rank maps."""
        for taps in self.stores.values():
            for tap, s in taps.items():
                if s.path is None:
                    if self.scratch is None:
                        raise RuntimeError("teacher stores held in RAM need a scratch folder to be shared")
                    taps[tap] = s.moved(self.scratch)
        self._complete = all(s.complete for s in self.all())

    def remove_scratch(self) -> None:
        for s in self.all():
            if s.folder is not None and self.scratch is not None and s.folder == self.scratch:
                s.remove()

    @torch.no_grad()
    def fill(
        self,
        run_teacher: Callable[[torch.Tensor, str], Mapping[str, torch.Tensor]],
        view_batches: ViewBatches,
        ranks: Ranks | None = None,
        batch_size: int = 512,
    ) -> int:
        """Compute the missing rows of every incomplete store, sharded over the ranks; returns the samples
        this rank ran a teacher on. `run_teacher(x, member)` → {tap: outputs}; `view_batches(chunks)` → for
        each chunk of (training samples, their recorded views) in turn, what the teachers see (normalised, in
        that view: TensorDataModule.view_batches)."""
        ranks = ranks or Ranks()
        with ExitStack() as locks:
            if ranks.rank == 0:
                for s in sorted(
                    (s for s in self.all() if s.lock_path is not None), key=lambda s: str(s.path)
                ):
                    s.refresh()
                    if not s.complete:
                        locks.enter_context(FileLock(str(s.lock_path)))  # another job may be filling it
            ranks.barrier()
            for s in self.all():
                s.refresh()
            # Every rank reads the missing rows before any rank writes: a rank that read them after another
            # had written its share would see a shorter list, split it otherwise, and leave rows unwritten.
            plan = self._plan(ranks)
            ranks.barrier()
            done = 0
            for mine, members in _sharing_rows(plan):
                chunks = list(mine.split(batch_size))
                for chunk, x in zip(chunks, self._inputs(view_batches, chunks), strict=True):
                    for member in members:
                        outputs = run_teacher(x, member)
                        for tap, s in plan[member][0].items():
                            s.write(chunk, outputs[tap])
                        done += len(chunk)
            ranks.barrier()
            if ranks.rank == 0:
                done += self._seal(run_teacher, view_batches, batch_size)
        ranks.barrier()
        for s in self.all():
            s.refresh()
        self._complete = all(s.complete for s in self.all())
        self.computed += done
        if done:
            log.info("teacher outputs: computed %d samples on rank %d of %d", done, ranks.rank, ranks.world)
        return done

    def _inputs(self, view_batches: ViewBatches, chunks: list[torch.Tensor]) -> Iterable[torch.Tensor]:
        """What the teachers see for each chunk of slots."""
        return view_batches([self.slots.keys(chunk) for chunk in chunks])

    def _plan(self, ranks: Ranks) -> dict[str, tuple[dict[str, OutputStore], torch.Tensor]]:
        """Each member's incomplete stores and this rank's share of the rows any of them misses."""
        plan = {}
        for member, taps in self.stores.items():
            todo = {tap: s for tap, s in taps.items() if not s.complete}
            if todo:
                missing = torch.unique(torch.cat([s.missing_slots() for s in todo.values()]))
                plan[member] = (todo, missing[ranks.rank :: ranks.world])
        return plan

    def _seal(
        self,
        run_teacher: Callable[[torch.Tensor, str], Mapping[str, torch.Tensor]],
        view_batches: ViewBatches,
        batch_size: int,
    ) -> int:
        """Rank 0, once every rank has written: seal each store; rows that read back otherwise than they were
        written are computed again first (twice at most). Returns the samples it ran a teacher on."""
        done = 0
        for _ in range(3):
            unsealed = {
                m: {tap: s for tap, s in taps.items() if not s.complete and not s.mark_complete()}
                for m, taps in self.stores.items()
            }
            unsealed = {m: taps for m, taps in unsealed.items() if taps}
            if not unsealed:
                return done
            for member, taps in unsealed.items():
                missing = torch.unique(torch.cat([s.missing_slots() for s in taps.values()]))
                chunks = list(missing.split(batch_size))
                for chunk, x in zip(chunks, self._inputs(view_batches, chunks), strict=True):
                    outputs = run_teacher(x, member)
                    for tap, s in taps.items():
                        s.write(chunk, outputs[tap])
                    done += len(chunk)
        bad = [s.label for s in self.all() if not s.complete]
        raise OSError(
            f"teacher stores {bad} read back otherwise than they were written, three times: the disk under "
            f"{next(s.folder for s in self.all() if not s.complete)} is corrupting data"
        )


def _sharing_rows(plan: Mapping[str, tuple[object, torch.Tensor]]) -> list[tuple[torch.Tensor, list[str]]]:
    """Members missing the same rows (the usual case) share their inputs: each chunk is read and made once
    for all of them (an image file and its recorded view are decoded once, not per teacher)."""
    groups: list[tuple[torch.Tensor, list[str]]] = []
    for member, (_, mine) in plan.items():
        same = next((g for g in groups if torch.equal(g[0], mine)), None)
        if same is None:
            groups.append((mine, [member]))
        else:
            same[1].append(member)
    return groups


def _topk(
    k: int | str | None, dm: TensorDataModule, teachers: TeacherEnsemble, taps: list[str]
) -> int | None:
    """`teacher_cache.logits_topk` resolved: `auto` is the top AUTO_TOPK for recorded views of data with more
    than AUTO_TOPK_CLASSES classes when every stored tap is logits (FKD's top-k soft labels), else None."""
    if k != "auto":
        return k if k is None else int(k)
    logit_taps = all(teachers.tap_module(m, tap) == "logits" for m in teachers.names for tap in taps)
    if not (dm.num_classes > AUTO_TOPK_CLASSES and dm.views is not None and logit_taps):
        return None
    log.info(
        "teacher_cache.logits_topk=auto: %d classes, recorded views: storing the top %d logits",
        dm.num_classes,
        AUTO_TOPK,
    )
    return AUTO_TOPK


def _check_topk(k: int, tap: str, module: str, classes: int) -> None:
    if module != "logits":
        raise ConfigError(
            f"teacher_cache.logits_topk={k} keeps logits only, but a distill term reads teacher tap "
            f"{tap!r} ({module}); set teacher_cache.logits_topk=null or keep only logit terms"
        )
    if k >= classes:
        raise ConfigError(
            f"teacher_cache.logits_topk={k} must be smaller than the class count ({classes}); "
            "or null to keep every logit"
        )


def build_outputs(
    cache: CacheSpec,
    dm: TensorDataModule,
    teachers: TeacherEnsemble,
    taps: list[str],
    shapes: Mapping[str, Mapping[str, tuple[int, ...]]],
    data_config: Mapping[str, Plain],
    precision: str,
    scratch: Path,
) -> TeacherOutputs | None:
    """One store per (teacher, tap the terms read), or None where outputs cannot be stored: the rules.

    - `teacher_cache.mode=none`, or a dry run's unfitted teachers (no checkpoint to key a store by): none;
    - fresh augmentation (a new view every step): none, and the log says why (`data.augment.views=K` records
      K views per sample, which the store holds);
    - `disk`: files under `<teacher_cache.dir>/<dataset>/`, shared by every job and rank; `memory`: RAM for one
      process, files in the run folder's `scratch` under DDP (TeacherOutputs.share_between_ranks);
    - `logits_topk=K`: logit taps only, K below the class count; `auto` (the default): the top 10 for recorded
      views of data with more than 100 classes when every stored tap is logits (FKD's top-k soft labels),
      every logit otherwise;
    - the key (kd_lightning.teachers.store.store_key): the data (config and content fingerprint), the slot
      count (kd_lightning.teachers.slots), the teacher's bytes, the tap, the dtype and the trainer's precision."""
    if cache.mode == "none" or teachers.unfitted:
        return None
    if dm.fresh_views:
        log.info(
            "teacher_cache.mode=%s is off: data.augment draws a new view of every sample each step, so teacher "
            "outputs cannot be reused; teachers run live on every batch (set data.augment.views=K for "
            "consistent teaching with K recorded views per sample, which the store can hold)",
            cache.mode,
        )
        return None
    folder = Path(cache.dir) / dm.name if cache.mode == "disk" and cache.dir is not None else None
    identity = data_key(data_config, dm.content_fingerprint())
    replay = dm.replay_identity()
    if replay is not None:
        identity = {**identity, "replay": replay}
    k = _topk(cache.logits_topk, dm, teachers, taps)
    slots = Slots.of(dm)
    stores: dict[str, dict[str, OutputStore]] = {}
    for m in teachers.names:
        source = Path(teachers.checkpoints[m])
        digest = file_digest(source) if source.is_file() else model_digest(teachers.members[m])
        stores[m] = {}
        for tap in taps:
            module = teachers.tap_module(m, tap)
            key = store_key(identity, slots.count, digest, tap, module, cache.dtype, precision)
            label = f"{m}-{tap}"
            if k is None:
                stores[m][tap] = TapStore(key, shapes[m][tap], folder, label=label)
            else:
                _check_topk(k, tap, module, dm.num_classes)
                stores[m][tap] = TopKLogitsStore(key, dm.num_classes, k, folder, label=label)
    return TeacherOutputs(stores, slots, scratch=scratch)
