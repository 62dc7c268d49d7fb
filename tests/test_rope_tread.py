"""Position maps, RoPE and TREAD routing as identities and invariants (the camera and regions: test_canvas.py)."""

from __future__ import annotations

import math

import pytest
import torch

from hdm_core import (
    PRESETS,
    XUT,
    canvas_position_map,
    downsample_pos,
    keep_count,
    make_axial_pos,
    random_keep_mask,
    restore_tokens,
    select_tokens,
)
from hdm_core.rope import apply_rope, aspect_info, rope_angles


def test_axial_grid_ranges_long_side_spans_unit():
    pos = make_axial_pos(4, 8).reshape(4, 8, 2)
    # landscape: x spans ±1 (cell centres), y spans ±4/8
    assert pos[0, 0].tolist() == pytest.approx([-0.5 + 0.125, -1 + 0.125])
    assert pos[-1, -1].tolist() == pytest.approx([0.5 - 0.125, 1 - 0.125])
    portrait = make_axial_pos(8, 4).reshape(8, 4, 2)
    assert portrait[0, 0].tolist() == pytest.approx([-1 + 0.125, -0.5 + 0.125])


def test_reduction_pulls_border_inward_by_three_fourteenths():
    h, w = 8, 12
    small = downsample_pos(canvas_position_map(h, w), h, w)[0].reshape(h // 2, w // 2, 2)
    direct = make_axial_pos(h // 2, w // 2).reshape(h // 2, w // 2, 2)
    assert torch.allclose(small[1:-1, 1:-1], direct[1:-1, 1:-1], atol=1e-6)
    delta_x = 2 * 1.0 / w  # latent cell size along x (long side)
    assert small[0, 0, 1].item() == pytest.approx(-1 + 17 / 14 * delta_x, abs=1e-6)
    with pytest.raises(ValueError, match="latent-resolution map"):
        downsample_pos(make_axial_pos(4, 6), h, w)


def test_aspect_is_log_width_over_height():
    assert aspect_info(64, 96) == pytest.approx(math.log(1.5))


def test_rope_is_a_rotation_and_text_is_unrotated():
    torch.manual_seed(0)
    q = torch.randn(2, 3, 5, 16)
    pos = torch.randn(2, 5, 2)
    pos[:, -1] = 0
    log_freqs = torch.randn(3, 4, 2)
    theta = rope_angles(pos, log_freqs)
    out = apply_rope(q, theta.cos(), theta.sin())
    assert torch.allclose(out.norm(dim=-1), q.norm(dim=-1), atol=1e-5)
    assert torch.equal(out[:, :, -1], q[:, :, -1])
    # pair 0 rotates with frequency 0 on y, pair 1 with frequency 0 on x
    assert torch.allclose(theta[0, 1, 0, :2], pos[0, 0] * log_freqs[1, 0].exp())


def test_tread_select_restore_round_trip():
    x = torch.randn(3, 20, 4)
    keep = random_keep_mask(3, 20, 0.5, generator=torch.Generator().manual_seed(1))
    assert keep.sum(1).tolist() == [keep_count(20, 0.5)] * 3 == [10] * 3
    kept, index = select_tokens(x, keep)
    assert torch.equal(restore_tokens(x, kept, index), x)
    assert torch.equal(kept[1], x[1][keep[1]])  # original order preserved
    assert keep_count(96, 0.25) == 72 and keep_count(7, 0.5) == 4
    uneven = torch.zeros(3, 20, dtype=torch.bool)
    uneven[0, :5] = uneven[1, :6] = uneven[2, :5] = True
    with pytest.raises(ValueError, match="same count"):
        select_tokens(x, uneven)
    with pytest.raises(ValueError, match=r"in \[0, 1\)"):
        keep_count(10, 1.0)


def test_tread_mask_is_reproducible_from_generator():
    a = random_keep_mask(2, 50, 0.3, generator=torch.Generator().manual_seed(7))
    b = random_keep_mask(2, 50, 0.3, generator=torch.Generator().manual_seed(7))
    assert torch.equal(a, b)


def test_model_rate_zero_means_off_and_routing_changes_output():
    torch.manual_seed(0)
    model = XUT(PRESETS["xut-tiny"]).eval()
    x, ctx = torch.randn(1, 4, 8, 8), torch.randn(1, 3, 48)
    with torch.no_grad():
        plain = model(x, 0.5, ctx)
        assert torch.equal(model(x, 0.5, ctx, tread_rate=0.0), plain)
        routed = model(x, 0.5, ctx, tread_rate=0.5, generator=torch.Generator().manual_seed(0))
        all_kept = model(x, 0.5, ctx, tread_keep=torch.ones(1, 16, dtype=torch.bool))
    assert not torch.allclose(routed, plain)
    assert torch.allclose(all_kept, plain, atol=1e-6)


def test_model_rejects_odd_latent_and_bad_mask():
    model = XUT(PRESETS["xut-tiny"]).eval()
    with pytest.raises(ValueError, match="not divisible by patch_size 2.*multiples of 16 px"):
        model(torch.randn(1, 4, 7, 8), 0.5, torch.randn(1, 2, 48))
    with pytest.raises(ValueError, match="tread_keep must be"):
        model(torch.randn(1, 4, 8, 8), 0.5, torch.randn(1, 2, 48), tread_keep=torch.ones(1, 5, dtype=torch.bool))
