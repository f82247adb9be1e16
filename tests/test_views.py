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
from kd_lightning.data.batch import stack_padded
from kd_lightning.data.views import replay_crops, resized_crop_box
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


def _views_dm(
    root: Path, train=CROP_FLIP, views: int = 3, replay: str = "per_sample", **kwargs
) -> ImageFolderDataModule:
    dm = ImageFolderDataModule(
        root=str(root), image_size=None, train_transforms=train, eval_transforms=EVAL, val_fraction=0,
        batch_size=4, augment={"views": views, "replay": replay}, **kwargs,
    )  # fmt: skip
    dm.setup()
    return dm


class _Epoch:  # the trainer the datamodule reads the epoch (and the device) from
    current_epoch = 0
    strategy = SimpleNamespace(root_device=torch.device("cpu"))


@pytest.mark.parametrize("replay", ["per_sample", "batched"])
def test_a_recorded_view_is_the_same_pixels_wherever_it_is_made(tmp_path, replay):
    """The precompute makes the views in chunks of 8, the training loader in batches of 4 in another order:
    the same pixels for every (sample, view). Batched, the images (40-90 pixels a side) are padded to each
    batch's largest, so a crop at an image's edge must not see its neighbours' sizes."""
    _pngs(tmp_path / "train", ["a", "b"], 6)
    dm = _views_dm(
        tmp_path / "train", [*CROP_FLIP, JITTER] if replay == "per_sample" else CROP_FLIP, replay=replay
    )
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
    x0, x1 = made_for_teacher[(0, 0)], made_for_teacher[(0, 1)]
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
        # data.augment.replay=batched: what one roi_align per batch cannot make
        ([*CROP_FLIP, JITTER], {"views": 2, "replay": "batched"},
         r"replay=batched .* must be a RandomResizedCrop, then at most a RandomHorizontalFlip; it is "
         r"\['RandomResizedCrop', 'RandomHorizontalFlip', 'ColorJitter'\]"),
        ([{**CROP_FLIP[0], "interpolation": "nearest"}], {"views": 2, "replay": "batched"},
         r"resizes bilinearly; data.train_transforms\[0\] \(RandomResizedCrop\) asks for .*NEAREST"),
        (CROP_FLIP, {"replay": "batched"}, r"replay=batched .* needs data.train_transforms and data.augment.views"),
        (CROP_FLIP, {"views": 2, "replay": "on_gpu"}, r"data.augment.replay='on_gpu'; valid: per_sample, batched"),
    ],
)  # fmt: skip
def test_what_cannot_be_recorded_is_refused_by_name(tmp_path, train, augment, pattern):
    _pngs(tmp_path / "train", ["a", "b"], 2)
    with pytest.raises(ConfigError, match=pattern):
        ImageFolderDataModule(
            root=str(tmp_path / "train"), image_size=None, train_transforms=train, eval_transforms=EVAL,
            augment=augment,
        ).setup()  # fmt: skip


@pytest.mark.parametrize("replay", ["per_sample", "batched"])
def test_stored_teacher_outputs_of_a_view_are_the_teacher_on_that_view(make_cfg, tmp_path, replay):
    """float16 rows of the recorded views, filled by the precompute, against the teacher run on each view."""
    _pngs(tmp_path / "train", ["a", "b", "c"], 5)
    cfg = make_cfg(
        "data=imagefolder", f"data.root={tmp_path / 'train'}", "data.image_size=null", "data.val_fraction=0",
        f"data.train_transforms={_hydra(CROP_FLIP)}", f"data.eval_transforms={_hydra(EVAL)}",
        f"data.augment={{views: 2, replay: {replay}}}", "student=cnn", "teachers.use=[cnn_s]", "teachers.members.cnn_s.fit.max_epochs=1",
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


def _smooth_pngs(root: Path, n: int) -> None:
    """Images of smooth colour gradients, 40-90 pixels a side, where two good resamplings of one box agree."""
    gen = torch.Generator().manual_seed(3)
    (root / "a").mkdir(parents=True)
    for i in range(n):
        h, w = (int(v) for v in torch.randint(40, 91, (2,), generator=gen))
        yy, xx = torch.meshgrid(torch.linspace(0, 1, h), torch.linspace(0, 1, w), indexing="ij")
        phase = torch.rand(3, generator=gen) * 6
        img = torch.stack([(yy * (2 + c) + xx * (3 - c) + phase[c]).sin() for c in range(3)]) * 110 + 128
        Image.fromarray(img.round().byte().permute(1, 2, 0).numpy()).save(root / "a" / f"{i}.png")


def test_batched_views_are_the_per_image_views_resampled_in_one_op(tmp_path):
    """replay=batched makes each recorded view from the same box and flip as the per-image replay: on smooth
    images the two agree to resampling error (a wrong box, a missed flip or a transposed crop would not)."""
    _smooth_pngs(tmp_path / "train", 6)
    each, batched = (_views_dm(tmp_path / "train", replay=r) for r in ("per_sample", "batched"))
    slots = Slots.of(each)
    chunks = [slots.keys(torch.arange(slots.count))]
    a, b = (torch.cat(list(dm.view_batches(chunks))) for dm in (each, batched))
    assert a.shape == b.shape == (slots.count, 3, 16, 16)
    scale = each.std.view(1, 3, 1, 1)  # back to [0, 1] pixel units
    differ = ((a - b) * scale).abs().mean(dim=(1, 2, 3))
    assert differ.max() < 0.03, differ
    assert ((a - b.flip(3)) * scale).abs().mean(dim=(1, 2, 3)).max() > 0.05  # a flip is not within that bound


def test_replay_crops_reads_only_each_images_own_pixels():
    """A crop at the right and bottom edges of a small image, padded beside a large one, equals that crop of
    the image alone, to the bit."""
    small, large = torch.rand(3, 20, 30), torch.rand(3, 50, 60)
    crop = torch.tensor([[7, 11, 13, 19, 0], [0, 0, 50, 60, 1]])
    both = replay_crops(stack_padded([small, large]), crop, (8, 8))
    assert torch.equal(both[0], replay_crops(stack_padded([small]), crop[:1], (8, 8))[0])
    assert torch.equal(both[1], replay_crops(stack_padded([large]), crop[1:], (8, 8))[0])
    # and the crop is of the image's own pixels: an edge-to-edge crop at the image's size is the image
    whole = replay_crops(
        stack_padded([small, large]), torch.tensor([[0, 0, 20, 30, 0], [0, 0, 50, 60, 1]]), (20, 30)
    )
    torch.testing.assert_close(whole[0], small, rtol=0, atol=1e-6)


def test_in_memory_data_refuses_a_batched_replay():
    from kd_lightning.data import DigitsDataModule

    with pytest.raises(ConfigError, match=r"replay=batched .* digits is held in memory"):
        DigitsDataModule(augment={"views": 2, "replay": "batched"})


def test_the_stores_key_tells_the_two_replays_apart(tmp_path):
    _pngs(tmp_path / "train", ["a", "b"], 2)
    each, batched = (_views_dm(tmp_path / "train", replay=r) for r in ("per_sample", "batched"))
    assert each.replay_identity() != batched.replay_identity()
