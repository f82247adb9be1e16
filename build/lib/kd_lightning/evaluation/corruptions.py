"""Input degradations at five severities, for images (N, C, H, W) and 1-D signals (N, C, L).

Applied to the data as loaded (before normalisation); noise is scaled by the training data's standard
deviation, so one severity means the same thing on any dataset. Severity 0 is the clean input.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F

from kd_lightning.errors import ConfigError, choices

# severity 1..5 → parameter
NOISE_STD = (0.1, 0.2, 0.35, 0.5, 0.75)  # × the data's standard deviation
BLUR_SIGMA = (0.5, 0.75, 1.0, 1.5, 2.0)  # in pixels / signal positions
CONTRAST = (0.75, 0.5, 0.35, 0.25, 0.15)  # kept fraction of each sample's deviation from its mean
DROPOUT = (0.05, 0.1, 0.2, 0.3, 0.5)  # fraction of positions set to zero


def _gaussian_noise(x: torch.Tensor, level: int, scale: float, gen: torch.Generator) -> torch.Tensor:
    return x + torch.randn(x.shape, generator=gen) * NOISE_STD[level - 1] * scale


def _blur(x: torch.Tensor, level: int, scale: float, gen: torch.Generator) -> torch.Tensor:
    sigma = BLUR_SIGMA[level - 1]
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    c = x.shape[1]
    if x.dim() == 3:
        return F.conv1d(
            F.pad(x, (radius, radius), mode="replicate"), k.view(1, 1, -1).repeat(c, 1, 1), groups=c
        )
    x = F.pad(x, (radius, radius, radius, radius), mode="replicate")
    x = F.conv2d(x, k.view(1, 1, 1, -1).repeat(c, 1, 1, 1), groups=c)
    return F.conv2d(x, k.view(1, 1, -1, 1).repeat(c, 1, 1, 1), groups=c)


def _contrast(x: torch.Tensor, level: int, scale: float, gen: torch.Generator) -> torch.Tensor:
    mean = x.flatten(1).mean(1).view(-1, *[1] * (x.dim() - 1))
    return mean + (x - mean) * CONTRAST[level - 1]


def _pixel_dropout(x: torch.Tensor, level: int, scale: float, gen: torch.Generator) -> torch.Tensor:
    keep = torch.rand((x.shape[0], 1, *x.shape[2:]), generator=gen) >= DROPOUT[level - 1]
    return x * keep


CORRUPTIONS: dict[str, Callable[..., torch.Tensor]] = {
    "gaussian_noise": _gaussian_noise,
    "blur": _blur,
    "contrast": _contrast,
    "pixel_dropout": _pixel_dropout,
}
MAX_SEVERITY = 5


def check_corruptions(names: list[str] | tuple[str, ...], severities: list[int] | tuple[int, ...]) -> None:
    for n in names:
        if n not in CORRUPTIONS:
            raise ConfigError(f"unknown corruption {n!r}; valid: {choices(CORRUPTIONS)}")
    for s in severities:
        if isinstance(s, bool) or not isinstance(s, int) or not 0 <= s <= MAX_SEVERITY:
            raise ConfigError(f"corruption severities must be integers in 0..{MAX_SEVERITY}, got {s!r}")


def corrupt(x: torch.Tensor, name: str, severity: int, scale: float = 1.0, seed: int = 0) -> torch.Tensor:
    """`x` degraded by `name` at `severity` (0: unchanged); `scale` is the data's std (for the noise)."""
    check_corruptions([name], [severity])
    if x.dim() not in (3, 4):
        raise ConfigError(
            f"corruptions need signals (N, C, L) or images (N, C, H, W), got a batch of shape {tuple(x.shape)}"
        )
    if severity == 0:
        return x
    gen = torch.Generator().manual_seed(seed * 1009 + severity)
    return CORRUPTIONS[name](x.float(), severity, scale, gen)
