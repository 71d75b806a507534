"""The house: stages at the top level import the lumina package and never each other, the
package imports nothing heavy, and the training stages read as tables of contents."""
import ast
import os
import subprocess
import sys

import pytest

from conftest import ROOT

STAGES = ["Dataset_download.py", "Train.py", "fine_tune.py", "ChatAI.py", "serve.py", "export.py"]


def imported_modules(path):
    tree = ast.parse(open(path, encoding="utf-8").read())
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module.split(".")[0])
    return names


def test_the_top_level_holds_the_stages_and_no_stage_imports_another():
    assert sorted(f for f in os.listdir(ROOT) if f.endswith(".py")) == sorted(STAGES)
    stage_names = {os.path.splitext(s)[0] for s in STAGES}
    for stage in STAGES:
        assert not imported_modules(os.path.join(ROOT, stage)) & stage_names, stage
    for module in os.listdir(os.path.join(ROOT, "lumina")):
        if module.endswith(".py"):
            assert not imported_modules(os.path.join(ROOT, "lumina", module)) & stage_names, module


@pytest.mark.parametrize("stage", ["Train.py", "fine_tune.py"])
def test_every_function_of_the_training_stages_fits_in_40_lines(stage):
    tree = ast.parse(open(os.path.join(ROOT, stage), encoding="utf-8").read())
    long = [(n.name, n.end_lineno - n.lineno + 1) for n in ast.walk(tree)
            if isinstance(n, ast.FunctionDef) and n.end_lineno - n.lineno + 1 > 40]
    assert long == []


def test_importing_the_library_has_no_side_effects(tmp_path):
    modules = "; ".join(f"import lumina.{name[:-3]}" for name in sorted(os.listdir(os.path.join(ROOT, "lumina")))
                        if name.endswith(".py") and name != "__init__.py")
    out = subprocess.run([sys.executable, "-c", f"import sys; sys.path.insert(0, {ROOT!r}); {modules}"],
                         cwd=tmp_path, capture_output=True, text=True)
    assert out.returncode == 0 and out.stdout == "" and out.stderr == ""
    assert os.listdir(tmp_path) == []


def test_ci_runs_the_readmes_test_command_verbatim():
    """A newcomer's command is the one CI runs: a requirement only CI installed once hid a failing test."""
    readme = open(os.path.join(ROOT, "README.md"), encoding="utf-8").read()
    command = next(line for line in readme.splitlines() if line.startswith("python -m pip install -r requirements-dev.txt"))
    ci = open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8").read().strip().splitlines()
    assert ci[-1] == command and "pytest" in command
