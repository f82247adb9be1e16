"""The one exception type users see for bad configuration or input files."""

from __future__ import annotations

import re
from collections.abc import Iterable


class ConfigError(ValueError):
    """A configuration value or input file is wrong; the message says which and what would be valid."""


def choices(valid: Iterable[str], limit: int = 40) -> str:
    """Format valid choices for an error message (sorted, truncated when very long)."""
    items = sorted(str(v) for v in valid)
    if len(items) > limit:
        return ", ".join(items[:limit]) + f", ... ({len(items) - limit} more)"
    return ", ".join(items)


SEED_MAX = 2**32 - 1  # numpy and Lightning accept seeds in [0, 2**32 - 1]


def as_int(key: str, value: object, minimum: int | None = None, maximum: int | None = None) -> int:
    """An integer config value (bools and non-integral numbers rejected), with optional bounds."""
    if isinstance(value, bool) or not (
        isinstance(value, int) or (isinstance(value, float) and value.is_integer())
    ):
        raise ConfigError(f"{key} must be an integer, got {value!r}")
    value = int(value)
    if minimum is not None and value < minimum:
        raise ConfigError(f"{key} must be an integer >= {minimum}, got {value}")
    if maximum is not None and value > maximum:
        raise ConfigError(f"{key} must be an integer <= {maximum}, got {value}")
    return value


def as_seed(key: str, value: object) -> int:
    return as_int(key, value, 0, SEED_MAX)


def as_float(
    key: str,
    value: object,
    low: float | None = None,
    high: float | None = None,
    open_low: bool = False,
    open_high: bool = False,
) -> float:
    """A finite number within [low, high] (ends open when asked)."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or value != value
        or value in (float("inf"), float("-inf"))
    ):
        raise ConfigError(f"{key} must be a finite number, got {value!r}")
    value = float(value)
    too_low = low is not None and (value <= low if open_low else value < low)
    too_high = high is not None and (value >= high if open_high else value > high)
    if too_low or too_high:
        lo = "" if low is None else f"{'(' if open_low else '['}{low}"
        hi = "" if high is None else f"{high}{')' if open_high else ']'}"
        raise ConfigError(f"{key} must be in {lo or '(-inf'}, {hi or 'inf)'}, got {value}")
    return value


_SAFE_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.:+-]{0,127}")


def safe_name(key: str, value: object) -> str:
    """A config value that becomes part of a file name (a teacher's name, a tap's role): letters, digits and
    `_ . : + -`, starting with a letter or digit, no `..`, at most 128 characters. Anything else could
    write outside the cache (`../x`, `/abs/dir`)."""
    if not isinstance(value, str) or not _SAFE_NAME.fullmatch(value) or ".." in value:
        raise ConfigError(
            f"{key}={value!r} becomes a file name: use letters, digits and _ . : + - only (starting with a "
            "letter or digit, no '..', at most 128 characters)"
        )
    return value
