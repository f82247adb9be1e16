"""RepDistiller's CIFAR zoo: every network has the reference's parameters, name for name and shape for shape.

tests/data/repdistiller_zoo.json holds, per model, what RepDistiller's own model code (commit b84f547,
`models/__init__.py`'s model_dict, num_classes=100) gives: the parameter count, the number of state_dict
tensors and a SHA-256 of the sorted `name:[shape]` lines. Loading the reference's weights into these
models was also checked to give the same logits (relative difference ≤ 3e-7, eval and train mode).
"""

import hashlib
import json
from pathlib import Path

import pytest
import torch

from kd_lightning.config.specs import TermSpec
from kd_lightning.errors import ConfigError
from kd_lightning.models import create_model, load_weights

REFERENCE = json.loads((Path(__file__).parent / "data" / "repdistiller_zoo.json").read_text())


def _signature(model: torch.nn.Module) -> str:
    lines = sorted((k, list(v.shape)) for k, v in model.state_dict().items())
    return hashlib.sha256("\n".join(f"{k}:{s}" for k, s in lines).encode()).hexdigest()


@pytest.mark.parametrize("name", sorted(REFERENCE))
def test_zoo_model_has_repdistillers_parameters(name):
    model = create_model({"name": name}, 100, (3, 32, 32))
    ref = REFERENCE[name]
    assert sum(p.numel() for p in model.parameters()) == ref["params"]
    assert len(model.state_dict()) == ref["tensors"]
    assert _signature(model) == ref["sha256"]
    assert model(torch.randn(2, 3, 32, 32)).shape == (2, 100)


def test_the_whole_crd_zoo_is_registered():
    assert len(REFERENCE) == 22


def test_released_teacher_file_gives_the_same_logits(tmp_path: Path):
    """A {'epoch', 'model', 'best_acc', 'optimizer'} file, and a DataParallel one ('module.' keys)."""
    torch.manual_seed(0)
    teacher = create_model({"name": "wrn_16_1"}, 100, (3, 32, 32)).eval()
    for m in teacher.modules():  # non-trivial running statistics, so eval mode is tested
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2)
    released = {"epoch": 240, "model": teacher.state_dict(), "best_acc": torch.tensor(75.6), "optimizer": {}}
    torch.save(released, tmp_path / "wrn_16_1_best.pth")
    torch.save({"module." + k: v for k, v in teacher.state_dict().items()}, tmp_path / "dp.pth")
    x = torch.randn(3, 3, 32, 32)
    for file in ("wrn_16_1_best.pth", "dp.pth"):
        again = create_model({"name": "wrn_16_1", "checkpoint": str(tmp_path / file)}, 100, (3, 32, 32))
        torch.testing.assert_close(again.eval()(x), teacher(x), rtol=0, atol=0)


def test_wrong_zoo_file_names_both_architectures(tmp_path: Path):
    torch.save(
        {"model": create_model({"name": "resnet8"}, 100, (3, 32, 32)).state_dict()}, tmp_path / "r8.pth"
    )
    with pytest.raises(ConfigError, match=r"r8.pth does not fit CifarResNet.*missing keys"):
        load_weights(create_model({"name": "resnet14"}, 100, (3, 32, 32)), tmp_path / "r8.pth")


def test_torchvision_source_reaches_torchvisions_model_of_the_same_name():
    ours = create_model({"name": "vgg11"}, 10, (3, 32, 32))
    theirs = create_model({"name": "vgg11", "source": "torchvision"}, 10, (3, 32, 32))
    assert type(ours).__module__ == "kd_lightning.models.cifar"
    assert type(theirs).__module__.startswith("torchvision.models")
    with pytest.raises(ConfigError, match=r"source must be one of auto, torchvision, got 'timm'"):
        create_model({"name": "vgg11", "source": "timm"}, 10, (3, 32, 32))
    with pytest.raises(
        ConfigError, match="'resnet8x4' .source: torchvision. is not a torchvision classifier"
    ):
        create_model({"name": "resnet8x4", "source": "torchvision"}, 10, (3, 32, 32))


def test_stage_taps_are_repdistillers_feature_layers_and_expand_multi_layer_terms():
    from types import SimpleNamespace

    from kd_lightning.core.stage_terms import expand_stage_terms
    from kd_lightning.models.taps import FeatureTaps

    x = torch.randn(2, 3, 32, 32)
    resnet = create_model({"name": "resnet8"}, 10, (3, 32, 32)).eval()
    feats = FeatureTaps(resnet, ["stage1", "stage2", "stage3"])(x)
    out = torch.relu(resnet.bn1(resnet.conv1(x)))
    for k, layer in enumerate((resnet.layer1, resnet.layer2, resnet.layer3), 1):
        out = layer(out)
        torch.testing.assert_close(feats[f"stage{k}"], out)
    vgg = create_model({"name": "vgg8"}, 10, (3, 32, 32)).eval()
    vgg_feats = FeatureTaps(vgg, ["stage1", "stage4"])(x)
    assert vgg_feats["stage1"].min() >= 0 and vgg_feats["stage1"].shape[-1] == 16  # after the block's ReLU
    cnn = create_model({"name": "cnn"}, 10, (3, 32, 32)).eval()  # its two conv blocks are its stages
    cnn_feats = FeatureTaps(cnn, ["stem", "stage1", "stage2", "map", "preact2"])(x)
    torch.testing.assert_close(cnn_feats["stage2"], cnn_feats["map"])  # the last stage is its last map
    torch.testing.assert_close(cnn_feats["stem"], x)  # the input of the first block
    torch.testing.assert_close(cnn_feats["stage2"], torch.relu(cnn_feats["preact2"]))
    assert cnn_feats["stage1"].shape == (2, 32, 32, 32)
    with pytest.raises(
        ConfigError, match=r"tap 'stage3'.*has 2 stage\(s\): stage1 = features.2, stage2 = features.6"
    ):
        FeatureTaps(cnn, ["stage3"])
    term = {"distance": "at", "weight": 1000.0, "student_tap": "stages", "teacher_tap": "stages"}
    teachers = SimpleNamespace(members={"t": vgg})  # 4 stages; the ResNet student has 3: zipped to 3
    expanded = expand_stage_terms({"terms": {"at": term, "kd": {"distance": "kl"}}}, resnet, teachers).terms
    assert list(expanded) == ["at1", "at2", "at3", "kd"]
    assert expanded["at2"] == TermSpec(**{**term, "student_tap": "stage2", "teacher_tap": "stage2"})
    with pytest.raises(ConfigError, match="student_tap and teacher_tap must both be 'stages'"):
        expand_stage_terms({"terms": {"at": {**term, "teacher_tap": "map"}}}, resnet, teachers)
