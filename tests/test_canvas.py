"""The canvas (hdm_core.canvas): the camera as one validated value, the map of a region as the exact slice of the
canvas's map, outpainting's camera, and tiled sampling (tiles, feathering, blending) as identities."""

from __future__ import annotations

import math

import pytest
import torch

from hdm_core import PRESETS, XUT
from hdm_core.canvas import (
    Camera,
    Region,
    Tiling,
    blend,
    canvas_position_map,
    feather,
    keep_picture_camera,
    region_inputs,
    slice_map,
    tile_regions,
    tiled_forward,
)
from hdm_core.rope import aspect_info, make_axial_pos

CAMERAS = [Camera(), Camera(0.5, -0.25, 2.0), Camera(-1.3, 0.7, 0.6)]


# ---------------------------------------------------------------------------------------------------
# Camera
# ---------------------------------------------------------------------------------------------------

def test_camera_moves_and_scales_the_map_as_the_spec_says():
    pos = make_axial_pos(6, 10)
    assert Camera().apply(pos) is pos and Camera().is_identity
    moved = Camera(x_shift=0.5, y_shift=-0.25, zoom=2.0).apply(pos)
    assert torch.allclose(moved[:, 1], (pos[:, 1] + 0.5) / 2) and torch.allclose(moved[:, 0], (pos[:, 0] - 0.25) / 2)


@pytest.mark.parametrize("kwargs,message", [
    (dict(zoom=0.0), "zoom must be a finite number in"), (dict(zoom=math.nan), "zoom"), (dict(zoom=-1), "zoom"),
    (dict(x_shift=math.inf), "x_shift must be a finite number"), (dict(y_shift=1e9), "y_shift"),
    (dict(x_shift="0.5"), "x_shift"), (dict(zoom=True), "zoom"), (dict(zoom=1e6), "zoom")])
def test_camera_refuses_unusable_values_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        Camera(**kwargs)


def test_camera_then_composes_two_cameras():
    pos = make_axial_pos(5, 7, dtype=torch.float64)
    a, b = Camera(0.3, -0.1, 1.5), Camera(-0.2, 0.4, 0.8)
    torch.testing.assert_close(a.then(b).apply(pos), b.apply(a.apply(pos)))


# ---------------------------------------------------------------------------------------------------
# The map of a region
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows,cols", [(12, 20), (20, 12), (9, 9), (1, 7)])
@pytest.mark.parametrize("camera", CAMERAS)
def test_region_map_is_exactly_the_slice_of_the_canvas_map(rows, cols, camera):
    full = canvas_position_map(rows, cols, camera)
    assert full.shape == (rows * cols, 2)
    regions = [Region(0, 0, rows, cols), Region(0, cols - 1, rows, 1), Region(rows // 3, cols // 4, rows // 2 or 1, 3)]
    for region in regions:
        got = canvas_position_map(rows, cols, camera, region)
        assert torch.equal(got, slice_map(full, rows, cols, region)), region
        assert torch.equal(got, slice_map(full[None], rows, cols, region)[0])
    if camera.is_identity:
        assert torch.equal(full, make_axial_pos(rows, cols))


def test_region_outside_the_canvas_is_refused():
    with pytest.raises(ValueError, match="does not fit the 8x8 canvas"):
        canvas_position_map(8, 8, region=Region(4, 4, 5, 2))
    with pytest.raises(ValueError, match="does not fit"):
        canvas_position_map(8, 8, region=Region(0, 0, 0, 2))


def test_region_inputs_give_the_true_place_or_a_picture_of_its_own():
    rows, cols, region, camera = 8, 16, Region(2, 4, 4, 8), Camera(0.2, 0.0, 1.25)
    pos, aspect = canvas_position_map(rows, cols, camera)[None], torch.full((1,), aspect_info(rows, cols))
    true_map, true_aspect = region_inputs(pos, aspect, rows, cols, region)
    assert torch.equal(true_map[0], canvas_position_map(rows, cols, camera, region)) and true_aspect is aspect
    own_map, own_aspect = region_inputs(pos, aspect, rows, cols, region, [camera])
    assert torch.equal(own_map[0], canvas_position_map(4, 8, camera))
    assert own_aspect.item() == pytest.approx(math.log(2.0))


@pytest.mark.parametrize("grown,picture", [((16, 24), Region(0, 4, 16, 16)), ((24, 16), Region(8, 0, 16, 16)),
                                           ((20, 30), Region(3, 5, 12, 18))])
@pytest.mark.parametrize("camera", CAMERAS)
def test_outpainting_camera_keeps_the_pictures_coordinates(grown, picture, camera):
    """On the grown canvas, the picture's cells get the map they had as a picture of its own through its camera."""
    keep = keep_picture_camera(*grown, picture, camera)
    on_grown = canvas_position_map(*grown, keep, picture)
    torch.testing.assert_close(on_grown, canvas_position_map(picture.height, picture.width, camera),
                               atol=1e-5, rtol=0)


# ---------------------------------------------------------------------------------------------------
# Tiles
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows,cols,tile,overlap", [(64, 64, 32, 16), (13, 29, 8, 3), (10, 7, 4, 0), (6, 6, 16, 4)])
def test_tiles_cover_the_canvas_and_overlap_as_asked(rows, cols, tile, overlap):
    regions = tile_regions(rows, cols, tile, tile, overlap)
    covered = torch.zeros(rows, cols)
    for r in regions:
        r.check(rows, cols)
        assert (r.height, r.width) == (min(tile, rows), min(tile, cols))
        r.slice(covered).add_(1)
    assert covered.min() >= 1
    for axis in ("top", "left"):
        starts = sorted({getattr(r, axis) for r in regions})
        assert all(b - a <= tile - overlap for a, b in zip(starts, starts[1:]))


@pytest.mark.parametrize("args,message", [((8, 8, 0, 4, 0), "tile height"), ((8, 8, 4, 4, 4), "overlap"),
                                          ((8, 8, 4, 4, -1), "overlap"), ((8, 8, 4.5, 4, 0), "tile height")])
def test_bad_tiles_are_refused(args, message):
    with pytest.raises(ValueError, match=message):
        tile_regions(*args)


def test_feathering_fades_only_towards_other_tiles():
    rows, cols, overlap = 10, 13, 2
    assert torch.equal(feather(Region(0, 0, rows, cols), rows, cols, overlap), torch.ones(rows, cols))
    total = torch.zeros(rows, cols)
    for r in tile_regions(rows, cols, 4, 4, overlap):
        w = feather(r, rows, cols, overlap)
        assert w.min() > 0 and w.max() <= 1
        if r.top == 0:  # no fade towards the canvas border
            assert torch.equal(w[0], w[1])
        r.slice(total).add_(w)
    assert total.min() >= 1 - 1e-6


def test_blend_is_exact_for_one_tile_and_averages_several():
    x = torch.randn(2, 3, 9, 11)
    whole = [Region(0, 0, 9, 11)]
    twice = lambda group: torch.cat([r.slice(x) * 2 for r in group])  # noqa: E731
    assert torch.equal(blend(x, whole, [torch.ones(9, 11)], twice), x * 2)
    regions = tile_regions(9, 11, 4, 5, 2)
    weights = [feather(r, 9, 11, 2) for r in regions]
    one_by_one = blend(x, regions, weights, twice)
    torch.testing.assert_close(one_by_one, x * 2)
    assert torch.equal(blend(x, regions, weights, twice, batch=4), one_by_one)  # batched tiles: the same sums


def test_tiles_with_true_positions_equal_the_untiled_call_for_a_pointwise_model():
    """A 'model' whose output at a cell depends only on that cell's input and position: tiles given their slice of
    the canvas map reproduce the whole-canvas call; tiles given their own whole map do not."""
    rows, cols, camera = 12, 20, Camera(0.1, -0.2, 1.1)
    x = torch.randn(1, 2, rows, cols)
    pos, aspect = canvas_position_map(rows, cols, camera)[None], torch.zeros(1)

    def pointwise(x_part, map_part, aspect_part):
        grid = map_part.reshape(map_part.shape[0], *x_part.shape[-2:], 2).permute(0, 3, 1, 2)
        return x_part * grid[:, 1:] + grid[:, :1] + aspect_part.reshape(-1, 1, 1, 1)
    whole = pointwise(x, pos, aspect)
    tiled = tiled_forward(pointwise, x, pos, aspect, Tiling(8, 8, 4), [camera])
    torch.testing.assert_close(tiled, whole, atol=1e-6, rtol=0)
    assert torch.equal(tiled_forward(pointwise, x, pos, aspect, Tiling(8, 8, 4, batch=3), [camera]), tiled)
    own = tiled_forward(pointwise, x, pos, aspect, Tiling(8, 8, 4, own_positions=True), [camera])
    assert (own - whole).abs().max() > 0.1


def test_one_tile_covering_the_canvas_is_the_untiled_xut_call():
    torch.manual_seed(0)
    model = XUT(PRESETS["xut-tiny"]).eval()
    for p in model.parameters():
        p.data.normal_(0, 0.05)
    x, t, ctx = torch.randn(1, 4, 16, 24), torch.tensor([0.7]), torch.randn(1, 3, 48)
    pos, aspect = canvas_position_map(16, 24, Camera(0.2, 0, 1.2))[None], torch.full((1,), aspect_info(16, 24))

    def forward(x_part, map_part, aspect_part):
        return model(x_part, t, ctx, pos_map=map_part, aspect=aspect_part)
    with torch.no_grad():
        assert torch.equal(tiled_forward(forward, x, pos, aspect, Tiling(32, 32, 8)), forward(x, pos, aspect))
        tiled = tiled_forward(forward, x, pos, aspect, Tiling(10, 14, 4))     # tiles that do not divide the canvas
    assert tiled.shape == x.shape and torch.isfinite(tiled).all()
