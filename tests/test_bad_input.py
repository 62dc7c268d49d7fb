"""Bad input to the library: a clear, early error that names the value and the fix; nothing half-written."""

from __future__ import annotations

import json
import math
import os
import re
import stat
import time

import pytest
import torch
from safetensors.torch import save_file

from hdm_core.canvas import Camera
from hdm_core.checkpoint import CONFIG_METADATA_KEY, CheckpointError, load_components, load_xut, save_single_file
from hdm_core.pipeline import GenerationParams, generate
from hdm_core.sampling import flow_sigmas
from hdm_core.weights import atomic_write


@pytest.fixture(scope="module")
def comps(tiny_checkpoint):
    return load_components(tiny_checkpoint)


# ---------------------------------------------------------------------------------------------------
# Generation parameters: checked before any work, NaN included
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("change, message", [
    (dict(cfg=math.nan), "cfg must be a finite number"),
    (dict(cfg=math.inf), "cfg must be a finite number"),
    (dict(camera=lambda: Camera(zoom=math.nan)), "zoom must be a finite number"),
    (dict(camera=lambda: Camera(zoom=0.0)), "zoom must be a finite number"),
    (dict(camera=lambda: Camera(x_shift=math.inf)), "x_shift must be a finite number"),
    (dict(camera=lambda: Camera(y_shift=math.nan)), "y_shift must be a finite number"),
    (dict(shift=math.nan), "shift must be a finite number"),
    (dict(strength=math.nan), "strength must be a finite number"),
    (dict(strength=1.5), "strength must be a finite number in"),
    (dict(tread_gamma_uncond=1.0), "tread_gamma_uncond must be"),
    (dict(steps=10**9), r"steps must be a whole number in \[1, 10000\]"),
    (dict(steps=2.5), "steps must be a whole number"),
    (dict(batch_size=0), "batch_size must be a whole number"),
    (dict(width=100_000, height=100_000), "width must be a whole number"),
    (dict(width=8192, height=8192), "67 megapixels, above the 16.8 MP limit"),
    (dict(seed=-1), "seed must be a whole number"),
    (dict(seed=2**64), "seed must be a whole number"),
    (dict(prompt=None), "prompt must be a string"),
    (dict(negative_prompt="bad \udcff byte"), "negative_prompt is not valid UTF-8"),
    (dict(sampler="ddim"), "unknown sampler 'ddim'"),
])
def test_generation_params_are_checked_up_front(change, message):
    with pytest.raises(ValueError, match=message):  # a Camera checks itself when it is built
        change = {k: v() if callable(v) else v for k, v in change.items()}
        GenerationParams(**{"prompt": "a red circle", **change}).validate()


def test_generate_checks_before_loading_or_sampling(comps):
    calls = []
    model_forward = comps.model.forward
    comps.model.forward = lambda *a, **kw: calls.append(1) or model_forward(*a, **kw)
    try:
        with pytest.raises(ValueError, match="cfg"):
            generate(comps, GenerationParams("x", width=32, height=32, steps=2, cfg=math.nan))
        with pytest.raises(ValueError, match="strength 0.5 is for img2img"):
            generate(comps, GenerationParams("x", width=32, height=32, steps=2, strength=0.5))
    finally:
        del comps.model.forward
    assert not calls


def test_non_finite_latent_is_an_error_not_a_black_image(comps):
    bad = comps.model.out_patch.proj.bias
    saved = bad.detach().clone()
    with torch.no_grad():
        bad.fill_(math.inf)
    try:
        with pytest.raises(FloatingPointError, match="NaN or Inf.*nothing was written"):
            generate(comps, GenerationParams("x", width=32, height=32, steps=2))
    finally:
        with torch.no_grad():
            bad.copy_(saved)


def test_schedules_are_bounded_and_vectorised():
    start = time.perf_counter()
    assert flow_sigmas(10_000).shape == (10_001,)
    assert time.perf_counter() - start < 1.0
    with pytest.raises(ValueError, match="100000000-step schedule.*raise denoise"):
        flow_sigmas(10, denoise=1e-7)
    with pytest.raises(ValueError, match="steps must be a whole number"):
        flow_sigmas(10**9)


# ---------------------------------------------------------------------------------------------------
# Weights and files
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("part, key", [("unet", "ctx_proj.weight"), ("te", "layers.0.mlp.up_proj.weight")])
def test_non_finite_weights_are_refused_on_load(tiny_parts, tmp_path, part, key):
    parts = {k: dict(tiny_parts[k]) for k in ("unet", "te")}
    parts[part][key] = parts[part][key].clone()
    parts[part][key][0, 0] = math.nan
    path = tmp_path / "nan.safetensors"
    save_single_file(path, parts["unet"], tiny_parts["config"], te_sd=parts["te"])
    with pytest.raises(CheckpointError, match=f"hold NaN or Inf values, e.g. \\['{key}'\\]"):
        load_components(path)


def test_quantised_and_fp8_weights_are_named(tiny_parts, tmp_path):
    int8 = {f"unet.model.{k}": (v * 0).to(torch.int8) if k == "ctx_proj.weight" else v
            for k, v in tiny_parts["unet"].items()}
    save_file(int8, str(tmp_path / "int8.safetensors"))
    with pytest.raises(CheckpointError, match="'ctx_proj.weight' is stored as torch.int8"):
        load_xut(tmp_path / "int8.safetensors")
    fp8 = {f"unet.model.{k}": v.to(torch.float8_e4m3fn) for k, v in tiny_parts["unet"].items()}
    save_file(fp8, str(tmp_path / "fp8.safetensors"))
    with pytest.raises(CheckpointError, match="fp8 weights need a compute dtype.*--dtype bf16"):
        load_xut(tmp_path / "fp8.safetensors")
    assert load_xut(tmp_path / "fp8.safetensors", dtype=torch.bfloat16).ctx_proj.weight.dtype == torch.bfloat16


@pytest.mark.parametrize("config", ["{not json", json.dumps({"dim": "wide"}), json.dumps([1, 2])])
def test_unusable_config_metadata_names_the_key(tiny_parts, tmp_path, config):
    path = tmp_path / "meta.safetensors"
    save_file({f"unet.model.{k}": v for k, v in tiny_parts["unet"].items()}, str(path),
              metadata={CONFIG_METADATA_KEY: config})
    with pytest.raises(CheckpointError, match=f"'{CONFIG_METADATA_KEY}'.*remove that key"):
        load_xut(path)


def test_a_folder_is_not_reported_as_missing(tmp_path):
    with pytest.raises(CheckpointError, match="is a folder; pass the .safetensors file inside it"):
        load_components(tmp_path)


def test_atomic_write_leaves_nothing_on_error_and_readable_files(tmp_path):
    target = tmp_path / "out" / "file.bin"

    def fail(tmp):
        tmp.write_bytes(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError, match=f"could not write {target}"):
        atomic_write(target, fail)
    assert not any(target.parent.iterdir())
    old = os.umask(0o022)
    try:
        atomic_write(target, lambda tmp: tmp.write_bytes(b"whole"))
    finally:
        os.umask(old)
    assert target.read_bytes() == b"whole" and stat.S_IMODE(target.stat().st_mode) == 0o644


# ---------------------------------------------------------------------------------------------------
# Images: the one reader (hdm_core.images) with real files of each hard kind
# ---------------------------------------------------------------------------------------------------

def test_16_bit_png_is_grey_not_white(tmp_path):
    import numpy as np
    from PIL import Image

    from hdm_core.images import open_rgb

    grey16 = np.full((8, 12), 32768, dtype=np.uint16)  # mid grey in 16 bits
    Image.fromarray(grey16).save(tmp_path / "g16.png")
    assert Image.open(tmp_path / "g16.png").mode.startswith("I")
    assert Image.open(tmp_path / "g16.png").convert("RGB").getpixel((0, 0)) == (255, 255, 255)  # Pillow's clip
    rgb = open_rgb(tmp_path / "g16.png")
    assert rgb.mode == "RGB" and rgb.size == (12, 8) and rgb.getpixel((0, 0)) == (128, 128, 128)


def test_exif_orientation_is_applied(tmp_path):
    from PIL import Image

    from hdm_core.images import open_rgb

    img = Image.new("RGB", (40, 20), (0, 0, 255))
    img.paste((255, 0, 0), (0, 0, 20, 20))  # left half red
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    img.save(tmp_path / "phone.jpg", exif=exif, quality=95)
    upright = open_rgb(tmp_path / "phone.jpg")
    assert upright.size == (20, 40)  # portrait, as a viewer shows it
    top, bottom = upright.getpixel((10, 5)), upright.getpixel((10, 35))
    assert top[0] > 200 and top[2] < 60 and bottom[2] > 200 and bottom[0] < 60  # the red half is on top


def test_alpha_is_composited_on_white(tmp_path):
    from PIL import Image

    from hdm_core.images import open_rgb

    img = Image.new("RGBA", (4, 4), (0, 0, 0, 0))  # fully transparent black
    img.putpixel((0, 0), (255, 0, 0, 255))
    img.save(tmp_path / "cutout.png")
    rgb = open_rgb(tmp_path / "cutout.png")
    assert rgb.getpixel((3, 3)) == (255, 255, 255) and rgb.getpixel((0, 0)) == (255, 0, 0)


def test_unreadable_images_name_the_file(tmp_path):
    from hdm_core.images import open_rgb

    (tmp_path / "cut.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    with pytest.raises(ValueError, match="cannot read .*cut.png"):
        open_rgb(tmp_path / "cut.png")
    with pytest.raises(ValueError, match="over the 1 MP limit"):
        from PIL import Image

        Image.new("RGB", (2000, 1000)).save(tmp_path / "big.png")
        open_rgb(tmp_path / "big.png", max_pixels=1_000_000)


def test_a_very_long_prompt_is_announced_and_can_be_limited(comps):
    te = comps.text_encoder
    long_prompt = "red circle, " * 600  # about 1,800 tokens
    with pytest.warns(UserWarning, match=r"the prompt is \d+ tokens.*max_tokens=256"):
        (full,) = te.encode(long_prompt)
    (cut,) = te.encode(long_prompt, max_tokens=256)
    assert full.shape[1] > 1024 and cut.shape[1] == 256
    torch.testing.assert_close(cut, full[:, :256])  # causal: truncation keeps the first states exactly


# ---------------------------------------------------------------------------------------------------
# The CLI: one line and exit code 2 for a user error, before any model is loaded
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("extra, message", [
    (["--zoom", "nan"], "zoom must be a finite number"),
    (["--steps", "1000000000"], "steps must be a whole number"),
    (["--strength", "0.5"], "--strength 0.5 needs --init-image"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "nodevice"], "--device"),
    (["--init-image", "MISSING/cut.png"], "cannot read .*cut.png"),
])
def test_cli_user_errors_are_one_line_before_loading(tmp_path, capsys, extra, message):
    from hdm_core.generate import main

    extra = [e.replace("MISSING", str(tmp_path)) for e in extra]
    # The checkpoint does not exist: each error must come before any attempt to load it.
    code = main(["--checkpoint", str(tmp_path / "absent.safetensors"), "--prompt", "x", "--width", "32",
                 "--height", "32", "--out", str(tmp_path / "out"), *extra])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("error: ")
    assert re.search(message, err[0]), err[0]


def test_cli_unwritable_output_and_missing_file_are_one_line(tmp_path, capsys):
    from hdm_core.generate import main

    (tmp_path / "a_file").write_text("not a folder")
    code = main(["--checkpoint", str(tmp_path / "absent.safetensors"), "--prompt", "x", "--out",
                 str(tmp_path / "a_file" / "out")])
    assert code == 2 and "cannot write to the output folder" in capsys.readouterr().err
    code = main(["--checkpoint", str(tmp_path / "absent.safetensors"), "--prompt", "x", "--out", str(tmp_path)])
    assert code == 2 and "checkpoint not found" in capsys.readouterr().err


def test_cli_pngs_are_whole_readable_and_valid_json(tiny_checkpoint, tmp_path):
    from PIL import Image

    from hdm_core.generate import main

    assert main(["--checkpoint", str(tiny_checkpoint), "--prompt", "x", "--width", "32", "--height", "32",
                 "--steps", "1", "--out", str(tmp_path)]) == 0
    (png,) = tmp_path.glob("*.png")
    assert stat.S_IMODE(png.stat().st_mode) == 0o666 & ~_umask() and not list(tmp_path.glob("*.tmp"))
    json.loads(Image.open(png).text["hdm"])


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_ctrl_c_while_loading_is_one_line_and_130(tiny_checkpoint, tmp_path, monkeypatch, capsys):
    import hdm_core.generate as cli

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(cli, "load_components", interrupted)
    assert cli.main(["--checkpoint", str(tiny_checkpoint), "--prompt", "x", "--out", str(tmp_path)]) == 130
    assert capsys.readouterr().err.strip() == "cancelled; nothing written" and not list(tmp_path.iterdir())
