"""ImageFolder with torchvision transform lists, and experiment=imagenet/resnet34_resnet18 on generated PNGs
(the ImageNet teacher's weights file is planted in TORCH_HOME: nothing is downloaded)."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torchvision.transforms import v2

from kd_lightning.data import ImageFolderDataModule
from kd_lightning.errors import ConfigError
from kd_lightning.models import create_model
from kd_lightning.runners.run import run

from .conftest import FAST_TRAINER, compose_cfg

TRAIN = [
    {"_target_": "torchvision.transforms.v2.RandomResizedCrop", "size": 224},
    {"_target_": "torchvision.transforms.v2.RandomHorizontalFlip", "p": 0.5},
]
EVAL = [
    {"_target_": "torchvision.transforms.v2.Resize", "size": 256},
    {"_target_": "torchvision.transforms.v2.CenterCrop", "size": 224},
]


def _pngs(root: Path, classes: list[str], per_class: int, seed: int = 0) -> list[Path]:
    rng = np.random.default_rng(seed)
    paths = []
    for c in classes:
        (root / c).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            h, w = rng.integers(40, 90, 2)
            path = root / c / f"{i}.png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(path)
            paths.append(path)
    return paths


def test_transform_lists_give_torchvisions_standard_pipelines(tmp_path):
    _pngs(tmp_path / "train", ["a", "b"], 3)
    tests = _pngs(tmp_path / "val", ["a", "b"], 2, seed=1)
    dm = ImageFolderDataModule(
        root=str(tmp_path / "train"), test_root=str(tmp_path / "val"), image_size=None,
        train_transforms=TRAIN, eval_transforms=EVAL, val_fraction=0, batch_size=2,
    )  # fmt: skip
    dm.setup()
    assert dm.input_shape == (3, 224, 224) and len(dm.splits["train"]) == 6 and len(dm.splits["val"]) == 0
    reference = v2.Compose([v2.Resize(256), v2.CenterCrop(224), v2.PILToTensor()])
    by_path = {p: i for i, (p, _) in enumerate(dm.splits["test"].samples)}
    for path in tests:
        x = dm.splits["test"][by_path[str(path)]][0]
        assert type(x) is torch.Tensor and x.dtype == torch.uint8
        assert torch.equal(x, reference(Image.open(path).convert("RGB")))
    torch.manual_seed(0)
    first, again = dm.splits["train"][0][0], dm.splits["train"][0][0]
    assert first.shape == (3, 224, 224) and not torch.equal(first, again)  # a fresh random crop each time
    assert dm.fresh_views  # so teacher outputs are never stored for reuse


@pytest.mark.parametrize(
    "kwargs,pattern",
    [
        ({"train_transforms": [{"_target_": "torchvision.transforms.v2.RandomResizedCrop", "sise": 9}]},
         r"data.train_transforms\[0\] \(torchvision.transforms.v2.RandomResizedCrop\)"),
        ({"train_transforms": ["RandomResizedCrop"]}, r"data.train_transforms\[0\] must be a mapping with _target_"),
        ({"eval_transforms": EVAL}, "data.eval_transforms is set but data.train_transforms is not"),
        ({"train_transforms": TRAIN, "eval_transforms": EVAL, "image_size": 32}, "set data.image_size=null"),
        ({"train_transforms": TRAIN, "eval_transforms": EVAL[:1], "image_size": None},
         r"different shapes \{'train': \(3, 224, 224\), 'test': \(3, \d+, \d+\)"),
        ({"train_transforms": [*TRAIN, {"_target_": "torchvision.transforms.v2.ToTensor"}], "eval_transforms": EVAL,
          "image_size": None}, "must end in a PIL image or a uint8"),
    ],
)  # fmt: skip
def test_bad_transform_lists_are_named(tmp_path, kwargs, pattern):
    _pngs(tmp_path / "train", ["a", "b"], 2)
    with pytest.raises(ConfigError, match=pattern):
        ImageFolderDataModule(root=str(tmp_path / "train"), val_fraction=0, **kwargs).setup()


def _imagenet_like(root: Path) -> None:
    """1000 class folders (the teacher's head), images in three of them only: enough for one step."""
    for i in range(1000):
        (root / "train" / f"n{i:08d}").mkdir(parents=True)
    _pngs(root / "train", ["n00000000", "n00000007", "n00000999"], 2)
    _pngs(root / "val", ["n00000000", "n00000999"], 2, seed=1)


def _plant_resnet34(tmp_path: Path, monkeypatch) -> torch.nn.Module:
    """A random ResNet-34 saved as torchvision's IMAGENET1K_V1 file in a TORCH_HOME of the test's own."""
    teacher = create_model({"name": "resnet34", "source": "torchvision"}, 1000, (3, 224, 224)).eval()
    hub = tmp_path / "torch_home" / "hub" / "checkpoints"
    hub.mkdir(parents=True)
    torch.save(teacher.state_dict(), hub / "resnet34-b627a593.pth")  # IMAGENET1K_V1's file name
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    return teacher


def _recipe(tmp_path: Path, *extra: str) -> list[str]:
    return [
        *FAST_TRAINER, "experiment=imagenet/resnet34_resnet18", "trainer.max_epochs=1",
        f"data.root={tmp_path / 'imagenet' / 'train'}", f"data.test_root={tmp_path / 'imagenet' / 'val'}",
        "data.batch_size=3", "data.num_workers=0", *extra,
    ]  # fmt: skip


def test_imagenet_recipe_runs_on_a_png_folder_with_torchvisions_teacher(tmp_path, cache_dir, monkeypatch):
    _imagenet_like(tmp_path / "imagenet")
    teacher = _plant_resnet34(tmp_path, monkeypatch)
    cfg = compose_cfg(_recipe(tmp_path, "+trainer.limit_train_batches=1"), tmp_path / "run", cache_dir)
    assert (cfg.optim.lr, cfg.optim.weight_decay, list(cfg.scheduler.milestones)) == (0.1, 1e-4, [30, 60, 90])
    assert (cfg.distill.ce_weight, cfg.distill.terms.kd.weight, cfg.distill.terms.kd.temperature) == (
        0.5,
        0.5,
        1.0,
    )
    r = run(cfg)
    assert r["status"] == "ok" and r["teacher_checkpoints"] == {
        "teacher": "torchvision weights IMAGENET1K_V1"
    }
    assert r["train_samples"] == 6 and r["best_test_acc"] is not None
    # the teacher is the planted file's network, untouched
    x = torch.randn(2, 3, 224, 224)
    planted = create_model(
        {"name": "resnet34", "source": "torchvision", "weights": "IMAGENET1K_V1", "small_input": False},
        1000, (3, 224, 224),
    ).eval()  # fmt: skip
    torch.testing.assert_close(planted(x), teacher(x))


def test_a_torchvision_weights_teacher_must_have_the_datas_classes(tmp_path, cache_dir, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "empty_torch_home"))  # a download would be attempted here
    _pngs(tmp_path / "train", ["a", "b", "c"], 2)
    cfg = compose_cfg(
        [*FAST_TRAINER, "experiment=imagenet/resnet34_resnet18", f"data.root={tmp_path / 'train'}", "dry_run=true"],
        tmp_path / "run", cache_dir,
    )  # fmt: skip
    with pytest.raises(ConfigError, match=r"weights IMAGENET1K_V1 classify 1000 classes, the data has 3"):
        run(cfg)
    assert not (tmp_path / "empty_torch_home").exists()


def test_imagenet_recipe_with_recorded_views_runs_the_teacher_once_per_view(tmp_path, cache_dir, monkeypatch):
    """RandomResizedCrop + flip recorded as K = 2 views per image in a disk store (the teacher's top-10
    logits: 1000 classes); the second run trains on the stored views and runs no teacher."""
    _imagenet_like(tmp_path / "imagenet")
    _plant_resnet34(tmp_path, monkeypatch)
    views = ["data.augment.views=2", "teacher_cache.mode=disk", f"teacher_cache.dir={tmp_path / 'stores'}"]
    first, second = (
        run(compose_cfg(_recipe(tmp_path, *views), tmp_path / name, cache_dir))
        for name in ("first", "second")
    )
    assert first["status"] == second["status"] == "ok" and first["train_samples"] == 6
    assert first["teacher_forward_samples"] == 6 * 2  # every view of every image once, none live
    assert second["teacher_forward_samples"] == 0
    files = first["teacher_store_files"]
    assert files == second["teacher_store_files"] and any("-top10-" in f for f in files)
