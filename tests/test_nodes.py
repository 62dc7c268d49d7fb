"""Node logic without ComfyUI: ids and widgets (HDM-ext compatibility), inputs → outputs, no mutation of inputs,
validation. The pack is imported the way ComfyUI imports it (as a package under a path-derived name), and the
ComfyUI glue (nodes/loading.py, and hdm_sample in nodes/sampling.py) is replaced by fakes where a node delegates."""

from __future__ import annotations

import copy
import importlib.util
import math
import sys
import types
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
PKG = "hdm_pack_under_test"
GLUE_FILES = {"model.py", "text_encoder.py", "loading.py"}


@pytest.fixture(scope="module")
def pack():
    spec = importlib.util.spec_from_file_location(PKG, REPO / "__init__.py", submodule_search_locations=[str(REPO)])
    module = importlib.util.module_from_spec(spec)
    sys.modules[PKG] = module
    spec.loader.exec_module(module)
    assert not hasattr(module, "NODE_CLASS_MAPPINGS")  # outside ComfyUI the root defines nothing
    nodes = importlib.import_module(f"{PKG}.nodes")
    yield nodes
    for name in [n for n in sys.modules if n == PKG or n.startswith(PKG + ".")]:
        del sys.modules[name]


@pytest.fixture
def glue(pack, monkeypatch):
    """A fake nodes/loading.py (and nodes.sampling.hdm_sample) recording calls."""
    fake = types.ModuleType(f"{PKG}.nodes.loading")
    fake.WEIGHT_DTYPES = ["default", "fp32", "bf16", "fp16", "fp8_e4m3fn", "fp8_e4m3fn_fast", "fp8_e5m2"]
    fake.calls = []
    fake.list_files = lambda kind: {"checkpoints": ["hdm-xut-340M-1024px-note.safetensors"]}.get(kind, [f"{kind}.st"])
    fake.missing_file_message = lambda kind, name: None if name.endswith((".safetensors", ".st")) else f"{name} missing"

    def record(name, result):
        def fn(*args, **kwargs):
            fake.calls.append((name, args, kwargs))
            return result
        return fn

    fake.load_checkpoint = record("load_checkpoint", ("MODEL", "CLIP", "VAE"))
    fake.load_split = record("load_split", ("MODEL", "CLIP", "VAE"))
    monkeypatch.setitem(sys.modules, fake.__name__, fake)
    monkeypatch.setattr(pack, "loading", fake, raising=False)
    monkeypatch.setattr(pack.sampling, "hdm_sample", record("hdm_sample", {"samples": torch.ones(1)}))
    return fake


def conditioning(length: int = 3, **extra) -> list:
    return [[torch.randn(1, length, 8), {"pooled_output": None, **extra}]]


# ---------------------------------------------------------------------------------------------------
# Registration and HDM-ext compatibility
# ---------------------------------------------------------------------------------------------------

def test_registration(pack, glue):
    ids = {"HDMLoader", "HDMSplitLoader", "HDMTextEncode", "HDMCameraParam", "HDMTreadGamma", "HDMSampler",
           "HDMCameraSweep", "HDMEmptyLatent"}
    assert set(pack.NODE_CLASS_MAPPINGS) == ids == set(pack.NODE_DISPLAY_NAME_MAPPINGS)
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["HDMLoader"] == "HDM Checkpoint Loader"
    assert pack.NODE_DISPLAY_NAME_MAPPINGS["HDMCameraParam"] == "HDM Camera"
    for node_id, cls in pack.NODE_CLASS_MAPPINGS.items():
        spec = cls.INPUT_TYPES()
        assert set(spec) <= {"required", "optional", "hidden"}, node_id
        assert isinstance(cls.RETURN_TYPES, tuple) and callable(getattr(cls, cls.FUNCTION)), node_id
        assert len(cls.OUTPUT_TOOLTIPS) == len(cls.RETURN_TYPES), node_id
        assert all(isinstance(t, str) for t in cls.OUTPUT_TOOLTIPS), node_id
        assert cls.CATEGORY.startswith("HDM/") and cls.DESCRIPTION, node_id


def test_hdm_ext_widgets(pack, glue):
    loader = pack.NODE_CLASS_MAPPINGS["HDMLoader"].INPUT_TYPES()
    assert list(loader["required"]) == ["ckpt_name"] and "optional" not in loader
    assert loader["required"]["ckpt_name"][0] == ["hdm-xut-340M-1024px-note.safetensors"]

    camera = pack.NODE_CLASS_MAPPINGS["HDMCameraParam"].INPUT_TYPES()["required"]
    assert list(camera) == ["positive", "negative", "x_shift", "y_shift", "zoom"]
    for name in ("x_shift", "y_shift"):
        opts = camera[name][1]
        assert (opts["min"], opts["max"], opts["step"], opts["default"], opts["display"]) == (-5.0, 5.0, 0.01, 0.0,
                                                                                             "slider")
    zoom = camera["zoom"][1]
    assert (zoom["min"], zoom["max"], zoom["default"], zoom["display"]) == (0.2, 5.0, 1.0, "slider")

    gamma = pack.NODE_CLASS_MAPPINGS["HDMTreadGamma"].INPUT_TYPES()["required"]
    assert list(gamma) == ["positive", "negative", "positive_gamma", "negative_gamma"]
    assert all(gamma[k][1]["min"] == 0.0 and gamma[k][1]["max"] == 1.0 for k in ("positive_gamma", "negative_gamma"))
    for cls in ("HDMCameraParam", "HDMTreadGamma"):
        assert pack.NODE_CLASS_MAPPINGS[cls].RETURN_TYPES == ("CONDITIONING", "CONDITIONING")


# ---------------------------------------------------------------------------------------------------
# Conditioning nodes
# ---------------------------------------------------------------------------------------------------

def test_camera_sets_values_without_mutating(pack):
    pos, neg = conditioning(5, tread_gamma=0.2), conditioning(2)
    before = copy.deepcopy((pos, neg))
    out_pos, out_neg = pack.HDMCameraParam().apply(pos, neg, 0.5, -0.25, 1.5)
    assert out_pos[0][1] == {"pooled_output": None, "tread_gamma": 0.2, "x_shift": 0.5, "y_shift": -0.25, "zoom": 1.5}
    assert out_neg[0][1]["zoom"] == 1.5 and "tread_gamma" not in out_neg[0][1]
    assert out_pos[0][0] is pos[0][0]  # tensors are shared, dicts are copies
    assert out_pos[0][1] is not pos[0][1]
    assert repr(before) == repr((pos, neg)) and "x_shift" not in pos[0][1]
    with pytest.raises(ValueError):
        pack.HDMCameraParam().apply(pos, neg, 0.0, 0.0, 0.0)
    for bad in ((math.nan, 0.0, 1.0), (0.0, math.inf, 1.0), (0.0, 0.0, math.nan)):  # the API accepts NaN widgets
        with pytest.raises(ValueError, match="must be a finite number"):
            pack.HDMCameraParam().apply(pos, neg, *bad)
    with pytest.raises(ValueError, match="positive_gamma"):
        pack.HDMTreadGamma().apply(pos, neg, math.nan, 0.15)
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    with pytest.raises(ValueError, match="zoom must be a finite number > 0"):
        pack.HDMCameraSweep().apply(pos, neg, latent, 3, 0.0, 0.0, 1.0, 0.5, 0.0, math.nan)


def test_tread_gamma_goes_to_its_own_conditioning(pack):
    pos, neg = conditioning() + conditioning(4), conditioning(2)
    out_pos, out_neg = pack.HDMTreadGamma().apply(pos, neg, 0.0, 0.15)
    assert [c[1]["tread_gamma"] for c in out_pos] == [0.0, 0.0]  # HDM-ext wrote 0.15 here
    assert [c[1]["tread_gamma"] for c in out_neg] == [0.15]
    assert all("tread_gamma" not in c[1] for c in pos + neg)
    with pytest.raises(ValueError, match="negative_gamma"):
        pack.HDMTreadGamma().apply(pos, neg, 0.0, 1.0)


def test_camera_path(pack):
    from hdm_pack_under_test.nodes.conditioning import camera_path

    path = camera_path(5, (-0.5, 0.2, 1.0), (0.5, 0.2, 4.0))
    assert torch.allclose(path["x_shift"], torch.tensor([-0.5, -0.25, 0.0, 0.25, 0.5]))
    assert torch.allclose(path["y_shift"], torch.full((5,), 0.2))
    assert torch.allclose(path["zoom"], torch.tensor([1.0, math.sqrt(2), 2.0, 2 * math.sqrt(2), 4.0]))  # constant speed
    eased = camera_path(5, (-1.0, 0.0, 1.0), (1.0, 0.0, 1.0), "ease_in_out")["x_shift"]
    assert eased[0] == -1.0 and eased[-1] == 1.0 and abs(eased[2]) < 1e-7 and eased[1] < -0.5


def test_camera_sweep(pack):
    pos, neg = conditioning(3), conditioning(6)
    latent = {"samples": torch.randn(2, 4, 8, 12), "batch_index": [5, 6]}
    before = copy.deepcopy((pos, neg, latent))
    out_pos, out_neg, out_latent = pack.HDMCameraSweep().apply(pos, neg, latent, 4, -0.5, 0.0, 1.0, 0.5, 0.0, 2.0)
    assert out_latent["samples"].shape == (4, 4, 8, 12)
    assert torch.equal(out_latent["samples"][3], latent["samples"][0])
    assert out_latent["batch_index"] == [5, 5, 5, 5]  # same noise for every frame
    for out in (out_pos, out_neg):
        assert out[0][1]["x_shift"].shape == (4,) and out[0][1]["zoom"][-1].item() == pytest.approx(2.0)
    assert repr(before) == repr((pos, neg, latent)) and latent["batch_index"] == [5, 6]
    with pytest.raises(ValueError):
        pack.HDMCameraSweep().apply(pos, neg, latent, 4, 0.0, 0.0, 0.0, 0.0, 0.0, 1.0)


def test_text_encode(pack):
    class Tokenizer:
        def tokenize_official(self, text):
            return {"qwen3_06b": [[(len(text), 1.0)]]}

    class Clip:
        tokenizer = Tokenizer()

        def encode_from_tokens_scheduled(self, tokens):
            return [[torch.zeros(1, 1, 8), {"tokens": tokens}]]

    (cond,) = pack.HDMTextEncode().encode(Clip(), "abc")
    assert cond[0][1]["tokens"] == {"qwen3_06b": [[(3, 1.0)]]}
    with pytest.raises(ValueError, match="CLIPTextEncode"):
        pack.HDMTextEncode().encode(types.SimpleNamespace(tokenizer=object()), "abc")
    with pytest.raises(RuntimeError, match="None"):
        pack.HDMTextEncode().encode(None, "abc")


# ---------------------------------------------------------------------------------------------------
# Latent, loaders, sampler
# ---------------------------------------------------------------------------------------------------

def test_empty_latent_presets_are_hdm_friendly(pack):
    from hdm_pack_under_test.nodes.latent import CUSTOM, RESOLUTIONS

    node = pack.HDMEmptyLatent()
    for name, (w, h) in RESOLUTIONS.items():
        assert w % 32 == 0 and h % 32 == 0 and 0.85e6 <= w * h <= 1.25e6, name
        latent, width, height = node.generate(name, 512, 512, 2)
        assert (width, height) == (w, h) and latent["samples"].shape == (2, 4, h // 8, w // 8)
        assert not latent["samples"].any()
    assert node.generate(CUSTOM, 528, 400, 1)[0]["samples"].shape == (1, 4, 50, 66)
    with pytest.raises(ValueError, match="multiple of 16"):
        node.generate(CUSTOM, 1000, 1024, 1)
    pixel_vae = types.SimpleNamespace(latent_channels=3, spacial_compression_encode=lambda: 1)
    assert node.generate(CUSTOM, 64, 32, 1, vae=pixel_vae)[0]["samples"].shape == (1, 3, 32, 64)


def test_loaders_delegate_and_validate(pack, glue):
    assert pack.HDMLoader.VALIDATE_INPUTS("hdm-xut-340M-1024px-note.safetensors") is True
    assert pack.HDMLoader.VALIDATE_INPUTS("gone.ckpt") == "gone.ckpt missing"
    assert pack.HDMLoader().load("x.safetensors") == ("MODEL", "CLIP", "VAE")
    assert glue.calls[-1] == ("load_checkpoint", ("x.safetensors",), {})
    split = pack.HDMSplitLoader
    assert list(split.INPUT_TYPES()["required"]) == ["unet_name", "clip_name", "vae_name", "weight_dtype"]
    assert split.VALIDATE_INPUTS("a.st", "b.st", "c.st") is True
    assert split.VALIDATE_INPUTS("a.st", "b.pt", "c.pt") == "b.pt missing c.pt missing"
    for weight_dtype in ("fp16", "fp8_e4m3fn"):
        split().load("a.st", "b.st", "c.st", weight_dtype)
        assert glue.calls[-1] == ("load_split", ("a.st", "b.st", "c.st", weight_dtype), {})
    assert split.INPUT_TYPES()["required"]["weight_dtype"][0] == glue.WEIGHT_DTYPES


def test_sampler_delegates(pack, glue):
    spec = pack.HDMSampler.INPUT_TYPES()["required"]
    assert list(spec) == ["model", "positive", "negative", "latent_image", "seed", "steps", "cfg", "sampler_name",
                          "shift", "denoise"]
    assert spec["sampler_name"][0] == ["euler", "heun", "dpmpp_2m"] and spec["seed"][1]["control_after_generate"]
    from hdm_core.sampling import SAMPLERS

    assert set(spec["sampler_name"][0]) <= set(SAMPLERS)
    (out,) = pack.HDMSampler().sample("m", "p", "n", {"samples": 0}, 1, 2, 3.0, "heun", 1.5, 0.5)
    assert torch.equal(out["samples"], torch.ones(1))
    assert glue.calls[-1][1] == ("m", "p", "n", {"samples": 0}, 1, 2, 3.0, "heun", 1.5, 0.5)


def test_sampler_noise_follows_batch_index(pack):
    """HDM Sampler's own noise: sample i is seeded with seed + batch_index[i], so an image does not depend on its
    batch and a camera sweep, whose batch_index repeats, shares one noise."""
    from hdm_core.pipeline import seeded_noise

    samples = torch.zeros(3, 4, 6, 8)
    torch.testing.assert_close(pack.sampling.batch_noise({"samples": samples}, samples, 10),
                               seeded_noise((3, 4, 6, 8), 10), rtol=0, atol=0)
    swept = pack.sampling.batch_noise({"samples": samples, "batch_index": [5, 5, 5]}, samples, 10)
    assert all(torch.equal(frame, seeded_noise((1, 4, 6, 8), 15)[0]) for frame in swept)


def test_node_modules_do_not_import_comfyui():
    """Node files import without ComfyUI: at module level they import neither ComfyUI nor the glue files (which
    import ComfyUI at the top); they do so inside the functions that run in ComfyUI."""
    import ast

    comfy = {"comfy", "comfy_api", "comfy_extras", "folder_paths", "node_helpers", "server", "latent_preview",
             "execution"}
    glue = {name.removesuffix(".py") for name in GLUE_FILES}
    for path in sorted((REPO / "nodes").glob("*.py")):
        if path.name in GLUE_FILES:
            continue
        top = [n for n in ast.parse(path.read_text()).body if isinstance(n, (ast.Import, ast.ImportFrom))]
        roots = {a.name.split(".")[0] for n in top if isinstance(n, ast.Import) for a in n.names}
        roots |= {n.module.split(".")[0] for n in top if isinstance(n, ast.ImportFrom) and n.level == 0}
        ours = {n.module or a.name for n in top if isinstance(n, ast.ImportFrom) and n.level == 1 for a in n.names}
        assert not roots & comfy, f"{path.name} imports {roots & comfy}"
        assert not ours & glue, f"{path.name} imports the glue {ours & glue} at module level"
