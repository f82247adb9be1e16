"""The package's layers (docs/ARCHITECTURE.md): imports point down, no import circle, every module imports."""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

from kd_lightning.errors import ConfigError

from .conftest import ROOT

PACKAGE = ROOT / "kd_lightning"

# Lower layers first. A module may import the modules of its own subpackage and of lower layers only;
# subpackages of one layer do not import each other. The top-level modules `train`, `trainers` and
# `optim` are the paths commands and YAML files name (`python -m kd_lightning.train`, `_target_`s).
LAYERS = [
    {"errors"},
    {"plain", "tensors"},
    {"files"},
    {"config"},
    {"data", "models"},
    {"losses"},
    {"teachers"},
    {"core", "evaluation"},
    {"engine"},
    {"runners", "analysis"},
    {"cli"},
    {"train", "trainers", "optim", "__init__"},
]
RANK = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(ROOT).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        out[name] = path
    return out


def imports(path: Path, known: set[str]) -> set[str]:
    """Every kd_lightning module `path` imports, at module level or inside functions."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.ImportFrom) and node.module and node.module.startswith("kd_lightning"):
            names = [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
        elif isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.startswith("kd_lightning")]
        found |= {n for n in names if n in known}
    return found


def part(module: str) -> str:
    """The layer unit of a module: its subpackage (`kd_lightning.teachers.store` → teachers)."""
    pieces = module.split(".")
    return pieces[1] if len(pieces) > 1 else "__init__"


def graph() -> dict[str, set[str]]:
    mods = modules()
    return {m: imports(p, set(mods)) - {m} for m, p in mods.items()}


def test_every_import_points_down_or_stays_in_its_subpackage():
    wrong = []
    for m, targets in graph().items():
        for t in targets:
            if t == "kd_lightning":  # the package's own __init__ holds the version only
                continue
            mine, theirs = part(m), part(t)
            if mine != theirs and RANK[theirs] >= RANK[mine]:
                wrong.append(f"{m} imports {t} ({mine}, layer {RANK[mine]} → {theirs}, layer {RANK[theirs]})")
    assert not wrong, "\n".join(wrong)


def test_no_import_circle():
    g = graph()
    circles, state = [], dict.fromkeys(g, 0)  # 0 unvisited, 1 on the path, 2 done

    def visit(m: str, path: list[str]) -> None:
        state[m] = 1
        for t in sorted(g[m]):
            if t not in g:
                continue
            if state[t] == 1:
                circles.append(" → ".join([*path[path.index(t) :], t]))
            elif state[t] == 0:
                visit(t, [*path, t])
        state[m] = 2

    for m in sorted(g):
        if state[m] == 0:
            visit(m, [m])
    assert not circles, "\n".join(circles)


def test_the_check_sees_a_circle_and_an_upward_import(tmp_path, monkeypatch):
    """The two checks above can fail: a planted circle and a planted upward import are caught."""
    fake = tmp_path / "kd_lightning"
    (fake / "data").mkdir(parents=True)
    (fake / "engine").mkdir()
    (fake / "__init__.py").write_text("")
    (fake / "data" / "__init__.py").write_text("")
    (fake / "engine" / "__init__.py").write_text("")
    (fake / "data" / "a.py").write_text("from kd_lightning.engine.b import x\n")
    (fake / "engine" / "b.py").write_text("from kd_lightning.data.a import y\n")
    monkeypatch.setattr(sys.modules[__name__], "PACKAGE", fake)
    monkeypatch.setattr(sys.modules[__name__], "ROOT", tmp_path)
    g = graph()
    assert g["kd_lightning.data.a"] == {"kd_lightning.engine.b"} and g["kd_lightning.engine.b"] == {
        "kd_lightning.data.a"
    }
    for check in (test_every_import_points_down_or_stays_in_its_subpackage, test_no_import_circle):
        try:
            check()
        except AssertionError as e:
            assert "kd_lightning.data.a" in str(e)
        else:
            raise AssertionError(f"{check.__name__} missed the planted problem")


def test_every_module_imports_in_a_fresh_process():
    names = sorted(modules())
    code = "import importlib, sys\nfor n in sys.argv[1:]:\n    importlib.import_module(n)\nprint('ok')"
    done = subprocess.run(
        [sys.executable, "-c", code, *names], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0 and done.stdout.strip() == "ok", done.stderr[-3000:]


def test_registries_import_every_module_of_their_subpackage_and_old_paths_work():
    """A new model, loss or runner file is found without editing an __init__; the paths users wrote
    before the subpackages still import."""
    import importlib
    import pkgutil

    from kd_lightning.runners import get_runner

    get_runner("distill")  # the runners' modules are imported on the first lookup
    for package in ("kd_lightning.models", "kd_lightning.losses", "kd_lightning.runners"):
        pkg = importlib.import_module(package)
        missing = [
            m.name for m in pkgutil.iter_modules(pkg.__path__) if f"{package}.{m.name}" not in sys.modules
        ]
        assert not missing, f"{package} did not import {missing}"
    from kd_lightning.losses import register_loss  # noqa: F401
    from kd_lightning.models import create_model, load_model, register_model  # noqa: F401
    from kd_lightning.optim import warmup_cosine  # noqa: F401  (conf/scheduler YAML of users)
    from kd_lightning.runners import RunContext, register_runner  # noqa: F401
    from kd_lightning.train import main  # noqa: F401  (python -m kd_lightning.train)
    from kd_lightning.trainers import CSVLogger  # noqa: F401  (conf/logger YAML of users)


def test_a_runner_of_ones_own_declares_its_settings_and_a_misspelt_one_is_refused(make_cfg):
    """A runner reads its own settings from a typed spec it declares (`register_runner(keys=...)`), from the
    config's group named after it; RunContext carries no composed config to read anything else from."""
    import dataclasses
    import json

    from kd_lightning.runners import RunContext, register_runner
    from kd_lightning.runners.registry import _RUNNERS
    from kd_lightning.runners.run import run

    @dataclasses.dataclass(frozen=True)
    class Probe:
        rounds: int = 1
        note: str = ""

    seen = []

    @register_runner("probe_runner", keys=Probe)
    def probe(ctx: RunContext) -> None:
        seen.append(ctx.keys)
        ctx.results["rounds"] = ctx.keys.rounds

    try:
        assert "cfg" not in {f.name for f in dataclasses.fields(RunContext)}
        results = run(make_cfg("runner=probe_runner", "+probe_runner.rounds=3", "+probe_runner.note=hi"))
        assert results["status"] == "ok" and seen == [Probe(rounds=3, note="hi")]
        cfg = make_cfg("runner=probe_runner", "+probe_runner.roundz=3")
        with pytest.raises(
            ConfigError, match=r"probe_runner has unknown key\(s\) \['roundz'\]; valid: .*rounds"
        ):
            run(cfg)
        written = json.loads((Path(cfg.paths.output_dir) / "results.json").read_text())
        assert written["status"] == "config_error" and len(seen) == 1  # refused before the runner ran
        with pytest.raises(ConfigError, match=r"probe_runner.rounds"):
            run(make_cfg("runner=probe_runner", "+probe_runner.rounds=many"))
    finally:
        _RUNNERS.pop("probe_runner", None)


def test_nothing_below_the_parse_reads_the_composed_config():
    """kd_lightning.config.request reads Hydra's composed config once; the layers below work from the RunSpec."""
    below = ("runners", "engine", "core", "teachers", "data", "losses", "models", "evaluation")
    found = [
        f"{path.relative_to(ROOT)}:{n}"
        for package in below
        for path in sorted((ROOT / "kd_lightning" / package).rglob("*.py"))
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if "DictConfig" in line
    ]
    assert not found, found


def test_no_function_is_longer_than_60_lines():
    """Short functions, split along what the code does (docs/ARCHITECTURE.md); a long one fails here."""
    long = []
    for path in sorted((ROOT / "kd_lightning").rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name} ({lines} lines)")
    assert not long, long


def test_any_is_rare_in_signatures_and_each_use_says_why():
    """The package is typed (make lint runs mypy over it): `Any` stays in fewer than 45 function signatures,
    and each one has a comment starting `# Any:` just above it (its decorators aside) saying why."""
    uses, unexplained = [], []
    for path in sorted((ROOT / "kd_lightning").rglob("*.py")):
        lines = path.read_text().splitlines()
        for node in ast.walk(ast.parse("\n".join(lines))):
            if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                continue
            a = node.args
            annotated = [
                x.annotation for x in [*a.posonlyargs, *a.args, *a.kwonlyargs, a.vararg, a.kwarg] if x
            ]
            text = " ".join(ast.unparse(t) for t in [*annotated, node.returns] if t is not None)
            if not re.search(r"\bAny\b", text):
                continue
            where = f"{path.relative_to(ROOT)}:{node.lineno} {node.name}"
            uses.append(where)
            first = min([node.lineno, *(d.lineno for d in node.decorator_list)])
            above = lines[max(0, first - 4) : first - 1]
            if not any(ln.strip().startswith("# Any:") for ln in above):
                unexplained.append(where)
    assert len(uses) < 45, uses
    assert not unexplained, unexplained
