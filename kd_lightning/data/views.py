"""Recorded random views for an image pipeline read from disk (`data.augment.views=K` with `train_transforms`).

FKD (Shen & Xing, ECCV 2022) and ReLabel (Yun et al., CVPR 2021) keep, per image, the random crop's box and
flip with the teacher's (top-K) outputs, and replay those crops when the student trains, so the teacher
never runs again. Here every training sample has K views. The random parameters of each view are recorded
once, when the data is set up: a fixed vector of uniform numbers per (sample, view) drawn from the split
seed (`draws`). When a view is made (for the teacher-output precompute, or in an epoch that shows it), each
random transform turns its share of those numbers into its own parameters, from the image's size: a
RandomResizedCrop's box (torchvision's sampling, its ten attempts and its fallback included), a crop's
offsets, a flip, ColorJitter's factors and order, ...; torchvision's functional ops then apply exactly
those parameters (`ViewPipeline.params` lists them). So a view is the same pixels wherever it is made: the
student sees what the teacher saw.

A random transform whose parameters are not recorded here (rotations, affine and perspective warps,
blurs with a random sigma, the policy augmentations) is refused with views, naming it; deterministic
transforms (Resize, CenterCrop, Pad, ...) run as they are.

`data.augment.replay=batched` makes the ImageNet recipe's views (RandomResizedCrop, then an optional
RandomHorizontalFlip) on the training device instead: the loader's workers only decode the images and work
out each view's box and flip from its recorded numbers (`ViewPipeline.crop`), and `replay_crops` crops,
resizes and flips the whole batch in one `torchvision.ops.roi_align`, as FFCV and DALI move this work off the
per-image path. Its pixels differ slightly from torchvision's resize (roi_align averages bilinear samples
where torchvision filters with antialiasing), so the replay is part of the stores' key; the precompute and
the training steps make each view the same way, so the student still sees what the teacher saw.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, TypeAlias

import torch

from kd_lightning.errors import ConfigError

if TYPE_CHECKING:
    from PIL.Image import Image

# what a transform step takes and gives: a PIL image or a (C, H, W) tensor
ImageLike: TypeAlias = "Image | torch.Tensor"
Step: TypeAlias = Callable[[ImageLike], ImageLike]  # a torchvision transform
# one random step's recorded parameters: its name, its numbers, and for ColorJitter the order of its ops
Params: TypeAlias = dict[str, str | int | float | bool | list[str]]

# random transforms applied with a probability p, by one functional op (one draw: apply when draw < p)
_WITH_P = {
    "RandomHorizontalFlip": "horizontal_flip",
    "RandomVerticalFlip": "vertical_flip",
    "RandomInvert": "invert",
    "RandomAutocontrast": "autocontrast",
    "RandomEqualize": "equalize",
    "RandomPosterize": "posterize",
    "RandomSolarize": "solarize",
    "RandomAdjustSharpness": "adjust_sharpness",
    "RandomGrayscale": "rgb_to_grayscale",
}
# how many uniform numbers each recorded transform takes from its view's draws
DRAWS = {"RandomResizedCrop": 22, "RandomCrop": 2, "ColorJitter": 5, **dict.fromkeys(_WITH_P, 1)}
DETERMINISTIC = ("Resize", "CenterCrop", "Pad", "Grayscale", "Normalize", "ToTensor")
_ORDERS = list(itertools.permutations(range(4)))  # ColorJitter's order of its four adjustments


def resized_crop_box(
    height: int, width: int, scale: Sequence[float], ratio: Sequence[float], u: Sequence[float]
):
    """RandomResizedCrop's box (top, left, h, w) for an image of height × width from 22 uniform numbers: ten
    attempts of (area, log-aspect), each kept if the box fits, then two for its position; torchvision's
    central-crop fallback when no attempt fits (torchvision.transforms.v2.RandomResizedCrop.make_params)."""
    area = height * width
    lo, hi = math.log(ratio[0]), math.log(ratio[1])
    for a in range(10):
        target = area * (scale[0] + float(u[2 * a]) * (scale[1] - scale[0]))
        aspect = math.exp(lo + float(u[2 * a + 1]) * (hi - lo))
        w = int(round(math.sqrt(target * aspect)))
        h = int(round(math.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(float(u[20]) * (height - h + 1)), int(float(u[21]) * (width - w + 1)), h, w
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _size(img: ImageLike) -> tuple[int, int]:
    from torchvision.transforms.v2 import functional as F

    h, w = F.get_size(img)
    return int(h), int(w)


class ViewPipeline:
    """The training transforms, applied with recorded parameters: `pipeline(img, draws)`."""

    def __init__(self, steps: Sequence[Step], where: str = "data.train_transforms"):
        self.steps = list(steps)
        self.offsets: list[int] = []
        total = 0
        for i, step in enumerate(self.steps):
            name = type(step).__name__
            if name not in DRAWS and name not in DETERMINISTIC:
                raise ConfigError(
                    f"{where}[{i}] ({name}) draws random parameters that data.augment.views cannot record; with "
                    f"recorded views use {', '.join(sorted(DRAWS))} (and {', '.join(DETERMINISTIC)}), or drop "
                    "data.augment.views (then the teachers run live on every batch)"
                )
            self.offsets.append(total)
            total += DRAWS.get(name, 0)
        self.draws_per_view = total

    def batched_size(self, where: str = "data.train_transforms") -> tuple[int, int]:
        """The views' size when `replay_crops` can make them on a batch (data.augment.replay=batched): the
        pipeline is a bilinear RandomResizedCrop, then at most a RandomHorizontalFlip."""
        from torchvision.transforms import InterpolationMode

        names = [type(step).__name__ for step in self.steps]
        if names not in (["RandomResizedCrop"], ["RandomResizedCrop", "RandomHorizontalFlip"]):
            raise ConfigError(
                f"data.augment.replay=batched crops, resizes and flips a batch in one op: {where} must be a "
                f"RandomResizedCrop, then at most a RandomHorizontalFlip; it is {names}. Set "
                "data.augment.replay=per_sample to replay these transforms image by image"
            )
        cfg = vars(self.steps[0])
        if cfg["interpolation"] not in (InterpolationMode.BILINEAR, "bilinear"):
            raise ConfigError(
                f"data.augment.replay=batched resizes bilinearly; {where}[0] (RandomResizedCrop) asks for "
                f"{cfg['interpolation']}: drop its interpolation or set data.augment.replay=per_sample"
            )
        out_h, out_w = cfg["size"]
        return int(out_h), int(out_w)

    def crop(self, size: tuple[int, int], draws: torch.Tensor) -> tuple[int, int, int, int, int]:
        """(top, left, height, width, flip) of the view `draws` records, for an image of `size` (h, w): what
        `replay_crops` applies (the pipeline is the one `batched_size` accepts)."""
        params = self.params(size, draws)
        flip = len(params) > 1 and params[1]["applied"] is True
        top, left, height, width = (params[0][k] for k in ("top", "left", "height", "width"))
        assert (
            isinstance(top, int)
            and isinstance(left, int)
            and isinstance(height, int)
            and isinstance(width, int)
        )
        return top, left, height, width, int(flip)

    def params(self, size: tuple[int, int], draws: torch.Tensor) -> list[Params]:
        """Each random step's parameters for an image of `size` (h, w) at the start of the pipeline."""
        out: list[Params] = []
        self._run(None, size, draws, out)
        return out

    def __call__(self, img: ImageLike, draws: torch.Tensor) -> ImageLike:
        out = self._run(img, _size(img), draws, None)
        assert out is not None  # an image in, an image out
        return out

    def _run(
        self, img: ImageLike | None, size: tuple[int, int], draws: torch.Tensor, record: list[Params] | None
    ) -> ImageLike | None:
        """The pipeline on `img` with the parameters `draws` gives each random step (sizes only when `img` is
        None), each random step's parameters appended to `record`."""
        u = [float(x) for x in draws]
        h, w = size
        for step, at in zip(self.steps, self.offsets, strict=True):
            name = type(step).__name__
            if name in DETERMINISTIC:
                if img is None:  # sizes only: run the step on a blank image of this size
                    img = torch.zeros(3, h, w, dtype=torch.uint8)
                img = step(img)
                h, w = _size(img)
                continue
            p: Params = {"transform": name}
            replay = _REPLAYS.get(name, _with_probability)
            img, (h, w) = replay(step, img, (h, w), u[at:], p)
            if record is not None:
                record.append(p)
        return img


# A replay reads a step's settings (a torchvision transform, v2 or v1 of the same name) with `vars(step)`:
# the attributes both versions set in __init__.
Replayed = tuple[
    "ImageLike | None", tuple[int, int]
]  # the image (None: sizes only) and its size after the step
Replay = Callable[[Step, "ImageLike | None", tuple[int, int], list[float], Params], Replayed]


def _resized_crop(
    step: Step, img: ImageLike | None, hw: tuple[int, int], u: list[float], p: Params
) -> Replayed:
    from torchvision.transforms.v2 import functional as F

    cfg = vars(step)
    top, left, bh, bw = resized_crop_box(*hw, cfg["scale"], cfg["ratio"], u[:22])
    p.update(top=top, left=left, height=bh, width=bw)
    out_h, out_w = cfg["size"]
    if img is not None:
        img = F.resized_crop(
            img,
            top,
            left,
            bh,
            bw,
            [out_h, out_w],
            interpolation=cfg["interpolation"],
            antialias=cfg["antialias"],
        )
    return img, (out_h, out_w)


def _random_crop(
    step: Step, img: ImageLike | None, hw: tuple[int, int], u: list[float], p: Params
) -> Replayed:
    from torchvision.transforms.v2 import functional as F

    cfg = vars(step)
    if img is None:
        img = torch.zeros(3, *hw, dtype=torch.uint8)
    if cfg["padding"] is not None:
        img = F.pad(img, cfg["padding"], fill=cfg["fill"], padding_mode=cfg["padding_mode"])
    ch, cw = cfg["size"]
    ih, iw = _size(img)
    if cfg["pad_if_needed"] and (ih < ch or iw < cw):
        pad = [max(0, cw - iw), max(0, ch - ih)]
        img = F.pad(img, pad, fill=cfg["fill"], padding_mode=cfg["padding_mode"])
        ih, iw = _size(img)
    top, left = int(u[0] * (ih - ch + 1)), int(u[1] * (iw - cw + 1))
    p.update(top=top, left=left, height=ch, width=cw)
    return F.crop(img, top, left, ch, cw), (ch, cw)


JITTER = ("brightness", "contrast", "saturation", "hue")


def _color_jitter(
    step: Step, img: ImageLike | None, hw: tuple[int, int], u: list[float], p: Params
) -> Replayed:
    from torchvision.transforms.v2 import functional as F

    order = _ORDERS[min(int(u[4] * 24), 23)]
    factors = {}
    for j, key in enumerate(JITTER):
        bounds = getattr(step, key)
        if bounds is not None:
            factors[key] = bounds[0] + u[j] * (bounds[1] - bounds[0])
    p.update(order=[JITTER[j] for j in order], **factors)
    if img is not None:
        ops: dict[str, Callable] = {
            "brightness": F.adjust_brightness, "contrast": F.adjust_contrast,
            "saturation": F.adjust_saturation, "hue": F.adjust_hue,
        }  # fmt: skip
        for j in order:
            if JITTER[j] in factors:
                img = ops[JITTER[j]](img, factors[JITTER[j]])
    return img, hw


def _with_probability(
    step: Step, img: ImageLike | None, hw: tuple[int, int], u: list[float], p: Params
) -> Replayed:
    """A transform applied with probability `step.p`."""
    from torchvision.transforms.v2 import functional as F

    name, cfg = type(step).__name__, vars(step)
    apply = u[0] < cfg["p"]
    p.update(applied=bool(apply))
    if not apply or img is None:
        return img, hw
    op = getattr(F, _WITH_P[name])
    if name == "RandomPosterize":
        return op(img, cfg["bits"]), hw
    if name == "RandomSolarize":
        return op(img, cfg["threshold"]), hw
    if name == "RandomAdjustSharpness":
        return op(img, cfg["sharpness_factor"]), hw
    if name == "RandomGrayscale":
        return op(img, num_output_channels=F.get_num_channels(img)), hw
    return op(img), hw


_REPLAYS: dict[str, Replay] = {
    "RandomResizedCrop": _resized_crop, "RandomCrop": _random_crop, "ColorJitter": _color_jitter,
}  # fmt: skip


def replay_crops(x: torch.Tensor, crop: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Each image of the float batch `x` (N, C, H, W; images padded as kd_lightning.data.batch.stack_padded
    pads them) cropped to its box in `crop` (N, 5: top, left, height, width, flip), resized to `size` and
    flipped where its flip is 1, in one roi_align and one select on x's device: no per-image work. Each output
    pixel averages ceil(box / size) × ceil(box / size) bilinear samples of its bin (sampling_ratio=-1), which
    filters a downscale as an antialiased resize does."""
    from torchvision.ops import roi_align

    crop = crop.to(x.device)
    top, left, height, width, flip = crop.unbind(1)
    batch = torch.arange(len(x), device=x.device)
    boxes = torch.stack([batch, left, top, left + width, top + height], 1).to(x.dtype)
    out = roi_align(x, boxes, list(size), spatial_scale=1.0, sampling_ratio=-1, aligned=True)
    return torch.where(flip.bool()[:, None, None, None], out.flip(3), out)


def draw_views(n: int, views: int, per_view: int, seed: int) -> torch.Tensor:
    """(n, views, per_view) uniform numbers in [0, 1): every (sample, view)'s recorded parameters, from a seed
    of their own (the split seed's), so that every run, rank and job records the same views."""
    gen = torch.Generator().manual_seed(seed * 7919 + 2)
    return torch.rand(n, views, max(1, per_view), generator=gen)
