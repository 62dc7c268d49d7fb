"""The position-true canvas has its effect on the shipped demo model (demo/canvas.py, figures in demo/README.md):
tiles and area prompts given their true place draw one shape where parts drawn as pictures of their own repeat it;
side by side, both ways give each half its prompt's colour. Five prompts, one seed: about 40 s."""

from __future__ import annotations

import pytest
import torch

from demo.canvas import composition, side_by_side, tiles
from demo.run import CAMERA_PROMPTS, PRETRAINED
from hdm_core.checkpoint import load_components
from training.toy_data import caption_for

CASES = [(p, 0) for p in CAMERA_PROMPTS]   # five prompts, every colour and shape


@pytest.fixture(scope="module")
def comps():
    return load_components(PRETRAINED, dtype=torch.float32)


def test_tiles_at_their_place_draw_one_picture(comps):
    """64 x 64 px in 32 px tiles: true places give one shape of the prompt (as the untiled call); every tile a
    picture of its own gives a grid of shapes. Measured over all 30 prompt-seed pairs: 28 / 2 / 28 of 30."""
    figures, _ = tiles(comps, CASES)
    print(f"\n[test_demo_canvas] tiles: {figures}")
    assert figures["canvas"]["one_right_object"] >= 4, figures
    assert figures["untiled"]["one_right_object"] >= 3, figures
    assert figures["own"]["one_right_object"] <= 1, figures


def test_an_area_prompt_at_its_place_draws_one_shape(comps):
    """The prompt on the centre area, an empty prompt on the ring around it: one shape with true places, a shape
    in every area as pictures of their own. Measured over 30: 27 / 0 of 30 right, 1.0 / 5.0 objects."""
    figures, _ = composition(comps, CASES)
    print(f"\n[test_demo_canvas] composition: {figures}")
    assert figures["canvas"]["one_right_object"] >= 4 and figures["canvas"]["mean_objects"] <= 1.4, figures
    assert figures["own"]["one_right_object"] == 0 and figures["own"]["mean_objects"] >= 3, figures


def test_side_by_side_prompts_colour_their_halves_either_way(comps):
    """Two prompts on the two halves: each half in its prompt's colour both ways; one shared shape with true places
    (this model draws one shape per picture, in the middle), one whole shape per half as pictures of their own."""
    pairs = [(caption_for("red", "circle"), caption_for("blue", "square"), 0),
             (caption_for("yellow", "triangle"), caption_for("green", "circle"), 0),
             (caption_for("purple", "square"), caption_for("red", "triangle"), 0)]
    figures, _ = side_by_side(comps, pairs)
    print(f"\n[test_demo_canvas] side by side: {figures}")
    assert figures["canvas"]["both_colours_right"] == 3 and figures["own"]["both_colours_right"] == 3, figures
    assert figures["canvas"]["two_objects"] == 0 and figures["own"]["two_objects"] == 3, figures


def test_batched_demo_sampling_is_the_public_pipeline(comps):
    """demo.run.generate_batch (every figure of the demo) draws what hdm_core.pipeline.generate draws, prompt by
    prompt, camera and seed included, up to float rounding."""
    from demo.run import SAMPLE, SIZE, generate_batch
    from hdm_core.canvas import Camera
    from hdm_core.pipeline import GenerationParams, generate

    cases = [("a red circle", 3, Camera(x_shift=0.5)), ("a blue square", 4, Camera(zoom=1.33))]
    batched = generate_batch(comps, cases, steps=4)
    for (prompt, seed, camera), image in zip(cases, batched):
        params = GenerationParams(prompt, width=SIZE, height=SIZE, seed=seed, camera=camera, **{**SAMPLE, "steps": 4})
        assert (generate(comps, params)[0] - image).abs().max().item() <= 1e-4
    with pytest.raises(ValueError, match="not \\['shift'\\]"):
        generate_batch(comps, cases, shift=3.0)
