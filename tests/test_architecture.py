"""The house rules, checked: layers (import-linter), no import cycles, imports at module level,
tasks/ holds only Prefect tasks, and every file a DVC stage runs is one of that stage's deps."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import yaml
from importlinter.cli import lint_imports

from import_graph import ROOT, cycles, edges, executed_files, imports_of, project_modules

MODULES = project_modules()


def test_import_linter_contracts_are_kept():
    """Layers (flows -> tasks -> tracking -> bertshrink; inside the library, modelfolder at the bottom)
    and "the library imports neither Prefect nor MLflow" (pyproject.toml [tool.importlinter])."""
    assert lint_imports(config_filename=str(ROOT / "pyproject.toml"), no_cache=True, no_logo=True) == 0


def test_no_module_imports_in_a_circle():
    assert cycles(edges(MODULES)) == []


def test_cycle_finder_finds_a_known_circle():
    graph = {"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}
    assert cycles(graph) == [["a", "b", "c"]]


def test_project_imports_are_at_module_level():
    """Imports inside functions hid a six-module circle once; only a comment-justified one may remain."""
    hidden = [f"{MODULES[m].relative_to(ROOT)}:{line} imports {target}"
              for m in MODULES for target, line, inside in imports_of(m, MODULES) if inside]
    assert hidden == []


def test_tasks_hold_only_prefect_tasks():
    """Every module in tasks/ defines Prefect tasks; MLflow helpers live in tracking/."""
    for path in sorted((ROOT / "tasks").glob("*.py")):
        if path.name == "__init__.py":
            continue
        tree = ast.parse(path.read_text())
        decorated = [node.name for node in tree.body if isinstance(node, ast.FunctionDef)
                     and any("task" in ast.unparse(d) for d in node.decorator_list)]
        assert decorated, f"{path.name} defines no Prefect task: move it out of tasks/"


def _stages() -> dict[str, dict]:
    """dvc.yaml's stages, a ``foreach`` stage by its ``do`` template."""
    stages = yaml.safe_load((ROOT / "dvc.yaml").read_text())["stages"]
    return {name: stage.get("do", stage) for name, stage in stages.items()}


def _entry_module(cmd: str) -> str:
    match = re.search(r"python -m ([\w.]+)", cmd)
    assert match, f"stage command {cmd!r} does not run a flow module"
    return match.group(1)


def _covered(path: Path, deps: list[str]) -> bool:
    rel = path.relative_to(ROOT)
    return any(rel == Path(dep) or Path(dep) in rel.parents for dep in deps)


@pytest.mark.parametrize("stage", sorted(_stages()))
def test_every_file_a_stage_runs_is_one_of_its_deps(stage):
    """Editing any project file a stage executes (imports inside functions included) must rerun it."""
    spec = _stages()[stage]
    deps = [d if isinstance(d, str) else next(iter(d)) for d in spec.get("deps", [])]
    ran = executed_files(_entry_module(spec["cmd"]), MODULES)
    missing = sorted(str(p.relative_to(ROOT)) for p in ran if not _covered(p, deps))
    assert missing == [], f"dvc.yaml stage {stage!r} runs these files but does not depend on them"


def test_coverage_check_catches_a_missing_dep():
    ran = executed_files("flows.teacher", MODULES)
    assert ROOT / "bertshrink" / "training" / "finetune.py" in ran
    assert not _covered(ROOT / "bertshrink" / "training" / "finetune.py", ["flows/teacher.py", "bertshrink/data"])
    assert _covered(ROOT / "bertshrink" / "training" / "finetune.py", ["bertshrink/training"])
    # a package's __init__ runs on every import below it: an empty one too must be a dep
    assert ROOT / "bertshrink" / "__init__.py" in ran and not _covered(ROOT / "bertshrink" / "__init__.py", [])


# --- trust: loading a model never runs code that came with it (README "Trust") ------------------------

SHIPPED_DIRS = ("bertshrink", "tasks", "flows", "tracking", "benchmarks")
SOURCE_DIRS = (*SHIPPED_DIRS, "tests")
PICKLE_MODULES = frozenset({"pickle", "cPickle", "joblib", "dill", "cloudpickle", "shelve", "marshal"})
PICKLE_CALLS = frozenset({"pd.read_pickle", "pandas.read_pickle", "torch.serialization.load"})


def _is_const(node: ast.AST | None, value) -> bool:
    return isinstance(node, ast.Constant) and node.value is value


def _keyword(call: ast.Call, name: str) -> ast.AST | None:
    return next((k.value for k in call.keywords if k.arg == name), None)


def code_running_loads(source: str, shipped: bool = True) -> list[str]:
    """Lines that could run code from a loaded file: ``torch.load`` without ``weights_only=True``,
    ``trust_remote_code`` set to anything but False; in shipped code also a pickle-family import,
    ``read_pickle`` and ``np.load(..., allow_pickle=<not False>)``."""
    found = []
    for node in ast.walk(ast.parse(source)):
        line = getattr(node, "lineno", 0)
        if isinstance(node, ast.Call):
            func = ast.unparse(node.func)
            if func.endswith("torch.load") and not _is_const(_keyword(node, "weights_only"), True):
                found.append(f"{line}: {func} without weights_only=True")
            remote_code = _keyword(node, "trust_remote_code")
            if remote_code is not None and not _is_const(remote_code, False):
                found.append(f"{line}: trust_remote_code turned on")
            if shipped and func in PICKLE_CALLS:
                found.append(f"{line}: {func} unpickles")
            if shipped and func in ("np.load", "numpy.load") and _keyword(node, "allow_pickle") is not None \
                    and not _is_const(_keyword(node, "allow_pickle"), False):
                found.append(f"{line}: {func} with allow_pickle")
        elif isinstance(node, ast.Dict):  # trust_remote_code passed in a kwargs dict
            for key, value in zip(node.keys, node.values):
                if isinstance(key, ast.Constant) and key.value == "trust_remote_code" and not _is_const(value, False):
                    found.append(f"{line}: trust_remote_code turned on")
        elif shipped and isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [node.module or ""] if isinstance(node, ast.ImportFrom) else [a.name for a in node.names]
            found += [f"{line}: imports {n}" for n in names if n.split(".")[0] in PICKLE_MODULES]
    return found


def test_no_source_loads_files_in_a_way_that_runs_their_code():
    """Weights load with weights_only=True, remote code stays off, shipped code never unpickles."""
    found = [f"{path.relative_to(ROOT)}:{hit}"
             for folder in SOURCE_DIRS for path in sorted((ROOT / folder).rglob("*.py"))
             for hit in code_running_loads(path.read_text(), shipped=folder in SHIPPED_DIRS)]
    assert found == []


@pytest.mark.parametrize("snippet", [
    "torch.load(path)", "torch.load(path, weights_only=False)", "torch.load(path, weights_only=flag)",
    "AutoModel.from_pretrained(p, trust_remote_code=True)", "AutoConfig.from_pretrained(p, **{'trust_remote_code': 1})",
    "import joblib", "from pickle import loads", "np.load(f, allow_pickle=True)", "pd.read_pickle(f)",
])
def test_the_trust_scan_catches_a_code_running_load(snippet):
    assert code_running_loads(snippet) != []


def test_the_trust_scan_lets_safe_loads_pass():
    safe = ("torch.load(p, map_location='cpu', weights_only=True)\n"
            "AutoModel.from_pretrained(p, trust_remote_code=False)\nnp.load(f, allow_pickle=False)\nnp.load(f)")
    assert code_running_loads(safe) == []
