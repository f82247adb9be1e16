"""A datamodule from the `data` group: our classes (or the user's own, where allowed), plain values only."""

from __future__ import annotations

import inspect
from collections.abc import Iterable, Mapping
from typing import Any

import hydra

from kd_lightning.config.hydra import to_mapping
from kd_lightning.config.run_spec import refuse_nested_targets
from kd_lightning.data.base import TensorDataModule
from kd_lightning.errors import ConfigError, choices
from kd_lightning.plain import Plain


# The datamodules of kd_lightning.data, under every name a config may give them.
def our_datamodules() -> dict[str, type[TensorDataModule]]:
    import kd_lightning.data as data

    out: dict[str, type[TensorDataModule]] = {}
    for name in data.__all__:
        cls = getattr(data, name)
        if isinstance(cls, type) and issubclass(cls, TensorDataModule) and cls is not TensorDataModule:
            out[f"kd_lightning.data.{name}"] = cls
            out[f"{cls.__module__}.{cls.__qualname__}"] = cls
    return out


def datamodule_class(target: object, allowed: Iterable[str] | None = None) -> type[TensorDataModule]:
    """The class `data._target_` names. `allowed=None` (kd-train: the user's own config): ours, or any
    TensorDataModule subclass. Otherwise (a run folder read back by kd-eval) only ours and the names in
    `allowed`, checked before anything is imported: a recorded config is data, never code."""
    if not isinstance(target, str) or not target:
        raise ConfigError("data._target_ is missing: pick a dataset with data=<name>")
    ours = our_datamodules()
    if target in ours:
        return ours[target]
    if allowed is not None and target not in set(allowed):
        names = sorted(n for n in ours if n.count(".") == 2)
        raise ConfigError(
            f"data._target_={target!r} is not one of kd_lightning's datamodules ({', '.join(names)}); a class "
            "of your own is used only when you name it on the command line (kd-eval --datamodule CLASS)"
        )
    try:
        cls = hydra.utils.get_class(target)
    except Exception as e:
        raise ConfigError(f"data._target_={target!r} cannot be imported: {e}".replace("\n", " ")) from None
    if not (isinstance(cls, type) and issubclass(cls, TensorDataModule)):
        raise ConfigError(
            f"data._target_={target!r} is not a TensorDataModule subclass (kd_lightning.data.TensorDataModule)"
        )
    return cls


# What a run passes to its datamodule beside the `data` group (not keys a user writes there).
RUN_ARGUMENTS = ("shuffle_seed", "test_each_epoch")


def instantiate_datamodule(
    data_cfg: Mapping[str, Plain], allowed: Iterable[str] | None = None, **run: object
) -> TensorDataModule:
    """`data` as its datamodule. Unknown keys are a ConfigError listing the valid ones; the class comes from
    `datamodule_class` (see `allowed`); no value is instantiated: a `_target_` nested in a value is refused
    (Hydra's recursive instantiation would run it), and the transform lists are built by the datamodule from
    an allowlist of torchvision transforms (kd_lightning.data.vision.image_pipeline)."""
    data_cfg = to_mapping(data_cfg, "data")
    data_cfg.pop("name", None)
    cls = datamodule_class(data_cfg.pop("_target_", None), allowed)
    valid = set()
    for klass in cls.__mro__:
        init = vars(klass).get("__init__")
        if klass is object or init is None:
            continue
        valid |= {p for p in inspect.signature(init).parameters if p not in ("self", "kwargs")}
        if klass is TensorDataModule:
            break
    valid -= set(RUN_ARGUMENTS)
    unknown = sorted(set(data_cfg) - valid - {"_partial_", "_convert_", "_recursive_"})
    if unknown:
        raise ConfigError(
            f"data has unknown key(s) {unknown}; valid keys for {cls.__name__}: {choices(valid)}"
        )
    for key in ("_partial_", "_convert_", "_recursive_"):
        data_cfg.pop(key, None)
    refuse_nested_targets(data_cfg)
    unexpected = sorted(set(run) - set(RUN_ARGUMENTS))
    if unexpected:
        raise TypeError(f"instantiate_datamodule: unexpected run arguments {unexpected}")
    # checked against the class's own signature when it is called (a TypeError below names the key)
    arguments: dict[str, Any] = {**data_cfg, **run}
    try:
        return cls(**arguments)
    except TypeError as e:
        raise ConfigError(f"data ({cls.__name__}): {e}") from None
