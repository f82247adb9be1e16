import pytest
import torch
from torch import nn

from kd_lightning.errors import ConfigError
from kd_lightning.models import create_model
from kd_lightning.models.taps import FeatureTaps, resolve_tap


def net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 6), nn.ReLU(), nn.Linear(6, 3))


def test_tap_returns_module_output_and_input():
    model = net()
    x = torch.randn(5, 4)
    feats = FeatureTaps(model, {"hidden": "1", "head_in": "2:input"})(x)
    expected_hidden = torch.relu(model[0](x))
    torch.testing.assert_close(feats["hidden"], expected_hidden)
    torch.testing.assert_close(feats["head_in"], expected_hidden)
    torch.testing.assert_close(feats["logits"], model(x))


def test_embed_is_input_of_last_linear_for_any_classifier():
    model = create_model({"name": "resnet8"}, 10, (3, 16, 16))
    assert resolve_tap(model, "embed") == "fc:input"
    feats = FeatureTaps(model, ["embed", "layer2"])(torch.randn(2, 3, 16, 16))
    assert feats["embed"].shape == (2, 64)
    assert feats["layer2"].shape == (2, 32, 8, 8)
    torch.testing.assert_close(model.fc(feats["embed"]), feats["logits"])


def test_aliases_map_roles_to_modules():
    model = net()
    taps = FeatureTaps(model, ["feat"], aliases={"feat": "1"})
    assert taps.specs == {"feat": "1"}


def test_unknown_tap_lists_valid_names():
    with pytest.raises(ConfigError) as e:
        FeatureTaps(net(), ["layer9"], owner="student")
    msg = str(e.value)
    assert "layer9" in msg and "student" in msg
    for name in ("0", "1", "2", "embed", "logits"):
        assert name in msg


def test_hooks_removed_and_store_cleared_between_calls():
    model = net()
    taps = FeatureTaps(model, ["1"])
    taps(torch.randn(2, 4))
    assert taps._store == {}
    taps.remove()
    assert not model[1]._forward_hooks
