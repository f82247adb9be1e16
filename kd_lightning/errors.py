"""The one exception type users see for bad configuration or input files."""

from __future__ import annotations

from collections.abc import Iterable


class ConfigError(ValueError):
    """A configuration value or input file is wrong; the message says which and what would be valid."""


def choices(valid: Iterable[str], limit: int = 40) -> str:
    """Format valid choices for an error message (sorted, truncated when very long)."""
    items = sorted(str(v) for v in valid)
    if len(items) > limit:
        return ", ".join(items[:limit]) + f", ... ({len(items) - limit} more)"
    return ", ".join(items)
