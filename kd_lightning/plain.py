"""Plain data: what YAML and JSON hold (a resolved config, results.json), and its typed readers."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from kd_lightning.errors import ConfigError

# A config or results value as plain data: what YAML and JSON hold (a resolved config, results.json). The
# containers are the read-only (covariant) kinds, so a `dict[str, float]` is a Plain value; readers narrow a
# value with `plain_map`, `plain_list`, `plain_num` and `plain_str`, which name the key when it is not so.
Plain = str | int | float | bool | None | Sequence["Plain"] | Mapping[str, "Plain"]


def plain_map(value: Plain, key: str) -> Mapping[str, Plain]:
    """`value` as a mapping (None as an empty one); ConfigError naming `key` otherwise."""
    if value is None:
        return {}
    if not isinstance(value, Mapping):
        raise ConfigError(f"{key} must be a mapping, got {value!r}")
    return value


def plain_list(value: Plain, key: str) -> Sequence[Plain]:
    """`value` as a list (None as an empty one); ConfigError naming `key` otherwise."""
    if value is None:
        return []
    if isinstance(value, str) or not isinstance(value, Sequence):
        raise ConfigError(f"{key} must be a list, got {value!r}")
    return value


def plain_num(value: Plain, key: str) -> float:
    """`value` as a number (bools refused); ConfigError naming `key` otherwise."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ConfigError(f"{key} must be a number, got {value!r}")
    return float(value)


def plain_str(value: Plain, key: str) -> str:
    """`value` as a string; ConfigError naming `key` otherwise."""
    if not isinstance(value, str):
        raise ConfigError(f"{key} must be a string, got {value!r}")
    return value


def as_plain(value: object, where: str = "config") -> Plain:
    """`value` (nested mappings, lists and scalars, as `yaml.safe_load`, `json.load` or OmegaConf's
    `to_container` give them) typed as Plain: mapping keys as strings, tuples as lists. Any other leaf is a
    ConfigError naming where it sits."""
    if isinstance(value, Mapping):
        return {str(k): as_plain(v, f"{where}.{k}") for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [as_plain(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if value is None or isinstance(value, str | int | float | bool):
        return value
    raise ConfigError(f"{where} holds a {type(value).__name__} ({value!r}); a config holds plain data only")
