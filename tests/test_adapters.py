import pytest
import torch
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.losses.adapters import Adapter, make_adapter


def test_vector_adapter_is_linear_and_trainable():
    a = make_adapter((5,), (7,), "auto")
    assert isinstance(a, Adapter) and isinstance(a.proj, nn.Linear)
    y = a(torch.randn(3, 5))
    assert y.shape == (3, 7)
    y.sum().backward()
    assert a.proj.weight.grad is not None


def test_map_adapter_1x1_conv_and_resize():
    a = make_adapter((8, 4, 4), (16, 8, 8), "linear")
    assert a(torch.randn(2, 8, 4, 4)).shape == (2, 16, 8, 8)
    conv = a.proj[0]
    assert isinstance(conv, nn.Conv2d) and conv.kernel_size == (1, 1)


def test_map_to_vector_flattens():
    a = make_adapter((4, 2, 2), (10,), "auto")
    assert a(torch.randn(3, 4, 2, 2)).shape == (3, 10)


def test_auto_is_identity_for_equal_shapes_and_linear_forces_projection():
    assert isinstance(make_adapter((6,), (6,), "auto"), nn.Identity)
    assert isinstance(make_adapter((6,), (6,), "linear"), Adapter)


def test_none_with_different_shapes_is_an_error():
    with pytest.raises(ConfigError, match="adapter: none"):
        make_adapter((6,), (7,), "none")


def test_unknown_kind_lists_valid():
    with pytest.raises(ConfigError, match="auto, none, linear, mlp"):
        make_adapter((6,), (7,), "conv9")
