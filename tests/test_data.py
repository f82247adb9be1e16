import gzip
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from kd_lightning.data import (
    CIFARDataModule,
    DigitsDataModule,
    ImageFolderDataModule,
    MNIST1DDataModule,
    MNISTDataModule,
    SyntheticDataModule,
)
from kd_lightning.data.base import random_crop_flip
from kd_lightning.errors import ConfigError

from .conftest import write_cifar


def _all(ds):
    return ds.__getitems__(list(range(len(ds))))


def test_digits_splits_are_disjoint_seeded_and_yield_indices():
    a, b = DigitsDataModule(split_seed=3, batch_size=64), DigitsDataModule(split_seed=3)
    a.setup(), b.setup()
    assert a.input_shape == (1, 8, 8) and a.num_classes == 10
    sizes = {k: len(v) for k, v in a.splits.items()}
    assert sum(sizes.values()) == 1797
    torch.testing.assert_close(a.splits["train"].x, b.splits["train"].x)
    batch = next(iter(a.train_dataloader()))
    x, y, idx = batch.x, batch.y, batch.index
    assert x.shape == (64, 1, 8, 8) and y.shape == idx.shape == (64,) and batch.view is None
    torch.testing.assert_close(a.splits["train"].x[idx], x)
    c = DigitsDataModule(split_seed=4)
    c.setup()
    assert not torch.equal(a.splits["train"].x, c.splits["train"].x)


def test_train_statistics_normalise_train_split():
    dm = DigitsDataModule()
    dm.setup()
    x = dm.prepare_batch(_all(dm.splits["train"]), train=False).x
    assert abs(x.mean().item()) < 1e-4 and abs(x.std().item() - 1) < 1e-3


def test_mnist1d_generated_locally_and_cached(tmp_path: Path):
    dm = MNIST1DDataModule(num_samples=200, cache_dir=str(tmp_path))
    dm.setup()
    assert dm.cache_path().is_file()
    assert dm.input_shape == (1, 40) and dm.num_classes == 10
    assert len(dm.splits["test"]) == 40 and len(dm.splits["train"]) + len(dm.splits["val"]) == 160
    again = MNIST1DDataModule(num_samples=200, cache_dir=str(tmp_path))
    again.setup()
    torch.testing.assert_close(dm.splits["train"].x, again.splits["train"].x)


@pytest.mark.parametrize("classes", [10, 100])
def test_cifar_reader_on_files_the_test_writes(tmp_path: Path, classes: int):
    write_cifar(tmp_path, classes)
    dm = CIFARDataModule(root=str(tmp_path), classes=classes, val_fraction=0.2, batch_size=4)
    dm.setup()
    n_train = 50 if classes == 10 else 10
    assert len(dm.splits["train"]) + len(dm.splits["val"]) == n_train
    assert dm.input_shape == (3, 32, 32) and dm.num_classes == classes
    assert dm.splits["train"].x.dtype == torch.uint8
    x = dm.prepare_batch(next(iter(dm.train_dataloader())), train=True).x
    assert x.dtype == torch.float32 and x.shape == (4, 3, 32, 32)


def test_cifar_missing_files_say_how_to_get_them(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"data.download=true.*data.root"):
        CIFARDataModule(root=str(tmp_path)).setup()


def test_cifar_pickle_with_code_is_refused(tmp_path: Path):
    write_cifar(tmp_path, 10)

    class Evil:
        def __reduce__(self):
            return (print, ("pwned",))

    with open(tmp_path / "cifar-10-batches-py" / "test_batch", "wb") as f:
        pickle.dump({b"data": Evil()}, f)
    with pytest.raises(ConfigError, match="refused global builtins.print"):
        CIFARDataModule(root=str(tmp_path)).setup()


def _idx(path: Path, arr: np.ndarray, compress: bool) -> None:
    raw = struct.pack(">BBBB", 0, 0, 8, arr.ndim) + struct.pack(f">{arr.ndim}i", *arr.shape) + arr.tobytes()
    path.write_bytes(gzip.compress(raw) if compress else raw)


@pytest.mark.parametrize("variant,folder", [("mnist", "MNIST"), ("fashion_mnist", "FashionMNIST")])
def test_mnist_idx_reader(tmp_path: Path, variant: str, folder: str):
    raw = tmp_path / folder / "raw"
    raw.mkdir(parents=True)
    rng = np.random.default_rng(0)
    _idx(raw / "train-images-idx3-ubyte", rng.integers(0, 256, (20, 28, 28), dtype=np.uint8), False)
    _idx(raw / "train-labels-idx1-ubyte.gz", np.arange(20, dtype=np.uint8) % 10, True)
    _idx(raw / "t10k-images-idx3-ubyte", rng.integers(0, 256, (8, 28, 28), dtype=np.uint8), False)
    _idx(raw / "t10k-labels-idx1-ubyte", np.arange(8, dtype=np.uint8) % 10, False)
    dm = MNISTDataModule(root=str(tmp_path), variant=variant, val_fraction=0.25)
    dm.setup()
    assert dm.input_shape == (1, 28, 28) and dm.num_classes == 10
    assert len(dm.splits["train"]) == 15 and len(dm.splits["test"]) == 8
    (raw / "t10k-labels-idx1-ubyte").write_bytes(b"\x00\x00\x08\x01\x00\x00\x00\x09abc")
    with pytest.raises(ConfigError, match="truncated"):
        MNISTDataModule(root=str(tmp_path), variant=variant).setup()


def test_imagefolder_on_png_files(tmp_path: Path):
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)):
        for cls in ("cat", "dog", "owl"):
            (tmp_path / split / cls).mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 256, (20, 24, 3), dtype=np.uint8)).save(
                    tmp_path / split / cls / f"{i}.png"
                )
    dm = ImageFolderDataModule(
        root=str(tmp_path / "train"),
        test_root=str(tmp_path / "test"),
        image_size=16,
        batch_size=4,
        val_fraction=0.2,
    )
    dm.setup()
    assert dm.class_names == ["cat", "dog", "owl"] and dm.num_classes == 3
    assert len(dm.splits["test"]) == 6 and len(dm.splits["train"]) + len(dm.splits["val"]) == 18
    x, y, idx, *_ = dm.prepare_batch(next(iter(dm.train_dataloader())), train=True)
    assert x.shape == (4, 3, 16, 16) and x.dtype == torch.float32 and y.shape == idx.shape == (4,)
    with pytest.raises(ConfigError, match="not a folder"):
        ImageFolderDataModule(root=str(tmp_path / "nope")).setup()


def test_batched_crop_flip_matches_per_sample_definition():
    x = torch.arange(2 * 1 * 4 * 4, dtype=torch.float32).view(2, 1, 4, 4)
    gen = torch.Generator().manual_seed(0)
    out = random_crop_flip(x, 1, hflip=False, generator=gen)
    gen = torch.Generator().manual_seed(0)
    oy = torch.randint(0, 3, (2,), generator=gen)
    ox = torch.randint(0, 3, (2,), generator=gen)
    padded = torch.nn.functional.pad(x, (1, 1, 1, 1))
    for i in range(2):
        torch.testing.assert_close(out[i], padded[i, :, oy[i] : oy[i] + 4, ox[i] : ox[i] + 4])


def test_bad_sizes_are_config_errors():
    with pytest.raises(ConfigError, match="batch_size"):
        DigitsDataModule(batch_size=0)
    with pytest.raises(ConfigError, match="val_fraction"):
        DigitsDataModule(val_fraction=1.5)
    with pytest.raises(ConfigError, match="num_train"):
        SyntheticDataModule(num_train=-3)


def test_class_subset_keeps_those_classes_relabelled_in_the_given_order():
    full = DigitsDataModule()
    full.setup()
    sub = DigitsDataModule(class_subset=[7, 2, 9])
    sub.setup()
    assert sub.num_classes == 3
    for split in ("train", "val", "test"):
        assert set(sub.splits[split].y.tolist()) <= {0, 1, 2}
    # relabelled in the order given: every test sample of class 7 becomes 0, of 2 becomes 1, of 9 becomes 2
    te_full, te_sub = full.splits["test"], sub.splits["test"]
    for new, old in enumerate([7, 2, 9]):
        assert int((te_sub.y == new).sum()) == int((te_full.y == old).sum())
        torch.testing.assert_close(te_sub.x[te_sub.y == new], te_full.x[te_full.y == old])
    with pytest.raises(ConfigError, match=r"class_subset \[12\] do not occur"):
        DigitsDataModule(class_subset=[1, 12]).setup()
    with pytest.raises(ConfigError, match="repeated"):
        DigitsDataModule(class_subset=[1, 1])
    with pytest.raises(ConfigError, match="at least 2"):
        DigitsDataModule(class_subset=[3])


def write_png_classes(root: Path, classes: list[str], per_class: int, size: int = 12, seed: int = 0) -> Path:
    """A folder of class subfolders of small PNGs; each class has its own mean colour, so it can be learnt."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    for k, cls in enumerate(classes):
        (root / cls).mkdir(parents=True, exist_ok=True)
        base = np.array([(37 * k) % 256, (91 * k) % 256, (151 * k) % 256], dtype=np.float32)
        for i in range(per_class):
            img = np.clip(base + rng.normal(0, 30, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / cls / f"{i}.png")
    return root


def test_imagefolder_class_subset_relabels_in_the_order_given(tmp_path: Path):
    root = write_png_classes(tmp_path / "train", ["a", "b", "c", "d"], 5)
    dm = ImageFolderDataModule(root=str(root), image_size=12, class_subset=[3, 1], val_fraction=0.2)
    dm.setup()
    assert dm.class_names == ["d", "b"] and dm.num_classes == 2
    labels = torch.cat([dm.labels(s) for s in ("train", "val", "test")])
    assert sorted(labels.tolist()) == [0] * 5 + [1] * 5  # only d (→ 0) and b (→ 1) remain
    for split in ("train", "test"):  # labels() and the images read agree
        assert torch.equal(torch.cat([b.y for b in dm.iter_split(split)]), dm.labels(split))
    with pytest.raises(ConfigError, match=r"class_subset \[7\] do not occur"):
        ImageFolderDataModule(root=str(root), class_subset=[0, 7]).setup()


def test_imagefolder_consistent_teaching_batches_say_each_samples_view(tmp_path: Path):
    root = write_png_classes(tmp_path / "train", ["a", "b"], 8)
    dm = ImageFolderDataModule(
        root=str(root), image_size=12, batch_size=4, augment={"crop_padding": 2, "hflip": True, "views": 3}
    )
    dm.setup()
    assert dm.view_params is not None and dm.view_params.shape == (dm.num_train, 3, 3)
    assert dm.views_per_sample == 3 and not dm.fresh_views
    batch = dm.prepare_batch(next(iter(dm.train_dataloader())), train=True)
    assert batch.view is not None and torch.equal(batch.view, dm.epoch_views(0)[batch.index])


def test_imagefolder_runs_with_class_subset_views_cache_and_robustness(make_cfg, tmp_path: Path):
    import json

    from kd_lightning.models import load_model
    from kd_lightning.runners.run import run

    root = write_png_classes(tmp_path / "images", ["a", "b", "c", "d"], 10)
    cfg = make_cfg(
        "data=imagefolder",
        f"data.root={root}",
        "data.image_size=12",
        "data.class_subset=[0,2,3]",
        "data.augment={crop_padding: 2, hflip: true, views: 2}",
        "student=cnn",
        "teachers.use=[cnn_s]",
        "teachers.members.cnn_s.fit.max_epochs=1",
        "distill=kd",
        "evaluate=robustness",
        "evaluate.corruptions=[gaussian_noise,blur]",
        "evaluate.severities=[0,2]",
        "trainer.max_epochs=2",
    )
    res = run(cfg)
    out = Path(cfg.paths.output_dir)
    assert res["status"] == "ok" and set(res["metrics"]) == {"student", "cnn_s"}
    assert load_model(out / "student.pt").state_dict()["fc.weight"].shape[0] == 3  # three classes kept
    rows = json.loads((out / "evaluation.json").read_text())["robustness"]
    assert {(r["corruption"], r["severity"]) for r in rows} == {
        (c, s) for c in ("gaussian_noise", "blur") for s in (0, 2)
    }


def test_imagefolder_feeds_amalgamation(make_cfg, tmp_path: Path):
    from kd_lightning.runners.run import run

    root = write_png_classes(tmp_path / "digits", [str(d) for d in range(10)], 4)
    tiny = [
        "amalgamation.block_epochs=1",
        "amalgamation.head_epochs=1",
        "amalgamation.finetune_epochs=0",
        "amalgamation.teachers.teacher_a.fit.max_epochs=1",
        "amalgamation.teachers.teacher_b.fit.max_epochs=1",
    ]
    cfg = make_cfg(
        "experiment=ye2019", "data=imagefolder", f"data.root={root}", "data.image_size=12", *tiny, fast=False
    )
    res = run(cfg)
    assert res["status"] == "ok" and set(res["task_acc"]) == {"parity", "ge5"}


def test_caches_follow_the_data_same_size_other_labels_and_an_image_fixed_in_place(
    make_cfg, tmp_path, caplog
):
    """Two folders with the same class names and image count but opposite labels, one cache: the second
    run fits and stores its own (its teachers score on its own data); fixing one image in place does too,
    and the log says why."""
    import json
    import logging
    import shutil

    from PIL import Image

    from kd_lightning.runners.run import run

    a = write_png_classes(tmp_path / "A", ["cat", "dog"], 12, seed=1)
    b = tmp_path / "B"  # A's images with the labels swapped: same names, same sizes, opposite classes
    for src, dst in (("cat", "dog"), ("dog", "cat")):
        shutil.copytree(a / src, b / dst)
    cache = tmp_path / "cache"
    common = ("data=imagefolder", "data.image_size=12", "data.val_fraction=0.2", "teachers.use=[cnn_s]",
              "teacher_cache.mode=disk", "distill=kd", "trainer.max_epochs=1", f"paths.cache_dir={cache}")  # fmt: skip
    first = run(make_cfg(*common, f"data.root={a}"))
    second = run(make_cfg(*common, f"data.root={b}"))
    assert second["teacher_checkpoints"] != first["teacher_checkpoints"]
    assert second["teacher_forward_samples"] > 0 and set(second["teacher_store_files"]).isdisjoint(
        first["teacher_store_files"]
    )
    assert second["teacher_test_acc"]["cnn_s"] >= 0.75  # A's teacher would score about 0 on B
    Image.fromarray(np.zeros((12, 12, 3), np.uint8)).save(b / "cat" / "3.png")  # one image fixed in place
    caplog.set_level(logging.WARNING)
    third = run(make_cfg(*common, f"data.root={b}"))
    assert "data changed in" in caplog.text and "1 files modified, 0 added, 0 removed" in caplog.text
    assert (
        third["teacher_checkpoints"] != second["teacher_checkpoints"] and third["teacher_forward_samples"] > 0
    )
    assert json.loads((tmp_path / "run" / "results.json").read_text())["status"] == "ok"


def test_a_moved_cifar_folder_keeps_its_fingerprint_and_another_one_does_not(tmp_path):
    first, other = tmp_path / "first", tmp_path / "other"
    write_cifar(first, 10)
    before = CIFARDataModule(root=str(first)).content_fingerprint()
    moved = tmp_path / "elsewhere" / "cifar"
    moved.parent.mkdir()
    first.rename(moved)
    assert CIFARDataModule(root=str(moved)).content_fingerprint() == before
    write_cifar(other, 10)  # same files, same sizes, other contents and times
    assert CIFARDataModule(root=str(other)).content_fingerprint() != before
    assert DigitsDataModule().content_fingerprint() is None  # generated: its config is its identity


def _cifar_file(path: Path, images: int, labels: list[int], key: bytes = b"fine_labels") -> None:
    import pickle

    path.parent.mkdir(parents=True, exist_ok=True)
    data = np.random.default_rng(0).integers(0, 256, (images, 3072), dtype=np.uint8)
    path.write_bytes(pickle.dumps({b"data": data, key: labels}))


def test_a_cifar_file_with_a_label_out_of_range_or_misaligned_is_refused_naming_it(tmp_path):
    from kd_lightning.data import CIFARDataModule

    folder = tmp_path / "cifar-10-batches-py"
    for i in range(1, 6):
        _cifar_file(folder / f"data_batch_{i}", 4, [0, 1, 2, 9], b"labels")
    _cifar_file(folder / "test_batch", 4, [0, 1, 2, 10], b"labels")  # 10 in a 10-class set
    with pytest.raises(
        ConfigError, match=r"test_batch: 1 label\(s\) outside 0..9 \(e.g. \[10\], in labels\)"
    ):
        CIFARDataModule(root=str(tmp_path), classes=10).load()
    _cifar_file(folder / "test_batch", 30, list(range(9)) * 2 + [1] * 7, b"labels")  # 30 images, 25 labels
    with pytest.raises(ConfigError, match=r"test_batch: 30 images but 25 labels"):
        CIFARDataModule(root=str(tmp_path), classes=10).load()


def test_an_empty_or_corrupt_image_is_named_by_path(tmp_path):
    """An empty file is named when the folder is scanned (before training); a file PIL cannot decode when
    the loader first reads it, also from a worker process."""
    from PIL import Image

    for c in ("a", "b"):
        (tmp_path / c).mkdir()
        for i in range(4):
            Image.new("RGB", (12, 12), (60 * i, 0, 0)).save(tmp_path / c / f"{i}.png")
    empty = tmp_path / "b" / "empty.png"
    empty.write_bytes(b"")
    with pytest.raises(ConfigError, match=rf"1 empty image file\(s\) \(0 bytes\) under {tmp_path}: {empty}"):
        ImageFolderDataModule(root=str(tmp_path), image_size=8, val_fraction=0).setup()
    empty.unlink()
    dm = ImageFolderDataModule(root=str(tmp_path), image_size=8, val_fraction=0, num_workers=2, batch_size=3)
    dm.setup()
    corrupt = tmp_path / "a" / "2.png"
    corrupt.write_bytes(b"not an image at all" * 10)  # broken after the scan: found when a worker reads it
    with pytest.raises(ConfigError, match=rf"image file {corrupt} cannot be read \(UnidentifiedImageError"):
        for _ in dm.iter_split("train"):
            pass
