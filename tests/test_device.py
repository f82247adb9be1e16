"""Data on the training device (`data.on_device`, kd_lightning/data/device.py) and stored teacher outputs read
beside the inputs: the same batches and losses as the DataLoader gives, and the settings checked."""

from __future__ import annotations

import pytest
import torch
from PIL import Image

from kd_lightning.data import ImageFolderDataModule
from kd_lightning.data.base import EpochSeededSampler
from kd_lightning.data.device import DeviceBatches
from kd_lightning.errors import ConfigError

from .test_teacher_cache import _fit


def test_device_batches_follow_the_samplers_order_on_every_rank():
    x, y = torch.arange(50).float().view(50, 1), torch.arange(50)
    for rank in (0, 1):
        sampler = EpochSeededSampler(50, seed=3, num_replicas=2, rank=rank)
        sampler.set_epoch(2)
        batches = list(DeviceBatches(x, y, 8, sampler))
        assert len(batches) == len(DeviceBatches(x, y, 8, sampler)) == 4  # 25 samples per rank
        order = [int(i) for b in batches for i in b.index]
        assert order == list(sampler) and all(torch.equal(b.y, b.index) for b in batches)
    plain = list(DeviceBatches(x, y, 16))
    assert [len(b.y) for b in plain] == [16, 16, 16, 2] and torch.equal(
        torch.cat([b.index for b in plain]), y
    )


@pytest.mark.parametrize("data", [[], ["student=cnn", "+data.augment={crop_padding: 1, hflip: true}"]],
                         ids=["digits", "digits-crop-flip"])  # fmt: skip
def test_on_device_and_the_loader_give_the_same_losses(make_cfg, data):
    """Same seed: the batches gathered on the device are the DataLoader's, the random crops the same draws."""
    loader, *_ = _fit(make_cfg, "data.on_device=false", "distill=kd", *data, epochs=2)
    device, *_ = _fit(make_cfg, "data.on_device=true", "distill=kd", *data, epochs=2)
    assert len(loader) > 10 and loader == device


def test_stores_on_disk_are_read_by_the_loaders_workers_with_the_same_losses(make_cfg, tmp_path):
    """Memory-mapped stores are not read by the step: the loader's workers gather their rows with the batch."""
    seen = {}

    def spy(module):
        features = module.feed.features

        def features_seen(x, index, view=None, targets=None):
            seen.setdefault("targets", targets is not None)
            return features(x, index, view, targets)

        module.feed.features = features_seen

    disk = ["teacher_cache.mode=disk", f"teacher_cache.dir={tmp_path / 'stores'}", "data.num_workers=2"]
    in_ram, *_ = _fit(make_cfg, "teacher_cache.mode=memory", "distill=kd", epochs=1)
    read_by_loader, _, module, _ = _fit(make_cfg, *disk, "distill=kd", epochs=1, hook=spy)
    assert seen["targets"] and module.teacher_outputs.files()
    assert torch.allclose(torch.tensor(in_ram), torch.tensor(read_by_loader), rtol=1e-6, atol=0)


def test_on_device_settings_are_checked(make_cfg, tmp_path):
    from kd_lightning.config.run_spec import parse_run

    with pytest.raises(ConfigError, match=r"data\.on_device must be true, false or auto, got 'gpu'"):
        parse_run(make_cfg("data.on_device=gpu"))
    (tmp_path / "img" / "a").mkdir(parents=True)
    for i in range(4):
        Image.new("RGB", (8, 8), (i * 40, 0, 0)).save(tmp_path / "img" / "a" / f"{i}.png")
    dm = ImageFolderDataModule(root=str(tmp_path / "img"), image_size=8, on_device=True, val_fraction=0)
    dm.setup()

    class _Trainer:
        strategy = type("S", (), {"root_device": torch.device("cpu")})()

    dm.trainer = _Trainer()
    with pytest.raises(ConfigError, match=r"data\.on_device=true keeps a dataset held in memory"):
        dm.train_dataloader()


def test_compile_auto_compiles_with_cuda_graphs_on_a_gpu_only():
    from kd_lightning.config.specs import PerfSpec, parse
    from kd_lightning.engine.build import on_cuda

    auto = parse(PerfSpec, {}, "perf")
    assert auto.compile == "auto"
    gpu, cpu = auto.on(cuda=True), auto.on(cuda=False)
    assert (gpu.compile, gpu.compile_mode) == (True, "reduce-overhead")
    assert cpu.compile is False
    chosen = parse(PerfSpec, {"compile_mode": "max-autotune"}, "perf").on(cuda=True)
    assert chosen.compile_mode == "max-autotune"  # a mode the config names is kept
    assert parse(PerfSpec, {"compile": False}, "perf").on(cuda=True).compile is False
    assert on_cuda({"accelerator": "gpu"}) and not on_cuda({"accelerator": "cpu"})
    assert on_cuda({"accelerator": "auto"}) == torch.cuda.is_available()


def test_a_batch_already_on_the_device_is_not_walked_again():
    """DeviceBatches gather batches on the training device: the transfer hook returns them as they are (no
    host-side walk of every field at every step); a batch with stored targets read by the loader, or one on
    another device, still goes through Lightning's move."""
    from kd_lightning.data import DigitsDataModule
    from kd_lightning.data.batch import Batch

    dm = DigitsDataModule()
    cpu = torch.device("cpu")
    on = Batch(torch.zeros(2, 3), torch.zeros(2, dtype=torch.long), torch.arange(2))
    assert dm.transfer_batch_to_device(on, cpu, 0) is on
    with_targets = on._replace(targets={"t": {"logits": (torch.zeros(2, 1),)}})
    moved = dm.transfer_batch_to_device(with_targets, cpu, 0)
    assert moved is not with_targets and torch.equal(moved.targets["t"]["logits"][0], torch.zeros(2, 1))
    elsewhere = on._replace(x=torch.zeros(2, 3, device="meta"))  # on another device: Lightning moves it
    with pytest.raises(NotImplementedError, match="meta tensor"):  # (a meta tensor holds nothing to copy)
        dm.transfer_batch_to_device(elsewhere, cpu, 0)
