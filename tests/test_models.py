import pickle
from pathlib import Path

import pytest
import torch

from kd_lightning.errors import ConfigError
from kd_lightning.models import (
    create_model,
    list_models,
    load_model,
    load_pretrained,
    load_weights,
    save_model,
)

SHAPES = {"mlp": (1, 40), "wide2": (20,), "cnn": (1, 8, 8), "cnn1d": (1, 40)}


@pytest.mark.parametrize("name", list_models())
def test_every_registered_model_builds_and_classifies(name):
    shape = SHAPES.get(name, (3, 16, 16))
    model = create_model({"name": name}, 7, shape).eval()
    assert model(torch.randn(2, *shape)).shape == (2, 7)


def test_torchvision_model_by_name_with_small_stem_and_gray_input():
    model = create_model({"name": "resnet18", "small_input": True}, 5, (1, 32, 32))
    assert model.conv1.in_channels == 1 and model.conv1.stride == (1, 1)
    assert isinstance(model.maxpool, torch.nn.Identity)
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 5)


def test_unknown_model_and_option_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown model 'resnet9'.*resnet8"):
        create_model({"name": "resnet9"}, 10, (3, 32, 32))
    with pytest.raises(ConfigError, match=r"unknown option\(s\) \['hiden'\].*hidden"):
        create_model({"name": "mlp", "hiden": [3]}, 10, (4,))
    with pytest.raises(ConfigError, match="hidden entries must be an integer >= 1, got 0"):
        create_model({"name": "mlp", "hidden": [0]}, 10, (4,))
    with pytest.raises(ConfigError, match="needs image inputs"):
        create_model({"name": "cnn"}, 10, (1, 40))


def test_save_load_roundtrip_gives_same_predictions(tmp_path: Path):
    spec = {"name": "cnn", "channels": [4, 8]}
    model = create_model(spec, 3, (1, 8, 8)).eval()
    path = save_model(model, tmp_path / "m.pt", spec, 3, (1, 8, 8))
    again = load_model(path).eval()
    x = torch.randn(4, 1, 8, 8)
    torch.testing.assert_close(model(x), again(x))


def test_plain_state_dict_and_spec_checkpoint(tmp_path: Path):
    spec = {"name": "mlp", "hidden": [6]}
    model = create_model(spec, 3, (4,))
    torch.save(model.state_dict(), tmp_path / "sd.pt")
    other = create_model({**spec, "checkpoint": str(tmp_path / "sd.pt")}, 3, (4,))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


def test_released_checkpoint_wrapper_model_key_loads(tmp_path: Path):
    """RepDistiller and mdistiller release {'epoch', 'model': state_dict, 'best_acc', 'optimizer'}."""
    spec = {"name": "mlp", "hidden": [6]}
    model = create_model(spec, 3, (4,))
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    model(torch.randn(2, 4)).sum().backward()
    opt.step()
    released = {"epoch": 240, "model": model.state_dict(), "best_acc": 73.5, "optimizer": opt.state_dict()}
    torch.save(released, tmp_path / "ckpt_epoch_240.pth")
    other = create_model(spec, 3, (4,))
    load_weights(other, tmp_path / "ckpt_epoch_240.pth")
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), other.state_dict().values()))


def test_checkpoint_for_another_architecture_is_named(tmp_path: Path):
    spec = {"name": "mlp", "hidden": [6]}
    path = save_model(create_model(spec, 3, (4,)), tmp_path / "m.pt", spec, 3, (4,))
    with pytest.raises(ConfigError, match=r"does not fit.*made for arch \{'name': 'mlp', 'hidden': \[6\]"):
        load_weights(create_model({"name": "mlp", "hidden": [7, 7]}, 3, (4,)), path)


def test_not_a_checkpoint(tmp_path: Path):
    bad = tmp_path / "notes.pt"
    bad.write_text("hello")
    with pytest.raises(ConfigError, match="not a PyTorch checkpoint"):
        load_weights(create_model({"name": "mlp"}, 3, (4,)), bad)
    with pytest.raises(ConfigError, match="not found"):
        load_weights(create_model({"name": "mlp"}, 3, (4,)), tmp_path / "missing.pt")


class _Evil:
    def __reduce__(self):
        return (Path.touch, (Path(_Evil.target),))


def test_malicious_pickle_is_refused(tmp_path: Path):
    _Evil.target = str(tmp_path / "pwned")
    path = tmp_path / "evil.pt"
    torch.save({"state_dict": {}, "payload": _Evil()}, path)
    with pytest.raises(ConfigError, match="refused to load"):
        load_weights(create_model({"name": "mlp"}, 3, (4,)), path)
    assert not (tmp_path / "pwned").exists()
    with open(path, "rb"):
        pass
    with pytest.raises(ConfigError):
        load_model(path)
    assert not (tmp_path / "pwned").exists()
    assert pickle  # the payload above really is an executable pickle


def test_ntk_wide2_output_scale_does_not_grow_with_width_and_zero_output_starts_at_zero():
    torch.manual_seed(0)
    x = torch.randn(256, 20)
    stds = [
        float(create_model({"name": "wide2", "width": w, "parametrization": "ntk"}, 3, (20,))(x).std())
        for w in (64, 4096)
    ]
    assert 0.5 < stds[1] / stds[0] < 2.0  # NTK scaling: O(1) outputs at every width
    zero = create_model(
        {"name": "wide2", "width": 512, "parametrization": "ntk", "zero_output": True}, 3, (20,)
    )
    assert torch.count_nonzero(zero(x)) == 0
    loss = zero(x).square().sum() + (zero(x) - 1).square().mean()
    loss.backward()
    assert zero.fc.weight.grad.abs().sum() > 0  # it still learns
    with pytest.raises(ConfigError, match="parametrization"):
        create_model({"name": "wide2", "parametrization": "mup"}, 3, (20,))


def test_load_pretrained_keeps_the_body_and_reinitialises_a_head_of_another_size(tmp_path):
    source = create_model({"name": "cnn1d", "channels": [8, 8]}, 5, (1, 40))
    save_model(source, tmp_path / "src.pt", {"name": "cnn1d", "channels": [8, 8]}, 5, (1, 40))
    target = create_model(
        {"name": "cnn1d", "channels": [8, 8], "pretrained": str(tmp_path / "src.pt")}, 3, (1, 40)
    )
    for k, v in source.state_dict().items():
        if not k.startswith("fc."):
            torch.testing.assert_close(target.state_dict()[k], v)
    assert target.fc.out_features == 3
    same = create_model({"name": "cnn1d", "channels": [8, 8]}, 5, (1, 40))
    assert load_pretrained(same, tmp_path / "src.pt") == []  # same head size: everything loads
    torch.testing.assert_close(same.fc.weight, source.fc.weight)
    wider = create_model({"name": "cnn1d", "channels": [16, 8]}, 3, (1, 40))
    with pytest.raises(ConfigError, match="do not fit"):
        load_pretrained(wider, tmp_path / "src.pt")
    with pytest.raises(ConfigError, match="resolved by kd-train"):
        create_model({"name": "cnn1d", "pretrained": {"data": {}}}, 3, (1, 40))


def test_load_model_on_an_empty_or_edited_file_names_the_problem(tmp_path: Path):
    from kd_lightning.models import load_model

    empty = tmp_path / "student.pt"
    empty.write_bytes(b"")
    with pytest.raises(ConfigError, match=r"student\.pt is empty \(0 bytes\)"):
        load_model(empty)
    spec = {"name": "mlp", "hidden": [6]}
    path = save_model(create_model(spec, 3, (4,)), tmp_path / "m.pt", spec, 3, (4,))
    obj = torch.load(path, weights_only=True)
    obj["arch"]["hidden"] = [7]  # the file's architecture edited by hand
    torch.save(obj, path)
    with pytest.raises(ConfigError, match=r"do not fit the architecture it records .*shape mismatches"):
        load_model(path)


def test_pretrained_weights_that_cannot_be_downloaded_say_so_with_the_file_and_its_folder(
    monkeypatch, tmp_path
):
    """No network: torch hub's download raises a URLError (an OSError, which a full disk raises too)."""
    import urllib.error

    from kd_lightning.models.torchvision_adapter import torchvision_model

    def offline(*args, **kwargs):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    import torchvision.models._api as weights_api

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(weights_api, "load_state_dict_from_url", offline)  # torchvision's own reference
    with pytest.raises(ConfigError) as e:
        torchvision_model("resnet18", 10, (3, 32, 32), "IMAGENET1K_V1", True, {})
    said = str(e.value)
    assert "could not be downloaded from https://download.pytorch.org/models/resnet18-" in said
    assert "Temporary failure in name resolution" in said and "space" not in said
    assert f"put it in {tmp_path / 'torch' / 'hub' / 'checkpoints'}" in said
