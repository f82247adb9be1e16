"""A broken YAML file is named, with its line, before Hydra composes anything."""

import pytest

from kd_lightning.config.conf_files import check_config_dirs, check_config_file, config_dirs_from_argv
from kd_lightning.errors import ConfigError

from .conftest import CONF


def test_packaged_configs_are_clean():
    check_config_dirs([CONF])


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("5\n", "must hold a mapping"),
        ("a: [1, 2\n", "line 2"),
        ("- a\n- b\n", "got a list"),
        ("a: b: c\n", "not valid YAML"),
    ],
)
def test_bad_file_is_named(tmp_path, text, needle):
    bad = tmp_path / "distill" / "broken.yaml"
    bad.parent.mkdir()
    bad.write_text(text)
    with pytest.raises(ConfigError) as e:
        check_config_dirs([tmp_path])
    assert str(bad) in str(e.value) and needle in str(e.value)


def test_empty_file_is_fine(tmp_path):
    (tmp_path / "empty.yaml").write_text("")
    check_config_file(tmp_path / "empty.yaml")


def test_user_config_dirs_are_checked_too(tmp_path):
    assert config_dirs_from_argv(["-cd", "x", "--config-dir=y", "seed=1"], tmp_path) == [
        tmp_path,
        *map(type(tmp_path), ["x", "y"]),
    ]
