"""make gpu-check: the GPU paths no CPU test reaches (mixed precision, the stores, torch.compile, channels-last,
recorded views, DDP over NCCL), each run once and measured, in one command.

    python bench/gpu_check.py [--report docs/GPU_CHECK.md]   # on a GPU: well under 8 minutes on one
    python bench/gpu_check.py --cpu                            # smoke mode: every case, tiny, on the CPU

Every case is a real run (`kd_lightning.runners.run.run` on a config composed as `kd-train` composes it),
in this process, on generated data (nothing is downloaded), teachers with random weights
(`random_weights=true`: speed and memory do not depend on them):
  cifar      experiment=cifar100/resnet32x4_resnet8x4 on CIFAR-100-format files of random pixels, for
             precision 16-mixed and bf16-mixed:
               student        the student alone (distill=none: no teacher runs in training)
               live           KD, the teacher live on every batch (the protocol's crop + flip)
               fill, stored   KD on 4 recorded crop/flip views per image (data.augment.views=4) from a
                              disk store: the run that fills it, then one that reads it (no teacher)
             and at bf16-mixed with perf.compile=true perf.channels_last=true: live, stored
  views      experiment=imagenet/resnet34_resnet18 on a generated ImageFolder (1000 class folders),
             RandomResizedCrop + flip recorded as 2 views per image: student, live, fill, stored; and
             fill+batched, stored+batched with data.augment.replay=batched (the views made on the device,
             a batch in one roi_align, instead of image by image in the loader's workers)
  ddp        trainer=ddp trainer.devices=1 (NCCL on a GPU, gloo with --cpu), 16-mixed, stored
  graphs     the GPU default, perf.compile=auto (every model compiled with CUDA graphs): the cifar student
             alone, KD live and stored, FitNet (live; also run eager as cifar/bf16-mixed/fitnet), and the
             ddp case (on the CPU the smoke mode compiles with the eager backend); every other case is
             eager (perf.compile=false)
Every case runs with perf.check_syncs=true: on a GPU a synchronising call in a training step (after the
first two, logging steps aside) raises (torch.cuda.set_sync_debug_mode("error")), on the CPU every host
read is counted; either fails the case.
For each: images/s (training samples over the median epoch's wall time, the first epoch left out when
there are more: it holds compilation and warm-up), teacher_forward_samples and peak GPU memory; then the
ratios of time per image: stored/student and live/(student + teacher), with the teacher's time per image
from its fill (the stores' precompute runs it the way a live step does, without gradients). Any error,
a run that does not end ok, or a store that is read while a teacher still runs fails the check (exit 1)
after every case has run.

The ceiling: for each cifar precision a hand-written PyTorch loop (`hand_loop`) trains the same models on the
same images, kept on the device, with the same augmentation, optimiser, precision and loss, as the student
alone, with the teacher live, and with the teacher's logits of 4 recorded views held in device memory;
`framework/hand` is the ratio of time per image of each case to its loop (1.00: as fast as plain PyTorch).
"""

from __future__ import annotations

import argparse
import datetime
import logging
import os
import statistics
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from kd_lightning.config.conf_files import compose_run  # noqa: E402
from kd_lightning.config.optim import prime_fused_sgd  # noqa: E402
from kd_lightning.data.base import crop_flip, crop_flip_params  # noqa: E402
from kd_lightning.data.generate import write_cifar, write_image_folder  # noqa: E402
from kd_lightning.data.vision import CIFARDataModule  # noqa: E402
from kd_lightning.models import create_model  # noqa: E402
from kd_lightning.runners.run import run  # noqa: E402

SIZES = {  # GPU: a few hundred steps per case; --cpu: a couple of steps
    "gpu": {"cifar_train": 12800, "batch": 128, "epochs": 3, "images": 2000, "image_size": 64, "workers": 8},
    "cpu": {"cifar_train": 128, "batch": 32, "epochs": 2, "images": 16, "image_size": 32, "workers": 0},
}


def _transforms(size: int) -> list[str]:
    crop = f"{{_target_: torchvision.transforms.v2.RandomResizedCrop, size: {size}}}"
    flip = "{_target_: torchvision.transforms.v2.RandomHorizontalFlip, p: 0.5}"
    resize = f"{{_target_: torchvision.transforms.v2.Resize, size: {size}}}"
    centre = f"{{_target_: torchvision.transforms.v2.CenterCrop, size: {size}}}"
    return [f"data.train_transforms=[{crop}, {flip}]", f"data.eval_transforms=[{resize}, {centre}]"]


def cases(mode: str, data: Path) -> list[tuple[str, list[str]]]:
    """(name, overrides) in the order they run; a `stored` case reads the store its `fill` case filled."""
    z = SIZES[mode]
    common = [
        f"trainer={'gpu' if mode == 'gpu' else 'cpu'}", f"trainer.max_epochs={z['epochs']}",
        "trainer.enable_progress_bar=false", "logger=none", "callbacks=none", "print_summary=false",
        "test_each_epoch=false", f"data.batch_size={z['batch']}", f"data.num_workers={z['workers']}",
        "perf.check_syncs=true", "perf.compile=false",  # eager; the graphs cases run the GPU default
    ]  # fmt: skip
    teacher = ["teachers.members.teacher.random_weights=true"]
    store = ["teacher_cache.mode=disk", f"teacher_cache.dir={data / 'stores'}"]
    cifar = [*common, "experiment=cifar100/resnet32x4_resnet8x4", f"data.root={data / 'cifar'}"]
    out: list[tuple[str, list[str]]] = []
    for p in ("16-mixed", "bf16-mixed"):
        at = [*cifar, f"trainer.precision={p}"]
        out += [
            (f"cifar/{p}/student", [*at, *teacher, "distill=none"]),
            (f"cifar/{p}/live", [*at, *teacher, "teacher_cache.mode=none"]),
            (f"cifar/{p}/fill", [*at, *teacher, "data.augment.views=4", *store]),
            (f"cifar/{p}/stored", [*at, *teacher, "data.augment.views=4", *store]),
        ]
    fast = ["perf.compile=true", "perf.channels_last=true"]
    if mode == "cpu":
        fast.append("perf.compile_backend=eager")  # dynamo traces as with inductor; no C++ build in CI
    at = [*unset(cifar), "trainer.precision=bf16-mixed", *fast]
    out += [
        ("cifar/bf16-mixed/live+compile+channels_last", [*at, *teacher, "teacher_cache.mode=none"]),
        ("cifar/bf16-mixed/stored+compile+channels_last", [*at, *teacher, "data.augment.views=4", *store]),
    ]
    # the default on a GPU (perf.compile=auto: CUDA graphs); the smoke mode compiles with the eager backend
    graphs = [] if mode == "gpu" else ["perf.compile=true", "perf.compile_backend=eager"]
    at = [*cifar, "trainer.precision=bf16-mixed", *teacher]
    by_default = [*unset(cifar), "trainer.precision=bf16-mixed", *teacher, *graphs]
    out += [
        ("cifar/bf16-mixed/fitnet", [*at, "distill=fitnet", "teacher_cache.mode=none"]),
        ("graphs/bf16-mixed/student", [*by_default, "distill=none"]),
        ("graphs/bf16-mixed/live", [*by_default, "teacher_cache.mode=none"]),
        ("graphs/bf16-mixed/stored", [*by_default, "data.augment.views=4", *store]),
        ("graphs/bf16-mixed/fitnet", [*by_default, "distill=fitnet", "teacher_cache.mode=none"]),
    ]
    views = [
        *common, "experiment=imagenet/resnet34_resnet18", f"data.root={data / 'images' / 'train'}",
        f"data.test_root={data / 'images' / 'val'}", *_transforms(z["image_size"]), "trainer.precision=bf16-mixed",
    ]  # fmt: skip
    recorded = [*views, *teacher, "data.augment.views=2", *store]
    out += [
        ("views/student", [*views, *teacher, "distill=none"]),
        ("views/live", [*views, *teacher, "teacher_cache.mode=none"]),
        ("views/fill", recorded),
        ("views/stored", recorded),
        ("views/fill+batched", [*recorded, "data.augment.replay=batched"]),
        ("views/stored+batched", [*recorded, "data.augment.replay=batched"]),
    ]
    ddp = ["trainer=ddp", "trainer.devices=1"] if mode == "gpu" else ["trainer=ddp_cpu", "trainer.devices=1"]
    at = [*cifar, *ddp, "trainer.precision=16-mixed", *teacher, "data.augment.views=4", *store]
    out.append(("ddp/16-mixed/stored", at))
    out.append(("graphs/ddp/16-mixed/stored", [*unset(at), *graphs]))
    return out


def unset(overrides: list[str]) -> list[str]:
    """Without the eager switch: perf.compile as the case or the default sets it."""
    return [o for o in overrides if o != "perf.compile=false"]


def write_data(mode: str, data: Path) -> None:
    z = SIZES[mode]
    write_cifar(data / "cifar", 100, n_train=z["cifar_train"], n_test=256 if mode == "gpu" else 16)
    write_image_folder(data / "images" / "train", z["images"], z["image_size"], classes=1000, used=20)
    write_image_folder(
        data / "images" / "val", 64 if mode == "gpu" else 8, z["image_size"], 1000, used=20, seed=1
    )


HAND_KINDS = ("student", "live", "stored")
REPEATED = {
    f"cifar/{p}/{k}" for p in ("16-mixed", "bf16-mixed") for k in ("student", "live", "fill", "stored")
}


def hand_loop(
    kind: str,
    precision: str,
    mode: str,
    data: Path,
    on_step: Callable[[int], None] | None = None,
    epochs: int | None = None,
) -> float:
    """Images/s of a plain PyTorch loop doing what the cifar case `kind` does: resnet8x4 (the student) and
    resnet32x4 (the teacher, random weights) on the generated CIFAR-100 images held on the device as uint8,
    normalised and cropped (padding 4) + flipped there, SGD (lr 0.05, momentum 0.9, weight decay 5e-4,
    fused on a GPU), 0.1 · CE + 0.9 · T² · KL at T = 4 under autocast; `stored`: the teacher's logits of 4
    recorded views per image computed first and held in device memory (float16), one view per image and
    epoch. Timed like the cases: the median epoch after the first."""
    z = SIZES[mode]
    device = torch.device("cuda" if mode == "gpu" else "cpu")
    dtype = torch.float16 if precision == "16-mixed" and mode == "gpu" else torch.bfloat16
    torch.manual_seed(0)
    arrays = CIFARDataModule(root=str(data / "cifar"), classes=100).load()
    x = torch.as_tensor(arrays["x_train"]).to(device)
    y = torch.as_tensor(arrays["y_train"]).long().to(device)
    scaled = x.float() / 255
    mean = scaled.mean((0, 2, 3), keepdim=True)
    std = scaled.std((0, 2, 3), keepdim=True)
    student = create_model({"name": "resnet8x4"}, 100, (3, 32, 32)).to(device).train()
    teacher = create_model({"name": "resnet32x4"}, 100, (3, 32, 32)).to(device).eval().requires_grad_(False)
    opt = prime_fused_sgd(
        torch.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=5e-4, fused=mode == "gpu")
    )
    scaler = torch.amp.GradScaler(enabled=dtype == torch.float16)
    n, b, views = len(y), z["batch"], 4

    def normalised(idx: torch.Tensor) -> torch.Tensor:
        return (x[idx].float() / 255 - mean) / std

    if kind == "stored":
        params = crop_flip_params(n * views, 4, True, torch.Generator(device).manual_seed(1), device).view(
            n, views, 3
        )
        logits = torch.empty((n, views, 100), dtype=torch.float16, device=device)
        with torch.no_grad(), torch.autocast(device.type, dtype):
            for i in range(0, n, 512):
                idx = torch.arange(i, min(n, i + 512), device=device)
                for v in range(views):
                    logits[idx, v] = teacher(crop_flip(normalised(idx), 4, params[idx, v])).half()
    seconds, step = [], 0
    for _ in range(epochs or z["epochs"]):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        for idx in torch.randperm(n, device=device).split(b):
            if on_step is not None:
                on_step(step)
            step += 1
            if kind == "stored":
                view = torch.randint(0, views, (len(idx),), device=device)
                xb = crop_flip(normalised(idx), 4, params[idx, view])
            else:
                xb = crop_flip(normalised(idx), 4, crop_flip_params(len(idx), 4, True, device=device))
            with torch.autocast(device.type, dtype):
                out = student(xb)
                loss = F.cross_entropy(out.float(), y[idx])
                if kind != "student":
                    if kind == "live":
                        with torch.no_grad():
                            target = teacher(xb).float()
                    else:
                        target = logits[idx, view].float()
                    kl = F.kl_div(F.log_softmax(out.float() / 4, 1), F.log_softmax(target / 4, 1),
                                  reduction="batchmean", log_target=True)  # fmt: skip
                    loss = 0.1 * loss + 0.9 * 16 * kl
            opt.zero_grad(set_to_none=True)
            scaler.scale(loss).backward()
            scaler.step(opt)
            scaler.update()
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    if on_step is not None:
        on_step(step)
    steady = seconds[1:] if len(seconds) > 1 else seconds
    return n / statistics.median(steady)


def run_case(name: str, overrides: list[str], data: Path) -> dict:
    if "perf.check_syncs=false" in overrides:
        overrides = [o for o in overrides if o != "perf.check_syncs=true"]
    return run(compose_run(overrides, data / "runs" / name.replace("/", "_"), data / "cache"))


def per_run_images_per_s(r: dict) -> float:
    epochs = r.get("epoch_seconds") or [r["fit_seconds"]]
    steady = epochs[1:] if len(epochs) > 1 else epochs
    return r["train_samples"] / statistics.median(steady)


def check(name: str, r: dict, backend: str | None = None) -> str | None:
    """Why this run fails the check, or None; `backend`: the process group's, required for a ddp case."""
    if r.get("status") != "ok":
        return f"status {r.get('status')}: {r.get('error', '')}"
    if name.startswith("ddp/") and backend is not None and backend != process_group_backend():
        return f"DDP ran with {process_group_backend()}, not {backend}"
    forwards = r.get("teacher_forward_samples") or 0
    if name.endswith("/fill") and forwards <= 0:  # (a repeated fill, "<name>/again", finds its store full)
        return "the fill ran no teacher (a store was found complete: stale data folder?)"
    if "/stored" in name and forwards != 0:
        return f"the store was filled but {forwards} teacher samples were still computed"
    return None


def process_group_backend() -> str:
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return "no process group"
    return str(torch.distributed.get_backend())


def write_report(path: Path, lines: list[str]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        "# make gpu-check\n\n`python bench/gpu_check.py` (bench/gpu_check.py documents every case).\n\n```\n"
        + "\n".join(lines)
        + "\n```\n"
    )


def selected(name: str, only: list[str]) -> bool:
    """Whether `--only` picks the case `name`: an entry is a prefix of case names, or with a trailing `$`
    one case's exact name (`cifar/bf16-mixed/live$` leaves out `cifar/bf16-mixed/live+compile+...`)."""
    return not only or any(name == o[:-1] if o.endswith("$") else name.startswith(o) for o in only)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--cpu", action="store_true", help="smoke mode: every case, tiny, on the CPU")
    p.add_argument("--report", type=Path, help="also write the output to this file (markdown, dated)")
    p.add_argument(
        "--only",
        default="",
        help="comma-separated name prefixes (or exact names ending in $): those cases only",
    )
    p.add_argument(
        "--reps", type=int, default=1,
        help="run the eager cifar cases (student, live, fill, stored) and their hand loops this many times, "
        "interleaved; figures are medians [min-max]",
    )  # fmt: skip
    a = p.parse_args()
    mode = "cpu" if a.cpu else "gpu"
    if mode == "gpu" and not torch.cuda.is_available():
        raise SystemExit(
            "gpu-check: no CUDA device here (torch.cuda.is_available() is False); --cpu for the smoke mode"
        )
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    warnings.filterwarnings("ignore")
    logging.getLogger("pytorch_lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning_fabric").setLevel(logging.ERROR)
    device = torch.cuda.get_device_name(0) if mode == "gpu" else "cpu (smoke mode)"
    lines = [
        f"gpu-check {datetime.date.today().isoformat()} on {device}; torch {torch.__version__}"
        + (f", CUDA {torch.version.cuda}" if mode == "gpu" else ""),
    ]

    def say(line: str) -> None:
        print(line, flush=True)
        lines.append(line)
        if (
            a.report is not None
        ):  # rewritten at every line: a run stopped by a time limit keeps what it measured
            write_report(a.report, lines)

    print(lines[0], flush=True)
    results: dict[str, dict] = {}
    speeds: dict[str, list[float]] = {}  # images/s of each run of a case (--reps)
    hand_speeds: dict[tuple[str, str], list[float]] = {}
    failures: list[str] = []
    started = time.perf_counter()

    def run_and_say(name: str, overrides: list[str], data: Path, rep: int) -> None:
        if mode == "gpu":
            torch.cuda.reset_peak_memory_stats()
        t0 = time.perf_counter()
        folder = name if rep == 0 else f"{name}/rep{rep}"
        try:
            r = run_case(folder, overrides, data)
        except BaseException as e:  # noqa: BLE001  (every case runs; the check fails at the end)
            if isinstance(e, KeyboardInterrupt):
                raise
            failures.append(f"{name}: {type(e).__name__}: {e}\n{traceback.format_exc()}")
            say(f"gpu_check.{name}: FAILED ({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})")
            if "synchroniz" not in str(e):
                return
            # a step that synchronises fails the check; its speed is still measured, without the check
            try:
                r = run_case(folder + "/unchecked", [*overrides, "perf.check_syncs=false"], data)
            except Exception as again:  # noqa: BLE001
                failures.append(f"{name} without perf.check_syncs: {type(again).__name__}: {again}")
                return
        if rep == 0:  # (a repeated fill computes nothing: the first is the one that timed the teacher)
            results[name] = r
        why = check(name if rep == 0 else f"{name}/again", r, backend="nccl" if mode == "gpu" else "gloo")
        if why is not None:
            failures.append(f"{name}: {why}")
        else:
            speeds.setdefault(name, []).append(per_run_images_per_s(r))
        extra = f"  (backend {process_group_backend()})" if name.startswith("ddp/") else ""
        memory = r.get("peak_gpu_memory_mib")
        say(
            f"gpu_check.{name}: images_per_s={per_run_images_per_s(r):.0f}  "
            f"teacher_forward_samples={r.get('teacher_forward_samples', 0)}  "
            f"peak_gpu_memory_mib={memory if memory is not None else '-'}  "
            f"wall_s={time.perf_counter() - t0:.1f}{extra}" + ("" if why is None else f"  FAILED: {why}")
        )

    with tempfile.TemporaryDirectory() as tmp_name:
        data = Path(tmp_name)
        write_data(mode, data)
        only = [s for s in a.only.split(",") if s]
        chosen = [(n, o) for n, o in cases(mode, data) if selected(n, only)]
        for rep in range(a.reps):  # the eager cifar cases and their hand loops again, interleaved
            for name, overrides in chosen:
                if rep == 0 or name in REPEATED:
                    run_and_say(name, overrides, data, rep)
            for p in ("16-mixed", "bf16-mixed"):
                for kind in HAND_KINDS:
                    if not selected(f"cifar/{p}/{kind}", only):
                        continue
                    try:
                        speed = hand_loop(kind, p, mode, data)
                    except Exception as e:  # noqa: BLE001  (the cases' results still print)
                        failures.append(
                            f"hand loop {p}/{kind}: {type(e).__name__}: {e}\n{traceback.format_exc()}"
                        )
                        continue
                    hand_speeds.setdefault((p, kind), []).append(speed)
                    say(f"gpu_check.hand/{p}/{kind}: images_per_s={speed:.0f}")
    hand = {k: statistics.median(v) for k, v in hand_speeds.items()}
    if a.reps > 1:
        for name, v in [*speeds.items(), *((f"hand/{p}/{k}", v) for (p, k), v in hand_speeds.items())]:
            if len(v) > 1:
                say(
                    f"gpu_check.{name}: images_per_s median {statistics.median(v):.0f} "
                    f"[{min(v):.0f}-{max(v):.0f}] over {len(v)} runs"
                )

    def speed(name: str) -> float:
        """A case's images/s: the median of its runs."""
        return statistics.median(speeds[name])

    for prefix in ("cifar/16-mixed", "cifar/bf16-mixed", "views"):
        names = {k: f"{prefix}/{k}" for k in ("student", "live", "fill", "stored")}
        if not all(n in speeds for n in names.values()):
            continue
        per = {k: 1 / speed(n) for k, n in names.items()}
        fill = results[names["fill"]]
        teacher = fill["teacher_precompute_seconds"] / max(1, fill["teacher_forward_samples"])
        say(
            f"gpu_check.{prefix}: stored/student={per['stored'] / per['student']:.3f}  "
            f"live/(student+teacher)={per['live'] / (per['student'] + teacher):.3f}  "
            f"live/student={per['live'] / per['student']:.3f}"
        )
    if all(n in speeds for n in ("views/stored", "views/stored+batched")):
        say(
            "gpu_check.views: stored+batched/stored="
            f"{speed('views/stored') / speed('views/stored+batched'):.3f} (time per image, the views made on "
            "the device in one roi_align against image by image in the loader)"
        )
    for p in ("16-mixed", "bf16-mixed"):
        names = {k: f"cifar/{p}/{k}" for k in HAND_KINDS}
        if not all(n in speeds for n in names.values()):
            continue
        ratios = {k: hand[(p, k)] / speed(n) for k, n in names.items() if (p, k) in hand}
        hand_line = "  ".join(f"{k}={hand[(p, k)]:.0f}" for k in HAND_KINDS if (p, k) in hand)
        say(
            f"gpu_check.cifar/{p}: framework/hand "
            + "  ".join(f"{k}={v:.3f}" for k, v in ratios.items())
            + f"  (hand loop images_per_s: {hand_line})"
        )
    for kind in ("student", "live", "fitnet"):
        graphed, eager = f"graphs/bf16-mixed/{kind}", f"cifar/bf16-mixed/{kind}"
        if graphed not in speeds or eager not in speeds:
            continue
        against = hand.get(("bf16-mixed", kind))
        say(
            f"gpu_check.graphs/bf16-mixed/{kind}: graphs/eager={speed(eager) / speed(graphed):.3f}"
            + (f"  framework/hand={against / speed(graphed):.3f}" if against else "")
            + " (time per image with CUDA graphs against the eager framework and the eager hand loop)"
        )
    say(f"gpu_check: {len(results)} cases in {time.perf_counter() - started:.0f} s, {len(failures)} failed")
    if failures:
        print("\n".join(["", "gpu-check FAILED:", *failures]), file=sys.stderr)
        raise SystemExit(1)


if __name__ == "__main__":
    main()
