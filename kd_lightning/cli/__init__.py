"""The commands: kd-train (train), kd-cache (cache), kd-eval (eval), kd-report (report).

Every command ends a configuration error the same way, through `config_error_exit`: one line on stderr,
`Configuration error: <what is wrong and what would be valid>`, exit status 2, no traceback.
"""

from __future__ import annotations

import sys
from typing import NoReturn

from kd_lightning.errors import ConfigError


def config_error_exit(e: ConfigError | str) -> NoReturn:
    """The one exit of every command for a configuration error (a bad key, option, file or argument)."""
    print(f"\nConfiguration error: {e}", file=sys.stderr)
    sys.exit(2)
