"""Generation pipeline and command-line tool on a tiny random checkpoint."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from PIL import Image

from hdm_core.canvas import Camera, Region, canvas_position_map
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


@pytest.mark.parametrize("change", [dict(camera=Camera(x_shift=0.5)), dict(camera=Camera(zoom=1.5)),
                                    dict(tread_gamma_uncond=0.5), dict(tile_size=32, tile_overlap=16),
                                    dict(negative_prompt="blurry"), dict(sampler="heun"), dict(shift=3.0)])
def test_every_control_changes_the_latent(comps, change):
    base = run(comps, seed=1)
    assert not torch.allclose(run(comps, seed=1, **change), base, atol=1e-4), change


@pytest.mark.parametrize("camera", [Camera(x_shift=0.5), Camera(y_shift=-0.25), Camera(zoom=2.0),
                                    Camera(x_shift=0.2, y_shift=0.1, zoom=0.5)])
def test_camera_reaches_the_model_with_its_direction(comps, monkeypatch, camera):
    """The position map the model sees is the identity map moved by the camera (SPEC §4.3): x_shift > 0 raises
    every x coordinate (the camera moves right, so content moves left), zoom > 1 shrinks the map (zooms in)."""
    seen = []
    forward = comps.model.forward
    monkeypatch.setattr(comps.model, "forward", lambda *a, **kw: seen.append(kw["pos_map"]) or forward(*a, **kw))
    run(comps, seed=1, steps=1)
    identity = seen[0]
    seen.clear()
    run(comps, seed=1, steps=1, camera=camera)
    shift = torch.tensor([camera.y_shift, camera.x_shift])  # channels (y, x)
    torch.testing.assert_close(seen[0], (identity + shift) / camera.zoom)


def test_tiles_cover_the_canvas_at_their_place(comps, monkeypatch):
    """Tiled sampling: one tile covering the canvas is the untiled result bit for bit; tiles that do not divide
    the canvas each get their slice of the canvas's map (stacked `tile_batch` at a time), and the result is
    close to the untiled one where the tiles agree (a model this random does not, so only finiteness there)."""
    untiled = run(comps, decode=False, seed=2)
    assert torch.equal(run(comps, decode=False, seed=2, tile_size=96, tile_overlap=32), untiled)
    seen = []
    forward = comps.model.forward
    monkeypatch.setattr(comps.model, "forward", lambda *a, **kw: seen.append((a[0].shape, kw["pos_map"])) or
                        forward(*a, **kw))
    tiled = run(comps, decode=False, seed=2, steps=1, tile_size=48, tile_overlap=16, tile_batch=2)
    assert torch.isfinite(tiled).all() and tiled.shape == untiled.shape
    # a 12 x 8 latent in 6 x 6 tiles overlapping by 2: rows start at 0, 3, 6 and columns at 0, 2; two tiles per
    # call, each with the cond and uncond samples (CFG batched): three calls of 4 per step
    assert [tuple(shape) for shape, _ in seen] == [(4, 4, 6, 6)] * 3
    tiles = [Region(top, left, 6, 6) for top in (0, 3, 6) for left in (0, 2)]
    for k, region in enumerate(tiles):
        for sample in range(2):
            assert torch.equal(seen[k // 2][1][(k % 2) * 2 + sample], canvas_position_map(12, 8, region=region))
    with pytest.raises(ValueError, match="tile_size 40 px must be a multiple of 16 px"):
        run(comps, tile_size=40)
    with pytest.raises(ValueError, match="tile_overlap 4 px must be a multiple of 8 px"):
        run(comps, tile_size=48, tile_overlap=4)
    assert torch.isfinite(run(comps, decode=False, steps=1, tile_size=48, tile_overlap=8)).all()  # one latent cell


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
    assert meta["camera"] == {"x_shift": 0.25, "y_shift": -0.5, "zoom": 1.5}
    assert (meta["tread_gamma_cond"], meta["tread_gamma_uncond"], meta["shift"]) == (0.25, 0.5, 2.5)
    assert Image.open(files[0]).text["parameters"].startswith(
        "a blue square\nNegative prompt: \nSteps: 2, Sampler: heun, CFG scale: 3.0, Seed: 7, Size: 32x32, "
        "Shift: 2.5, X shift: 0.25, Y shift: -0.5, Zoom: 1.5, TREAD gamma cond: 0.25, TREAD gamma uncond: 0.5, "
        "Model hash: ")  # then the model's name and hash (tests/test_cli_tools.py)


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
