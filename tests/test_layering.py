"""The dependency rule: nodes → hdm_core, training → hdm_core, nothing else between our packages. hdm_core and
training never import ComfyUI; hdm_core imports nothing of ours but itself; nodes and training never import each
other."""

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


def project_imports(path: Path) -> set[str]:
    """Our top-level packages that `path` imports, absolutely or relatively (`from ..hdm_core import x`)."""
    package = path.relative_to(REPO).parts[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(), filename=str(path))):
        if isinstance(node, ast.Import):
            found.update(alias.name.split(".")[0] for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level == 0 and node.module:
                found.add(node.module.split(".")[0])
            elif node.level == 1:
                found.add(package)
            elif node.level == 2:  # from the repository root package: ..hdm_core, ..training
                found.add((node.module or "").split(".")[0] or {a.name for a in node.names}.pop())
    return found & PROJECT_PACKAGES


PROJECT_PACKAGES = {"hdm_core", "nodes", "training", "demo", "bench", "tests"}
ALLOWED = {"hdm_core": {"hdm_core"}, "nodes": {"nodes", "hdm_core"}, "training": {"training", "hdm_core"}}


@pytest.mark.parametrize("package", sorted(ALLOWED))
def test_project_packages_import_only_what_the_rule_allows(package):
    files = sorted((REPO / package).rglob("*.py"))
    assert files
    for path in files:
        extra = project_imports(path) - ALLOWED[package]
        assert not extra, f"{path.relative_to(REPO)} imports {extra}"


def test_root_package_imports_without_comfyui():
    import importlib.util

    spec = importlib.util.spec_from_file_location("hdm_pack_root", REPO / "__init__.py",
                                                  submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # must not raise outside ComfyUI
    assert getattr(module, "NODE_CLASS_MAPPINGS", {}) == {}
