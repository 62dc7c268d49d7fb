"""The dependency rule: hdm_core and training never import ComfyUI; hdm_core imports nothing of ours but itself."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "node_helpers", "nodes", "server",
                 "latent_preview", "execution"}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            roots.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", ["hdm_core", "training"])
def test_no_comfyui_imports(package):
    files = sorted((REPO / package).rglob("*.py"))
    assert files
    for path in files:
        bad = imported_roots(path) & COMFY_MODULES
        assert not bad, f"{path.relative_to(REPO)} imports {bad}"


def test_hdm_core_does_not_import_other_project_packages():
    for path in sorted((REPO / "hdm_core").rglob("*.py")):
        assert not imported_roots(path) & {"training", "nodes", "tests"}, path


def test_root_package_imports_without_comfyui():
    import importlib.util

    spec = importlib.util.spec_from_file_location("hdm_pack_root", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # must not raise outside ComfyUI
    assert getattr(module, "NODE_CLASS_MAPPINGS", {}) == {}
