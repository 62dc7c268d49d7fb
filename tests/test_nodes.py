"""The node pack without ComfyUI: the node logic (inputs → outputs, no mutation of inputs, validation messages) and
the layering that lets CI import it. The pack is imported the way ComfyUI imports it (as a package under a
path-derived name). The node schemas themselves (ids, widgets, tooltips) need ComfyUI's comfy_api: they are
checked through a real server's /object_info in tests/test_comfy_integration.py, and statically here."""

from __future__ import annotations

import ast
import copy
import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
NODES = REPO / "nodes"
PKG = "hdm_pack_under_test"
GLUE_FILES = {"model.py", "text_encoder.py", "loading.py", "positions.py"}  # ComfyUI glue: ComfyUI at the top
LOGIC_FILES = {"conditioning.py", "latent.py", "sampling.py"}               # node logic: no ComfyUI at the top
SHELL_FILES = {"schema.py", "extension.py", *(p.name for p in NODES.glob("*_nodes.py"))}
# The first release's ids (HDMLoader, HDMCameraParam, HDMTreadGamma: HDM-ext's), first in NODE_IDS and permanent.
IDS = ("HDMLoader", "HDMSplitLoader", "HDMTextEncode", "HDMCameraParam", "HDMTreadGamma", "HDMSampler",
       "HDMCameraSweep", "HDMEmptyLatent")
COMFY_MODULES = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "node_helpers", "server", "latent_preview",
                 "execution"}


@pytest.fixture(scope="module")
def pack():
    spec = importlib.util.spec_from_file_location(PKG, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PKG] = module
    spec.loader.exec_module(module)
    assert not hasattr(module, "comfy_entrypoint")  # outside ComfyUI the root defines nothing
    nodes = importlib.import_module(f"{PKG}.nodes")
    for name in LOGIC_FILES:
        importlib.import_module(f"{PKG}.nodes.{name.removesuffix('.py')}")
    yield nodes
    for name in [n for n in sys.modules if n == PKG or n.startswith(PKG + ".")]:
        del sys.modules[name]


def conditioning(length: int = 3, **extra) -> list:
    return [[torch.randn(1, length, 8), {"pooled_output": None, **extra}]]


def camera(*values):
    from hdm_core.canvas import Camera

    return Camera(*values)


# ---------------------------------------------------------------------------------------------------
# Registration and layering (static)
# ---------------------------------------------------------------------------------------------------

def top_level_imports(path: Path) -> tuple[set[str], set[str]]:
    """(absolute import roots, relative module names) a file imports at module level."""
    top = [n for n in ast.parse(path.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))]
    roots = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names}
    roots |= {n.module.split(".")[0] for n in top if isinstance(n, ast.ImportFrom) and n.level == 0}
    ours = {n.module or a.name for n in top if isinstance(n, ast.ImportFrom) and n.level == 1 for a in n.names}
    return roots, ours


def test_node_ids_are_the_permanent_ones(pack):
    """NODE_IDS starts with the first release's ids; every shell declares one of NODE_IDS, and the extension lists
    the classes in that order (class name = node id)."""
    assert pack.NODE_IDS[:len(IDS)] == IDS and len(set(pack.NODE_IDS)) == len(pack.NODE_IDS)
    assert callable(pack.comfy_entrypoint)
    declared = [node.value.value for path in sorted(NODES.glob("*_nodes.py")) for node in ast.walk(ast.parse(
        path.read_text())) if isinstance(node, ast.keyword) and node.arg == "node_id"]
    assert sorted(declared) == sorted(pack.NODE_IDS)
    extension = ast.parse((NODES / "extension.py").read_text())
    listed = next(n for n in extension.body if isinstance(n, ast.AnnAssign) and n.target.id == "NODES")
    assert [e.id for e in listed.value.elts] == list(pack.NODE_IDS)


def test_every_file_is_of_one_kind():
    assert {p.name for p in NODES.glob("*.py")} - {"__init__.py"} <= GLUE_FILES | LOGIC_FILES | SHELL_FILES


def test_node_logic_imports_without_comfyui():
    """Logic files import neither ComfyUI nor the glue nor the shells at module level (inside functions they may);
    nodes/__init__.py imports nothing at module level (the shells come in through comfy_entrypoint)."""
    for name in sorted(LOGIC_FILES):
        roots, ours = top_level_imports(NODES / name)
        assert not roots & COMFY_MODULES, f"{name} imports {roots & COMFY_MODULES}"
        glue_or_shell = {n.removesuffix(".py") for n in GLUE_FILES | SHELL_FILES}
        assert not ours & glue_or_shell, f"{name} imports {ours & glue_or_shell} at module level"
    assert top_level_imports(NODES / "__init__.py") == (set(), set())


def test_schemas_pin_the_versioned_api_and_guard_new_fields():
    """Shells take comfy_api only through schema.py, which imports the versioned adapter (not `latest`) and passes
    search_aliases only where io.Schema has that field (0.8.0's raises TypeError on it)."""
    for name in sorted(SHELL_FILES - {"schema.py"}):
        roots, _ = top_level_imports(NODES / name)
        assert not roots & COMFY_MODULES, f"{name} imports {roots & COMFY_MODULES}: go through schema.py"
    source = (NODES / "schema.py").read_text()
    imported = {n.module for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)}
    assert "comfy_api.v0_0_2" in imported and not any(m.startswith("comfy_api.latest") for m in imported if m)
    assert '"search_aliases" in SCHEMA_FIELDS' in source
    for path in NODES.glob("*_nodes.py"):
        assert "io.Schema(" not in path.read_text(), f"{path.name}: build schemas with node_schema()"


def test_every_input_and_output_has_a_tooltip_and_every_node_a_description():
    """Statically: every io.*.Input / io.*.Output call names a tooltip; every schema a description and an HDM
    category (the served /object_info is checked in tests/test_comfy_integration.py)."""
    for path in sorted(NODES.glob("*.py")):
        if path.name not in SHELL_FILES:
            continue
        for call in (n for n in ast.walk(ast.parse(path.read_text())) if isinstance(n, ast.Call)):
            func = call.func
            kwargs = {k.arg for k in call.keywords}
            if isinstance(func, ast.Attribute) and func.attr in ("Input", "Output"):
                assert "tooltip" in kwargs, f"{path.name}:{call.lineno} has no tooltip"
            if isinstance(func, ast.Name) and func.id == "node_schema":
                assert {"description", "category", "display_name", "search_aliases"} <= kwargs, \
                    f"{path.name}:{call.lineno}"


# ---------------------------------------------------------------------------------------------------
# Conditioning logic
# ---------------------------------------------------------------------------------------------------

def test_camera_sets_values_without_mutating(pack):
    cond = pack.conditioning
    pos, neg = conditioning(5, tread_gamma=0.2), conditioning(2)
    before = copy.deepcopy((pos, neg))
    out_pos, out_neg = cond.with_camera(pos, neg, camera(0.5, -0.25, 1.5))
    assert out_pos[0][1] == {"pooled_output": None, "tread_gamma": 0.2, "x_shift": 0.5, "y_shift": -0.25, "zoom": 1.5}
    assert out_neg[0][1]["zoom"] == 1.5 and "tread_gamma" not in out_neg[0][1]
    assert out_pos[0][0] is pos[0][0]  # tensors are shared, dicts are copies
    assert out_pos[0][1] is not pos[0][1]
    assert repr(before) == repr((pos, neg)) and "x_shift" not in pos[0][1]


def test_tread_gamma_goes_to_its_own_conditioning(pack):
    cond = pack.conditioning
    pos, neg = conditioning() + conditioning(4), conditioning(2)
    out_pos, out_neg = cond.with_tread_gamma(pos, neg, 0.0, 0.15)
    assert [c[1]["tread_gamma"] for c in out_pos] == [0.0, 0.0]  # HDM-ext wrote 0.15 here
    assert [c[1]["tread_gamma"] for c in out_neg] == [0.15]
    assert all("tread_gamma" not in c[1] for c in pos + neg)
    with pytest.raises(ValueError, match="negative_gamma"):
        cond.with_tread_gamma(pos, neg, 0.0, 1.0)
    with pytest.raises(ValueError, match="positive_gamma"):
        cond.with_tread_gamma(pos, neg, math.nan, 0.15)


def test_camera_path(pack):
    path = pack.conditioning.camera_path(5, camera(-0.5, 0.2, 1.0), camera(0.5, 0.2, 4.0))
    assert torch.allclose(path["x_shift"], torch.tensor([-0.5, -0.25, 0.0, 0.25, 0.5]))
    assert torch.allclose(path["y_shift"], torch.full((5,), 0.2))
    assert torch.allclose(path["zoom"], torch.tensor([1.0, math.sqrt(2), 2.0, 2 * math.sqrt(2), 4.0]))  # constant speed
    eased = pack.conditioning.camera_path(5, camera(-1.0, 0.0, 1.0), camera(1.0, 0.0, 1.0), "ease_in_out")["x_shift"]
    assert eased[0] == -1.0 and eased[-1] == 1.0 and abs(eased[2]) < 1e-7 and eased[1] < -0.5
    with pytest.raises(ValueError, match="easing must be one of linear, ease_in_out"):
        pack.conditioning.camera_path(3, camera(), camera(), "bounce")


def test_camera_sweep(pack):
    pos, neg = conditioning(3), conditioning(6)
    latent = {"samples": torch.randn(2, 4, 8, 12), "batch_index": [5, 6]}
    before = copy.deepcopy((pos, neg, latent))
    out_pos, out_neg, out_latent = pack.conditioning.sweep(pos, neg, latent, 4, camera(-0.5, 0.0, 1.0),
                                                           camera(0.5, 0.0, 2.0))
    assert out_latent["samples"].shape == (4, 4, 8, 12)
    assert torch.equal(out_latent["samples"][3], latent["samples"][0])
    assert out_latent["batch_index"] == [5, 5, 5, 5]  # same noise for every frame
    for out in (out_pos, out_neg):
        assert out[0][1]["x_shift"].shape == (4,) and out[0][1]["zoom"][-1].item() == pytest.approx(2.0)
    assert repr(before) == repr((pos, neg, latent)) and latent["batch_index"] == [5, 6]
    with pytest.raises(ValueError, match="frames >= 2"):
        pack.conditioning.sweep(pos, neg, latent, 1, camera(), camera())


def test_text_encode(pack):
    class Tokenizer:
        def tokenize_official(self, text):
            return {"qwen3_06b": [[(len(text), 1.0)]]}

    class Clip:
        tokenizer = Tokenizer()

        def encode_from_tokens_scheduled(self, tokens):
            return [[torch.zeros(1, 1, 8), {"tokens": tokens}]]

    cond = pack.conditioning.encode_official(Clip(), "abc")
    assert cond[0][1]["tokens"] == {"qwen3_06b": [[(3, 1.0)]]}
    with pytest.raises(ValueError, match="CLIPTextEncode"):
        pack.conditioning.encode_official(types.SimpleNamespace(tokenizer=object()), "abc")
    with pytest.raises(RuntimeError, match="None"):
        pack.conditioning.encode_official(None, "abc")


# ---------------------------------------------------------------------------------------------------
# Latent and sampler logic
# ---------------------------------------------------------------------------------------------------

def test_empty_latent_presets_are_hdm_friendly(pack):
    latent = pack.latent
    for name, (w, h) in latent.RESOLUTIONS.items():
        assert w % 32 == 0 and h % 32 == 0 and 0.85e6 <= w * h <= 1.25e6, name
        out, width, height = latent.empty_latent(name, 512, 512, 2)
        assert (width, height) == (w, h) and out["samples"].shape == (2, 4, h // 8, w // 8)
        assert not out["samples"].any()
    assert latent.DEFAULT_RESOLUTION in latent.RESOLUTIONS
    assert latent.empty_latent(latent.CUSTOM, 528, 400, 1)[0]["samples"].shape == (1, 4, 50, 66)
    with pytest.raises(ValueError, match="multiple of 16"):
        latent.empty_latent(latent.CUSTOM, 1000, 1024, 1)
    pixel_vae = types.SimpleNamespace(latent_channels=3, spacial_compression_encode=lambda: 1)
    assert latent.empty_latent(latent.CUSTOM, 64, 32, 1, vae=pixel_vae)[0]["samples"].shape == (1, 3, 32, 64)


@pytest.mark.parametrize("batch", [0, -1, 4097, 1.5, True])
def test_empty_latent_refuses_a_batch_it_cannot_make(pack, batch):
    """A linked INT skips ComfyUI's widget range check: batch 0 used to give an empty LATENT that failed later."""
    with pytest.raises(ValueError, match=r"batch_size must be a whole number from 1 to 4096, got .*number of images"):
        pack.latent.empty_latent(pack.latent.DEFAULT_RESOLUTION, 1024, 1024, batch)


def test_empty_latent_names_an_unknown_resolution(pack):
    with pytest.raises(ValueError, match="unknown resolution '999x999'"):
        pack.latent.empty_latent("999x999", 1024, 1024, 1)


def test_sampler_noise_follows_batch_index(pack):
    """HDM Sampler's own noise: sample i is seeded with seed + batch_index[i], so an image does not depend on its
    batch and a camera sweep, whose batch_index repeats, shares one noise."""
    from hdm_core.pipeline import seeded_noise

    samples = torch.zeros(3, 4, 6, 8)
    torch.testing.assert_close(pack.sampling.batch_noise({"samples": samples}, samples, 10),
                               seeded_noise((3, 4, 6, 8), 10), rtol=0, atol=0)
    swept = pack.sampling.batch_noise({"samples": samples, "batch_index": [5, 5, 5]}, samples, 10)
    assert all(torch.equal(frame, seeded_noise((1, 4, 6, 8), 15)[0]) for frame in swept)


def test_sampler_choices_are_hdm_core_samplers():
    from hdm_core.sampling import SAMPLERS

    assert list(SAMPLERS) == ["euler", "heun", "dpmpp_2m"]  # HDM Sampler's sampler_name options, in this order
