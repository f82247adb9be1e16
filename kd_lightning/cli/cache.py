"""kd-cache: fill the teacher-output stores a config needs, once, before a job array runs.

    kd-cache experiment=landro2021 teacher_cache.mode=disk                    # every teacher of the pool
    kd-cache -m experiment=landro2021 teacher_cache.mode=disk 'teachers.use=[cnn_a],[cnn_b]'
    kd-cache --verify experiment=landro2021 teacher_cache.mode=disk           # check every block, repair
    kd-cache --list [paths.cache_dir=DIR]                                      # what the cache holds, sizes

It builds what kd-train builds up to the fit (data, teachers, the student's taps and the objective, which
decide which taps are stored), then runs the precompute stage in this process; nothing is trained. The
jobs that follow find complete stores and run no teacher on the training set.
"""

from __future__ import annotations

import sys
from contextlib import AbstractContextManager, nullcontext
from pathlib import Path
from typing import TypedDict

import hydra
import torch
from omegaconf import DictConfig

from kd_lightning.cli import config_error_exit
from kd_lightning.config.conf_files import CONF_DIR, check_composition
from kd_lightning.config.resolvers import register_resolvers, user_cache_dir
from kd_lightning.config.run_spec import parse_run
from kd_lightning.engine.build import build_module, build_teacher_ensemble, resolve_pretrained_models
from kd_lightning.errors import ConfigError
from kd_lightning.runners.run import check_accelerator, stage_data
from kd_lightning.teachers.store import human_size

register_resolvers()


def precision_context(precision: str, device: torch.device) -> AbstractContextManager[object]:
    """The autocast the training steps run under (the stores' key holds the precision)."""
    if "mixed" not in precision:
        return nullcontext()
    from pytorch_lightning.plugins.precision import MixedPrecision

    where = "cuda" if device.type == "cuda" else "cpu"
    if precision.startswith("bf16"):
        return MixedPrecision("bf16-mixed", where).forward_context()
    return MixedPrecision("16-mixed", where).forward_context()


VERIFY = False  # `kd-cache --verify`: check every block of every complete store before filling


class Filled(TypedDict):
    files: list[str]  # the stores' files
    computed: int  # the rows the fill computed
    mismatched: int | None  # with `verify`: the blocks that did not match their checksums


def fill_stores(cfg: DictConfig, verify: bool = False) -> Filled:
    """Build the run's teacher outputs and fill them; returns {files, computed} and, with `verify`, the
    number of blocks whose rows did not match their checksums (recomputed by the fill)."""
    spec = parse_run(cfg)
    if spec.cache.mode != "disk":
        raise ConfigError("kd-cache fills files that later runs read: set teacher_cache.mode=disk")
    check_accelerator(spec)
    dm = stage_data(spec)
    spec = resolve_pretrained_models(spec)
    teachers = build_teacher_ensemble(spec, dm)
    if teachers is None:
        raise ConfigError("kd-cache fills the teachers' outputs: this config has no teachers")
    module = build_module(spec, dm, teachers)
    outputs = module.teacher_outputs
    if outputs is None:
        raise ConfigError(
            "this config stores no teacher outputs (no teachers, no distillation terms, or data.augment draws "
            "a fresh view every step: set data.augment.views=K)"
        )
    mismatched = None
    if verify:  # stores up to 1 GiB were checked whole when opened; the others are now
        mismatched = sum(len(getattr(s, "repaired", [])) for s in outputs.all()) + outputs.check(full=True)
    gpu = spec.trainer.accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    teachers.to(device)
    with precision_context(spec.trainer.precision, device):
        computed = outputs.fill(
            lambda x, m: teachers(x, names=[m])[m],
            lambda chunks: dm.view_batches(chunks, device),
            batch_size=dm.eval_batch_size,
        )
    return Filled(files=outputs.files(), computed=computed, mismatched=mismatched)


@hydra.main(config_path=str(CONF_DIR), config_name="train", version_base="1.3")
def hydra_main(cfg: DictConfig) -> None:
    try:
        done = fill_stores(cfg, verify=VERIFY)
    except ConfigError as e:
        config_error_exit(e)
    if done["mismatched"] is not None:
        bad = done["mismatched"]
        print(
            f"verified every block of {len(done['files'])} store file(s): "
            + (f"{bad} block(s) did not match their checksums and were recomputed" if bad else "all match")
        )
    print(f"teacher outputs: {done['computed']} teacher passes computed; stores:")
    for f in done["files"]:
        print(f"  {f}")


def list_cache(root: Path) -> list[str]:
    """What the cache holds: each folder two levels down (`teachers/digits`, `teacher_outputs/mnist1d`, ...)
    with its file count and size, the largest first."""
    if not root.is_dir():
        return [f"{root}: empty (nothing cached yet)"]
    groups: dict[str, list[int]] = {}
    for path in root.rglob("*"):
        if path.is_file() and not path.name.endswith(".lock"):
            rel = path.relative_to(root).parts
            key = "/".join(rel[:2]) if len(rel) > 2 else rel[0] if len(rel) > 1 else "."
            groups.setdefault(key, []).append(path.stat().st_size)
    total = sum(sum(v) for v in groups.values())
    lines = [f"{root}: {human_size(total)} in {sum(len(v) for v in groups.values())} files"]
    for key, sizes in sorted(groups.items(), key=lambda kv: -sum(kv[1])):
        lines.append(f"  {human_size(sum(sizes)):>10}  {len(sizes):6d} files  {key}/")
    lines.append(
        f"to clear it: rm -rf {root} (or one of the folders above); everything is made again when needed"
    )
    return lines


def cache_root(argv: list[str]) -> Path:
    given = [a.split("=", 1)[1] for a in argv if a.startswith("paths.cache_dir=")]
    return Path(given[-1] if given else user_cache_dir())


def main() -> None:
    global VERIFY
    if "--list" in sys.argv[1:]:
        print("\n".join(list_cache(cache_root(sys.argv[1:]))))
        return
    if "--verify" in sys.argv[1:]:
        VERIFY = True
        sys.argv.remove("--verify")
    try:
        check_composition(sys.argv[1:], CONF_DIR)
    except ConfigError as e:
        config_error_exit(e)
    hydra_main()


if __name__ == "__main__":
    main()
