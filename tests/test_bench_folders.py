"""Every bench row's multirun folder is a hydra.sweep.dir value that Hydra's override grammar accepts (a
label's brackets once broke `make bench-accuracy` at its second row)."""

from __future__ import annotations

import importlib.util
import sys

import pytest
from hydra.core.override_parser.overrides_parser import OverridesParser

from tests.conftest import ROOT


def _load(name: str):
    sys.path.insert(0, str(ROOT / "bench"))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "bench" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize(("bench", "table"), [("accuracy", "GALLO"), ("papers", "THAPA")])
def test_every_row_folder_is_a_valid_sweep_dir(bench, table, tmp_path):
    module = _load(bench)
    parser = OverridesParser.create()
    for label in getattr(module, table):
        folder = tmp_path / module.folder_for(label)
        (override,) = parser.parse_overrides([f"hydra.sweep.dir={folder}"])
        assert override.value() == str(folder), label
