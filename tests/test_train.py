"""The real entry point: end-to-end runs and the configuration errors users meet first."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from kd_lightning.errors import ConfigError
from kd_lightning.models import create_model, save_model
from kd_lightning.runners.run import run

from .conftest import FAST, ROOT, run_cli


def _cli_env(tmp_path: Path, cache_dir: Path) -> dict:
    return {"KD_OUTPUT_ROOT": str(tmp_path / "outputs"), "KD_CACHE_DIR": str(cache_dir)}


def test_cli_default_experiment_prints_summary_and_writes_results(tmp_path, cache_dir):
    proc = run_cli(*FAST, "print_summary=true", "baseline=true", cwd=ROOT, env=_cli_env(tmp_path, cache_dir))
    assert proc.returncode == 0, proc.stderr[-3000:]
    for text in (
        "cnn_s",
        "cnn_l",
        "teacher",
        "student alone (baseline)",
        "student + teachers",
        "results.json",
    ):
        assert text in proc.stdout, text
    [results] = list((tmp_path / "outputs").rglob("results.json"))
    r = json.loads(results.read_text())
    assert r["status"] == "ok" and r["teachers"] == "digits_pair" and r["student"] == "mlp"
    assert 0 <= r["baseline_test_acc"] <= 1 and r["fit_seconds"] > 0
    assert (results.parent / "student.pt").is_file()
    assert len(list((results.parent / "checkpoints").glob("*.ckpt"))) >= 1


def test_plain_supervised_training_without_teachers(make_cfg):
    r = run(make_cfg("teachers=none", "distill=none"))
    assert r["status"] == "ok" and r["teacher_test_acc"] == {} and r["teacher_set"] == "none"


def test_hinton_kd_and_summed_terms(make_cfg):
    r = run(make_cfg("distill=[feature,kd]"))
    assert r["status"] == "ok"
    r = run(make_cfg("distill=kd", "teachers.use=[cnn_l]"))
    assert r["status"] == "ok" and list(r["teacher_test_acc"]) == ["cnn_l"]


def test_label_free_training(make_cfg):
    assert run(make_cfg("distill=kd", "distill.ce_weight=0"))["status"] == "ok"


@pytest.mark.parametrize(
    "overrides,pattern",
    [
        (["distill.terms.feat.student_tap=layer9"], r"unknown tap 'layer9' for student.*features\.0"),
        (["distill.terms.feat.teacher_tap=head"], r"unknown tap 'head' for teacher 'cnn_"),
        (["distill.terms.feat.distance=msee"], r"unknown distance/loss 'msee'.*cosine"),
        (
            ["distill.terms.feat.weight=heavy"],
            r"distill.terms.feat.weight must be a finite number, got 'heavy'",
        ),
        (["distill.terms.feat.combine=sum"], r"combine='sum'; valid: per_teacher, mean, concat"),
        (["student.name=resnet9"], r"unknown model 'resnet9'"),
        (["data.batch_size=0"], r"data.batch_size must be an integer >= 1, got 0"),
        (["data.batch_size=abc"], r"data.batch_size must be an integer, got .abc."),
        (["trainer.max_epochs=0"], r"trainer.max_epochs must be an integer >= 1"),
        (["optim.lr=-1"], r"optim.lr must be in \(0.0, inf\)"),
        (["resume=/no/such.ckpt"], r"resume must be null, .auto. or an existing checkpoint file"),
        (["+data.bogus=1"], r"data has unknown key\(s\) \['bogus'\]"),
        (["teachers.use=[cnn_x]"], r"unknown teacher\(s\) \['cnn_x'\]"),
        (["teachers=none"], r"no teachers"),
        (["+optim.name=adagrad"], r"optim.name is no longer a key: use optim=<adam\|adamw\|sgd>"),
        (["+optim.scheduler=step"], r"optim.scheduler is no longer a key: use the scheduler group"),
        (["+optim.momentum=0.9"], r"optim \(torch.optim.Adam\):.*momentum"),
        (["scheduler=step", "+scheduler.step=3"], r"scheduler \(torch.optim.lr_scheduler.StepLR\):.*'step'"),
        (["scheduler=cosine", "scheduler.interval=batch"], r"scheduler.interval='batch'; valid: epoch, step"),
        (["teacher_cache.mode=ram"], r"teacher_cache.mode='ram'; valid: none, memory, disk"),
        (["teacher_cache=disk"], r"teacher_cache is a group of keys now; use teacher_cache.mode=disk"),
        (["+teachers.members.cnn_s.colour=red"], r"teachers.members.cnn_s has unknown key\(s\) \['colour'\]"),
        (["perf.compile=yes"], r"perf.compile has an unexpected value 'yes'; valid: true or false or auto"),
        (["+amalgamation.tasks=[parity]"], r"amalgamation is set but runner=distill"),
        (["runner=stagewise"], r"runner='stagewise'; valid: amalgamation, distill"),
    ],
)
def test_config_errors_before_training(make_cfg, overrides, pattern):
    cfg = make_cfg(*overrides)
    with pytest.raises(ConfigError, match=pattern):
        run(cfg)
    r = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
    assert r["status"] == "config_error" and "fit_seconds" not in r  # failed before training started


def test_missing_teacher_checkpoint(make_cfg, tmp_path):
    # fit_if_missing (true in digits_pair) never fits into an explicit path: a typo is an error
    cfg = make_cfg(f"teachers.members.cnn_s.checkpoint={tmp_path}/none.pt", "dry_run=true")
    with pytest.raises(ConfigError, match=r"teachers\.members\.cnn_s\.checkpoint: no file at .*none\.pt"):
        run(cfg)
    assert not (tmp_path / "none.pt").exists()


def test_teacher_made_for_another_class_count(make_cfg, tmp_path):
    arch = {"name": "cnn", "channels": [16, 32]}
    path = save_model(create_model(arch, 4, (1, 8, 8)), tmp_path / "t4.pt", arch, 4, (1, 8, 8))
    cfg = make_cfg(f"teachers.members.cnn_s.checkpoint={path}")
    with pytest.raises(ConfigError, match=r"4-class head but the dataset has 10 classes"):
        run(cfg)


def test_cli_config_error_is_one_clear_message(tmp_path, cache_dir):
    proc = run_cli(
        *FAST, "distill.terms.feat.student_tap=layer9", cwd=ROOT, env=_cli_env(tmp_path, cache_dir)
    )
    assert proc.returncode == 2
    assert "Configuration error: unknown tap 'layer9'" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_cli_unknown_group_choice_lists_options(tmp_path, cache_dir):
    proc = run_cli("teachers=nope", cwd=ROOT, env=_cli_env(tmp_path, cache_dir))
    assert proc.returncode == 2 and "Configuration error" in proc.stderr
    assert "teachers/nope" in proc.stderr and "digits_pair" in proc.stderr and "mnist1d_pool" in proc.stderr


@pytest.mark.parametrize(
    "args,names",
    [
        (["data=imagefolder"], ["data.root must be set", "data.root=<value>"]),  # a `???` value
        (["KD_DEVICES_PER_NODE=4"], ["KD_DEVICES_PER_NODE"]),  # a key that does not exist
        (["optim.momentum=0.9"], ["optim.momentum", "+optim.momentum=0.9"]),
        (["-m", "seed=0,1", "student=nope"], ["student/nope", "mlp"]),  # a multirun's first job
        (["trainer.max_epochs=${nope.x}"], ["nope.x"]),  # a broken interpolation
    ],
)
def test_cli_every_configuration_error_is_one_line_exit_2_no_traceback(tmp_path, cache_dir, args, names):
    proc = run_cli(*args, "dry_run=true", cwd=ROOT, env=_cli_env(tmp_path, cache_dir))
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "Configuration error: " in proc.stderr and "Traceback" not in proc.stderr, proc.stderr[-2000:]
    for name in names:
        assert name in proc.stderr, (name, proc.stderr)


def test_cli_broken_yaml_in_user_config_dir_is_named(tmp_path, cache_dir):
    extra = tmp_path / "my_conf" / "distill"
    extra.mkdir(parents=True)
    (extra / "mine.yaml").write_text("terms: {feat: [1, 2}\n")
    proc = run_cli(
        "--config-dir", str(tmp_path / "my_conf"), "distill=mine", cwd=ROOT, env=_cli_env(tmp_path, cache_dir)
    )
    assert proc.returncode == 2
    assert f"config file {extra / 'mine.yaml'} is not valid YAML (line 1" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_console_script_kd_train(tmp_path, cache_dir):
    script = Path(sys.executable).parent / "kd-train"
    assert script.exists(), "the project is not installed (pip install -e .)"
    proc = subprocess.run(
        [str(script), *FAST, "dry_run=true"],
        cwd=tmp_path,  # anywhere, not only the repository root
        env={**os.environ, **_cli_env(tmp_path, cache_dir)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    [r] = [json.loads(p.read_text()) for p in (tmp_path / "outputs").rglob("results.json")]
    assert r["status"] == "dry_run"


TINY_MNIST1D = [
    "data.num_samples=600",
    "trainer.max_epochs=1",
    "trainer.enable_progress_bar=false",
    "logger=none",
    "print_summary=false",
    *(f"teachers.members.{m}.fit.max_epochs=1" for m in ("cnn_a", "cnn_b", "cnn_c")),
]


@pytest.mark.parametrize(
    ("experiment", "teachers"),
    [
        ("gallo2020", {"cnn_b"}),
        ("landro2021", {"cnn_a", "cnn_b"}),
        ("landro2021_student_beats_teacher", {"cnn_a", "cnn_b", "cnn_c"}),
    ],
)
def test_paper_experiments_run(make_cfg, experiment, teachers):
    res = run(make_cfg(f"experiment={experiment}", *TINY_MNIST1D, fast=False))
    assert res["status"] == "ok" and set(res["teacher_test_acc"]) == teachers
    assert res["data"] == "mnist1d" and 0 <= res["test_acc"] <= 1


TINY = ["trainer.enable_progress_bar=false", "logger=none", "print_summary=false"]


def test_rahbar2020_runs_and_mixes_labels_and_teacher(make_cfg):
    res = run(
        make_cfg(
            "experiment=rahbar2020",
            "student.width=128",
            "trainer.max_epochs=5",
            "distill.rho=0.5",
            *TINY,
            fast=False,
        )
    )
    assert res["status"] == "ok" and set(res["teacher_test_acc"]) == {"mlp64"} and res["student"] == "wide2"


def test_thapa2022_pretrains_on_the_source_fine_tunes_on_the_target_and_evaluates(make_cfg, tmp_path):
    tiny = [
        "data.num_samples=600",
        "source_data.num_samples=600",
        "trainer.max_epochs=2",
        "student.pretrained.fit.max_epochs=1",
        "teachers.members.cnn_l.arch.pretrained.fit.max_epochs=1",
        "teachers.members.cnn_l.fit.max_epochs=1",
        "evaluate.severities=[0,3]",
        *TINY,
    ]
    res = run(make_cfg("experiment=thapa2022", *tiny, fast=False))
    assert res["status"] == "ok" and set(res["metrics"]) == {"student", "cnn_l"}
    assert set(res["robustness"]) == {"student", "cnn_l"} and "student" in res["agreement"]
    resolved = (tmp_path / "run" / "config.resolved.yaml").read_text()
    assert "pretrained/cnn1d-" in resolved  # the source-task model file the student started from
    for key in ("acc", "macro_f1", "ece"):
        assert 0 <= res["metrics"]["student"][key] <= 1


def test_ye2019_runs_without_labels_and_reports_each_chosen_task(make_cfg):
    tiny = [
        "data.num_samples=600",
        "amalgamation.block_epochs=1",
        "amalgamation.head_epochs=1",
        "amalgamation.finetune_epochs=1",
        "amalgamation.teachers.teacher_a.fit.max_epochs=1",
        "amalgamation.teachers.teacher_b.fit.max_epochs=1",
        *TINY,
    ]
    res = run(make_cfg("experiment=ye2019", *tiny, fast=False))
    assert res["status"] == "ok" and set(res["task_acc"]) == {"parity", "ge5"}
    assert set(res["teacher_test_acc"]) == {"teacher_a:parity", "teacher_b:ge5"}
    assert res["test_acc"] == pytest.approx(sum(res["task_acc"].values()) / 2)


def test_a_torchvision_name_as_student_choice_names_the_way_to_choose_it():
    from kd_lightning.config.conf_files import CONF_DIR, check_composition

    with pytest.raises(
        ConfigError, match=r"'resnet18' is a torchvision model: student=torchvision student.name=resnet18"
    ):
        check_composition(["student=resnet18"], CONF_DIR)
    with pytest.raises(ConfigError) as e:
        check_composition(["student=nope"], CONF_DIR)
    assert "torchvision model" not in str(e.value)


def test_a_run_from_another_folder_reuses_the_per_user_cache_and_the_console_stays_quiet(tmp_path):
    """No KD_CACHE_DIR: the cache is the user's (XDG_CACHE_HOME here), whatever folder a run starts from."""
    env = {k: v for k, v in os.environ.items() if k != "KD_CACHE_DIR"}
    env.update(
        XDG_CACHE_HOME=str(tmp_path / "xdg"), PYTHONWARNINGS="ignore", KD_OUTPUT_ROOT=str(tmp_path / "out")
    )
    args = [*FAST, "teachers.use=[cnn_s]", "distill=kd"]
    runs = []
    for folder in ("first", "second"):
        cwd = tmp_path / folder
        cwd.mkdir()
        done = subprocess.run([sys.executable, "-m", "kd_lightning.train", *args], cwd=cwd, env=env,
                              capture_output=True, text=True, timeout=600)  # fmt: skip
        assert done.returncode == 0, done.stderr[-3000:]
        runs.append(done.stdout + done.stderr)
    cache = tmp_path / "xdg" / "kd_lightning"
    fitted = sorted((cache / "teachers" / "digits").glob("cnn_s-*.pt"))
    assert len(fitted) == 1 and "not fitted yet, fitting it" in runs[0] and "fitting" not in runs[1]
    for out in runs:  # Lightning's tips and device lines are not printed (verbose=true brings them back)
        assert "Tip:" not in out and "GPU available" not in out and "Loading `train_dataloader`" not in out
    listing = subprocess.run([sys.executable, "-m", "kd_lightning.cli.cache", "--list"], env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert (
        str(cache) in listing.stdout and "teachers/digits/" in listing.stdout and "rm -rf" in listing.stdout
    )


def test_a_run_that_fails_in_training_says_why_in_two_lines_and_keeps_the_traceback(tmp_path, cache_dir):
    run_dir = tmp_path / "nan"
    proc = run_cli(*FAST, "trainer.max_epochs=3", "+callbacks.poison._target_=tests.conftest.PoisonWeightsAtEpoch",
                   "+callbacks.poison.epoch=1", f"hydra.run.dir={run_dir}", cwd=ROOT,
                   env=_cli_env(tmp_path, cache_dir))  # fmt: skip
    assert proc.returncode == 1 and "Traceback" not in proc.stdout + proc.stderr
    said = [ln for ln in proc.stderr.splitlines() if ln.strip()]
    assert (
        said[-2].startswith("Training failed: non-finite training loss (nan) at epoch 1")
        and "optim.lr" in said[-2]
    )
    assert f"The last good checkpoint is {run_dir / 'checkpoints' / 'last.ckpt'}" in said[-1]
    res = json.loads((run_dir / "results.json").read_text())
    assert res["status"] == "failed" and "Traceback" in res["traceback"]
    assert "Traceback" in Path(res["log_file"]).read_text() and res["log_file"] in said[-1]


def test_a_misspelt_key_lists_the_valid_ones_in_the_first_message_and_trainer_arguments_are_named():
    from kd_lightning.cli.train import loss_options
    from kd_lightning.config.conf_files import CONF_DIR, check_composition

    with pytest.raises(
        ConfigError,
        match=r"'T' is not a key of distill.terms.kd .*the options of distance 'kl': standardize, temperature",
    ):
        check_composition(["distill=kd", "distill.terms.kd.T=0"], CONF_DIR, loss_options)
    with pytest.raises(ConfigError, match=r"'max_epoch' is not a key of trainer .*max_epochs"):
        check_composition(["trainer.max_epoch=3"], CONF_DIR)
    from kd_lightning.config.run_spec import check_trainer

    with pytest.raises(
        ConfigError, match=r"trainer.devices=0 is not valid; give a positive number of devices, -1"
    ):
        check_trainer({"accelerator": "cpu", "devices": 0})
    with pytest.raises(
        ConfigError, match=r"trainer.precision='bf17-mixed' is not valid; valid: .*bf16-mixed"
    ):
        check_trainer({"precision": "bf17-mixed"})
    check_trainer({"devices": "4", "num_nodes": 2, "precision": "bf16-mixed", "accelerator": "gpu"})


def test_several_cpu_devices_say_that_they_run_ddp(make_cfg, caplog):
    from kd_lightning.runners.run import run

    with caplog.at_level("INFO", logger="kd_lightning"):
        assert run(make_cfg("trainer=cpu", "trainer.devices=3", "dry_run=true"))["status"] == "dry_run"
    said = [r.getMessage() for r in caplog.records if "CPU processes" in r.getMessage()]
    assert said == [
        "trainer.devices=3 on the CPU: DDP over 3 CPU processes (gloo), each with data.batch_size=64"
    ]
    caplog.clear()
    with caplog.at_level("INFO", logger="kd_lightning"):
        run(make_cfg("trainer=cpu", "dry_run=true"))
    assert not [r for r in caplog.records if "CPU processes" in r.getMessage()]  # one process: nothing to say


def test_a_quoted_run_folder_is_the_one_locked_and_checked(tmp_path, cache_dir):
    """`'hydra.run.dir="outputs/x"'`: Hydra writes to outputs/x; the lock and the finished-run check must be
    on that folder too, not on one whose name holds the quotes."""
    run_dir = tmp_path / "x"
    first = run_cli(*FAST, "trainer.max_epochs=1", f"hydra.run.dir={run_dir}", cwd=ROOT,
                    env=_cli_env(tmp_path, cache_dir))  # fmt: skip
    assert first.returncode == 0, first.stderr[-2000:]
    config = (run_dir / ".hydra" / "config.yaml").read_bytes()
    again = run_cli(*FAST, "trainer.max_epochs=2", f'hydra.run.dir="{run_dir}"', cwd=tmp_path,
                    env=_cli_env(tmp_path, cache_dir))  # fmt: skip
    assert again.returncode == 2 and "holds a finished run" in again.stderr, again.stderr[-2000:]
    assert (run_dir / ".hydra" / "config.yaml").read_bytes() == config  # not rewritten with max_epochs=2
    assert [p.name for p in tmp_path.iterdir() if '"' in p.name] == []  # no folder named with the quotes


def test_a_full_disk_is_said_in_two_lines_naming_the_folder_and_the_way_on(tmp_path):
    import errno

    from kd_lightning.cli.train import failure_lines

    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"x")
    said = failure_lines(OSError(errno.ENOSPC, "No space left on device"), tmp_path)
    assert said[0].startswith(f"Training failed: no space left on the device of {tmp_path}")
    assert f"The last good checkpoint is {tmp_path / 'checkpoints' / 'last.ckpt'}" in said[1]
    assert "resume=auto" in said[1] and f"hydra.run.dir={tmp_path}" in said[1]
