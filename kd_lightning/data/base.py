"""The datamodule base: splits, normalisation and augmentation on device, and the public reading API.

Every batch is a `Batch` (kd_lightning.data.batch: x, y, index, view, targets, crop). Normalisation and
augmentation run in `on_after_batch_transfer`, after the batch has reached the device, so student and
teachers always see the same tensor. Other parts of the framework (evaluation, amalgamation) read data only through the
public methods `iter_split`, `labels`, `prepare_batch`, `input_shape`, `num_classes` and `num_train`, so a
dataset read from disk supports them as an in-memory one does.
"""

from __future__ import annotations

import copy
import logging
import math
from collections.abc import Callable, Iterator, Sequence
from typing import TypeVar

import numpy as np
import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from kd_lightning.config.specs import LoaderSpec, parse
from kd_lightning.data.batch import Batch, Targets, collate_samples
from kd_lightning.data.device import DeviceBatches, fits_on_device
from kd_lightning.data.fingerprint import Listings, content_digest
from kd_lightning.data.views import replay_crops
from kd_lightning.errors import ConfigError, as_seed

log = logging.getLogger(__name__)

# what `_on` keeps on a device: a tensor, or a tuple of them
Held = TypeVar("Held", torch.Tensor, tuple[torch.Tensor, ...])


class _Length(Dataset):
    """What a DistributedSampler reads of its dataset: the length only."""

    def __init__(self, n: int):
        self.n = n

    def __len__(self) -> int:
        return self.n


class EpochSeededSampler(DistributedSampler):
    """A shuffle that depends only on (seed, epoch), sharded over DDP ranks.

    A resumed run sees exactly the batches it would have seen. Under DDP rank r takes every
    world_size-th index of the *same* permutation (padded to equal length, as DistributedSampler
    does), so N ranks × batch b step through the same global batches as 1 process × batch N·b.
    Being a DistributedSampler, Lightning uses it as it is instead of wrapping it in a second shuffle.
    The epoch comes from `epoch_source` (the trainer's epoch) when given, else from `set_epoch`.
    """

    def __init__(
        self,
        n: int,
        seed: int,
        epoch_source: Callable[[], int | None] | None = None,
        num_replicas: int = 1,
        rank: int = 0,
        view_of: Callable[[int], torch.Tensor] | None = None,
    ):
        super().__init__(_Length(n), num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed)
        self.n, self.epoch_source = n, epoch_source
        # recorded views made by the dataset: each key is (sample, the view this epoch shows of it)
        self.view_of = view_of

    def current_epoch(self) -> int:
        epoch = self.epoch_source() if self.epoch_source is not None else None
        return self.epoch if epoch is None else int(epoch)

    def resume_after(self, epoch: int, samples: int) -> None:
        """A run resumed in the middle of `epoch`: this rank's first `samples` of it were trained on."""
        self.skip = (int(epoch), int(samples))

    skip: tuple[int, int] = (-1, 0)  # (epoch, samples of it already trained on), set by resume_after

    def __iter__(self):
        gen = torch.Generator().manual_seed(self.seed * 100003 + self.current_epoch())
        perm = torch.randperm(self.n, generator=gen).tolist()
        perm += perm[: self.total_size - self.n]
        mine = perm[self.rank : self.total_size : self.num_replicas]
        if self.skip[0] == self.current_epoch():
            mine = mine[self.skip[1] :]
        if self.view_of is None:
            return iter(mine)
        views = self.view_of(self.current_epoch())
        return iter([(i, int(views[i])) for i in mine])


def _world() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_world_size(), torch.distributed.get_rank()
    return 1, 0


class SplitDataset(Dataset):
    """A datamodule's split: its samples by index and their labels in order (tensors in memory, or files)."""

    def __len__(self) -> int:
        raise NotImplementedError

    @property
    def labels(self) -> torch.Tensor:
        raise NotImplementedError


class IndexedTensorDataset(SplitDataset):
    """`(x[i], y[i], i)`; `__getitems__` returns a whole Batch with one index operation. Under consistent
    teaching the training split's sampler gives `(sample, view)` keys, and the batch carries each sample's
    view, which the augmentation on the device replays."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor):
        if len(x) != len(y):
            raise ValueError(f"x and y differ in length: {len(x)} vs {len(y)}")
        self.x, self.y = x, y

    def __len__(self) -> int:
        return len(self.y)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i], torch.tensor(i)

    def __getitems__(self, keys: list[int] | list[tuple[int, int]]) -> Batch:
        if keys and isinstance(keys[0], tuple):
            idx, view = torch.as_tensor(keys, dtype=torch.long).unbind(1)
            return Batch(self.x[idx], self.y[idx], idx, view)
        idx = torch.as_tensor(keys, dtype=torch.long)
        return Batch(self.x[idx], self.y[idx], idx)

    @property
    def labels(self) -> torch.Tensor:
        return self.y


class ResumableLoader(DataLoader):
    """A DataLoader that a mid-epoch checkpoint can resume: its state is how far into the epoch training got
    (`position()`: the epoch and the batches done), and a resumed run's sampler skips those batches, so the
    run continues with the batch it would have trained next (Lightning saves and restores the state of a
    loader that has `state_dict` / `load_state_dict`)."""

    def __init__(
        self,
        dataset: Dataset,
        sampler: EpochSeededSampler,
        position: Callable[[], tuple[int, int]],
        batch_size: int,
        collate_fn: Collate,
        num_workers: int,
        pin_memory: bool,
    ):
        super().__init__(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            collate_fn=collate_fn,
            num_workers=num_workers,
            pin_memory=pin_memory,
            persistent_workers=num_workers > 0,
        )
        self.position = position

    def state_dict(self) -> dict[str, int]:
        epoch, batches = self.position()
        return {"epoch": epoch, "samples": batches * int(self.batch_size or 1)}

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Lightning's way in, when it makes the loader after restoring a checkpoint (DistillationModule's
        on_load_checkpoint tells the datamodule otherwise: its optimiser setup makes the loader first)."""
        if isinstance(self.sampler, EpochSeededSampler):
            self.sampler.resume_after(state["epoch"], state["samples"])


# a DataLoader's collate_fn: what the dataset gave for a batch's keys (a list of samples, or a whole Batch
# from __getitems__) → the Batch
Collate = Callable[[object], Batch]


def batch_is_collated(batch: object) -> Batch:
    """Collate function for datasets whose `__getitems__` already returns a batch."""
    if not isinstance(batch, Batch):
        raise TypeError(f"expected a Batch from the dataset's __getitems__, got {type(batch).__name__}")
    return batch


# what the teacher stores give for a batch's samples (and their recorded views): their rows, read on the host
TargetReader = Callable[[torch.Tensor, torch.Tensor | None], Targets]


class _with_targets:  # noqa: N801  (a collate function, named as the functions it wraps)
    """A collate function that also reads the batch's stored teacher outputs (in the loader's workers)."""

    def __init__(self, collate: Collate, reader: TargetReader):
        self.collate, self.reader = collate, reader

    def __call__(self, samples: object) -> Batch:
        batch = self.collate(samples)
        if batch.index is None:
            raise ValueError(
                "stored teacher outputs need the batch's sample indices (a dataset of kd_lightning's)"
            )
        return batch._replace(targets=self.reader(batch.index, batch.view))


def crop_flip_params(
    n: int,
    padding: int,
    hflip: bool,
    generator: torch.Generator | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """(n, 3) int64 on `device`: crop offsets (y, x) in [0, 2·padding] and a flip bit, drawn uniformly
    (drawn where they are used: nothing is copied from the host in a training step)."""
    oy = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
    ox = torch.randint(0, 2 * padding + 1, (n,), generator=generator, device=device)
    if hflip:
        flip = (torch.rand(n, generator=generator, device=device) < 0.5).long()
    else:
        flip = torch.zeros(n, dtype=torch.long, device=device)
    return torch.stack([oy, ox, flip], 1)


def crop_flip(x: torch.Tensor, padding: int, params: torch.Tensor) -> torch.Tensor:
    """Crop (zero padding) and flip each image of a batch (N, C, H, W) as `params` say; no Python loop."""
    n, _, h, w = x.shape
    dev = x.device
    params = params.to(dev)
    if padding > 0:
        padded = torch.nn.functional.pad(x, (padding, padding, padding, padding))
        rows = (params[:, 0, None] + torch.arange(h, device=dev))[:, :, None]  # N,H,1
        cols = (params[:, 1, None] + torch.arange(w, device=dev))[:, None, :]  # N,1,W
        x = padded[torch.arange(n, device=dev)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)
    x = torch.where(params[:, 2, None, None, None].bool(), x.flip(3), x)
    return x.contiguous()


def random_crop_flip(
    x: torch.Tensor, padding: int, hflip: bool, generator: torch.Generator | None = None
) -> torch.Tensor:
    """Batched random crop (zero padding) and horizontal flip of an image batch (N, C, H, W)."""
    device = generator.device if generator is not None else x.device
    return crop_flip(x, padding, crop_flip_params(len(x), padding, hflip, generator, device))


class TensorDataModule(pl.LightningDataModule):
    """Base for datasets that fit in memory. Subclasses implement `load()`.

    `load()` returns train and test arrays; a validation split is carved from train with `split_seed`
    (independent of the run seed, so every run of a sweep sees the same splits).
    """

    name = "tensor"

    def __init__(
        self,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        val_fraction: float = 0.1,
        split_seed: int = 0,
        train_subset: int | None = None,
        normalize: bool = True,
        augment: dict | None = None,
        num_workers: int = 0,
        class_subset: list[int] | None = None,
        on_device: bool | str = "auto",
        shuffle_seed: int | None = None,
        test_each_epoch: bool = False,
    ):
        """`shuffle_seed` (the run's seed; None: torch's initial seed) orders the training batches;
        `test_each_epoch` (the run's setting) makes the validation loop also test, for the per-epoch test
        curve. Both come from the run, not from the `data` group."""
        super().__init__()
        spec = parse(
            LoaderSpec,
            {
                "batch_size": batch_size,
                "eval_batch_size": eval_batch_size,
                "val_fraction": val_fraction,
                "split_seed": split_seed,
                "train_subset": train_subset,
                "normalize": bool(normalize),
                "augment": augment,
                "num_workers": num_workers,
                "class_subset": class_subset,
                "on_device": on_device,
            },
            "data",
        )
        self.batch_size = spec.batch_size
        self.eval_batch_size = spec.eval_batch_size or max(self.batch_size, 256)
        self.val_fraction, self.split_seed, self.train_subset = (
            spec.val_fraction,
            spec.split_seed,
            spec.train_subset,
        )
        self.normalize = spec.normalize
        self.crop_padding, self.hflip = spec.augment.crop_padding, spec.augment.hflip
        # consistent teaching: a fixed number of recorded views per sample (None: a fresh view every step)
        self.views = spec.augment.views
        self.view_params: torch.Tensor | None = None  # (n_train, views, 3), drawn once at setup
        self.replay = self._checked_replay(spec.augment.replay)
        self.crop_size: tuple[int, int] | None = None  # the views' size when the device crops them (batched)
        self.num_workers = spec.num_workers
        self.on_device = spec.on_device  # True | False | "auto" (kd_lightning.data.device)
        self.class_subset = None if spec.class_subset is None else [int(c) for c in spec.class_subset]
        self.shuffle_seed = None if shuffle_seed is None else as_seed("seed", shuffle_seed)
        self.test_each_epoch = bool(test_each_epoch)
        self.splits: dict[str, SplitDataset] = {}
        self.mean: torch.Tensor | None = None
        self.std: torch.Tensor | None = None

    replays_file_views = False  # a dataset of image files whose recorded views `replay` can make

    def _checked_replay(self, replay: str) -> str:
        """`data.augment.replay`: `batched` is for recorded views of image files (ImageFolderDataModule)."""
        if replay == "batched" and not self.replays_file_views:
            raise ConfigError(
                f"data.augment.replay=batched makes recorded views of image files on the device; {self.name} "
                "is held in memory, where every view is already made on the device in one batched op: "
                "drop data.augment.replay"
            )
        return replay

    # --- to implement -------------------------------------------------------------------
    def load(self) -> dict[str, np.ndarray]:
        """Return {'x_train', 'y_train', 'x_test', 'y_test'}; x as (N, C, ...) float32 or uint8."""
        raise NotImplementedError

    # --- what the data is, for cache keys -----------------------------------------------------
    def content_listings(self) -> Listings | None:
        """The files the data is read from (kd_lightning.data.fingerprint); None for data generated in
        memory, whose config is its identity. Datasets read from disk override it."""
        return None

    def content_fingerprint(self) -> str | None:
        """The fingerprint of the data's files (computed once per datamodule), None for generated data."""
        if not hasattr(self, "_fingerprint"):
            listings = self.content_listings()
            self._fingerprint = content_digest(listings) if listings is not None else None
        return self._fingerprint

    # --- shapes ---------------------------------------------------------------------------
    @property
    def input_shape(self) -> tuple[int, ...]:
        self._require_setup()
        return tuple(self.splits["train"][0][0].shape)

    @property
    def num_classes(self) -> int:
        self._require_setup()
        return self._num_classes

    def _require_setup(self) -> None:
        if not self.splits:
            self.setup("fit")

    def _view_params(self) -> torch.Tensor:
        if self.view_params is None:
            raise RuntimeError("recorded views are drawn at setup: call setup() first")
        return self.view_params

    def tensors(self, split: str) -> IndexedTensorDataset:
        """A split held as tensors in memory; TypeError for a split read from files."""
        ds = self.splits[split]
        if not isinstance(ds, IndexedTensorDataset):
            raise TypeError(f"the {split} split of {type(self).__name__} is not held as tensors in memory")
        return ds

    # --- Lightning hooks ------------------------------------------------------------------
    def setup(self, stage: str | None = None) -> None:
        if self.splits:
            return
        self.splits, self._num_classes = self.build_splits()
        if self.normalize:
            self.fit_normalization()
        self._draw_views()

    def fit_normalization(self) -> None:
        """Per-channel statistics of the training split (datasets read from disk state theirs instead)."""
        self.set_normalization(self._to_float(self.tensors("train").x))

    def build_splits(self) -> tuple[dict[str, SplitDataset], int]:
        """train / val / test datasets and the class count (in-memory: from `load()`)."""
        arrays = self.load()
        x_tr, y_tr = torch.as_tensor(arrays["x_train"]), torch.as_tensor(arrays["y_train"]).long()
        x_te, y_te = torch.as_tensor(arrays["x_test"]), torch.as_tensor(arrays["y_test"]).long()
        if self.class_subset is not None:
            (x_tr, y_tr), (x_te, y_te) = self._select_classes(x_tr, y_tr), self._select_classes(x_te, y_te)
        num_classes = int(max(y_tr.max(), y_te.max()) + 1)
        val_idx, tr_idx = self.split_train_val(len(y_tr))
        splits: dict[str, SplitDataset] = {
            "train": IndexedTensorDataset(x_tr[tr_idx], y_tr[tr_idx]),
            "val": IndexedTensorDataset(x_tr[val_idx], y_tr[val_idx]),
            "test": IndexedTensorDataset(x_te, y_te),
        }
        return splits, num_classes

    def split_train_val(self, n: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(validation, training) positions among `n` labelled samples, from `split_seed`."""
        perm = torch.randperm(n, generator=torch.Generator().manual_seed(self.split_seed))
        n_val = max(1, int(round(self.val_fraction * n))) if self.val_fraction > 0 else 0
        val_idx, tr_idx = perm[:n_val], perm[n_val:]
        if self.train_subset is not None:
            tr_idx = tr_idx[: int(self.train_subset)]
        return val_idx, tr_idx

    def _draw_views(self) -> None:
        """Consistent teaching: the crop/flip of each of the K recorded views of every training sample."""
        if self.views is not None:
            n = len(self.splits["train"])
            gen = torch.Generator().manual_seed(self.split_seed * 7919 + 1)
            self.view_params = crop_flip_params(n * self.views, self.crop_padding, self.hflip, gen).view(
                n, self.views, 3
            )

    def class_lookup(self, present: list[int]) -> torch.Tensor:
        """`data.class_subset` as a label map: old id → new id (0..k-1 in the order given), -1 to drop."""
        wanted = self.class_subset or present
        absent = [c for c in wanted if c not in present]
        if absent:
            raise ConfigError(
                f"data.class_subset {absent} do not occur in {self.name}; its classes: {sorted(present)}"
            )
        lookup = torch.full((max(present) + 1,), -1, dtype=torch.long)
        lookup[torch.tensor(wanted)] = torch.arange(len(wanted))
        return lookup

    def _select_classes(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        lookup = self.class_lookup(sorted(int(c) for c in y.unique()))
        new = lookup[y]
        keep = new >= 0
        return x[keep], new[keep]

    def set_normalization(self, train_x: torch.Tensor) -> None:
        """Per-channel mean/std of the training split (never of val/test)."""
        dims = [0] + list(range(2, train_x.dim()))
        self.mean = train_x.mean(dim=dims).view(1, -1, *[1] * (train_x.dim() - 2))
        self.std = train_x.std(dim=dims).clamp_min(1e-6).view_as(self.mean)

    @staticmethod
    def _to_float(x: torch.Tensor) -> torch.Tensor:
        return x.float().div_(255.0) if x.dtype == torch.uint8 else x.float()

    @property
    def num_train(self) -> int:
        self._require_setup()
        return len(self.splits["train"])

    def labels(self, split: str) -> torch.Tensor:
        """The class labels of a split, in order (no inputs are read)."""
        self._require_setup()
        return torch.as_tensor(self.splits[split].labels)

    def iter_split(self, split: str, batch_size: int | None = None) -> Iterator[Batch]:
        """The batches of a split in order, as loaded (on the CPU, not yet scaled or normalised)."""
        self._require_setup()
        ds = self.splits[split]
        loader = DataLoader(
            ds,
            batch_size=batch_size or self.eval_batch_size,
            collate_fn=self._collate(ds),
            num_workers=self.num_workers,
        )
        yield from loader

    def view_inputs(
        self, index: torch.Tensor, view: torch.Tensor | None, device: torch.device | str = "cpu"
    ) -> torch.Tensor:
        """What the teachers see for these training samples: normalised and, under consistent teaching, in
        recorded view `view` (None without recorded views); for the teacher-output precompute."""
        self._require_setup()
        index = index.cpu()
        ds = self.splits["train"]
        if view is not None and getattr(ds, "views", None) is not None:  # the dataset makes each view itself
            raw = collate_samples([ds[key] for key in zip(index.tolist(), view.tolist(), strict=True)])
            return self.prepare_batch(raw._replace(x=raw.x.to(device)), train=False).x
        if isinstance(ds, IndexedTensorDataset):
            raw = ds.__getitems__(index.tolist())
        else:
            raw = collate_samples([ds[i] for i in index.tolist()])
        x = self.prepare_batch(raw._replace(x=raw.x.to(device)), train=False).x
        if view is not None and self.view_params is not None:
            x = crop_flip(x, self.crop_padding, self.view_params[index, view.cpu()])
        return x

    def view_batches(
        self, chunks: Sequence[tuple[torch.Tensor, torch.Tensor | None]], device: torch.device | str = "cpu"
    ) -> Iterator[torch.Tensor]:
        """`view_inputs` of each chunk of (samples, views) in turn. Recorded views made from image files are
        read and made in `num_workers` worker processes (the precompute decodes K views of every image)."""
        self._require_setup()
        ds = self.splits["train"]
        made_by_dataset = getattr(ds, "views", None) is not None and all(v is not None for _, v in chunks)
        if not made_by_dataset or self.num_workers == 0:
            for index, view in chunks:
                yield self.view_inputs(index, view, device)
            return
        keys = [list(zip(i.tolist(), v.tolist(), strict=True)) for i, v in chunks if v is not None]
        loader = DataLoader(ds, batch_sampler=keys, collate_fn=collate_samples, num_workers=self.num_workers)
        for raw in loader:
            yield self.prepare_batch(raw._replace(x=raw.x.to(device)), train=False).x

    def replay_identity(self) -> dict[str, str] | None:
        """What the pixels of a recorded view depend on beyond the data and its config (an image pipeline's
        library), for the teacher stores' key; None when views are made here, on the device."""
        return None

    def input_std(self, max_batches: int = 8) -> float:
        """Standard deviation of the training inputs scaled to [0, 1] (up to `max_batches` eval batches):
        the unit of the noise corruptions."""
        xs = [self._to_float(b.x) for _, b in zip(range(max_batches), self.iter_split("train"), strict=False)]
        return float(torch.cat([x.flatten() for x in xs]).std())

    @staticmethod
    def _collate(ds: Dataset) -> Collate:
        return batch_is_collated if isinstance(ds, IndexedTensorDataset) else collate_samples

    @property
    def augments_training(self) -> bool:
        """Whether training batches are augmented at all (images only)."""
        return len(self.input_shape) == 3 and (self.crop_padding > 0 or self.hflip)

    @property
    def fresh_views(self) -> bool:
        """A new random view every step: teacher outputs cannot be reused (no `augment.views`)."""
        return self.augments_training and self.views is None

    @property
    def views_per_sample(self) -> int:
        """How many views of each training sample there are for teachers to see: K under consistent teaching
        (`Batch.view` says which), else 1."""
        self._require_setup()
        return self.views if self.recorded_views and self.views else 1

    def epoch_views(self, epoch: int) -> torch.Tensor:
        """Which recorded view each training sample shows in `epoch` (depends on the run seed and epoch).

        Drawn once per epoch, not per batch."""
        seed = self.shuffle_seed if self.shuffle_seed is not None else self.split_seed
        key = (seed, epoch)
        if getattr(self, "_views_key", None) != key:
            gen = torch.Generator().manual_seed(seed * 104729 + epoch)
            self._views = torch.randint(0, self.views or 1, (len(self.splits["train"]),), generator=gen)
            self._views_key = key
        return self._views

    def prepare_batch(self, batch: Batch, train: bool) -> Batch:
        """Scale, normalise and (when training) augment a batch that is already on its device. Everything it
        reads (statistics, recorded view parameters, this epoch's views) is kept on that device: nothing is
        copied from or read on the host."""
        x = self._to_float(batch.x)
        if batch.crop is not None:  # recorded views of image files, made here (data.augment.replay=batched)
            if self.crop_size is None:
                raise RuntimeError("a batch with crops needs data.augment.replay=batched")
            x = replay_crops(x, batch.crop, self.crop_size)
            batch = batch._replace(crop=None)
        mean, std = self.mean, self.std
        if mean is not None and std is not None:
            on_device = self._on(x.device, "norm", lambda: (mean, std))
            x = (x - on_device[0]) / on_device[1]
        if train and x.dim() == 4 and (self.crop_padding > 0 or self.hflip):
            if self.views is None:
                x = random_crop_flip(x, self.crop_padding, self.hflip, self._augment_rng(x.device))
            elif batch.index is not None:
                # consistent teaching: this epoch's recorded view of each sample (the teacher stores key on it
                # too) comes from the sampler, else is found here on the device
                view = batch.view
                if view is None:
                    epoch = self.trainer.current_epoch if self.trainer is not None else 0
                    key = ("views", self.shuffle_seed, epoch)
                    view = self._on(x.device, key, lambda: self.epoch_views(epoch))[batch.index]
                params = self._on(x.device, "view_params", self._view_params)
                return batch._replace(x=crop_flip(x, self.crop_padding, params[batch.index, view]), view=view)
        return batch._replace(x=x)

    def _augment_rng(self, device: torch.device) -> torch.Generator:
        """The random crops and flips of an epoch come from a generator seeded by (run seed, epoch, rank) on
        the batch's device: the same draws whichever loader made the batch (a DataLoader draws from torch's
        global generator when it starts an epoch) and after a resume from an epoch's end (a run resumed in the
        middle of an epoch draws that epoch's remaining crops anew)."""
        epoch = self.trainer.current_epoch if self.trainer is not None else 0
        seed = self.shuffle_seed if self.shuffle_seed is not None else self.split_seed
        key = (device, seed, epoch, _world()[1])
        held = self.__dict__.get("_augment")
        if held is None or held[0] != key:
            gen = torch.Generator(device=device).manual_seed((seed * 1_000_003 + epoch) * 1009 + key[3])
            self.__dict__["_augment"] = held = (key, gen)
        return held[1]

    def _on(self, device: torch.device, what: object, make: Callable[[], Held]) -> Held:
        """`make()`'s tensors moved to `device` once and kept there (the views of the newest epoch only)."""
        cache = self.__dict__.setdefault("_device_copies", {})
        key = (device, what)
        if key not in cache:
            if isinstance(what, tuple) and what[0] == "views":
                for old in [k for k in cache if isinstance(k[1], tuple) and k[1][0] == "views"]:
                    del cache[old]
            made = make()
            cache[key] = tuple(t.to(device) for t in made) if isinstance(made, tuple) else made.to(device)
        return cache[key]

    def transfer_batch_to_device(self, batch: Batch, device: torch.device, dataloader_idx: int) -> Batch:
        """A batch that is on `device` already (DeviceBatches gather it there) is returned as it is: Lightning's
        move walks every field of the batch on the host at every step, to copy nothing."""
        on = [batch.x, batch.y, batch.index, batch.view, batch.crop] if isinstance(batch, Batch) else None
        if on is not None and batch.targets is None and all(t is None or t.device == device for t in on):
            return batch
        return super().transfer_batch_to_device(batch, device, dataloader_idx)

    def on_after_batch_transfer(self, batch: Batch, dataloader_idx: int) -> Batch:
        training = self.trainer is not None and self.trainer.training
        return self.prepare_batch(batch, train=training)

    @property
    def recorded_views(self) -> bool:
        """Consistent teaching: every training sample has `views` recorded views (the store holds each)."""
        return self.augments_training and self.views is not None

    def _sampler(self, ds: SplitDataset, views: bool) -> EpochSeededSampler:
        seed = self.shuffle_seed if self.shuffle_seed is not None else torch.initial_seed() % (2**31)
        view_of = self.epoch_views if views else None
        sampler = EpochSeededSampler(len(ds), seed, self._trainer_epoch, *_world(), view_of=view_of)
        sampler.resume_after(*self._resume)
        return sampler

    _resume: tuple[int, int] = (-1, 0)

    def resume_after(self, epoch: int, samples: int) -> None:
        """A run resumed from a checkpoint saved in the middle of `epoch`, after `samples` of this rank's
        training samples of it: the training loader starts with the next one."""
        self._resume = (int(epoch), int(samples))

    def _loader(self, split: str, shuffle: bool) -> DataLoader | DeviceBatches:
        self._require_setup()
        ds = self.splits[split]
        batch_size = self.batch_size if split == "train" else self.eval_batch_size
        device = self._device_for_data()
        if device is not None:
            x, y = self._on(device, ("split", split), lambda: (self.tensors(split).x, self.tensors(split).y))
            order = self._sampler(ds, views=False) if shuffle else None
            return DeviceBatches(x, y, batch_size, order, self._position if shuffle else None)
        # the sampler picks this epoch's recorded view of each training sample: the batch carries it, so
        # stored teacher outputs can be read beside the inputs (`read_targets`)
        views = shuffle and (getattr(ds, "views", None) is not None or self.recorded_views)
        collate = self._collate(ds)
        if split == "train" and self.target_reader is not None:
            collate = _with_targets(collate, self.target_reader)
        if not shuffle:
            return DataLoader(
                ds,
                batch_size=batch_size,
                persistent_workers=self.num_workers > 0,
                collate_fn=collate,
                num_workers=self.num_workers,
                pin_memory=self.pin_memory,
            )
        return ResumableLoader(
            ds,
            sampler=self._sampler(ds, views),
            position=self._position,
            batch_size=batch_size,
            collate_fn=collate,
            num_workers=self.num_workers,
            pin_memory=self.pin_memory,
        )

    def _position(self) -> tuple[int, int]:
        """How far into its epoch training is: (epoch, batches completed), for a mid-epoch checkpoint."""
        trainer = self.trainer
        if trainer is None:
            return 0, 0
        return trainer.current_epoch, trainer.fit_loop.epoch_loop.batch_progress.current.completed

    target_reader: TargetReader | None = None  # set by read_targets

    def read_targets(self, reader: TargetReader | None) -> None:
        """Have the training loader read `reader(index, view)` (the teachers' stored outputs, on the CPU) for
        each batch in its workers, as `Batch.targets`: for stores that do not fit on the training device."""
        self.target_reader = reader

    def _device_for_data(self) -> torch.device | None:
        """Where the splits live when `data.on_device` puts them on the training device, else None."""
        trainer = getattr(self, "trainer", None)
        if self.on_device is False or trainer is None:
            return None
        if not all(isinstance(ds, IndexedTensorDataset) for ds in self.splits.values()):
            if self.on_device is True:
                raise ConfigError(
                    f"data.on_device=true keeps a dataset held in memory on the device; {self.name} reads its "
                    "samples from files: set data.on_device=auto or false"
                )
            return None
        device = trainer.strategy.root_device
        if self.on_device is True:
            if self.target_reader is not None and device.type != "cpu":
                log.warning(
                    "data.on_device=true while the teacher stores do not fit on %s: every step reads their "
                    "rows on the host (data.on_device=auto reads them in the loader's workers instead)",
                    device,
                )
            return device
        if self.target_reader is not None:  # the stores are read beside the inputs, by a DataLoader
            return None
        if device.type == "cpu":  # held in memory there already: batches are gathered without a loader
            return device
        nbytes = sum(self.tensors(k).x.nbytes + self.tensors(k).y.nbytes for k in self.splits)
        return device if fits_on_device(nbytes, device) else None

    @property
    def pin_memory(self) -> bool:
        """Page-locked batches when a GPU will read them (faster host-to-device copies)."""
        trainer = getattr(self, "trainer", None)
        on_gpu = trainer is not None and trainer.strategy.root_device.type == "cuda"
        return on_gpu

    def reshuffled(self, seed: int) -> TensorDataModule:
        """The same data (splits shared, nothing reloaded) with its training batches shuffled by `seed`: a
        teacher fitted during a run must not depend on which run (which seed) happened to fit it first. A
        copy, so the run's own datamodule never changes."""
        other = copy.copy(self)
        other.__dict__["_device_copies"] = {}
        other.__dict__.pop("_augment", None)
        other.shuffle_seed = int(seed)
        other.trainer = None
        return other

    def _trainer_epoch(self) -> int | None:
        trainer = getattr(self, "trainer", None)
        return None if trainer is None else trainer.current_epoch

    def train_dataloader(self) -> DataLoader | DeviceBatches:
        return self._loader("train", shuffle=True)

    def val_roles(self) -> list[str]:
        """What the validation loop evaluates, in loader order: the validation split unless
        data.val_fraction=0, and the test split when the run tests after every epoch."""
        self._require_setup()
        return (["val"] if len(self.splits["val"]) else []) + (["test"] if self.test_each_epoch else [])

    def val_dataloader(self) -> list[DataLoader | DeviceBatches]:
        return [self._loader(role, shuffle=False) for role in self.val_roles()]

    def test_dataloader(self) -> DataLoader | DeviceBatches:
        return self._loader("test", shuffle=False)

    def describe(self) -> str:
        self._require_setup()
        sizes = ", ".join(f"{k}={len(v)}" for k, v in self.splits.items())
        return f"{self.name}: input {self.input_shape}, {self.num_classes} classes, {sizes}"

    def steps_per_epoch(self) -> int:
        self._require_setup()
        return math.ceil(len(self.splits["train"]) / self.batch_size)
