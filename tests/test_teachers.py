from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.config.specs import MemberSpec, parse
from kd_lightning.errors import ConfigError
from kd_lightning.models import create_model, save_model
from kd_lightning.teachers.ensemble import TeacherEnsemble
from kd_lightning.teachers.members import build_teachers, fitted_teacher_path


def small_teacher(seed: int) -> nn.Module:
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(4, 8), nn.BatchNorm1d(8), nn.Dropout(0.5), nn.Linear(8, 3))


def test_members_frozen_and_stay_in_eval_mode():
    ens = TeacherEnsemble({"a": small_teacher(0), "b": small_teacher(1)})
    ens.train()
    assert not ens.training and not any(m.training for m in ens.modules())
    assert not any(p.requires_grad for p in ens.parameters())


def test_outputs_are_deterministic_and_usable_as_loss_targets():
    ens = TeacherEnsemble({"a": small_teacher(0)})
    ens.configure_taps(["1"])
    x = torch.randn(6, 4)
    out1, out2 = ens(x), ens(x)
    torch.testing.assert_close(out1["a"]["logits"], out2["a"]["logits"])  # eval: dropout off, BN fixed
    student = torch.randn(6, 8, requires_grad=True)
    F.mse_loss(student, out1["a"]["1"]).backward()  # would raise for raw inference tensors
    assert student.grad is not None
    assert not out1["a"]["1"].requires_grad


def test_weights_normalised_and_combined_logits():
    ens = TeacherEnsemble({"a": small_teacher(0), "b": small_teacher(1)}, weights={"a": 1.0, "b": 3.0})
    assert ens.weights == {"a": 0.25, "b": 0.75}
    x = torch.randn(5, 4)
    feats = ens(x)
    torch.testing.assert_close(
        ens.combined_logits(feats), 0.25 * feats["a"]["logits"] + 0.75 * feats["b"]["logits"]
    )


def _member(**kw):
    return {"arch": {"name": "mlp", "hidden": [8]}, "fit_if_missing": False, "fit": {"max_epochs": 1}, **kw}


@pytest.mark.parametrize("fit_if_missing", [False, True])
def test_a_checkpoint_path_that_does_not_exist_is_an_error_never_a_fit(tmp_path: Path, fit_if_missing):
    """A typo in `checkpoint:` must not train a new teacher and write it at the typo."""
    calls = []
    typo = tmp_path / "nope.pt"
    cfg = {"members": {"t": _member(checkpoint=str(typo), fit_if_missing=fit_if_missing)}}
    with pytest.raises(
        ConfigError, match=r"teachers\.members\.t\.checkpoint: no file at .*nope\.pt.*checkpoint=null"
    ):
        build_teachers(cfg, 3, (4,), "d", {}, tmp_path, lambda *a: calls.append(a))
    assert calls == [] and not typo.exists()


def test_dry_run_fits_no_teacher(tmp_path: Path):
    calls = []
    cfg = {"members": {"t": _member(fit_if_missing=True)}}
    ens = build_teachers(cfg, 3, (4,), "d", {}, tmp_path, lambda *a: calls.append(a), dry_run=True)
    assert calls == [] and ens.unfitted == ["t"] and not Path(ens.checkpoints["t"]).exists()
    assert ens(torch.randn(2, 4))["t"]["logits"].shape == (2, 3)  # built, for the shape checks


def test_a_self_describing_teacher_file_supplies_its_arch(tmp_path: Path):
    arch = {"name": "mlp", "hidden": [8]}
    model = create_model(arch, 3, (4,))
    path = save_model(model, tmp_path / "student.pt", arch, 3, (4,))
    member = {"checkpoint": str(path)}  # no arch
    ens = build_teachers({"members": {"t": member}}, 3, (4,), "d", {}, tmp_path)
    x = torch.randn(2, 4)
    torch.testing.assert_close(ens(x)["t"]["logits"], model.eval()(x))
    # a mismatch shows the file's arch next to the config's
    wrong = {"checkpoint": str(path), "arch": {"name": "mlp", "hidden": [16]}}
    with pytest.raises(
        ConfigError,
        match=r"made for arch \{'name': 'mlp', 'hidden': \[8\].*config asks for arch \{'name': 'mlp', 'hidden': \[16\]",
    ):
        build_teachers({"members": {"t": wrong}}, 3, (4,), "d", {}, tmp_path)
    # a plain state_dict does not say its arch
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    with pytest.raises(
        ConfigError, match=r"teachers\.members\.t\.arch is required: .*plain\.pt does not record"
    ):
        build_teachers(
            {"members": {"t": {"checkpoint": str(tmp_path / "plain.pt")}}}, 3, (4,), "d", {}, tmp_path
        )


def test_fit_if_missing_fits_once_then_reuses_the_cache(tmp_path: Path):
    calls = []

    def fit(name, arch, fit_cfg, path):
        calls.append(name)
        save_model(create_model(arch, 3, (4,)), path, arch, 3, (4,))

    cfg = {"members": {"t": _member(fit_if_missing=True)}}
    ens = build_teachers(cfg, 3, (4,), "d", {"x": 1}, tmp_path, fit)
    assert calls == ["t"] and Path(ens.checkpoints["t"]).is_file()
    build_teachers(cfg, 3, (4,), "d", {"x": 1}, tmp_path, fit)
    assert calls == ["t"]  # cached
    # a different data config or fit setting gives a different cache key
    build_teachers(cfg, 3, (4,), "d", {"x": 2}, tmp_path, fit)
    assert calls == ["t", "t"]
    other_fit = parse(MemberSpec, _member(fit_if_missing=True, fit={"max_epochs": 2}), "t")
    other = fitted_teacher_path(tmp_path, "d", "t", other_fit, {"x": 1})
    assert other != Path(ens.checkpoints["t"])


def test_class_count_mismatch_is_reported(tmp_path: Path):
    arch = {"name": "mlp", "hidden": [8]}
    path = save_model(create_model(arch, 5, (4,)), tmp_path / "t.pt", arch, 5, (4,))
    cfg = {"members": {"t": _member(checkpoint=str(path))}}
    with pytest.raises(ConfigError, match=r"5-class head but the dataset has 3 classes"):
        build_teachers(cfg, 3, (4,), "d", {}, tmp_path)


def test_use_selects_members_and_rejects_unknown(tmp_path: Path):
    arch = {"name": "mlp", "hidden": [8]}
    path = save_model(create_model(arch, 3, (4,)), tmp_path / "t.pt", arch, 3, (4,))
    cfg = {"members": {"a": _member(checkpoint=str(path)), "b": _member(checkpoint=str(path))}, "use": ["b"]}
    assert build_teachers(cfg, 3, (4,), "d", {}, tmp_path).names == ["b"]
    cfg["use"] = ["c"]
    with pytest.raises(ConfigError, match=r"unknown teacher\(s\) \['c'\].*a, b"):
        build_teachers(cfg, 3, (4,), "d", {}, tmp_path)
    cfg["use"] = []
    assert build_teachers(cfg, 3, (4,), "d", {}, tmp_path) is None


def test_unknown_member_key_is_reported(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"unknown key\(s\) \['chekpoint'\]"):
        build_teachers({"members": {"t": _member(chekpoint="x")}}, 3, (4,), "d", {}, tmp_path)


def test_teacher_fit_seed_refits_every_fitted_member_with_shifted_seeds(make_cfg):
    """teachers.fit_seed: one sweep axis for teacher variance; each fit is cached apart, 0 is the default set."""
    from kd_lightning.runners.run import run

    base = run(make_cfg("dry_run=true"))
    shifted = run(make_cfg("dry_run=true", "teachers.fit_seed=1"))
    assert base["teacher_fit_seed"] == 0 and shifted["teacher_fit_seed"] == 1
    for name in ("cnn_s", "cnn_l"):
        assert base["teacher_checkpoints"][name] != shifted["teacher_checkpoints"][name]
    again = run(make_cfg("dry_run=true", "teachers.fit_seed=0"))
    assert again["teacher_checkpoints"] == base["teacher_checkpoints"]


def test_teacher_fit_seed_with_only_teachers_from_files_is_refused(make_cfg, tmp_path):
    from kd_lightning.models import create_model, save_model
    from kd_lightning.runners.run import run

    spec = {"name": "cnn", "channels": [4, 8]}
    path = save_model(create_model(spec, 10, (1, 8, 8)), tmp_path / "t.pt", spec, 10, (1, 8, 8))
    cfg = make_cfg("teachers.use=[cnn_s]", f"teachers.members.cnn_s.checkpoint={path}", "teachers.fit_seed=2")
    with pytest.raises(ConfigError, match="teachers.fit_seed=2 changes nothing"):
        run(cfg)


def test_random_weights_teacher_is_an_untrained_seeded_control(make_cfg, tmp_path):
    from kd_lightning.runners.run import run

    r = run(make_cfg("teachers.use=[cnn_s]", "teachers.members.cnn_s.random_weights=true", "distill=kd"))
    assert r["status"] == "ok" and r["teacher_checkpoints"] == {"cnn_s": "random weights (seed 101)"}
    assert r["teacher_set"] == "cnn_s(random)"  # reports never pool it with the fitted cnn_s
    assert r["teacher_test_acc"]["cnn_s"] < 0.4  # chance is 0.1 on digits; a fitted cnn_s scores > 0.9
    again = run(make_cfg("teachers.use=[cnn_s]", "teachers.members.cnn_s.random_weights=true", "distill=kd"))
    assert again["teacher_test_acc"] == r["teacher_test_acc"]  # the same seeded weights
    shifted = run(
        make_cfg("teachers.use=[cnn_s]", "teachers.members.cnn_s.random_weights=true", "teachers.fit_seed=1",
                 "dry_run=true")
    )  # fmt: skip
    assert shifted["teacher_checkpoints"] == {"cnn_s": "random weights (seed 102)"}
    cfg = make_cfg(
        "teachers.members.cnn_s.random_weights=true", f"teachers.members.cnn_s.checkpoint={tmp_path}/x.pt"
    )
    with pytest.raises(ConfigError, match="random_weights=true builds .* it needs arch and no checkpoint"):
        run(cfg)


def test_a_teacher_fit_does_not_depend_on_the_seed_of_the_run_that_fitted_it():
    """The cache key has no run seed, so the fit must not have one either: its batches follow its own seed."""
    from kd_lightning.config.specs import FitSpec
    from kd_lightning.data import DigitsDataModule
    from kd_lightning.engine.fitting import fit_model

    fit = FitSpec(max_epochs=1, lr=0.01, seed=7)
    weights = []
    for run_seed in (0, 1, 0):
        dm = DigitsDataModule(
            batch_size=64, shuffle_seed=run_seed
        )  # a run's datamodule, shuffled by its seed
        dm.setup()
        model, _ = fit_model({"name": "mlp", "hidden": [16]}, dm, fit)
        assert dm.shuffle_seed == run_seed  # the run's own datamodule is left as it was
        weights.append(model.state_dict())
    for k, v in weights[0].items():
        torch.testing.assert_close(weights[1][k], v)


@pytest.mark.parametrize("name", ["../x", "../../../../x", "/abs/dir/teacher", ".hidden", "a/b"])
def test_a_teacher_name_that_would_be_a_path_is_refused(tmp_path: Path, name):
    """Member names become cache file names: one that is a path would write outside the cache."""
    cfg = {"members": {name: _member(fit_if_missing=True)}}
    calls = []
    with pytest.raises(ConfigError, match=r"becomes a file name: use letters, digits"):
        build_teachers(cfg, 3, (4,), "d", {}, tmp_path / "cache", lambda *a: calls.append(a))
    assert calls == [] and not (tmp_path / "x").exists() and list(tmp_path.iterdir()) == []
