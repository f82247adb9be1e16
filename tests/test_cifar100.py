"""experiment=cifar100/<teacher>_<student>: the 13 pairs of the CRD table with RepDistiller's protocol, on a
CIFAR-100-format fixture; and make bench-cifar100 end to end, one step per job."""

import csv
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from kd_lightning.models import create_model
from kd_lightning.runners.run import run

from .conftest import FAST_TRAINER, ROOT, compose_cfg, write_cifar

PAIRS = json.loads((ROOT / "bench" / "data" / "cifar100_published.json").read_text())["pairs"]
MOBILE = ("MobileNetV2", "ShuffleV1", "ShuffleV2")
# each pair's teacher, as its experiment file names it
TEACHER = {
    p: re.search(
        r"arch: \{name: (\S+)\}", (ROOT / "conf" / "experiment" / "cifar100" / f"{p}.yaml").read_text()
    )[1]
    for p in PAIRS
}


@pytest.fixture(scope="module")
def cifar100_root(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("cifar100")
    write_cifar(root, 100, n_train=24, n_test=12)
    return root


def _pair_cfg(pair: str, root: Path, tmp_path: Path, cache_dir: Path, *more: str):
    over = [*FAST_TRAINER, f"experiment=cifar100/{pair}", f"data.root={root}", "data.num_workers=0", *more]
    return compose_cfg(over, tmp_path / "run", cache_dir)


def test_the_thirteen_pairs_of_the_crd_table():
    files = sorted(p.stem for p in (ROOT / "conf" / "experiment" / "cifar100").glob("*_*.yaml"))
    assert files == sorted(PAIRS) and len(files) == 13


@pytest.fixture(scope="module")
def released_teachers(tmp_path_factory) -> Path:
    """RepDistiller-format files ({'epoch', 'model', 'best_acc', 'optimizer'}) for the table's six teachers."""
    root = tmp_path_factory.mktemp("released")
    for name in sorted(set(TEACHER.values())):
        model = create_model({"name": name}, 100, (3, 32, 32))
        (root / f"{name}_vanilla").mkdir()
        state = {"epoch": 240, "model": model.state_dict(), "best_acc": 70.0, "optimizer": {}}
        torch.save(state, root / f"{name}_vanilla" / "ckpt_epoch_240.pth")
    return root


@pytest.mark.parametrize("pair", sorted(PAIRS))
def test_pair_carries_the_protocol_and_trains_a_batch(
    pair, cifar100_root, released_teachers, tmp_path, cache_dir
):
    cfg = _pair_cfg(pair, cifar100_root, tmp_path, cache_dir, "trainer.max_epochs=240")
    student = cfg.student.name
    teacher = cfg.teachers.members.teacher
    assert pair == f"{teacher.arch.name}_{student}" and list(cfg.teachers.members) == ["teacher"]
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay, cfg.optim.nesterov) == (
        0.01 if student in MOBILE else 0.05, 0.9, 5e-4, False,
    )  # fmt: skip
    assert list(cfg.scheduler.milestones) == [150, 180, 210] and cfg.scheduler.gamma == 0.1
    assert (cfg.data.batch_size, cfg.data.val_fraction, cfg.data.augment.crop_padding) == (64, 0, 4)
    assert cfg.data.augment.hflip and cfg.test_each_epoch
    # the teacher, when no file is given, is trained with RepDistiller's teacher protocol
    assert (teacher.fit.max_epochs, teacher.fit.optim.lr, list(teacher.fit.scheduler.milestones)) == (
        240, 0.05, [150, 180, 210],
    )  # fmt: skip
    released = released_teachers / f"{teacher.arch.name}_vanilla" / "ckpt_epoch_240.pth"
    cfg = _pair_cfg(
        pair, cifar100_root, tmp_path, cache_dir, f"teachers.members.teacher.checkpoint={released}",
        "+trainer.fast_dev_run=true",
    )  # fmt: skip
    r = run(cfg)
    assert r["status"] == "ok" and r["teacher_checkpoints"] == {"teacher": str(released)}
    assert r["val_acc"] is None and r["last_test_acc"] is not None


def test_the_protocols_learning_rate_schedule():
    from omegaconf import OmegaConf

    from kd_lightning.config.optim import build_optim

    cfg = compose_cfg(["experiment=cifar100/vgg13_vgg8"], Path("/tmp/unused"), Path("/tmp/unused"))
    setup = build_optim(OmegaConf.to_container(cfg.optim), OmegaConf.to_container(cfg.scheduler))
    param = torch.nn.Parameter(torch.zeros(1))
    conf = setup.configure([param], total_steps=240 * 782)
    opt, sched = conf["optimizer"], conf["lr_scheduler"]["scheduler"]
    assert conf["lr_scheduler"]["interval"] == "epoch" and opt.defaults["nesterov"] is False
    lrs = []
    for _ in range(240):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs[149] == pytest.approx(0.05) and lrs[150] == pytest.approx(0.005)
    assert (
        lrs[180] == pytest.approx(5e-4)
        and lrs[210] == pytest.approx(5e-5)
        and lrs[239] == pytest.approx(5e-5)
    )


METHODS = sorted(
    p.stem for p in (ROOT / "conf" / "distill").glob("*.yaml") if p.stem not in ("camkd", "aekd")
)


@pytest.mark.parametrize("distill", METHODS)
def test_every_single_teacher_method_composes_with_a_pair(distill, cifar100_root, tmp_path, cache_dir):
    cfg = _pair_cfg(
        "resnet32x4_resnet8x4", cifar100_root, tmp_path, cache_dir, f"distill={distill}", "dry_run=true"
    )
    assert run(cfg)["status"] == "dry_run"


def test_bench_cifar100_end_to_end_with_a_released_teacher(cifar100_root, tmp_path):
    """A RepDistiller-format teacher file is used as it is (not fitted); student, KD and DKD one step each."""
    teachers = tmp_path / "released"
    for name in ("resnet56", "resnet110"):
        (teachers / f"{name}_vanilla").mkdir(parents=True)
        model = create_model({"name": name}, 100, (3, 32, 32))
        released = {
            "epoch": 240,
            "model": model.state_dict(),
            "accuracy": torch.tensor(72.3),
            "optimizer": {},
        }
        torch.save(released, teachers / f"{name}_vanilla" / "ckpt_epoch_240.pth")
    out = tmp_path / "bench"
    cmd = [
        sys.executable, "bench/cifar100.py", f"--data-root={cifar100_root}", f"--teachers={teachers}",
        "--pairs=resnet56_resnet20,resnet110_resnet32", "--methods=student,kd,dkd", "--seeds=0", f"--out={out}", "--",
        "trainer.max_epochs=1", "+trainer.limit_train_batches=1", "data.num_workers=0", "logger=none",
        f"paths.cache_dir={tmp_path / 'cache'}",
    ]  # fmt: skip
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    [table] = list(out.rglob("cifar100_table.csv"))
    table_rows = list(csv.DictReader(table.open()))
    assert sorted((r["pair"], r["method"]) for r in table_rows) == [
        (p, m) for p in ("resnet110_resnet32", "resnet56_resnet20") for m in ("dkd", "kd", "student")
    ]
    rows = {r["method"]: r for r in table_rows if r["pair"] == "resnet56_resnet20"}
    assert rows["kd"]["published (%)"] == "70.66 (RepDistiller)"
    assert rows["dkd"]["published (%)"] == "71.97 (mdistiller)"
    assert rows["student"]["published (%)"] == "69.06 (RepDistiller)"
    assert rows["kd"]["teacher (published, %)"] == "72.34 (RepDistiller)"
    for r in rows.values():
        assert r["seeds"] == "1" and r["ours, last epoch (%)"] != "—"
    assert rows["kd"]["teacher (ours, %)"] != "—" and rows["student"]["teacher (ours, %)"] == "—"
    results = [json.loads(p.read_text()) for p in out.rglob("results.json")]
    used = {(r["experiment"], r["distill"]): r for r in results}
    for pair, name in (("resnet56_resnet20", "resnet56"), ("resnet110_resnet32", "resnet110")):
        file = teachers / f"{name}_vanilla" / "ckpt_epoch_240.pth"
        assert used[f"cifar100/{pair}", "kd"]["teacher_checkpoints"] == {"teacher": str(file)}
    assert not list((tmp_path / "cache").rglob("teacher-*.pt"))  # nothing was fitted
    for r in results:  # mdistiller's β for these pairs, from the pairs' experiment files
        if r["distill"] == "dkd":
            resolved = (Path(r["output_dir"]) / "config.resolved.yaml").read_text()
            assert re.search(r"\n +beta: 2\.0\n", resolved)


def test_fitnet_sp_and_dkd_read_what_the_references_read_in_a_pair(tmp_path, cache_dir):
    """FitNet: stage 2 through RepDistiller's ConvReg, MSE; SP: the last stage's maps; DKD: mdistiller's β."""
    import torch.nn.functional as F

    from kd_lightning.core.objective import build_objective
    from kd_lightning.models.taps import FeatureTaps

    cfg = compose_cfg(
        ["experiment=cifar100/vgg13_MobileNetV2", "distill=[fitnet,sp,dkd]"], tmp_path, cache_dir
    )
    terms = cfg.distill.terms
    assert (terms.hint.student_tap, terms.hint.teacher_tap, terms.hint.adapter) == (
        "stage2",
        "stage2",
        "convreg",
    )
    assert (terms.sp.student_tap, terms.sp.teacher_tap, terms.dkd.beta) == ("last_stage", "last_stage", 6.0)
    plain = compose_cfg(["distill=[fitnet,sp,dkd]"], tmp_path, cache_dir).distill.terms  # elsewhere: generic
    assert (plain.hint.student_tap, plain.hint.adapter, plain.sp.student_tap, plain.dkd.beta) == (
        "embed", "auto", "embed", 8.0,
    )  # fmt: skip
    vgg = create_model({"name": "vgg13"}, 100, (3, 32, 32))
    assert FeatureTaps(vgg, ["last_stage"]).specs["last_stage"] == "act4"
    # the hint term against RepDistiller's computation, for each of ConvReg's three cases
    for s_shape, t_shape in (((8, 16, 16), (12, 8, 8)), ((8, 4, 4), (12, 8, 8)), ((8, 6, 6), (12, 4, 4))):
        obj = build_objective(
            {"ce_weight": 0.0, "terms": {"hint": {"weight": 1.0, "distance": "mse", "adapter": "convreg",
                                                  "student_tap": "stage2", "teacher_tap": "stage2"}}},
            {"stage2": s_shape, "logits": (100,)}, {"t": {"stage2": t_shape}}, {"t": 1.0}, {},
        )  # fmt: skip
        [reg] = [m for m in obj.modules() if type(m).__name__ == "ConvReg"]
        s, t = torch.randn(4, *s_shape), torch.randn(4, *t_shape)
        loss, _ = obj(
            {"stage2": s, "logits": torch.randn(4, 100)}, {"t": {"stage2": t}}, torch.zeros(4).long()
        )
        conv = reg.conv
        if isinstance(conv, torch.nn.ConvTranspose2d):
            z = F.conv_transpose2d(s, conv.weight, conv.bias, stride=2, padding=1)
        else:
            z = F.conv2d(s, conv.weight, conv.bias, stride=conv.stride, padding=conv.padding)
        z = F.relu(F.batch_norm(z, None, None, reg.bn.weight, reg.bn.bias, training=True))
        assert z.shape[1:] == t.shape[1:]
        assert loss.item() == pytest.approx(F.mse_loss(z, t).item(), rel=1e-5)
