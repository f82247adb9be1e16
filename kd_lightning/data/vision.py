"""Image datasets on disk: CIFAR-10/100 and (Fashion-)MNIST readers, and any ImageFolder.

The readers parse the standard files themselves (no checksum test, so they also read fixtures that
tests write); torchvision is used only to download, and only when `download=true` is asked for.
CIFAR's python batches are pickles: they are read with an unpickler that accepts numpy arrays only.
"""

from __future__ import annotations

import gzip
import io
import pickle
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import numpy as np
import torch

from kd_lightning.data.base import SplitDataset, TensorDataModule
from kd_lightning.data.fingerprint import FileListing, Listings, scan_tree
from kd_lightning.data.views import ImageLike, Step, ViewPipeline, draw_views
from kd_lightning.errors import ConfigError, as_float, as_int
from kd_lightning.plain import Plain

_NUMPY_GLOBALS = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("_codecs", "encode"),
}


class _ArraysOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> object:
        if (module, name) in _NUMPY_GLOBALS:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"refused global {module}.{name}: CIFAR batches hold only arrays")


def read_cifar_batch(path: Path) -> dict:
    """One CIFAR python batch → {'data': uint8 (N, 3072), 'labels' or 'fine_labels': list}."""
    with open(path, "rb") as f:
        try:
            raw = _ArraysOnlyUnpickler(f, encoding="bytes").load()
        except pickle.UnpicklingError as e:
            raise ConfigError(f"{path} is not a CIFAR batch file: {e}") from None
    return {(k.decode() if isinstance(k, bytes) else k): v for k, v in raw.items()}


class CIFARDataModule(TensorDataModule):
    """CIFAR-10 / CIFAR-100 from the python-version batches under `root`."""

    _LAYOUT = {
        10: ("cifar-10-batches-py", [f"data_batch_{i}" for i in range(1, 6)], ["test_batch"], "labels"),
        100: ("cifar-100-python", ["train"], ["test"], "fine_labels"),
    }

    def __init__(self, root: str = "data", classes: int = 10, download: bool = False, **kwargs):
        kwargs.setdefault("augment", {"crop_padding": 4, "hflip": True})
        super().__init__(**kwargs)
        if isinstance(classes, bool) or classes not in self._LAYOUT:
            raise ConfigError(f"data.classes must be 10 or 100 for CIFAR, got {classes}")
        self.root, self.classes, self.download = Path(root), int(classes), bool(download)
        self.name = f"cifar{classes}"

    def prepare_data(self) -> None:
        folder = self.root / self._LAYOUT[self.classes][0]
        if folder.is_dir() or not self.download:
            return
        import torchvision

        ds = torchvision.datasets.CIFAR10 if self.classes == 10 else torchvision.datasets.CIFAR100
        ds(str(self.root), train=True, download=True)

    def content_listings(self) -> Listings | None:
        folder_name, train_files, test_files, _ = self._LAYOUT[self.classes]
        names = [f"{folder_name}/{f}" for f in train_files + test_files]
        if not all((self.root / n).is_file() for n in names):
            return None  # load() names what is missing
        return {"": FileListing.of(self.root, names)}

    def load(self) -> dict[str, np.ndarray]:
        folder_name, train_files, test_files, label_key = self._LAYOUT[self.classes]
        folder = self.root / folder_name
        missing = [f for f in train_files + test_files if not (folder / f).is_file()]
        if missing:
            raise ConfigError(
                f"CIFAR-{self.classes} files not found: {folder} lacks {missing}. Pass data.download=true to "
                f"fetch them (~170 MB), or set data.root to the folder that holds {folder_name}/"
            )

        def read(files: list[str]) -> tuple[np.ndarray, np.ndarray]:
            xs, ys = [], []
            for f in files:
                batch = read_cifar_batch(folder / f)
                if "data" not in batch or label_key not in batch:
                    raise ConfigError(
                        f"{folder / f} lacks 'data' or '{label_key}': not a CIFAR-{self.classes} batch file"
                    )
                x = np.asarray(batch["data"], dtype=np.uint8)
                y = np.asarray(batch[label_key], dtype=np.int64)
                self._check_batch(folder / f, x, y, label_key)
                xs.append(x.reshape(-1, 3, 32, 32))
                ys.append(y)
            return np.concatenate(xs), np.concatenate(ys)

        x_tr, y_tr = read(train_files)
        x_te, y_te = read(test_files)
        return {"x_train": x_tr, "y_train": y_tr, "x_test": x_te, "y_test": y_te}

    def _check_batch(self, path: Path, x: np.ndarray, y: np.ndarray, label_key: str) -> None:
        """One image per label, 3×32×32 bytes each, and every label a class of this CIFAR: a file that breaks
        one of these would load misaligned or train a head of the wrong width."""
        if x.ndim != 2 or x.shape[1] != 3 * 32 * 32:
            raise ConfigError(
                f"{path}: 'data' holds {x.shape[1] if x.ndim == 2 else x.shape} values per image; CIFAR has "
                f"3×32×32 = 3072"
            )
        if len(x) != len(y):
            raise ConfigError(
                f"{path}: {len(x)} images but {len(y)} labels ({label_key}); they must match one to one"
            )
        bad = (y < 0) | (y >= self.classes)
        if bad.any():
            values = sorted({int(v) for v in y[bad]})[:5]
            raise ConfigError(
                f"{path}: {int(bad.sum())} label(s) outside 0..{self.classes - 1} (e.g. {values}, in {label_key}); "
                f"CIFAR-{self.classes} has {self.classes} classes (data.classes)"
            )


def read_idx(path: Path) -> np.ndarray:
    """Read an IDX file (the MNIST format), optionally gzip-compressed."""
    raw = path.read_bytes()
    if path.suffix == ".gz":
        raw = gzip.decompress(raw)
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] != 0x08:
        raise ConfigError(f"{path} is not an unsigned-byte IDX file (bad magic number)")
    ndim = raw[3]
    dims = np.frombuffer(raw, dtype=">i4", count=ndim, offset=4)
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise ConfigError(f"{path} is truncated: header says {dims.tolist()}, found {data.size} bytes")
    return data.reshape(dims).copy()


class MNISTDataModule(TensorDataModule):
    """MNIST or Fashion-MNIST from the IDX files in `root/<MNIST|FashionMNIST>/raw` (torchvision's layout)."""

    _FILES = {
        "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
        "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
    }

    def __init__(self, root: str = "data", variant: str = "mnist", download: bool = False, **kwargs):
        super().__init__(**kwargs)
        folders = {"mnist": "MNIST", "fashion_mnist": "FashionMNIST"}
        if variant not in folders:
            raise ConfigError(f"data.variant must be one of {sorted(folders)}, got {variant!r}")
        self.root, self.variant, self.download = Path(root), variant, bool(download)
        self.folder = self.root / folders[variant] / "raw"
        self.name = variant

    def _find(self, stem: str) -> Path | None:
        for candidate in (self.folder / stem, self.folder / f"{stem}.gz"):
            if candidate.is_file():
                return candidate
        return None

    def prepare_data(self) -> None:
        if not self.download or all(self._find(s) for pair in self._FILES.values() for s in pair):
            return
        import torchvision

        ds = torchvision.datasets.MNIST if self.variant == "mnist" else torchvision.datasets.FashionMNIST
        ds(str(self.root), train=True, download=True)

    def content_listings(self) -> Listings | None:
        found = [self._find(s) for pair in self._FILES.values() for s in pair]
        paths = [p for p in found if p is not None]
        if len(paths) < len(found):
            return None  # load() names what is missing
        return {"": FileListing.of(self.root, [str(p.relative_to(self.root)) for p in paths])}

    def load(self) -> dict[str, np.ndarray]:
        out = {}
        for split, (images, labels) in self._FILES.items():
            image_path, label_path = self._find(images), self._find(labels)
            if image_path is None or label_path is None:
                raise ConfigError(
                    f"{self.variant} files not found in {self.folder} (need {images} and {labels}, optionally .gz). "
                    "Pass data.download=true to fetch them, or set data.root to the folder that holds "
                    f"{self.folder.parent.name}/raw/"
                )
            out[f"x_{split}"] = read_idx(image_path)[:, None, :, :]
            out[f"y_{split}"] = read_idx(label_path).astype(np.int64)
        return out


class _ImageFiles(SplitDataset):
    """Images read lazily from disk and passed through `transform` (PIL in), as uint8 (C, H, W) tensors.

    With recorded views (`views`, a ViewPipeline, and `draws`, set by the datamodule) an item is a view: the
    key `(sample, view)` gives that view of that sample, `(x, y, sample, view)` (a plain index gives view 0).
    With `batched` the key `(sample, view)` gives the decoded image whole and the view's crop instead,
    `(x, y, sample, view, (top, left, height, width, flip))`, for the device to make the view
    (kd_lightning.data.views.replay_crops)."""

    def __init__(
        self,
        samples: list[tuple[str, int]],
        transform: Callable[[ImageLike], torch.Tensor],
        views: ViewPipeline | None = None,
        batched: bool = False,
    ):
        self.samples = samples
        self.transform = transform
        self.views = views
        self.batched = batched
        self.draws: torch.Tensor | None = None  # (samples, K, draws per view), set at setup

    def __len__(self) -> int:
        return len(self.samples)

    @property
    def labels(self) -> torch.Tensor:
        return torch.as_tensor([label for _, label in self.samples], dtype=torch.long)

    def __getitem__(self, key: int | tuple[int, int]) -> tuple:
        from PIL import Image

        i, view = key if isinstance(key, tuple) else (key, 0)
        path, label = self.samples[i]
        with open(path, "rb") as f:
            raw = f.read()
        try:
            img = Image.open(io.BytesIO(raw)).convert("RGB")
        except (OSError, ValueError, SyntaxError) as e:  # PIL's UnidentifiedImageError, a truncated file, ...
            raise ConfigError(
                f"image file {path} cannot be read ({type(e).__name__}: {e}); remove or replace it"
            ) from None
        if self.views is None or self.draws is None:
            return self.transform(img), label, i
        if self.batched and isinstance(key, tuple):
            whole = self.transform(img)
            size = (int(whole.shape[1]), int(whole.shape[2]))
            return whole, label, i, view, self.views.crop(size, self.draws[i, view])
        return self.transform(self.views(img, self.draws[i, view])), label, i, view


# The torchvision transforms a config may name (`torchvision.transforms.v2.<Name>`, or the same name under
# torchvision.transforms), built with plain arguments only: numbers, strings, booleans and lists of them.
# An allowlist rather than Hydra's instantiate: a config (a shared run folder's, for kd-eval) names data,
# never code to run. ToTensor and Normalize are listed so that the end-of-pipeline check can explain them.
TRANSFORMS = (
    "AugMix", "AutoAugment", "CenterCrop", "ColorJitter", "GaussianBlur", "Grayscale", "Normalize", "Pad",
    "RandAugment", "RandomAdjustSharpness", "RandomAffine", "RandomAutocontrast", "RandomCrop",
    "RandomEqualize", "RandomGrayscale", "RandomHorizontalFlip", "RandomInvert", "RandomPerspective",
    "RandomPosterize", "RandomResizedCrop", "RandomRotation", "RandomSolarize", "RandomVerticalFlip",
    "Resize", "ToTensor", "TrivialAugmentWide",
)  # fmt: skip
_PREFIXES = ("torchvision.transforms.v2.", "torchvision.transforms.")


def _plain(value: object) -> bool:
    if value is None or isinstance(value, bool | int | float | str):
        return True
    return isinstance(value, list | tuple) and all(_plain(v) for v in value)


def build_transform(spec: Plain, where: str) -> Step:
    """One transform from `{_target_: torchvision.transforms.v2.<Name>, <arg>: <plain value>, ...}`."""
    from torchvision.transforms import v2

    if not isinstance(spec, Mapping) or "_target_" not in spec:
        raise ConfigError(
            f"{where} must be a mapping with _target_ (e.g. "
            f"{{_target_: torchvision.transforms.v2.RandomResizedCrop, size: 224}}), got {spec!r}"
        )
    target = str(spec["_target_"])
    name = next((target[len(p) :] for p in _PREFIXES if target.startswith(p)), None)
    if name not in TRANSFORMS:
        raise ConfigError(
            f"{where}._target_={target!r} is not an allowed transform; valid: torchvision.transforms.v2."
            f"{{{', '.join(TRANSFORMS)}}}"
        )
    kwargs: dict[str, object] = {k: v for k, v in spec.items() if k != "_target_"}
    for k, v in kwargs.items():
        if not _plain(v):
            raise ConfigError(f"{where}.{k}={v!r}: transform arguments are numbers, strings or lists of them")
    interpolation, policy = kwargs.get("interpolation"), kwargs.get("policy")
    if isinstance(interpolation, str):
        try:
            kwargs["interpolation"] = v2.InterpolationMode(interpolation.lower())
        except ValueError:
            modes = ", ".join(m.value for m in v2.InterpolationMode)
            raise ConfigError(f"{where}.interpolation={interpolation!r}; valid: {modes}") from None
    if isinstance(policy, str):
        kwargs["policy"] = v2.AutoAugmentPolicy(policy.lower())
    try:
        return getattr(v2, name)(**kwargs)
    except Exception as e:
        raise ConfigError(f"{where} ({target}): {e}".replace("\n", " ")) from None


def image_pipeline(
    specs: Sequence[Plain] | None, image_size: int | None, key: str
) -> Callable[[ImageLike], torch.Tensor]:
    """A PIL image → uint8 (C, H, W) tensor: the `specs` (torchvision transforms, each a mapping with
    `_target_` and its arguments, applied in order; see TRANSFORMS), or Resize + CenterCrop to `image_size`
    when null. Normalisation is not part of it: the data module normalises batches on their device."""
    from torchvision.transforms import v2

    return v2.Compose([*image_steps(specs, image_size, key), *to_uint8()])


def v2_compose(steps: list[Step]) -> Callable[[ImageLike], torch.Tensor]:
    from torchvision.transforms import v2

    return v2.Compose(steps)


def to_uint8() -> list[Step]:
    """The end of every image pipeline: a PIL image (or a uint8 image) → a plain uint8 (C, H, W) tensor."""
    from torchvision.transforms import v2

    return [v2.PILToTensor(), _PlainTensor()]


def image_steps(specs: Sequence[Plain] | None, image_size: int | None, key: str) -> list[Step]:
    """The transforms of `image_pipeline`, before the conversion to a uint8 tensor."""
    from torchvision.transforms import v2

    if specs is None:
        if image_size is None:
            raise ConfigError(f"data.image_size or data.{key} must be set (the size images are brought to)")
        steps: list[Step] = [v2.Resize(image_size), v2.CenterCrop(image_size)]
    else:
        if isinstance(specs, str | Mapping) or not isinstance(specs, list | tuple):
            raise ConfigError(
                f"data.{key} must be a list of transforms ({{_target_: ..., args}}), got {specs!r}"
            )
        steps = [build_transform(spec, f"data.{key}[{i}]") for i, spec in enumerate(specs)]
    return steps


class _PlainTensor:
    """torchvision's tv_tensors.Image → a plain uint8 tensor (what the collate and the stores expect)."""

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if not isinstance(x, torch.Tensor) or x.dtype != torch.uint8 or x.dim() != 3:
            raise ConfigError(
                f"image transforms must end in a PIL image or a uint8 (C, H, W) tensor; got {type(x).__name__} "
                f"{getattr(x, 'dtype', '')} — leave out ToTensor/Normalize (batches are normalised on device)"
            )
        return x.as_subclass(torch.Tensor)


class ImageFolderDataModule(TensorDataModule):
    """Any folder of class subfolders (torchvision ImageFolder layout), read lazily from disk.

    `root` holds the training classes; `test_root` (same class names) the test set, or else a
    `test_fraction` of `root` is held out. Images are resized to `image_size` and normalised with
    `mean`/`std` (ImageNet statistics by default, which pretrained torchvision weights expect).
    Everything an in-memory dataset supports works here too: `class_subset` (class ids are the
    positions of the sorted folder names), `augment` (crop/flip on device, `views` for consistent
    teaching), evaluation under corruptions and amalgamation.
    """

    name = "imagefolder"
    replays_file_views = True

    def __init__(
        self,
        root: str,
        test_root: str | None = None,
        test_fraction: float = 0.2,
        image_size: int | None = 32,
        mean: tuple[float, ...] = (0.485, 0.456, 0.406),
        std: tuple[float, ...] = (0.229, 0.224, 0.225),
        train_transforms: Sequence[Plain] | None = None,
        eval_transforms: Sequence[Plain] | None = None,
        **kwargs,
    ):
        super().__init__(**kwargs)
        self.root = Path(root)
        self.test_root = Path(test_root) if test_root else None
        self.test_fraction = as_float(
            "data.test_fraction", test_fraction, 0.0, 1.0, open_low=True, open_high=True
        )
        self.image_size = None if image_size is None else as_int("data.image_size", image_size, 1)
        if eval_transforms is not None and train_transforms is None:
            raise ConfigError(
                "data.eval_transforms is set but data.train_transforms is not: set both (training images "
                "would otherwise get another size than evaluation images)"
            )
        if eval_transforms is not None and self.image_size is not None:
            raise ConfigError(
                "data.image_size sizes the default transforms only; with data.train_transforms and "
                "data.eval_transforms set, give the sizes there and set data.image_size=null"
            )
        # random per-image transforms (RandomResizedCrop...) make every epoch's view new, unless the views are
        # recorded (data.augment.views=K): then every sample has K views, each made from recorded parameters
        self.custom_train = train_transforms is not None
        steps = image_steps(train_transforms, self.image_size, "train_transforms")
        self.view_pipeline: ViewPipeline | None = None
        if self.custom_train and self.views is not None:
            if self.crop_padding or self.hflip:
                raise ConfigError(
                    "data.augment.crop_padding / hflip crop and flip batches on the device; with "
                    "data.train_transforms put the crop and the flip in the transforms (RandomCrop, "
                    "RandomHorizontalFlip) and keep data.augment.views only"
                )
            self.view_pipeline = ViewPipeline(steps)  # refuses a random transform it cannot record
        if self.replay == "batched":
            if self.view_pipeline is None:
                raise ConfigError(
                    "data.augment.replay=batched makes recorded views on the device: it needs "
                    "data.train_transforms and data.augment.views=K (or drop data.augment.replay)"
                )
            self.crop_size = self.view_pipeline.batched_size()
        self.train_transform = v2_compose([*([] if self.view_pipeline is not None else steps), *to_uint8()])
        self.eval_transform = image_pipeline(eval_transforms, self.image_size, "eval_transforms")
        self.mean_std = (tuple(mean), tuple(std))
        self._listings: Listings = {}

    def _scan(
        self, root: Path, classes: list[str] | None = None, tag: str = "train"
    ) -> tuple[list[tuple[str, int]], list[str]]:
        """(path, class id) of every image under `root`'s class folders, and the class names. The files'
        names, sizes and times are kept too: they fingerprint the data (`content_listings`)."""
        from torchvision.datasets.folder import IMG_EXTENSIONS

        if not root.is_dir():
            raise ConfigError(f"data.root {root} is not a folder; expected one subfolder of images per class")
        found = sorted(p.name for p in root.iterdir() if p.is_dir())
        classes = classes or found
        if not classes:
            raise ConfigError(f"{root} has no class subfolders; expected {root}/<class>/<image>.png")
        unknown = sorted(set(found) - set(classes))
        if unknown:
            raise ConfigError(
                f"{root} has classes {unknown} that the training folder lacks; valid: {classes}"
            )
        listing = scan_tree(root, IMG_EXTENSIONS)
        index = {c: i for i, c in enumerate(classes)}
        keep = [i for i, r in enumerate(listing.rel) if "/" in r and r.split("/", 1)[0] in index]
        listing = FileListing(root, [listing.rel[i] for i in keep], listing.size[keep], listing.mtime[keep])
        empty = [root / listing.rel[i] for i in range(len(listing.rel)) if listing.size[i] == 0]
        if empty:  # the sizes are at hand from the scan: named now, not when a worker first reads one
            more = f" (and {len(empty) - 5} more)" if len(empty) > 5 else ""
            raise ConfigError(
                f"{len(empty)} empty image file(s) (0 bytes) under {root}: {', '.join(map(str, empty[:5]))}{more}; "
                "remove or replace them"
            )
        self._listings[tag] = listing
        samples = [(str(root / r), index[r.split("/", 1)[0]]) for r in listing.rel]
        if not samples:
            raise ConfigError(f"no images ({', '.join(IMG_EXTENSIONS)}) under {root}")
        return samples, classes

    def content_listings(self) -> Listings:
        if "train" not in self._listings:
            _, classes = self._scan(self.root)
            if self.test_root is not None:
                self._scan(self.test_root, classes, "test")
        return dict(self._listings)

    def _keep_classes(self, samples: list[tuple[str, int]], lookup: torch.Tensor) -> list[tuple[str, int]]:
        return [(path, int(lookup[label])) for path, label in samples if lookup[label] >= 0]

    def build_splits(self) -> tuple[dict[str, SplitDataset], int]:
        samples, classes = self._scan(self.root)
        lookup = self.class_lookup(list(range(len(classes))))
        self.class_names = [classes[c] for c in (self.class_subset or range(len(classes)))]
        gen = torch.Generator().manual_seed(self.split_seed)
        order = [samples[i] for i in torch.randperm(len(samples), generator=gen).tolist()]
        if self.test_root is not None:
            test, _ = self._scan(self.test_root, classes, "test")
        else:
            n_test = max(1, int(round(self.test_fraction * len(order))))
            test, order = order[:n_test], order[n_test:]
        order, test = self._keep_classes(order, lookup), self._keep_classes(test, lookup)
        val_idx, tr_idx = self.split_train_val(len(order))
        splits = {
            "train": _ImageFiles(
                [order[i] for i in tr_idx.tolist()],
                self.train_transform,
                self.view_pipeline,
                batched=self.replay == "batched",
            ),
            "val": _ImageFiles([order[i] for i in val_idx.tolist()], self.eval_transform),
            "test": _ImageFiles(test, self.eval_transform),
        }
        if self.view_pipeline is not None and self.views is not None:  # each (sample, view)'s parameters
            train = splits["train"]
            train.draws = draw_views(
                len(train), self.views, self.view_pipeline.draws_per_view, self.split_seed
            )
        shapes = {k: tuple(ds[0][0].shape) for k, ds in splits.items() if len(ds)}
        if len(set(shapes.values())) > 1:
            raise ConfigError(
                f"data.train_transforms and data.eval_transforms give images of different shapes {shapes}; "
                "end both in the same size (e.g. RandomResizedCrop 224 and CenterCrop 224)"
            )
        return dict(splits), len(self.class_names)

    @property
    def augments_training(self) -> bool:
        return self.custom_train or super().augments_training

    def _draw_views(self) -> None:
        if self.view_pipeline is None:  # recorded views of a transform pipeline are drawn in build_splits
            super()._draw_views()

    def replay_identity(self) -> dict[str, str] | None:
        if self.view_pipeline is None:
            return None
        import torchvision

        # the functional ops that make a view from its parameters are torchvision's: another version may
        # resample differently, and stored teacher outputs must belong to the pixels the student sees
        made = {"views": "kd_lightning.views/1", "torchvision": torchvision.__version__}
        if self.replay == "batched":  # another resampling: other pixels than the per-image replay
            made["replay"] = "batched/roi_align/1"
        return made

    def fit_normalization(self) -> None:
        mean, std = self.mean_std
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
