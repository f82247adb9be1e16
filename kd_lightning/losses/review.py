"""AB and ReviewKD: two methods that read several stages at once, the teacher's before their last ReLU.

- `ab`, "Knowledge transfer via distillation of activation boundaries formed by hidden neurons" (Heo et
  al., AAAI 2019), as RepDistiller runs it. A connector per stage (identity where the student's map has
  the teacher's channels and height, else RepDistiller's ConvReg without its ReLU) maps the student's
  pre-activation map g_S onto the teacher's t; with margin m (1.0) the stage's loss is
      Σ (g_S + m)² · [g_S > −m and t ≤ 0] + (g_S − m)² · [g_S ≤ m and t > 0],
  summed over every element, weighted 2^(i − n + 1) for stage i of n (the deepest 1, each shallower half
  the next), divided by the batch size and scaled by 3/1000. RepDistiller trains it only in its init stage
  (connector and the student's layers but its classifier, 30 epochs) and adds no term afterwards: here the
  pre-stage (kd_lightning.engine.prestage, `only`), the term's weight scaling it. Taps [preact*] on both sides.
- `reviewkd`, "Distilling knowledge via knowledge review" (Chen et al., CVPR 2021), as mdistiller runs it.
  The student's stage maps (after their ReLU) and its globally pooled last map are fused from the deepest
  level up by attention-based fusion (ABF): at each level a 1×1 convolution + BN to `mid` channels
  (mid = min(512, channels of the pooled level)); below the deepest, the previous level's fused map is
  upsampled (nearest) to this level's size and the two are mixed by per-position weights from a 1×1
  convolution + sigmoid; then nearest resizing to the teacher's size and a 3×3 convolution + BN to the
  teacher's channels. The hierarchical context loss (HCL) compares each level with the teacher's
  pre-activation stage map (its pooled last map for the pooled level): the MSE, plus the MSE of both maps
  average-pooled to 4, 2 and 1 positions per side (those below the student's size), weighted 1/2, 1/4,
  1/8, divided by the sum of the weights; summed over levels. Weight 1, ramped in over `warmup` (20)
  epochs: factor min(e / 20, 1), e counted from 1 as mdistiller's trainer does. Taps: student
  [stage*, map], teacher [preact*, map].
Maps may be 2-D (B, C, H, W) or 1-D (B, C, L): the same layers in one dimension fewer.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from kd_lightning.errors import ConfigError, as_float, as_int
from kd_lightning.losses.adapters import ConvReg
from kd_lightning.losses.protocol import PreStage
from kd_lightning.losses.registry import register_loss
from kd_lightning.tensors import add_all


def _map_lists(
    name: str, student_shape: tuple, teacher_shape: tuple, taps: str
) -> tuple[list[tuple[int, ...]], list[tuple[int, ...]]]:
    """The student's and the teacher's lists of map shapes, one per level, both 1-D or both 2-D."""
    lists = [
        isinstance(x, tuple) and x and all(isinstance(y, tuple) and len(y) in (2, 3) for y in x)
        for x in (student_shape, teacher_shape)
    ]
    if not all(lists) or len(student_shape) != len(teacher_shape):
        raise ConfigError(
            f"{name} reads a list of feature maps on each side, as many for the student as for each teacher "
            f"({taps}), got student {student_shape} and teacher {teacher_shape}"
        )
    if len({len(s) for s in (*student_shape, *teacher_shape)}) > 1:
        raise ConfigError(
            f"{name} needs maps of one kind, all (C, H, W) or all (C, L); got student {student_shape} and "
            f"teacher {teacher_shape}"
        )
    return [tuple(s) for s in student_shape], [tuple(t) for t in teacher_shape]


@register_loss("ab")
class ActivationBoundaries(nn.Module):
    shape_free = True  # the connectors map the student's maps; no adapter

    def __init__(
        self, student_shape: tuple, teacher_shape: tuple, margin: float = 1.0, init_epochs: int = 30
    ):
        super().__init__()
        s_shapes, t_shapes = _map_lists(
            "ab", student_shape, teacher_shape, "student_tap: [preact*], teacher_tap: [preact*]"
        )
        self.margin = as_float("ab margin", margin, 0.0)
        self.init_epochs = as_int("ab init_epochs", init_epochs, 1)
        self.connectors = nn.ModuleList(
            nn.Identity() if s[:2] == t[:2] else ConvReg(s, t, relu=False)
            for s, t in zip(s_shapes, t_shapes, strict=True)
        )
        # trained in the pre-stage only (RepDistiller's connector is in its init list, not its trainable list)
        self.connectors.requires_grad_(False)
        n = len(s_shapes)
        self.stage_weights = [2.0 ** (i - n + 1) for i in range(n)]

    def boundary(self, g: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        m = self.margin
        g, t = g.float(), t.float()
        below = (g + m).pow(2) * ((g > -m) & (t <= 0))
        above = (g - m).pow(2) * ((g <= m) & (t > 0))
        return (below + above).sum()

    def forward(self, s: list[torch.Tensor], t: list[torch.Tensor]) -> torch.Tensor:
        losses = [
            w * self.boundary(c(g), target)
            for w, c, g, target in zip(self.stage_weights, self.connectors, s, t, strict=True)
        ]
        return add_all(losses) / len(s[0]) * 3 / 1000

    def pre_stage(self) -> PreStage:
        return PreStage(
            epochs=self.init_epochs, loss=self.forward, module=self.connectors, student=True, only=True
        )


class ABF(nn.Module):
    """One level of ReviewKD's attention-based fusion (see the module's docstring)."""

    def __init__(self, c_in: int, c_mid: int, c_out: int, fuse: bool, dims: int):
        super().__init__()
        conv, bn = (nn.Conv2d, nn.BatchNorm2d) if dims == 2 else (nn.Conv1d, nn.BatchNorm1d)
        first = conv(c_in, c_mid, 1, bias=False)
        self.conv1 = nn.Sequential(first, bn(c_mid))
        second = conv(c_mid, c_out, 3, 1, 1, bias=False)
        self.conv2 = nn.Sequential(second, bn(c_out))
        self.att_conv = nn.Sequential(conv(2 * c_mid, 2, 1), nn.Sigmoid()) if fuse else None
        nn.init.kaiming_uniform_(first.weight, a=1)
        nn.init.kaiming_uniform_(second.weight, a=1)

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None, out_size: tuple[int, ...]
    ) -> tuple[torch.Tensor, torch.Tensor]:
        x = self.conv1(x)
        if self.att_conv is not None:
            if residual is None:
                raise ValueError("a fusing ReviewKD block needs the residual of the block before it")
            residual = F.interpolate(residual, size=tuple(x.shape[2:]), mode="nearest")
            z = self.att_conv(torch.cat([x, residual], 1))
            x = x * z[:, :1] + residual * z[:, 1:]
        if tuple(x.shape[2:]) != tuple(out_size):
            x = F.interpolate(x, size=tuple(out_size), mode="nearest")
        return self.conv2(x), x


def _pooled(f: torch.Tensor) -> torch.Tensor:
    """The global average of a map, kept as a map of one position: (B, C, 1, 1) or (B, C, 1)."""
    return f.mean(tuple(range(2, f.dim())), keepdim=True)


def hcl(student: list[torch.Tensor], teacher: list[torch.Tensor]) -> torch.Tensor:
    """ReviewKD's hierarchical context loss (see the module's docstring)."""
    per_level = []
    for fs, ft in zip(student, teacher, strict=True):
        fs, ft = fs.float(), ft.float()
        pool = F.adaptive_avg_pool2d if fs.dim() == 4 else F.adaptive_avg_pool1d
        loss, cnt, tot = F.mse_loss(fs, ft), 1.0, 1.0
        for level in (4, 2, 1):
            if level >= fs.shape[2]:
                continue
            cnt /= 2.0
            loss = loss + F.mse_loss(pool(fs, level), pool(ft, level)) * cnt
            tot += cnt
        per_level.append(loss / tot)
    return add_all(per_level)


@register_loss("reviewkd")
class ReviewKD(nn.Module):
    shape_free = True  # the fusion maps the student's channels and sizes; no adapter

    def __init__(self, student_shape: tuple, teacher_shape: tuple, warmup: int = 20, max_mid: int = 512):
        super().__init__()
        s_shapes, t_shapes = _map_lists(
            "reviewkd",
            student_shape,
            teacher_shape,
            "student_tap: [stage*, map], teacher_tap: [preact*, map]",
        )
        if len(s_shapes) < 2:
            raise ConfigError(
                f"reviewkd reads the stage maps and the last map (student_tap: [stage*, map]), got {len(s_shapes)} map"
            )
        self.warmup = as_int("reviewkd warmup", warmup, 0)
        dims = len(s_shapes[0]) - 1
        # the levels: each stage's map, then the last map pooled to one position
        c_in = [s[0] for s in s_shapes]
        c_out = [t[0] for t in t_shapes]
        self.out_sizes = [t[1:] for t in t_shapes[:-1]] + [(1,) * dims]
        mid = min(as_int("reviewkd max_mid", max_mid, 1), c_in[-1])
        last = len(c_in) - 1
        self.abfs = nn.ModuleList(ABF(c_in[i], mid, c_out[i], i < last, dims) for i in range(len(c_in)))

    def fuse(self, s: list[torch.Tensor]) -> list[torch.Tensor]:
        """The student's fused maps, shallowest level first."""
        levels = [*s[:-1], _pooled(s[-1])]
        out, residual = self.abfs[-1](levels[-1], None, self.out_sizes[-1])
        results = [out]
        for i in range(len(levels) - 2, -1, -1):
            out, residual = self.abfs[i](levels[i], residual, self.out_sizes[i])
            results.insert(0, out)
        return results

    def forward(self, s: list[torch.Tensor], t: list[torch.Tensor], epoch: int = 0) -> torch.Tensor:
        ramp = 1.0 if self.warmup == 0 else min(float(epoch + 1) / self.warmup, 1.0)  # epoch is 0-based here
        return ramp * hcl(self.fuse(s), [*t[:-1], _pooled(t[-1])])
