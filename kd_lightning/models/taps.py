"""Read intermediate features of any nn.Module by module name, with forward hooks (torchdistill-style).

A tap spec is one of:
- `logits` (or `output`): the model's output;
- `embed`: the input of the model's last nn.Linear, i.e. the penultimate embedding, for any classifier;
- `map`: the last feature map before global pooling (the input of the last adaptive/average pooling,
  or of the last nn.Flatten that follows other layers), for any CNN — what AT, NST and FitNet read;
- `<module name>`: that module's output, e.g. `layer3`, `features.7`;
- `<module name>:input`: that module's (first) input;
- `stage<k>`: the k-th stage's output of a model that declares its stages (`stage_taps`, the CIFAR zoo:
  layer1..3 of a CIFAR ResNet, ...); `stage1` of any other model is its `map`; `last_stage` the last. A term whose taps are
  `stages` becomes one term per stage (kd_lightning.core.stage_terms), as RepDistiller sums AT
  and NST over the stages. `stem`: the first stage's input (RepDistiller's feat[0] of its ResNets); a
  term whose taps are `all_stages` reads the list [stem, stage1, …, stageK] at once (FSP).
- `preact<k>`: the k-th stage's output before its last ReLU (RepDistiller's and mdistiller's `preact`
  features, which AB and ReviewKD read): the last `preact` module inside a CIFAR ResNet stage, the input of
  a VGG stage's ReLU, or what the model lists in `preact_taps` (WRN: the next batch norm, as RepDistiller;
  cnn, cnn1d: the last batch norm). In a list of taps, `stage*` and `preact*` stand for stage1 … stageK
  and preact1 … preactK, K the fewest stages among the student and the teachers
  (kd_lightning.core.stage_terms).
Aliases (a dict alias → spec, from the model's `taps` config) let terms name one role, say `embed`,
across teachers of different architectures.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Mapping

import torch
from torch import nn

from kd_lightning.errors import ConfigError, choices

OUTPUT = "logits"
_OUTPUT_NAMES = {"logits", "output"}


def _last_linear_name(model: nn.Module) -> str | None:
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    return names[-1] if names else None


_POOLS = (
    nn.AdaptiveAvgPool1d,
    nn.AdaptiveAvgPool2d,
    nn.AdaptiveMaxPool1d,
    nn.AdaptiveMaxPool2d,
    nn.AvgPool2d,
)


def _last_map_name(model: nn.Module) -> str | None:
    named = [(n, m) for n, m in model.named_modules() if n and not list(m.children())]
    pools = [n for n, m in named if isinstance(m, _POOLS)]
    if pools:
        return pools[-1]
    flats = [i for i, (_, m) in enumerate(named) if isinstance(m, nn.Flatten) and i > 0]
    return named[flats[-1]][0] if flats else None


def resolve_tap(
    model: nn.Module, tap: str, aliases: Mapping[str, str] | None = None, owner: str = "model"
) -> str:
    """Turn a tap name or alias into a concrete spec ('logits', 'name' or 'name:input'), or fail clearly."""
    spec = (aliases or {}).get(tap, tap)
    if spec == "last_stage":
        spec = stages(model)[-1]
    elif spec == "stem":
        if not getattr(model, "stage_taps", None):
            raise ConfigError(
                f"tap 'stem' (the input of the first stage) needs a model that declares its stages (stage_taps); "
                f"{owner} ({type(model).__name__}) does not: name a module with '<module>:input' instead"
            )
        spec = getattr(model, "stem_tap", None) or f"{stages(model)[0]}:input"
    elif STAGE.fullmatch(spec):
        spec = stage_tap(model, int(spec[len("stage") :]), owner)
    elif PREACT.fullmatch(spec):
        spec = preact_tap(model, int(spec[len("preact") :]), owner)
    if spec in _OUTPUT_NAMES:
        return OUTPUT
    if spec == "map":
        last = _last_map_name(model)
        if last is None:
            raise ConfigError(
                f"tap 'map' needs a CNN with a pooling or flatten layer after its convolutions in {owner}; "
                "name a module instead"
            )
        return f"{last}:input"
    if spec == "embed":
        last = _last_linear_name(model)
        if last is None:
            raise ConfigError(f"tap 'embed' needs an nn.Linear head in {owner}; name a module instead")
        return f"{last}:input"
    name, _, where = spec.partition(":")
    modules = dict(model.named_modules())
    if name not in modules or name == "" or where not in ("", "input", "output"):
        valid = ["logits", "embed", "map", *(aliases or {})] + [n for n in modules if n]
        raise ConfigError(
            f"unknown tap {tap!r} for {owner} ({type(model).__name__}); valid taps: {choices(valid, 60)}"
        )
    return name if where in ("", "output") else f"{name}:input"


STAGE = re.compile(r"stage[1-9][0-9]*")
PREACT = re.compile(r"preact[1-9][0-9]*")


def stages(model: nn.Module) -> tuple[str, ...]:
    """The modules whose outputs are the model's stage features (`stage_taps` of the CIFAR zoo models, the
    layers RepDistiller's multi-layer terms read); a model that declares none has one: its last map."""
    return tuple(getattr(model, "stage_taps", None) or ("map",))


def stage_tap(model: nn.Module, k: int, owner: str) -> str:
    names = stages(model)
    if k > len(names):
        raise ConfigError(
            f"tap 'stage{k}': {owner} ({type(model).__name__}) has {len(names)} stage(s): "
            + ", ".join(f"stage{i + 1} = {n}" for i, n in enumerate(names))
        )
    return names[k - 1]


def preact_tap(model: nn.Module, k: int, owner: str) -> str:
    """The spec of the k-th stage's pre-activation output (see the module's docstring)."""
    names = stages(model)
    if k > len(names):
        stage_tap(model, k, owner)  # raises, listing the stages
    declared = getattr(model, "preact_taps", None)
    if declared:
        return declared[k - 1]
    modules = dict(model.named_modules())
    stage = names[k - 1]
    inside = [n for n in modules if n.startswith(f"{stage}.") and n.rsplit(".", 1)[-1] == "preact"]
    if inside:
        return inside[-1]
    if isinstance(modules.get(stage), nn.ReLU):
        return f"{stage}:input"
    raise ConfigError(
        f"tap 'preact{k}': {owner} ({type(model).__name__}) declares no pre-activation features; the CIFAR "
        "ResNets, Wide ResNets, VGGs, cnn and cnn1d do (their `preact` modules or `preact_taps`)"
    )


class FeatureTaps:
    """Forward hooks that record the named features of one model during its forward pass.

    `taps` maps the key under which a feature is returned to its spec; call `taps(x)` to get
    `{key: tensor}` (the output is included under `logits` whether asked for or not).
    """

    def __init__(
        self,
        model: nn.Module,
        taps: Mapping[str, str] | Iterable[str],
        aliases: Mapping[str, str] | None = None,
        owner: str = "model",
    ):
        self.model = model
        pairs = list(taps.items()) if isinstance(taps, Mapping) else [(k, k) for k in taps]
        self.specs = {key: resolve_tap(model, spec, aliases, owner) for key, spec in pairs}
        self._store: dict[str, torch.Tensor] = {}
        self._handles = []
        by_module: dict[tuple[str, bool], list[str]] = {}
        for key, spec in self.specs.items():
            if spec == OUTPUT:
                continue
            name, _, where = spec.partition(":")
            by_module.setdefault((name, where == "input"), []).append(key)
        for (name, is_input), keys_ in by_module.items():
            module = model.get_submodule(name)
            if is_input:
                self._handles.append(module.register_forward_pre_hook(self._pre_hook(keys_)))
            else:
                self._handles.append(module.register_forward_hook(self._hook(keys_)))

    def _hook(self, keys: list[str]):
        def hook(_module: nn.Module, _inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> None:
            for k in keys:
                self._store[k] = output

        return hook

    def _pre_hook(self, keys: list[str]):
        def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> None:
            # an in-place module (torchvision's ReLU(inplace=True)) would overwrite the input it is given
            x = inputs[0].clone() if getattr(module, "inplace", False) else inputs[0]
            for k in keys:
                self._store[k] = x

        return hook

    def __call__(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        self._store = {}
        out = self.model(x)
        feats = self._store
        self._store = {}
        if getattr(self.model, "kd_cuda_graphs", False):  # copied out of the graph's memory (engine/build.py)
            feats = {k: v.clone() for k, v in feats.items()}
        feats[OUTPUT] = out
        return feats

    def collect(self, forward: Callable[[], torch.Tensor]) -> dict[str, torch.Tensor]:
        """The taps recorded while `forward()` runs the model some other way (with other weights through
        torch.func.functional_call, under vmap: kd_lightning.core.packed), and its output as `logits`."""
        self._store = {}
        out = forward()
        feats, self._store = self._store, {}
        feats[OUTPUT] = out
        return feats

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
