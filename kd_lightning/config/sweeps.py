"""Sweeps over teacher combinations: an OmegaConf resolver that spells every subset of the pool in
Hydra's own sweep syntax, so the basic sweeper (or any launcher) expands it into jobs.

    kd-train -m experiment=landro2021 sweep=teacher_subsets seed=0,1
    # conf/sweep/teacher_subsets.yaml sets hydra.sweeper.params."teachers.use" to
    # ${kd_subsets:${teachers.members}}  →  "[cnn_a],[cnn_b],[cnn_c],[cnn_a,cnn_b],...,[cnn_a,cnn_b,cnn_c]"
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from itertools import combinations

from kd_lightning.errors import ConfigError


def teacher_subsets(pool: Iterable[str], min_size: int = 1, max_size: int | None = None) -> list[list[str]]:
    """Every subset of `pool` with min_size..max_size members, smallest first, in pool order."""
    names = list(pool)
    if len(set(names)) != len(names):
        raise ConfigError(f"the teacher pool names a teacher twice: {names}")
    hi = len(names) if max_size is None else min(max_size, len(names))
    if not names or min_size < 1 or min_size > hi:
        raise ConfigError(f"no teacher subsets of size {min_size}..{hi} in the pool {names}")
    return [list(c) for k in range(min_size, hi + 1) for c in combinations(names, k)]


def sweep_string(subsets: Iterable[Iterable[str]]) -> str:
    """Hydra's choice-sweep syntax over lists: `[a],[b],[a,b]`."""
    return ",".join("[" + ",".join(s) + "]" for s in subsets)


def resolve_subsets(
    members: Mapping[str, object] | Sequence[str] | None,
    min_size: int | str = 1,
    max_size: int | str | None = None,
    include_none: bool | str = False,
) -> str:
    """`include_none`: also the empty subset `[]`, the job's student trained without any teacher (the
    control every teacher set is compared with)."""
    pool = list(members.keys()) if isinstance(members, Mapping) else list(members or [])
    subsets = teacher_subsets(pool, int(min_size), None if max_size in (None, "") else int(max_size))
    if str(include_none).lower() in ("true", "1"):
        subsets = [[], *subsets]
    return sweep_string(subsets)
