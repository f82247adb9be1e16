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


def test_a_misspelt_group_answers_without_importing_torchvision_and_a_sweeps_later_choices_are_checked():
    import subprocess
    import sys

    from kd_lightning.config.conf_files import TORCHVISION_MODELS, check_composition

    probe = (
        "import sys\n"
        "from kd_lightning.config.conf_files import CONF_DIR, check_composition\n"
        "from kd_lightning.errors import ConfigError\n"
        "try:\n"
        "    check_composition(['student=mpl'], CONF_DIR)\n"
        "except ConfigError as e:\n"
        "    print(e)\n"
        "print('torchvision' in sys.modules)\n"
    )
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120).stdout
    assert "Could not find 'student/mpl'" in out and out.strip().endswith("False")  # seconds spared
    with pytest.raises(ConfigError, match=r"'resnet18' is a torchvision model: student=torchvision"):
        check_composition(["student=resnet18"], CONF)
    from torchvision.models import list_models

    assert set(list_models()) == TORCHVISION_MODELS  # the installed torchvision's, as the hint assumes
    with pytest.raises(ConfigError, match=r"Could not find 'distill/kdd'"):
        check_composition(["-m", "distill=kd,kdd", "seed=0,1"], CONF)  # the second choice, before any job


def test_recorded_views_of_an_image_folder_need_no_plus():
    from kd_lightning.config.conf_files import check_composition
    from kd_lightning.data.fingerprint import data_key

    cfg = check_composition(["data=imagefolder", "data.root=/x", "data.augment.views=2"], CONF)
    assert cfg.data.augment.views == 2
    # spelt out with its defaults, augment is still "no augmentation": the caches of image folders stay valid
    plain = {"_target_": "x", "augment": {"crop_padding": 0, "hflip": False, "views": None}}
    assert data_key(plain) == data_key({**plain, "augment": None})
    assert data_key({**plain, "augment": {"crop_padding": 4, "hflip": False, "views": None}}) != data_key(
        plain
    )
