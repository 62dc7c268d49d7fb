"""The position-true canvas in a real ComfyUI server (CPU): every model call ComfyUI makes on part of the latent
(area prompts, tiles) gets exactly its slice of the canvas's position map; HDM Area Positions keeps the legacy
"picture of its own"; HDM Tiled Diffusion with one tile is the untiled result; ScaleROPE drives the camera;
outpainting's built-in nodes run on HDM.

Skipped unless COMFYUI_PATH points to a ComfyUI checkout (0.8.0 or later); see tests/comfy_harness.py. The probe
node HDMProbePositions (tests/comfy_probe) records the map and aspect of every model call.
"""

from __future__ import annotations

import math
import uuid
from pathlib import Path

import pytest
import torch
from comfy_harness import CKPT, HDM_SAMPLER, Server, execution_error, read_probe, saved_latent, session

from hdm_core.canvas import Camera, Region, canvas_position_map, tile_regions

W, H = 256, 192                      # px; the tiny test model's latent is 32 x 24 cells (8 px each), patch 2
ROWS, COLS = H // 8, W // 8
AREA = Region(6, 8, 12, 16)          # ConditioningSetArea(width 128, height 96, x 64, y 48) in latent cells
CAMERA = {"x_shift": 0.2, "y_shift": -0.1, "zoom": 1.3}
KSAMPLER = {"seed": 3, "steps": 2, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}


@pytest.fixture(scope="module")
def server(request, tmp_path_factory) -> Server:
    return session(request, tmp_path_factory).server


def base_graph(camera: dict | None = CAMERA) -> dict:
    """Loader, prompts, an empty W x H latent; the positive / negative pair is ["5", 0] / ["5", 1]."""
    g = {"1": {"class_type": "HDMLoader", "inputs": {"ckpt_name": CKPT}},
         "2": {"class_type": "HDMTextEncode", "inputs": {"clip": ["1", 1], "text": "a lighthouse at dusk"}},
         "3": {"class_type": "HDMTextEncode", "inputs": {"clip": ["1", 1], "text": "blurry"}},
         "4": {"class_type": "EmptyLatentImage", "inputs": {"width": W, "height": H, "batch_size": 1}},
         "20": {"class_type": "HDMTextEncode", "inputs": {"clip": ["1", 1], "text": "a red boat"}}}
    g["5"] = {"class_type": "HDMCameraParam", "inputs": {"positive": ["2", 0], "negative": ["3", 0],
                                                         **(camera or {"x_shift": 0.0, "y_shift": 0.0, "zoom": 1.0})}}
    return g


def finish(g: dict, server: Server, model=("1", 0), positive=("5", 0), sampler: str = "KSampler",
           latent=("4", 0)) -> tuple[str, dict]:
    """Probe → sampler → SaveLatent; returns (probe log path, graph)."""
    log = str(server.base / "output" / f"positions_{uuid.uuid4().hex}.jsonl")
    g["30"] = {"class_type": "HDMProbePositions", "inputs": {"model": list(model), "log": log}}
    params = KSAMPLER if sampler == "KSampler" else {**HDM_SAMPLER, "steps": 2}
    g["31"] = {"class_type": sampler, "inputs": {"model": ["30", 0], "positive": list(positive),
                                                 "negative": ["5", 1], "latent_image": list(latent), **params}}
    g["32"] = {"class_type": "SaveLatent", "inputs": {"samples": ["31", 0], "filename_prefix": f"c/{uuid.uuid4().hex}"}}
    return log, g


def calls(log: str) -> list[dict]:
    entries = read_probe(Path(log))
    assert entries, "the probe recorded no model call"
    return entries


def with_area(g: dict, kind: str) -> tuple[str, str]:
    """Add an area prompt of `kind` for "a red boat" at AREA combined with the whole-canvas prompt, camera applied
    on top (node "5" then sees the combined list); returns the positive to use."""
    if kind == "ConditioningSetArea":
        g["21"] = {"class_type": kind, "inputs": {"conditioning": ["20", 0], "width": 128, "height": 96, "x": 64,
                                                  "y": 48, "strength": 1.0}}
    elif kind == "ConditioningSetAreaPercentage":
        g["21"] = {"class_type": kind, "inputs": {"conditioning": ["20", 0], "width": 0.5, "height": 0.5, "x": 0.25,
                                                  "y": 0.25, "strength": 1.0}}
    else:  # a mask at latent resolution whose bounds are AREA
        g["22"] = {"class_type": "SolidMask", "inputs": {"value": 0.0, "width": COLS, "height": ROWS}}
        g["23"] = {"class_type": "SolidMask", "inputs": {"value": 1.0, "width": AREA.width, "height": AREA.height}}
        g["24"] = {"class_type": "MaskComposite", "inputs": {"destination": ["22", 0], "source": ["23", 0],
                                                            "x": AREA.left, "y": AREA.top, "operation": "add"}}
        g["21"] = {"class_type": kind, "inputs": {"conditioning": ["20", 0], "mask": ["24", 0], "strength": 1.0,
                                                  "set_cond_area": "mask bounds"}}
    g["25"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["2", 0], "conditioning_2": ["21", 0]}}
    g["5"]["inputs"]["positive"] = ["25", 0]
    return "5", "0"


def assert_maps(entries: list[dict], expected: dict[tuple[int, int], torch.Tensor], aspect: dict | None = None):
    """Every recorded call of a spatial size in `expected` got exactly that map (max-abs 0) in every sample."""
    seen = set()
    for e in entries:
        size = tuple(e["x"][-2:])
        assert size in expected, (size, list(expected))
        got = torch.tensor(e["pos"])
        want = expected[size].expand_as(got)
        assert (got - want).abs().max().item() == 0.0, size
        want_aspect = (aspect or {}).get(size, math.log(COLS / ROWS))
        assert all(a == pytest.approx(want_aspect, abs=1e-6) for a in e["aspect"]), (size, e["aspect"])
        seen.add(size)
    assert seen == set(expected), (seen, list(expected))


@pytest.mark.parametrize("kind", ["ConditioningSetArea", "ConditioningSetAreaPercentage", "ConditioningSetMask"])
def test_an_area_call_receives_exactly_its_slice_of_the_canvas_map(server, kind):
    g = base_graph()
    with_area(g, kind)
    log, g = finish(g, server)
    entry = server.run(g)
    assert execution_error(entry) is None, execution_error(entry)
    camera = Camera(**CAMERA)
    assert_maps(calls(log), {(ROWS, COLS): canvas_position_map(ROWS, COLS, camera),
                             (AREA.height, AREA.width): canvas_position_map(ROWS, COLS, camera, AREA)})


def test_own_picture_positions_are_the_legacy_behaviour(server):
    g = base_graph()
    with_area(g, "ConditioningSetArea")
    g["26"] = {"class_type": "HDMAreaPositions", "inputs": {"model": ["1", 0], "positions": "own"}}
    log, g = finish(g, server, model=("26", 0))
    assert execution_error(server.run(g)) is None
    camera = Camera(**CAMERA)
    assert_maps(calls(log), {(ROWS, COLS): canvas_position_map(ROWS, COLS, camera),
                             (AREA.height, AREA.width): canvas_position_map(AREA.height, AREA.width, camera)},
                aspect={(AREA.height, AREA.width): math.log(AREA.width / AREA.height)})


def test_an_area_covering_the_canvas_equals_no_area(server):
    """The same map in every call, and the same latent up to float rounding: ComfyUI adds a second, whole-canvas
    negative for the area, batched with the first, and the mean of the two batched copies differs in the last bits."""
    plain_log, plain = finish(base_graph(), server)
    whole = base_graph()
    whole["21"] = {"class_type": "ConditioningSetArea", "inputs": {"conditioning": ["2", 0], "width": W, "height": H,
                                                                   "x": 0, "y": 0, "strength": 1.0}}
    whole["5"]["inputs"]["positive"] = ["21", 0]
    whole_log, whole = finish(whole, server)
    got, want = saved_latent(server, server.run(whole)), saved_latent(server, server.run(plain))
    assert (got - want).abs().max().item() <= 1e-6 * want.abs().max().item()
    full = {(ROWS, COLS): canvas_position_map(ROWS, COLS, Camera(**CAMERA))}
    assert_maps(calls(whole_log), full)
    assert_maps(calls(plain_log), full)


@pytest.mark.parametrize("sampler", ["KSampler", "HDMSampler"])
def test_one_tile_covering_the_canvas_is_the_untiled_result(server, sampler):
    _, plain = finish(base_graph(), server, sampler=sampler)
    tiled = base_graph()
    tiled["26"] = {"class_type": "HDMTiledDiffusion", "inputs": {"model": ["1", 0], "tile_width": W, "tile_height": H,
                                                                 "overlap": 64, "tile_batch": 1}}
    _, tiled = finish(tiled, server, model=("26", 0), sampler=sampler)
    assert torch.equal(saved_latent(server, server.run(tiled)), saved_latent(server, server.run(plain)))


@pytest.mark.parametrize("sampler", ["KSampler", "HDMSampler"])
def test_tiles_that_do_not_divide_the_canvas_run_tile_by_tile(server, sampler):
    """96 x 128 px tiles overlapping by 32 px on 256 x 192 px (12 x 16 cells overlapping by at least 4 on 24 x 32: 3 x 3
    tiles, spread evenly), 4 per model call: the model gets the canvas's map (which hdm_core.canvas.tiled_forward
    slices per tile, tests/test_canvas.py) and its blocks run on tiles of 6 x 8 patches, 4, 4 and 1 per call."""
    g = base_graph()
    g["26"] = {"class_type": "HDMTiledDiffusion", "inputs": {"model": ["1", 0], "tile_width": 128, "tile_height": 96,
                                                             "overlap": 32, "tile_batch": 4}}
    blocks = str(server.base / "output" / f"blocks_{uuid.uuid4().hex}.jsonl")
    g["27"] = {"class_type": "HDMProbeBlockPatch", "inputs": {"model": ["26", 0], "log": blocks}}
    log, g = finish(g, server, model=("27", 0), sampler=sampler)
    latent = saved_latent(server, server.run(g))
    assert torch.isfinite(latent).all() and latent.shape[-2:] == (ROWS, COLS)
    assert len(tile_regions(ROWS, COLS, 12, 16, 4)) == 9
    assert_maps(calls(log), {(ROWS, COLS): canvas_position_map(ROWS, COLS, Camera(**CAMERA))})
    first_block = [e for e in read_probe(Path(blocks)) if e["key"] == 0]
    assert {e["img"][0] for e in first_block} == {4, 1}                      # tiles per call (batch 1 each)
    assert {e["img"][1] for e in first_block} <= {6 * 8 + n for n in range(1, 10)}   # 48 image tokens + the text


def tiled(g: dict, model: list, tile_batch: int, positions: str = "canvas") -> tuple[str, int]:
    """HDM Tiled Diffusion (96 x 128 px tiles overlapping by 32: 9 tiles) on `model`, then HDM Area Positions."""
    g["26"] = {"class_type": "HDMTiledDiffusion", "inputs": {"model": model, "tile_width": 128, "tile_height": 96,
                                                             "overlap": 32, "tile_batch": tile_batch}}
    g["28"] = {"class_type": "HDMAreaPositions", "inputs": {"model": ["26", 0], "positions": positions}}
    return "28", 0


@pytest.mark.parametrize("positions", ["canvas", "own"])
def test_tiles_batched_per_call_equal_tiles_one_by_one_for_a_batch(server, positions):
    """A latent batch of 2 (every model call has several samples) sampled with 4 tiles per call equals one tile
    per call: each stacked tile gets its samples' timesteps, prompts and positions."""
    results = []
    for tile_batch in (1, 4):
        g = base_graph()
        g["4"]["inputs"]["batch_size"] = 2
        _, g = finish(g, server, model=tiled(g, ["1", 0], tile_batch, positions))
        results.append(saved_latent(server, server.run(g)))
    assert results[0].shape[0] == 2 and torch.isfinite(results[0]).all()
    scale = results[0].abs().max().item()  # large: the test model's weights are random
    assert (results[0] - results[1]).abs().max().item() <= 1e-5 * scale  # batched kernels differ by ulps


def test_scale_rope_drives_the_camera_of_tiles_drawn_as_their_own_pictures(server):
    """ScaleROPE reaches tiles that are pictures of their own exactly as HDM Camera does (the camera each tile's own
    map is seen through)."""
    s, sx, token = 0.8, 2.0, 2 * 2 / COLS
    rope = base_graph(camera=None)
    rope["29"] = {"class_type": "ScaleROPE", "inputs": {"model": ["1", 0], "scale_x": s, "shift_x": sx, "scale_y": s,
                                                        "shift_y": 0.0, "scale_t": 1.0, "shift_t": 0.0}}
    _, rope = finish(rope, server, model=tiled(rope, ["29", 0], 1, "own"))
    camera = base_graph(camera={"x_shift": sx * token / s, "y_shift": 0.0, "zoom": 1 / s})
    _, camera = finish(camera, server, model=tiled(camera, ["1", 0], 1, "own"))
    plain = base_graph(camera=None)
    _, plain = finish(plain, server, model=tiled(plain, ["1", 0], 1, "own"))
    got, want, untouched = (saved_latent(server, server.run(g)) for g in (rope, camera, plain))
    assert (got - want).abs().max().item() <= 1e-6
    assert (got - untouched).abs().max().item() > 1e-3


@pytest.mark.parametrize("inputs, message", [
    ({"tile_width": 136}, "tile_width 136 px is not a multiple of 16 px (one patch"),
    ({"overlap": 12}, "overlap 12 px is not a multiple of 8 px (one latent cell"),
    ({"overlap": 96}, "overlap 96 px must be >= 0 and smaller than the tile")])
def test_tiles_the_model_cannot_run_are_refused_by_name(server, inputs, message):
    """Values from a linked INT or the API skip the widgets' steps: the node names the value in px."""
    g = base_graph()
    g["26"] = {"class_type": "HDMTiledDiffusion", "inputs": {"model": ["1", 0], "tile_width": 128, "tile_height": 96,
                                                             "overlap": 32, "tile_batch": 1, **inputs}}
    _, g = finish(g, server, model=("26", 0))
    err = execution_error(server.run(g))
    assert err is not None and message in err["exception_message"], err


def test_scale_rope_drives_the_camera(server):
    """ScaleROPE scale s, shift (sx, sy) tokens = HDM Camera zoom 1/s, shift (sx, sy)·token/s (token = 2·patch / long
    side in latent cells = 2·2/32 here)."""
    s, sx, sy = 0.8, 2.0, -1.0
    token = 2 * 2 / COLS
    rope = base_graph(camera=None)
    rope["26"] = {"class_type": "ScaleROPE", "inputs": {"model": ["1", 0], "scale_x": s, "shift_x": sx, "scale_y": s,
                                                        "shift_y": sy, "scale_t": 1.0, "shift_t": 0.0}}
    _, rope = finish(rope, server, model=("26", 0))
    camera = base_graph(camera={"x_shift": sx * token / s, "y_shift": sy * token / s, "zoom": 1 / s})
    _, camera = finish(camera, server)
    got, want = saved_latent(server, server.run(rope)), saved_latent(server, server.run(camera))
    assert (got - want).abs().max().item() <= 1e-6
    stretched = base_graph(camera=None)
    stretched["26"] = {"class_type": "ScaleROPE", "inputs": {"model": ["1", 0], "scale_x": 0.8, "shift_x": 0.0,
                                                             "scale_y": 1.0, "shift_y": 0.0, "scale_t": 1.0,
                                                             "shift_t": 0.0}}
    _, stretched = finish(stretched, server, model=("26", 0))
    err = execution_error(server.run(stretched))
    assert err is not None and "one zoom" in err["exception_message"]


@pytest.mark.parametrize("encoder", ["VAEEncodeForInpaint", "InpaintModelConditioning"])
def test_outpainting_nodes_run_on_hdm_with_the_grown_canvas_map(server, encoder):
    """ImagePadForOutpaint (64 px on the right) then either inpainting encoder: the model sees the grown canvas's
    own map (what demo/canvas.py measured as the better choice) and the picture's part of the latent is kept."""
    g = base_graph(camera=None)
    g["40"] = {"class_type": "EmptyImage", "inputs": {"width": W - 64, "height": H, "batch_size": 1, "color": 4210752}}
    g["41"] = {"class_type": "ImagePadForOutpaint", "inputs": {"image": ["40", 0], "left": 0, "top": 0, "right": 64,
                                                               "bottom": 0, "feathering": 0}}
    positive = ("5", 0)
    if encoder == "VAEEncodeForInpaint":
        g["42"] = {"class_type": encoder, "inputs": {"pixels": ["41", 0], "vae": ["1", 2], "mask": ["41", 1],
                                                     "grow_mask_by": 0}}
        latent = ("42", 0)
    else:
        g["42"] = {"class_type": encoder, "inputs": {"positive": ["5", 0], "negative": ["5", 1], "vae": ["1", 2],
                                                     "pixels": ["41", 0], "mask": ["41", 1], "noise_mask": True}}
        positive, latent = ("42", 0), ("42", 2)
    log, g = finish(g, server, positive=positive, latent=latent)
    entry = server.run(g)
    assert execution_error(entry) is None, execution_error(entry)
    assert_maps(calls(log), {(ROWS, COLS): canvas_position_map(ROWS, COLS)})
