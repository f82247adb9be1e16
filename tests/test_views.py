"""Recorded random views of an image pipeline read from disk (`data.train_transforms` + `data.augment.views`):
the same pixels wherever a view is made, the teacher's stored outputs for a view equal to the teacher run on
it, and the random transforms whose parameters cannot be recorded refused by name."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from kd_lightning.data import ImageFolderDataModule
from kd_lightning.data.views import resized_crop_box
from kd_lightning.engine.build import build_module, build_teacher_ensemble
from kd_lightning.errors import ConfigError
from kd_lightning.teachers.slots import Slots

from .conftest import built_data
from .test_imagenet_recipe import _pngs

CROP_FLIP = [
    {"_target_": "torchvision.transforms.v2.RandomResizedCrop", "size": 16},
    {"_target_": "torchvision.transforms.v2.RandomHorizontalFlip", "p": 0.5},
]
JITTER = {"_target_": "torchvision.transforms.v2.ColorJitter", "brightness": 0.4, "contrast": 0.4,
          "saturation": 0.4, "hue": 0.1}  # fmt: skip
EVAL = [{"_target_": "torchvision.transforms.v2.Resize", "size": 16},
        {"_target_": "torchvision.transforms.v2.CenterCrop", "size": 16}]  # fmt: skip


def _views_dm(root: Path, train=CROP_FLIP, views: int = 3, **kwargs) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(
        root=str(root), image_size=None, train_transforms=train, eval_transforms=EVAL, val_fraction=0,
        batch_size=4, augment={"views": views}, **kwargs,
    )  # fmt: skip
    dm.setup()
    return dm


class _Epoch:  # the trainer the datamodule reads the epoch (and the device) from
    current_epoch = 0
    strategy = SimpleNamespace(root_device=torch.device("cpu"))


def test_a_recorded_view_is_the_same_pixels_wherever_it_is_made(tmp_path):
    _pngs(tmp_path / "train", ["a", "b"], 6)
    dm = _views_dm(tmp_path / "train", [*CROP_FLIP, JITTER])
    assert dm.views_per_sample == 3 and not dm.fresh_views and dm.input_shape == (3, 16, 16)
    dm.trainer = _Epoch()
    made_for_teacher = {}  # what the teacher-output precompute shows the teacher, (sample, view) by (sample, view)
    slots = Slots.of(dm)
    chunks = [slots.keys(chunk) for chunk in torch.arange(slots.count).split(8)]
    for (index, view), x in zip(chunks, dm.view_batches(chunks), strict=True):
        made_for_teacher.update(zip(zip(index.tolist(), view.tolist(), strict=True), x, strict=True))
    assert len(made_for_teacher) == 3 * dm.num_train
    seen = set()
    for epoch in range(4):  # the student's batches replay those views, epoch after epoch
        _Epoch.current_epoch = epoch
        for batch in dm.train_dataloader():
            batch = dm.prepare_batch(batch, train=True)
            assert torch.equal(batch.view, dm.epoch_views(epoch)[batch.index])
            for key, x in zip(
                zip(batch.index.tolist(), batch.view.tolist(), strict=True), batch.x, strict=True
            ):
                assert torch.equal(x, made_for_teacher[key]), f"{key} differs from the view the teacher saw"
                seen.add(key)
    assert len(seen) > dm.num_train  # several views of some samples were shown
    # different views of one sample are different crops
    x0, x1 = dm.splits["train"][(0, 0)][0], dm.splits["train"][(0, 1)][0]
    assert x0.shape == x1.shape == (3, 16, 16) and not torch.equal(x0, x1)


def test_the_recorded_parameters_are_those_applied(tmp_path):
    """Replaying a view's recorded box and flip with torchvision's own ops gives the view's pixels."""
    _pngs(tmp_path / "train", ["a", "b"], 4)
    dm = _views_dm(tmp_path / "train", views=4)
    ds, pipeline = dm.splits["train"], dm.view_pipeline
    flips = set()
    for i in range(len(ds)):
        img = Image.open(ds.samples[i][0]).convert("RGB")
        for v in range(4):
            box, flip = pipeline.params(tuple(F.get_size(img)), ds.draws[i, v])
            assert box["transform"] == "RandomResizedCrop" and flip["transform"] == "RandomHorizontalFlip"
            replay = F.resized_crop(img, box["top"], box["left"], box["height"], box["width"], [16, 16])
            if flip["applied"]:
                replay = F.horizontal_flip(replay)
            flips.add(flip["applied"])
            assert torch.equal(ds[(i, v)][0], F.pil_to_tensor(replay))
    assert flips == {True, False}


def test_resized_crop_boxes_follow_torchvisions_sampling():
    """Area and aspect of our boxes against torchvision's RandomResizedCrop on the same image (4,000 each)."""
    torch.manual_seed(0)
    crop = v2.RandomResizedCrop(16)
    img = torch.zeros(3, 60, 90, dtype=torch.uint8)
    theirs = torch.tensor(
        [list(crop.make_params([img]).values())[:4] for _ in range(4000)], dtype=torch.float
    )
    u = torch.rand(4000, 22, generator=torch.Generator().manual_seed(1))
    ours = torch.tensor([resized_crop_box(60, 90, crop.scale, crop.ratio, r.tolist()) for r in u]).float()
    for boxes in (theirs, ours):  # inside the image
        assert (boxes[:, 0] >= 0).all() and (boxes[:, 0] + boxes[:, 2] <= 60).all()
        assert (boxes[:, 1] >= 0).all() and (boxes[:, 1] + boxes[:, 3] <= 90).all()

    def stats(b):
        area = b[:, 2] * b[:, 3] / (60 * 90)
        aspect = (b[:, 3] / b[:, 2]).log()
        centre = (b[:, 1] + b[:, 3] / 2) / 90
        return torch.stack([area.mean(), area.quantile(0.1), area.quantile(0.9), aspect.mean(), aspect.std(),
                            centre.mean(), centre.std()])  # fmt: skip

    torch.testing.assert_close(stats(ours), stats(theirs), atol=0.02, rtol=0)


@pytest.mark.parametrize(
    "train,augment,pattern",
    [
        ([*CROP_FLIP, {"_target_": "torchvision.transforms.v2.RandomRotation", "degrees": 10}], {"views": 2},
         r"data.train_transforms\[2\] \(RandomRotation\) draws random parameters that data.augment.views cannot "
         r"record; with recorded views use ColorJitter, "),
        (CROP_FLIP, {"views": 2, "hflip": True}, r"data.augment.crop_padding / hflip .* RandomHorizontalFlip"),
    ],
)  # fmt: skip
def test_what_cannot_be_recorded_is_refused_by_name(tmp_path, train, augment, pattern):
    _pngs(tmp_path / "train", ["a", "b"], 2)
    with pytest.raises(ConfigError, match=pattern):
        ImageFolderDataModule(
            root=str(tmp_path / "train"), image_size=None, train_transforms=train, eval_transforms=EVAL,
            augment=augment,
        ).setup()  # fmt: skip


def test_stored_teacher_outputs_of_a_view_are_the_teacher_on_that_view(make_cfg, tmp_path):
    """float16 rows of the recorded views, filled by the precompute, against the teacher run on each view."""
    _pngs(tmp_path / "train", ["a", "b", "c"], 5)
    cfg = make_cfg(
        "data=imagefolder", f"data.root={tmp_path / 'train'}", "data.image_size=null", "data.val_fraction=0",
        f"data.train_transforms={_hydra(CROP_FLIP)}", f"data.eval_transforms={_hydra(EVAL)}",
        "data.augment={views: 2}", "student=cnn", "teachers.use=[cnn_s]", "teachers.members.cnn_s.fit.max_epochs=1",
        "distill=[feature,kd]", "teacher_cache.mode=memory", "teacher_cache.dtype=float16",
    )  # fmt: skip
    spec, dm = built_data(cfg)
    module = build_module(spec, dm, build_teacher_ensemble(spec, dm))
    outputs = module.teacher_outputs
    assert outputs is not None and outputs.all()[0].shape[0] == 2 * dm.num_train
    teachers = module.teachers
    computed = outputs.fill(
        lambda x, m: teachers(x, names=[m])[m], lambda c: dm.view_batches(c), batch_size=7
    )
    assert computed == 2 * dm.num_train and outputs.complete
    dm.trainer = _Epoch()
    for epoch in (0, 1):
        _Epoch.current_epoch = epoch
        batch = dm.prepare_batch(next(iter(dm.train_dataloader())), train=True)
        live = teachers(batch.x)
        stored = outputs.get(batch.index, batch.view, "cpu")
        for tap, value in live["cnn_s"].items():
            torch.testing.assert_close(stored["cnn_s"][tap], value, rtol=2e-3, atol=2e-3)  # float16's bound


def _hydra(transforms: list[dict]) -> str:
    """A transform list as a Hydra override value."""
    items = [", ".join(f"{k}: {v}" for k, v in t.items()) for t in transforms]
    return "[" + ", ".join("{" + i + "}" for i in items) + "]"


def test_views_made_in_worker_processes_are_the_same(tmp_path):
    """The precompute and the training loader read recorded views in `num_workers` processes: same pixels."""
    _pngs(tmp_path / "train", ["a", "b"], 4)
    here, workers = (
        _views_dm(tmp_path / "train", views=2),
        _views_dm(tmp_path / "train", views=2, num_workers=1),
    )
    slots = Slots.of(here)
    chunks = [slots.keys(chunk) for chunk in torch.arange(slots.count).split(5)]
    for a, b in zip(here.view_batches(chunks), workers.view_batches(chunks), strict=True):
        assert torch.equal(a, b)
    keys = [(i, v) for index, view in chunks for i, v in zip(index.tolist(), view.tolist(), strict=True)]
    made = dict(zip(keys, torch.cat(list(here.view_batches(chunks))), strict=True))
    workers.trainer = _Epoch()
    for batch in workers.train_dataloader():
        batch = workers.prepare_batch(batch, train=True)
        for key, x in zip(zip(batch.index.tolist(), batch.view.tolist(), strict=True), batch.x, strict=True):
            assert torch.equal(x, made[key])
