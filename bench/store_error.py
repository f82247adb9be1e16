"""How much a compact teacher-output store changes each loss (docs/STORE.md): float16 / bfloat16 storage
of logits and features, and top-K logits. Teacher: a fitted teacher of a pool; "student": a weaker fitted
teacher of the same pool (so the losses are those of a student that has learnt something), its features
mapped to the teacher's size by a fixed random linear map where a distance needs equal sizes.
Prints, per loss and form, the relative change |L(stored) − L(exact)| / L(exact): median and max over
the training set's batches of 256.
Usage: python bench/store_error.py [--data mnist1d|digits]
"""

from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from hydra import compose, initialize_config_dir  # noqa: E402
from hydra.core.hydra_config import HydraConfig  # noqa: E402
from omegaconf import open_dict  # noqa: E402

from kd_lightning.config.resolvers import register_resolvers  # noqa: E402
from kd_lightning.config.run_spec import parse_run  # noqa: E402
from kd_lightning.data.from_config import instantiate_datamodule  # noqa: E402
from kd_lightning.engine.build import build_teacher_ensemble  # noqa: E402
from kd_lightning.losses import create_loss  # noqa: E402
from kd_lightning.teachers.store import stored_as  # noqa: E402

LOGIT_LOSSES = {"kd T=4": ("kl", {"temperature": 4.0}), "kd T=1": ("kl", {"temperature": 1.0}),
                "dkd": ("dkd", {"warmup": 0}), "soft_mse": ("soft_mse", {})}  # fmt: skip
FEATURE_LOSSES = ["mse", "l1", "smooth_l1", "cosine", "sp", "rkd", "pkt", "cc"]
SETTINGS = {"digits": ("digits_pair", "cnn_l", "cnn_s"), "mnist1d": ("mnist1d_pool", "cnn_b", "cnn_a")}


def outputs(data: str) -> tuple[dict, dict, torch.Tensor]:
    """Teacher and 'student' logits and embeddings on the training split, and the labels."""
    register_resolvers()
    pool, teacher, student = SETTINGS[data]
    with initialize_config_dir(config_dir=str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("train", overrides=[f"data={data}", f"teachers={pool}"], return_hydra_config=True)
    with open_dict(cfg):
        cfg.paths.root_dir = str(ROOT)
        cfg.paths.output_dir = str(ROOT / "outputs" / "store_error")
        cfg.hydra.runtime.output_dir = cfg.paths.output_dir
        cfg.hydra.runtime.cwd = str(ROOT)
    HydraConfig.instance().set_config(cfg)
    spec = parse_run(cfg)
    dm = instantiate_datamodule(spec.data.config)
    dm.setup("fit")
    teachers = build_teacher_ensemble(spec, dm)
    teachers.configure_taps(["logits", "embed"])
    x = torch.cat([dm.prepare_batch(b, train=False).x for b in dm.iter_split("train")])
    feats = teachers(x, names=[teacher, student])
    return feats[teacher], feats[student], dm.labels("train")


def relative_changes(t: dict, s: dict, y: torch.Tensor) -> dict[tuple[str, str], list[float]]:
    gen = torch.Generator().manual_seed(0)
    proj = torch.randn(s["embed"].shape[1], t["embed"].shape[1], generator=gen) / s["embed"].shape[1] ** 0.5
    s_embed = s["embed"] @ proj
    forms = {"float16": {"dtype": "float16"}, "bfloat16": {"dtype": "bfloat16"}}
    topk = {f"top-{k}": {"topk": k} for k in (1, 3, 5) if k < t["logits"].shape[1]}
    out: dict[tuple[str, str], list[float]] = {}
    for i in range(0, len(y), 256):
        sl = slice(i, i + 256)
        for name, (loss, kw) in LOGIT_LOSSES.items():
            fn = create_loss(loss, {}, **kw)
            args = (y[sl],) if loss == "dkd" else ()
            exact = float(fn(s["logits"][sl], t["logits"][sl], *args))
            for form, f in {**forms, **topk}.items():
                got = float(fn(s["logits"][sl], stored_as(t["logits"][sl], **f), *args))
                out.setdefault((name, form), []).append(abs(got - exact) / max(abs(exact), 1e-12))
        for loss in FEATURE_LOSSES:
            shapes = {
                "student_shape": tuple(t["embed"].shape[1:]),
                "teacher_shape": tuple(t["embed"].shape[1:]),
            }
            fn = create_loss(loss, shapes)
            exact = float(fn(s_embed[sl], t["embed"][sl]))
            for form, f in forms.items():
                got = float(fn(s_embed[sl], stored_as(t["embed"][sl], **f)))
                out.setdefault((loss, form), []).append(abs(got - exact) / max(abs(exact), 1e-12))
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default="mnist1d", choices=sorted(SETTINGS))
    a = p.parse_args()
    t, s, y = outputs(a.data)
    changes = relative_changes(t, s, y)
    forms = sorted({f for _, f in changes}, key=lambda f: (not f.startswith("float") and f != "bfloat16", f))
    print(f"\n{a.data}: relative change of each loss, median / max over batches of 256\n")
    print("| loss | " + " | ".join(forms) + " |\n|---|" + "---|" * len(forms))
    for name in [*LOGIT_LOSSES, *FEATURE_LOSSES]:
        cells = []
        for f in forms:
            v = changes.get((name, f))
            cells.append("—" if v is None else f"{statistics.median(v):.1e} / {max(v):.1e}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
