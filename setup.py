"""Build hook: the wheel carries the top-level `conf/` as package data `kd_lightning/conf`.

`conf/` stays where users read and edit it (the repository's top level); a wheel or `pip install .`
gets a copy inside the package, which `kd_lightning.config.conf_files.CONF_DIR` finds. Everything else is
declared in pyproject.toml.
"""

import shutil
from pathlib import Path

from setuptools import setup
from setuptools.command.build_py import build_py

ROOT = Path(__file__).resolve().parent


class BuildWithConf(build_py):
    def run(self) -> None:
        super().run()
        if not self.editable_mode:  # an editable install reads the checkout's conf/ directly
            shutil.copytree(ROOT / "conf", Path(self.build_lib) / "kd_lightning" / "conf", dirs_exist_ok=True)


setup(cmdclass={"build_py": BuildWithConf})
