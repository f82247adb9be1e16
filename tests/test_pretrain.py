"""`pretrained:` mappings: pre-train once on the source task, cache, reuse; clear errors otherwise."""

from pathlib import Path

import pytest

from kd_lightning.engine.pretrain import resolve_pretrained
from kd_lightning.errors import ConfigError

SOURCE = {"_target_": "kd_lightning.data.DigitsDataModule", "class_subset": [0, 1, 2, 3, 4]}


def test_fits_on_the_source_task_once_then_reuses_the_file(tmp_path):
    calls = []

    def fit(arch, data_cfg, fit_cfg, path: Path):
        calls.append((arch, data_cfg, fit_cfg))
        path.write_bytes(b"weights")

    spec = {
        "name": "cnn",
        "channels": [8],
        "pretrained": {"fit_if_missing": True, "data": SOURCE, "fit": {"seed": 3}},
    }
    first = resolve_pretrained("student", spec, tmp_path, fit)
    again = resolve_pretrained("student", spec, tmp_path, fit)
    assert first == again and Path(first["pretrained"]).is_file() and len(calls) == 1
    assert calls[0][0] == {"name": "cnn", "channels": [8]} and calls[0][1] == SOURCE
    assert calls[0][2].seed == 3 and calls[0][2].max_epochs >= 1
    other = {**spec, "pretrained": {**spec["pretrained"], "data": {**SOURCE, "class_subset": [5, 6]}}}
    assert resolve_pretrained("student", other, tmp_path, fit)["pretrained"] != first["pretrained"]
    assert len(calls) == 2  # another source task, another file


@pytest.mark.parametrize(
    ("pretrained", "message"),
    [
        ("/no/such/file.pt", "checkpoint file not found"),
        ({"checkpoint": "/no/such.pt"}, "fit_if_missing: true"),
        ({"fit_if_missing": True}, "needs a checkpoint path, or `data`"),
        ({"data": SOURCE, "epochs": 3}, r"unknown key\(s\) \['epochs'\]"),
        (3, "must be null, a checkpoint path or a mapping"),
    ],
)
def test_bad_pretrained_settings_name_the_key(tmp_path, pretrained, message):
    with pytest.raises(ConfigError, match=message):
        resolve_pretrained("student", {"name": "cnn", "pretrained": pretrained}, tmp_path, None)


def test_torchvision_weight_names_become_weights_and_bad_ones_list_the_valid(tmp_path):
    spec = resolve_pretrained("student", {"name": "resnet18", "pretrained": "IMAGENET1K_V1"}, tmp_path, None)
    assert spec["weights"] == "IMAGENET1K_V1" and spec["pretrained"] is None  # nothing downloaded here
    with pytest.raises(ConfigError, match="torchvision weights of 'resnet18': DEFAULT, IMAGENET1K_V1"):
        resolve_pretrained("student", {"name": "resnet18", "pretrained": "IMAGENET22K"}, tmp_path, None)


def test_a_run_given_torchvision_weights_as_pretrained_builds_with_those_weights(make_cfg, monkeypatch):
    """`student.pretrained=IMAGENET1K_V1` reaches torchvision as weights= (the download is intercepted)."""
    import torchvision

    from kd_lightning.config.run_spec import parse_run
    from kd_lightning.engine.build import resolve_pretrained_models

    cfg = make_cfg("student=torchvision", "student.name=resnet18", "student.pretrained=IMAGENET1K_V1")
    spec = resolve_pretrained_models(parse_run(cfg))
    assert spec.student.options["weights"] == "IMAGENET1K_V1" and spec.student.options["pretrained"] is None
    seen = []
    real = torchvision.models.get_model

    def fake_get_model(name, weights=None, **kw):
        seen.append(weights)
        return real(name, weights=None, **kw)

    monkeypatch.setattr(torchvision.models, "get_model", fake_get_model)
    from kd_lightning.models import create_model

    create_model(spec.student.arch, 10, (1, 8, 8))
    assert seen == ["IMAGENET1K_V1"]
