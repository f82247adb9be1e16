"""torchvision classifiers as students and teachers: head resized to the class count, stem to the input.

`small_input: true` swaps a ResNet's 7×7/2 stem and max-pool for a 3×3/1 conv (32×32 images keep
their resolution, as CIFAR ResNets do); a first conv whose channel count differs from the data's is
rebuilt (pretrained filters averaged over RGB for one-channel inputs).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from kd_lightning.errors import ConfigError


def torchvision_names() -> list[str]:
    import torchvision

    return list(torchvision.models.list_models(module=torchvision.models))


def replace_module(model: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = model.get_submodule(parent_name) if parent_name else model
    setattr(parent, child, new)


def last_linear(model: nn.Module) -> tuple[str, nn.Linear]:
    """The classifier head: the last nn.Linear in module order."""
    linears = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ConfigError(f"{type(model).__name__} has no nn.Linear classifier head to resize")
    return linears[-1]


def pretrained(name: str, weights: str, kwargs: dict) -> nn.Module:
    """torchvision's model with its pretrained weights, downloaded once into torch hub's folder. A download
    that fails (no network: an OSError, as a full disk would be) says so, with the file and where it goes."""
    import urllib.error

    import torchvision

    try:
        return torchvision.models.get_model(name, weights=weights, **kwargs)
    except (urllib.error.URLError, ConnectionError, TimeoutError) as e:
        url = torchvision.models.get_model_weights(name)[weights.rsplit(".", 1)[-1]].url
        folder = Path(torch.hub.get_dir()) / "checkpoints"
        raise ConfigError(
            f"the pretrained weights {name} {weights} could not be downloaded from {url} "
            f"({getattr(e, 'reason', e)}): this machine has no network, or the site cannot be reached. Download "
            f"{url.rsplit('/', 1)[-1]} elsewhere and put it in {folder} (torch hub's folder: $TORCH_HOME/hub), "
            "then run again"
        ) from None


def torchvision_model(
    name: str,
    num_classes: int,
    input_shape: tuple[int, ...],
    weights: str | None,
    small_input: bool,
    kwargs: dict,
) -> nn.Module:
    import torchvision

    if weights:
        # Pretrained weights carry their own head size; replace the head afterwards.
        model = pretrained(name, weights, kwargs)
        head_name, head = last_linear(model)
        if head.out_features != num_classes:
            replace_module(model, head_name, nn.Linear(head.in_features, num_classes))
    else:
        model = torchvision.models.get_model(name, weights=None, num_classes=num_classes, **kwargs)
    convs = [(n, m) for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    if convs and len(input_shape) == 3:
        conv_name, conv = convs[0]
        cin = input_shape[0]
        stem_small = small_input and hasattr(model, "maxpool")
        if conv.in_channels != cin or stem_small:
            if stem_small:
                new = nn.Conv2d(cin, conv.out_channels, (3, 3), 1, 1, bias=conv.bias is not None)
            else:
                k, s = conv.kernel_size, conv.stride
                p = conv.padding if isinstance(conv.padding, str) else (conv.padding[0], conv.padding[1])
                new = nn.Conv2d(
                    cin, conv.out_channels, (k[0], k[1]), (s[0], s[1]), p, bias=conv.bias is not None
                )
            if weights and not stem_small:
                with torch.no_grad():  # keep pretrained filters: average over the RGB channels
                    new.weight.copy_(conv.weight.mean(1, keepdim=True).expand_as(new.weight))
            replace_module(model, conv_name, new)
        if stem_small:
            model.maxpool = nn.Identity()
    if small_input and not hasattr(model, "maxpool"):
        raise ConfigError(
            f"small_input=true is supported for ResNet-style torchvision models only, not {name!r}"
        )
    if isinstance(model, torchvision.models.ResNet):
        # layer1..layer4 are the stages (mdistiller's ImageNet features); a stage's pre-activation is the
        # input of its last block's ReLU at that block's last call (the sum before the final ReLU)
        model.stage_taps = ("layer1", "layer2", "layer3", "layer4")
        model.preact_taps = tuple(
            f"layer{i}.{len(getattr(model, f'layer{i}')) - 1}.relu:input" for i in range(1, 5)
        )
    return model
