"""Golden parity with the official implementation (SPEC test-vector how-to). Tolerance 1e-4 max-abs."""

from __future__ import annotations

import hashlib

import pytest
import torch
from safetensors.torch import load_file

from hdm_core import XUT, Camera, XUTConfig, canvas_position_map, downsample_pos, make_axial_pos
from hdm_core.checkpoint import UNET_PREFIX, load_xut, save_single_file
from hdm_core.pipeline import make_denoiser
from hdm_core.sampling import flow_sigmas, sample_euler

TOL = 1e-4


@pytest.fixture(scope="module")
def golden(golden_dir):
    return {name: load_file(golden_dir / f"{name}.safetensors")
            for name in ("weights", "inputs", "outputs", "intermediates_camera", "sampling")}


@pytest.fixture(scope="module")
def model(golden, golden_config):
    m = XUT(XUTConfig.from_dict(golden_config["config"])).eval()
    m.load_state_dict(golden["weights"], strict=True)
    return m


def max_abs(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return (a.double() - b.double()).abs().max().item()


def test_files_match_their_checksums(golden_dir, golden_config):
    for name, digest in golden_config["sha256"].items():
        assert hashlib.sha256((golden_dir / name).read_bytes()).hexdigest() == digest, name


@pytest.mark.parametrize("output, pos_key", [
    ("out_camera", "pos_map_camera_latent"),
    ("out_default", None),
    ("out_identity_camera", "pos_map_identity_latent"),
])
def test_forward(model, golden, output, pos_key):
    i = golden["inputs"]
    with torch.no_grad():
        y = model(i["x"], i["t"], i["ctx"], pos_map=i[pos_key] if pos_key else None, aspect=i["addon_info"])
    assert max_abs(y, golden["outputs"][output]) < TOL


def test_forward_tread_with_recorded_keep_mask(model, golden):
    i = golden["inputs"]
    with torch.no_grad():
        y = model(i["x"], i["t"], i["ctx"], aspect=i["addon_info"], tread_keep=i["tread_keep_mask"])
    assert max_abs(y, golden["outputs"]["out_tread"]) < TOL


def test_forward_fp64_matches_official_fp64(model, golden):
    i = golden["inputs"]
    m64 = model.double()
    try:
        with torch.no_grad():
            y = m64(i["x"].double(), i["t"].double(), i["ctx"].double(), pos_map=i["pos_map_camera_latent"],
                    aspect=i["addon_info"].double())
    finally:
        model.float()
    assert max_abs(y, golden["outputs"]["out_camera_fp64"]) < 1e-6


def test_intermediates(model, golden):
    """Stage by stage: every block output of the camera call."""
    i, ref = golden["inputs"], golden["intermediates_camera"]
    seen = {}
    hooks = [mod.register_forward_hook(lambda m, a, out, name=name: seen.__setitem__(name, out))
             for name, mod in model.named_modules() if f"block.{name}" in ref]
    try:
        with torch.no_grad():
            model(i["x"], i["t"], i["ctx"], pos_map=i["pos_map_camera_latent"], aspect=i["addon_info"])
    finally:
        for h in hooks:
            h.remove()
    block_keys = [k for k in ref if k.startswith("block.")]
    assert block_keys and len(seen) == len(block_keys)
    for name, out in seen.items():
        assert max_abs(out, ref[f"block.{name}"]) < TOL, name


def test_camera_map_and_its_reduction(golden):
    i, o = golden["inputs"], golden["outputs"]
    b, _, h, w = i["x"].shape
    for k in range(b):
        ours = canvas_position_map(h, w, Camera(i["x_shift"][k].item(), i["y_shift"][k].item(), i["zoom"][k].item()))
        assert max_abs(ours, i["pos_map_camera_latent"][k]) <= 2e-7
        assert max_abs(downsample_pos(ours, h, w)[0], o["pos_map_patch_camera"][k]) <= 2e-7
    assert max_abs(canvas_position_map(h, w), i["pos_map_identity_latent"][0]) <= 2e-7
    assert max_abs(make_axial_pos(h // 2, w // 2), o["pos_map_patch_default"][0]) <= 2e-7


def test_sampling_run(model, golden, golden_config):
    s, cfg = golden["sampling"], golden_config["sampling"]
    denoise = make_denoiser(model, s["cond_ctx"], s["uncond_ctx"], cfg["cfg_scale"], pos_map=s["pos_map_latent"],
                            aspect=s["addon_info"])
    sigmas = flow_sigmas(cfg["steps"])
    for k in range(cfg["steps"]):
        assert sigmas[k].item() == pytest.approx(s[f"t_step{k}"].item(), abs=1e-7)
    steps = []
    final = sample_euler(denoise, s["noise"], sigmas, callback=steps.append)
    for k in range(1, cfg["steps"]):
        assert max_abs(steps[k - 1]["x"], s[f"x_step{k}"]) < TOL
    assert max_abs(final, s["final_latent"]) < TOL


def test_single_file_loader_reproduces_golden(golden, golden_config, tmp_path):
    path = tmp_path / "golden_single.safetensors"
    save_single_file(path, golden["weights"], XUTConfig.from_dict(golden_config["config"]))
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        assert all(k.startswith(UNET_PREFIX) for k in f.keys())
    model = load_xut(path)
    i = golden["inputs"]
    with torch.no_grad():
        y = model(i["x"], i["t"], i["ctx"], pos_map=i["pos_map_camera_latent"], aspect=i["addon_info"])
    assert max_abs(y, golden["outputs"]["out_camera"]) < TOL
