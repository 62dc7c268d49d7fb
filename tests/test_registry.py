"""What the Comfy Registry checks before it publishes a node pack, run on this repository (no network, no ComfyUI):

* `[tool.comfy]` complete: PublisherId, DisplayName, an https Icon (here a file of this repository), the ComfyUI
  versions it needs (`requires-comfyui`), and the `[project]` fields the registry reads;
* the registry validator's ruff rules: S102 (exec), S307 (eval), E702 (several statements on one line);
* no run-time installs: nothing calls pip (in a subprocess, os.system or as a module) and the code ComfyUI loads
  (the root `__init__.py`, `nodes/`, `hdm_core/`) starts no processes at all.
"""

from __future__ import annotations

import ast
import re
import subprocess
import sys
from pathlib import Path

import pytest

if sys.version_info >= (3, 11):
    import tomllib
else:  # Python 3.10: the same parser from PyPI
    tomllib = pytest.importorskip("tomli")

REPO = Path(__file__).resolve().parents[1]
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
REGISTRY_RULES = "S102,S307,E702"
LOADED_BY_COMFYUI = [REPO / "__init__.py", *sorted((REPO / "nodes").glob("*.py")),
                     *sorted((REPO / "hdm_core").glob("*.py"))]
PROCESS_CALLS = {"subprocess": {"run", "call", "check_call", "check_output", "Popen", "getoutput", "getstatusoutput"},
                 "os": {"system", "popen", "execv", "execvp", "execl", "spawnv", "spawnl"}}
SKIP_DIRS = {".venv", "venv", ".git", "build", "dist", "node_modules", "__pycache__"}


def python_files() -> list[Path]:
    return [p for p in sorted(REPO.rglob("*.py")) if not SKIP_DIRS & set(p.relative_to(REPO).parts)]


def process_calls(tree: ast.AST) -> list[ast.Call]:
    """Calls such as subprocess.run(...) / os.system(...) in a parsed file."""
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute):
            owner = node.func.value
            if isinstance(owner, ast.Name) and node.func.attr in PROCESS_CALLS.get(owner.id, ()):
                out.append(node)
    return out


def strings_in(node: ast.AST) -> list[str]:
    return [n.value for n in ast.walk(node) if isinstance(n, ast.Constant) and isinstance(n.value, str)]


def test_tool_comfy_is_complete():
    comfy, project = PYPROJECT["tool"]["comfy"], PYPROJECT["project"]
    assert comfy["PublisherId"] and re.fullmatch(r"[a-z0-9][a-z0-9-]*", comfy["PublisherId"])
    assert comfy["DisplayName"]
    assert re.fullmatch(r">=\d+\.\d+\.\d+", comfy["requires-comfyui"])
    assert isinstance(comfy.get("includes", []), list)
    icon = comfy["Icon"]
    prefix = "https://raw.githubusercontent.com/hdm-comfyui/comfyui-hdm/main/"
    assert icon.startswith(prefix) and (REPO / icon[len(prefix):]).is_file(), f"Icon {icon} is not a file here"
    assert project["urls"]["Repository"] == "https://github.com/hdm-comfyui/comfyui-hdm"
    assert re.fullmatch(r"[a-z0-9][a-z0-9-]*", project["name"]) and project["description"] and project["license"]
    assert re.fullmatch(r"\d+\.\d+\.\d+", project["version"])  # the registry takes semantic versions


def test_registry_ruff_rules_pass():
    """ruff (the test extra installs it) with the registry validator's rules, over every file it would publish."""
    try:
        import ruff  # noqa: F401
    except ImportError:
        pytest.fail("ruff is missing: install the test extra (pip install -e .[test])")
    done = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--isolated", "--select",
                           REGISTRY_RULES, "--output-format", "concise", str(REPO)],
                          capture_output=True, text=True, cwd=REPO)
    assert done.returncode == 0, done.stdout + done.stderr


def test_no_run_time_installs():
    """No file calls pip: no `import pip`, no process call whose arguments mention pip or ensurepip."""
    for path in python_files():
        tree = ast.parse(path.read_text(), filename=str(path))
        imports = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
        imports |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
        assert not imports & {"pip", "ensurepip"}, f"{path.relative_to(REPO)} imports pip"
        for call in process_calls(tree):
            words = " ".join(strings_in(call))
            assert not re.search(r"\b(pip|ensurepip)\b", words), f"{path.relative_to(REPO)}:{call.lineno} runs pip"


def test_code_comfyui_loads_starts_no_processes():
    for path in LOADED_BY_COMFYUI:
        tree = ast.parse(path.read_text(), filename=str(path))
        calls = [f"{path.relative_to(REPO)}:{c.lineno}" for c in process_calls(tree)]
        assert not calls, f"the pack starts processes at {calls}"
        names = {n.id for n in ast.walk(tree) if isinstance(n, ast.Name)}
        assert not names & {"eval", "exec", "__import__"}, f"{path.relative_to(REPO)} uses {names & {'eval', 'exec'}}"
