"""Metrics beyond accuracy and input degradations (kd_lightning/evaluation), and the kd-eval command."""

import json

import pytest
import torch
from sklearn.metrics import f1_score

from kd_lightning.errors import ConfigError
from kd_lightning.evaluation import (
    CORRUPTIONS,
    classification_metrics,
    corrupt,
    expected_calibration_error,
    macro_f1,
)
from kd_lightning.evaluation.corruptions import CONTRAST, DROPOUT, NOISE_STD
from kd_lightning.evaluation.robustness import robustness_summary
from kd_lightning.evaluation.run_eval import check_eval_cfg
from kd_lightning.runners.run import run

from .conftest import run_cli


def test_macro_f1_matches_scikit_learn():
    g = torch.Generator().manual_seed(0)
    y = torch.randint(0, 4, (300,), generator=g)
    pred = torch.where(torch.rand(300, generator=g) < 0.7, y, torch.randint(0, 4, (300,), generator=g))
    assert macro_f1(pred, y, 4) == pytest.approx(f1_score(y.numpy(), pred.numpy(), average="macro"))


def test_ece_by_hand_on_two_bins():
    # confidences 0.9 (two samples, one right) and 0.6 (two samples, both right): ECE = ½·|0.5−0.9| + ½·|1−0.6|
    probs = torch.tensor([[0.9, 0.1], [0.9, 0.1], [0.6, 0.4], [0.4, 0.6]])
    y = torch.tensor([0, 1, 0, 1])
    assert expected_calibration_error(probs, y, bins=10) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    perfect = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    assert expected_calibration_error(perfect, torch.tensor([0, 1])) == pytest.approx(0.0)
    m = classification_metrics(torch.log(probs), y)
    assert m["acc"] == pytest.approx(0.75) and m["ece"] == pytest.approx(0.4)


@pytest.mark.parametrize("shape", [(64, 1, 40), (16, 3, 12, 12)])
def test_corruptions_do_what_their_names_say(shape):
    x = torch.randn(shape)
    for name in CORRUPTIONS:
        assert torch.equal(corrupt(x, name, 0), x)  # severity 0 is the clean input
        assert corrupt(x, name, 3).shape == x.shape
    noise = corrupt(x, "gaussian_noise", 4, scale=2.0) - x
    assert float(noise.std()) == pytest.approx(NOISE_STD[3] * 2.0, rel=0.1)
    flat = torch.full(shape, 0.3)
    torch.testing.assert_close(corrupt(flat, "blur", 5), flat)  # blur keeps a constant input
    assert float(corrupt(x, "blur", 5).std()) < float(x.std())  # and smooths the rest
    dev = lambda v: v - v.flatten(1).mean(1).view(-1, *[1] * (v.dim() - 1))  # noqa: E731
    torch.testing.assert_close(dev(corrupt(x, "contrast", 2)), dev(x) * CONTRAST[1])
    dropped = corrupt(torch.ones(shape), "pixel_dropout", 5)
    assert float((dropped == 0).float().mean()) == pytest.approx(DROPOUT[4], abs=0.06)
    assert torch.equal(corrupt(x, "gaussian_noise", 2, seed=1), corrupt(x, "gaussian_noise", 2, seed=1))


def test_bad_corruption_settings_are_named():
    with pytest.raises(ConfigError, match="unknown corruption 'fog'"):
        check_eval_cfg({"corruptions": ["fog"], "severities": [1]}, (1, 40))
    with pytest.raises(ConfigError, match="severities"):
        check_eval_cfg({"corruptions": ["blur"], "severities": [9]}, (1, 40))
    with pytest.raises(ConfigError, match="signals .* or images"):
        check_eval_cfg({"corruptions": ["blur"], "severities": [1]}, (20,))
    with pytest.raises(ConfigError, match="unknown key"):
        check_eval_cfg({"corrupt": []}, (1, 40))


def test_summary_means_over_severities_above_zero():
    rows = [
        {"model": "s", "corruption": "blur", "severity": 0, "acc": 1.0},
        {"model": "s", "corruption": "blur", "severity": 1, "acc": 0.8},
        {"model": "s", "corruption": "blur", "severity": 2, "acc": 0.6},
        {"model": "s", "corruption": "contrast", "severity": 1, "acc": 0.4},
    ]
    assert robustness_summary(rows)["s"] == pytest.approx({"blur": 0.7, "contrast": 0.4, "mean": 0.55})


def test_evaluate_robustness_in_a_run_and_kd_eval_later_agree(make_cfg, tmp_path):
    """evaluate=robustness writes the metrics; kd-eval rebuilds the run from its folder and gets the same."""
    cfg = make_cfg("evaluate=robustness", "evaluate.severities=[0,2]")
    res = run(cfg)
    out = tmp_path / "run"
    assert set(res["metrics"]) == {"student", "cnn_s", "cnn_l", "ensemble"}
    assert res["metrics"]["student"]["acc"] == pytest.approx(res["test_acc"], abs=1e-6)
    assert set(res["agreement"]) == {"student", "cnn_s", "cnn_l"}  # against the ensemble
    assert (out / "robustness.png").stat().st_size > 0 and (out / "robustness.csv").is_file()
    proc = run_cli("--severities", "0,2", str(out), cwd=tmp_path, module="kd_lightning.cli.eval")
    assert proc.returncode == 0, proc.stderr
    again = json.loads((out / "eval" / "evaluation.json").read_text())
    first = json.loads((out / "evaluation.json").read_text())
    assert set(again["clean"]) == set(first["clean"])
    for model, metrics in first["clean"].items():
        assert again["clean"][model] == pytest.approx(metrics, rel=1e-5)
    assert [r["acc"] for r in again["robustness"]] == pytest.approx([r["acc"] for r in first["robustness"]])
    bad = run_cli(str(tmp_path / "nowhere"), cwd=tmp_path, module="kd_lightning.cli.eval")
    assert bad.returncode == 2 and "not a finished kd-train run folder" in bad.stderr


@pytest.mark.parametrize(
    "payload,pattern",
    [
        ({"train_subset": {"_target_": "pathlib.Path.touch", "self": "{x}"}}, r"data\.train_subset holds a _target_"),
        ({"augment": {"crop_padding": [{"_target_": "pathlib.Path.touch", "self": "{x}"}]}},
         r"data\.augment\.crop_padding\[0\] holds a _target_"),
        ({"_target_": "pathlib.Path.touch", "self": "{x}"}, r"not one of kd_lightning's datamodules"),
    ],
    ids=["value", "nested", "datamodule"],
)  # fmt: skip
def test_kd_eval_never_runs_code_from_a_run_folder(make_cfg, tmp_path, payload, pattern):
    """A shared run folder is data: a `_target_` in its recorded config is refused and nothing runs."""
    import yaml

    from kd_lightning.cli.eval import main

    res = run(make_cfg("teachers=none", "distill=none", "trainer.max_epochs=1"))
    marker = tmp_path / "pwned"
    recorded = tmp_path / "run" / "config.resolved.yaml"
    cfg = yaml.safe_load(recorded.read_text())
    text = json.dumps(payload).replace("{x}", str(marker))
    cfg["data"].update(json.loads(text))
    recorded.write_text(yaml.safe_dump(cfg))
    with pytest.raises(SystemExit) as stop:
        main([res["output_dir"], "--corruptions", "", "--severities", "0"])
    assert stop.value.code == 2
    assert not marker.exists()
    with pytest.raises(ConfigError, match=pattern):
        from kd_lightning.cli.eval import load_run

        load_run(tmp_path / "run")
    assert not marker.exists()


def test_transforms_come_from_an_allowlist_with_plain_arguments(tmp_path):
    from kd_lightning.data.from_config import instantiate_datamodule

    marker = tmp_path / "pwned"
    touch = {"_target_": "pathlib.Path.touch", "self": str(marker)}
    base = {"_target_": "kd_lightning.data.ImageFolderDataModule", "root": str(tmp_path), "image_size": None}
    for transforms, pattern in (
        ([touch], r"train_transforms\[0\]\._target_='pathlib.Path.touch' is not an allowed transform"),
        ([{"_target_": "torchvision.transforms.v2.RandomApply", "transforms": [touch]}], "not an allowed"),
        (
            [{"_target_": "torchvision.transforms.v2.RandomCrop", "size": touch}],
            r"train_transforms\[0\]\.size=.*numbers, strings",
        ),
    ):
        with pytest.raises(ConfigError, match=pattern):
            instantiate_datamodule({**base, "train_transforms": transforms, "eval_transforms": transforms})
    assert not marker.exists()
