"""Multi-task networks for amalgamation (Ye et al. 2019): shared conv blocks, one linear head per task.

Tasks are functions of a dataset's class label (`TASKS`); model files hold plain tensors and
primitives and load with weights_only=True.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path

import torch
from torch import nn

from kd_lightning.errors import ConfigError, choices
from kd_lightning.files import save_torch_atomic
from kd_lightning.models.weights import safe_load
from kd_lightning.plain import Plain

TASKS: dict[str, tuple[int, Callable[[torch.Tensor], torch.Tensor]]] = {
    "digit": (10, lambda y: y),
    "parity": (2, lambda y: y % 2),
    "ge5": (2, lambda y: (y >= 5).long()),
    "mod3": (3, lambda y: y % 3),
}
FILE_FORMAT = "kd_lightning.multitask/1"


def task_labels(task: str, y: torch.Tensor) -> torch.Tensor:
    return TASKS[task][1](y)


def check_tasks(key: str, tasks: object) -> list[str]:
    if isinstance(tasks, str) or not isinstance(tasks, Sequence) or not tasks:
        raise ConfigError(f"{key} must be a non-empty list of tasks from {choices(TASKS)}, got {tasks!r}")
    bad = [t for t in tasks if t not in TASKS]
    if bad:
        raise ConfigError(f"{key} has unknown task(s) {bad}; valid: {choices(TASKS)}")
    if len(set(tasks)) != len(tasks):
        raise ConfigError(f"{key} repeats a task: {list(tasks)}")
    return [str(t) for t in tasks]


class MultiTaskNet(nn.Module):
    """Conv-BN-ReLU blocks (1-D or 2-D after the input), a flattened map, one linear head per task."""

    def __init__(
        self, input_shape: Sequence[int], tasks: Sequence[str], channels: Sequence[int], kernel_size: int = 5
    ):
        super().__init__()
        conv, bn = (nn.Conv1d, nn.BatchNorm1d) if len(input_shape) == 2 else (nn.Conv2d, nn.BatchNorm2d)
        if len(input_shape) not in (2, 3):
            raise ConfigError(
                f"amalgamation needs signals (C, L) or images (C, H, W), got {tuple(input_shape)}"
            )
        cin, blocks = int(input_shape[0]), []
        for c in channels:
            blocks.append(
                nn.Sequential(
                    conv(cin, c, kernel_size, stride=2, padding=kernel_size // 2, bias=False),
                    bn(c),
                    nn.ReLU(),
                )
            )
            cin = c
        self.blocks = nn.ModuleList(blocks)
        with torch.no_grad():
            dim = self.trunk(torch.zeros(2, *input_shape)).flatten(1).shape[1]
        self.heads = nn.ModuleDict({t: nn.Linear(dim, TASKS[t][0]) for t in tasks})
        self.spec = {
            "channels": [int(c) for c in channels],
            "kernel_size": int(kernel_size),
            "tasks": list(tasks),
        }

    def conv(self, k: int) -> nn.Conv1d | nn.Conv2d:
        """The convolution that opens block `k`."""
        conv = self.blocks[k][0]  # type: ignore[index]  # a ModuleList of Sequentials (built above)
        assert isinstance(conv, nn.Conv1d | nn.Conv2d)
        return conv

    def trunk(self, x: torch.Tensor, upto: int | None = None) -> torch.Tensor:
        for block in self.blocks[: len(self.blocks) if upto is None else upto]:
            x = block(x)
        return x

    def block_outputs(self, x: torch.Tensor) -> list[torch.Tensor]:
        outs = []
        for block in self.blocks:
            x = block(x)
            outs.append(x)
        return outs

    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        z = self.trunk(x).flatten(1)
        return {t: head(z) for t, head in self.heads.items()}


def save_multitask(
    model: MultiTaskNet, path: Path, input_shape: Sequence[int], meta: Mapping[str, Plain]
) -> Path:
    payload = {
        "format": FILE_FORMAT,
        "spec": model.spec,
        "input_shape": [int(s) for s in input_shape],
        "state_dict": {k: v.detach().cpu().clone() for k, v in model.state_dict().items()},
        "meta": dict(meta),
    }
    return save_torch_atomic(path, payload)


def load_multitask(path: str | Path) -> MultiTaskNet:
    obj = safe_load(path)  # weights_only=True
    if not (isinstance(obj, Mapping) and obj.get("format") == FILE_FORMAT):
        raise ConfigError(f"{path} is not a kd_lightning multi-task model file ({FILE_FORMAT})")
    spec = obj["spec"]
    model = MultiTaskNet(obj["input_shape"], spec["tasks"], spec["channels"], spec["kernel_size"])
    model.load_state_dict(obj["state_dict"], strict=True)
    return model
