"""`pretrained:` mappings: pre-train once on the source task, cache, reuse; clear errors otherwise."""

from pathlib import Path

import pytest

from kd_lightning.errors import ConfigError
from kd_lightning.pretrain import resolve_pretrained

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
    assert calls[0][2]["seed"] == 3 and calls[0][2]["max_epochs"] >= 1
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
