"""Generation pipeline and command-line tool on a tiny random checkpoint."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from PIL import Image

from hdm_core.checkpoint import load_components
from hdm_core.config import latent_size
from hdm_core.generate import main as generate_main
from hdm_core.pipeline import GenerationParams, generate, seeded_noise


@pytest.fixture(scope="module")
def comps(tiny_checkpoint):
    return load_components(tiny_checkpoint)


def run(comps, decode=True, **kw):
    return generate(comps, GenerationParams(**{"prompt": "a red circle", "width": 64, "height": 96, "steps": 3,
                                               "cfg": 3.0, **kw}), decode=decode)


def test_images_shape_range_and_determinism(comps):
    images = run(comps, batch_size=2, seed=5)
    assert images.shape == (2, 3, 96, 64) and 0 <= images.min() and images.max() <= 1
    assert torch.equal(run(comps, batch_size=2, seed=5), images)
    # sample i of a batch uses seed + i, so it does not depend on the batch it is in
    latents = run(comps, decode=False, batch_size=2, seed=5)  # large values: the random weights are large
    alone = run(comps, decode=False, batch_size=1, seed=6)[0]
    assert (alone - latents[1]).abs().max() < 1e-3 * latents.abs().max()  # batched kernels differ by ulps


@pytest.mark.parametrize("change", [dict(x_shift=0.5), dict(zoom=1.5), dict(tread_gamma_uncond=0.5),
                                    dict(negative_prompt="blurry"), dict(sampler="heun"), dict(shift=3.0)])
def test_every_control_changes_the_latent(comps, change):
    base = run(comps, seed=1)
    assert not torch.allclose(run(comps, seed=1, **change), base, atol=1e-4), change


@pytest.mark.parametrize("camera", [dict(x_shift=0.5), dict(y_shift=-0.25), dict(zoom=2.0),
                                    dict(x_shift=0.2, y_shift=0.1, zoom=0.5)])
def test_camera_reaches_the_model_with_its_direction(comps, monkeypatch, camera):
    """The position map the model sees is the identity map moved by the camera (SPEC §4.3): x_shift > 0 raises
    every x coordinate (the camera moves right, so content moves left), zoom > 1 shrinks the map (zooms in)."""
    seen = []
    forward = comps.model.forward
    monkeypatch.setattr(comps.model, "forward", lambda *a, **kw: seen.append(kw["pos_map"]) or forward(*a, **kw))
    run(comps, seed=1, steps=1)
    identity = seen[0]
    seen.clear()
    run(comps, seed=1, steps=1, **camera)
    shift = torch.tensor([camera.get("y_shift", 0.0), camera.get("x_shift", 0.0)])  # channels (y, x)
    torch.testing.assert_close(seen[0], (identity + shift) / camera.get("zoom", 1.0))


def test_img2img_starts_from_the_noised_input(comps):
    """With a zero-velocity model the sampler keeps its start, x = σ0·ε + (1 − σ0)·x0 with σ0 ≈ strength."""
    still = copy.deepcopy(comps)
    torch.nn.init.zeros_(still.model.out_patch.proj.weight)
    torch.nn.init.zeros_(still.model.out_patch.proj.bias)
    init = torch.rand(1, 3, 48, 32)
    x0 = comps.vae.encode(init * 2 - 1, sample=False)
    for strength in (0.05, 0.5):
        params = GenerationParams("x", width=32, height=48, steps=4, strength=strength, seed=3)
        latent = generate(still, params, init_image=init, decode=False)
        noise = seeded_noise(tuple(x0.shape), 3)
        assert torch.allclose(latent, strength * noise + (1 - strength) * x0, atol=1e-5)


def test_sizes_are_rounded_with_a_warning_and_bad_input_named(comps):
    assert latent_size(1024, 1024, downscale=8, patch=2) == (128, 128)
    with pytest.warns(UserWarning, match="1000x1000 is not a multiple of 16 px; generating 992x992"):
        assert latent_size(1000, 1000, downscale=8, patch=2, round_down=True) == (124, 124)
    with pytest.raises(ValueError, match="1010x1008 is not a multiple of 16 px.*use e.g. 1008x1008"):
        latent_size(1010, 1008, downscale=8, patch=2)
    with pytest.raises(ValueError, match="too small"):
        latent_size(8, 1024, downscale=8, patch=2, round_down=True)
    with pytest.raises(ValueError, match="unknown sampler 'ddim'"):
        run(comps, sampler="ddim")


def test_empty_and_very_long_prompts(comps):
    assert run(comps, prompt="").shape == (1, 3, 96, 64)
    long_prompt = ", ".join(["a very detailed red circle"] * 120)
    assert comps.text_encoder.encode(long_prompt)[0].shape[1] > 600  # never truncated
    assert torch.isfinite(run(comps, prompt=long_prompt)).all()


def test_cli_writes_pngs_with_parameters(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    assert generate_main(["--checkpoint", str(tiny_checkpoint), "--prompt", "a blue square", "--width", "32",
                          "--height", "32", "--steps", "2", "--batch-size", "2", "--seed", "7", "--out", str(out),
                          "--device", "cpu", "--sampler", "heun", "--shift", "2.5", "--x-shift", "0.25",
                          "--y-shift", "-0.5", "--zoom", "1.5", "--tread-gamma-cond", "0.25",
                          "--tread-gamma-uncond", "0.5"]) == 0
    files = sorted(out.glob("*.png"))
    assert len(files) == 2
    meta = json.loads(Image.open(files[1]).text["hdm"])
    assert meta["prompt"] == "a blue square" and meta["seed"] == 8 and meta["steps"] == 2
    assert (meta["x_shift"], meta["y_shift"], meta["zoom"]) == (0.25, -0.5, 1.5)
    assert (meta["tread_gamma_cond"], meta["tread_gamma_uncond"], meta["shift"]) == (0.25, 0.5, 2.5)
    assert Image.open(files[0]).text["parameters"] == (
        "a blue square\nNegative prompt: \nSteps: 2, Sampler: heun, CFG scale: 3.0, Seed: 7, Size: 32x32, "
        "Shift: 2.5, X shift: 0.25, Y shift: -0.5, Zoom: 1.5, TREAD gamma cond: 0.25, TREAD gamma uncond: 0.5")


def test_cli_help_shows_every_default(capsys):
    """--help names the default of every option; where the default is None the help says what that means."""
    with pytest.raises(SystemExit):
        generate_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "None" not in text
    for shown in ("--steps STEPS sampling steps (default: 32)", "(default: fp16 on GPU, fp32 on CPU)",
                  "(default: cuda if available, else mps, else cpu)", "--zoom ZOOM camera: > 1 zooms in (default: 1.0)",
                  "(default: euler)", "(default: outputs)", "(default: empty)"):
        assert shown in text, shown


def test_cli_interrupt_writes_nothing(tiny_checkpoint, tmp_path, monkeypatch):
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr("hdm_core.generate.generate", interrupted)
    out = tmp_path / "out"
    assert generate_main(["--checkpoint", str(tiny_checkpoint), "--prompt", "x", "--out", str(out),
                          "--device", "cpu"]) == 130
    assert not out.exists() or not list(out.iterdir())
