"""Data pipeline: captions, shifted square crop and its position map, buckets, folder and tar sources."""

from __future__ import annotations

import itertools
import math
import random
from pathlib import Path

import pytest
import torch
from PIL import Image

from hdm_core.canvas import Region, canvas_position_map
from hdm_core.rope import area_downsample_pos, make_axial_pos
from training.captions import CaptionRules, process_caption
from training.data import (
    BatchPlan,
    FolderDataset,
    FolderSource,
    SampleSpec,
    crop_position_map,
    epoch_plan,
    make_buckets,
    make_sample,
    nearest_bucket,
    resize_and_crop,
)
from training.shards import ShardSource, ShardStream, count_samples, expand_shards
from training.toy_data import make_toy_folder, make_toy_shards

SPEC = SampleSpec(32, 1, CaptionRules(tag_separator=",", group_separator=""))


# ---------------------------------------------------------------------------------------------------
# Captions
# ---------------------------------------------------------------------------------------------------

def test_caption_keep_section_groups_and_dropout():
    rules = CaptionRules(tag_dropout=0.5, group_dropout=0.3, shuffle=True)
    text = "artist a$$1girl|||red$$blue$$green%%sky$$cloud%%smile"
    seen = set()
    for seed in range(50):
        out = process_caption(text, rules, random.Random(seed)).split(", ")
        assert out[:2] == ["artist a", "1girl"]  # always kept, in order
        assert set(out[2:]) <= {"red", "blue", "green", "sky", "cloud", "smile"}
        seen.add(tuple(out[2:]))
    assert len(seen) > 10  # dropout and shuffle really vary the caption
    # deterministic from the generator
    assert process_caption(text, rules, random.Random(3)) == process_caption(text, rules, random.Random(3))


def test_caption_without_augmentation_is_a_plain_join():
    rules = CaptionRules()
    assert process_caption("a$$b%%c", rules, random.Random(0)) == "a, b, c"
    assert process_caption("  plain sentence  ", rules, random.Random(0)) == "plain sentence"
    kohya = CaptionRules(keep_separator="|||", group_separator="", tag_separator=",")
    assert process_caption("x|||b, c", kohya, random.Random(0)) == "x, b, c"
    assert process_caption("a, b", CaptionRules(caption_dropout=1.0), random.Random(0)) == ""


# ---------------------------------------------------------------------------------------------------
# Shifted square crop and position maps (SPEC §4.4)
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [(96, 40), (40, 96), (64, 64), (50, 31)])
def test_shifted_square_crop_geometry(size):
    img = Image.new("RGB", size)
    for seed in range(5):
        crop, top, left, rh, rw = resize_and_crop(img, 32, 32, random.Random(seed))
        assert crop.size == (32, 32) and min(rh, rw) == 32
        assert abs(rw / rh - size[0] / size[1]) < 0.05
        assert (top == 0 if rw >= rh else left == 0)  # the window only moves along the long side
        assert 0 <= top <= rh - 32 and 0 <= left <= rw - 32


@pytest.mark.parametrize("full,top,left,crop,factor", [((40, 96), 0, 13, (40, 40), 8), ((96, 40), 27, 0, (40, 40), 8),
                                                       ((32, 32), 0, 0, (32, 32), 1), ((24, 64), 0, 5, (24, 24), 4)])
def test_crop_position_map_equals_the_full_map_at_the_crop(full, top, left, crop, factor):
    """The map of the crop is the region's map on the full image (the canvas), area-downsampled; at factor 1 it is
    bit for bit the full image's map at the pixels the crop came from."""
    region = canvas_position_map(*full, region=Region(top, left, *crop))
    got = crop_position_map(*full, top, left, *crop, factor)
    torch.testing.assert_close(got, area_downsample_pos(region, *crop, factor), atol=1e-6, rtol=0)
    if factor == 1:
        rows, cols = torch.meshgrid(torch.arange(crop[0]), torch.arange(crop[1]), indexing="ij")
        src = ((rows + top) * full[1] + cols + left).reshape(-1)
        assert torch.equal(got, make_axial_pos(*full)[src]) and torch.equal(got, region)


def test_sample_image_and_map_are_cropped_together():
    """An image whose pixels encode their own column: the cropped pixels and the map agree on the position."""
    w, h = 80, 32
    img = Image.new("RGB", (w, h))
    img.putdata([(x, 0, 0) for _ in range(h) for x in range(w)])
    for seed in range(4):
        s = make_sample(img, "a", (32, 32), SPEC, random.Random(seed))
        left = int(s.pixels[0, 0, 0])             # column of the full image at crop column 0
        torch.testing.assert_close(s.pixels[0, 0].long(), torch.arange(left, left + 32))
        x_expected = -1 + (torch.arange(left, left + 32) + 0.5) * 2 / w
        torch.testing.assert_close(s.pos.reshape(32, 32, 2)[0, :, 1], x_expected.float())
        assert s.aspect == pytest.approx(math.log(w / h))  # from the uncropped image


def test_buckets():
    buckets = make_buckets(1024, 64, 2.0)
    assert (1024, 1024) in buckets
    for h, w in buckets:
        assert h % 64 == 0 and w % 64 == 0 and max(h, w) / min(h, w) <= 2.0
        assert 0.85 < h * w / 1024**2 <= 1.0
    assert nearest_bucket(buckets, 1000, 1500)[1] > nearest_bucket(buckets, 1000, 1500)[0]
    assert nearest_bucket(buckets, 500, 500) == (1024, 1024)


# ---------------------------------------------------------------------------------------------------
# Folder source
# ---------------------------------------------------------------------------------------------------

def test_folder_skips_corrupt_images_and_reads_captions(tmp_path):
    root = make_toy_folder(tmp_path / "imgs", n=6, corrupt=2)
    (root / "00000.txt").unlink()  # missing caption → empty caption
    ds = FolderDataset(root, SPEC, seed=0)
    assert len(ds) == 8
    bad = [i for i, f in enumerate(ds.files) if f.name.startswith("corrupt")]
    sample = ds[(bad[0], 0, 32, 32)]
    assert sample.skipped == 2 and sample.pixels.shape == (3, 32, 32)  # replaced by the next good image
    assert ds[(0, 0, 32, 32)].caption == ""
    src = FolderSource(ds, BatchPlan(seed=0, batch_size=2), workers=0)
    total = sum(b.skipped for b in itertools.islice(iter(src), src.batches_per_epoch))
    assert total == 3  # corrupt_0 falls through corrupt_1 to a good image (2), corrupt_1 itself (1)


def test_epoch_plan_is_seeded_disjoint_and_balanced():
    sizes = [None] * 103
    plans = [epoch_plan(sizes, 0, BatchPlan(7, 4, r, 3)) for r in range(3)]
    assert len({len(p) for p in plans}) == 1
    seen = [k[0] for p in plans for batch in p for k in batch]
    assert len(seen) == len(set(seen))
    assert plans[0] == epoch_plan(sizes, 0, BatchPlan(7, 4, 0, 3))
    assert plans[0] != epoch_plan(sizes, 1, BatchPlan(7, 4, 0, 3))


def test_folder_source_resumes_where_it_left_off(tmp_path):
    root = make_toy_folder(tmp_path / "imgs", n=20, corrupt=0)
    ds = FolderDataset(root, SPEC, seed=1)

    def take(n, state=None):
        src = FolderSource(ds, BatchPlan(seed=1, batch_size=4), workers=0, state=state)
        out = [(b.captions, b.pixels.sum().item()) for b in itertools.islice(iter(src), n)]
        return out, src.state()

    full, _ = take(9)  # crosses an epoch boundary (5 batches per epoch)
    first, state = take(3)
    rest, _ = take(6, state)
    assert first + rest == full


def test_bucketed_folder_batches_share_a_shape(tmp_path):
    root = make_toy_folder(tmp_path / "imgs", n=24, corrupt=1)
    ds = FolderDataset(root, SPEC, seed=0)
    src = FolderSource(ds, BatchPlan(seed=0, batch_size=2, buckets=make_buckets(32, 8, 2.0)), workers=0)
    assert src.unreadable_at_start == 1
    shapes = {tuple(b.pixels.shape[-2:]) for b in itertools.islice(iter(src), src.batches_per_epoch)}
    assert len(shapes) > 1 and all(h % 8 == 0 and w % 8 == 0 for h, w in shapes)


# ---------------------------------------------------------------------------------------------------
# Tar shards
# ---------------------------------------------------------------------------------------------------

def _stream(shards, rank, world, workers, state=None):
    slots = max(1, min(workers, len(shards) // world))
    return ShardSource(ShardStream(shards, SPEC, BatchPlan(0, 3, rank, world), slots, 4, state), workers)


def test_shards_per_rank_disjoint_and_corrupt_counted(tmp_path):
    make_toy_shards(tmp_path, shards=4, per_shard=6, corrupt=1)
    shards = expand_shards(str(tmp_path / "shard-{0000..0003}.tar"))
    assert len(shards) == 4 and count_samples(shards) == 25
    keys, skipped = [], 0
    for rank in range(2):
        source = _stream(shards, rank, 2, 0)
        batches = list(itertools.islice(iter(source), 4))
        assert all(b.position[1] == 0 for b in batches)  # still the first epoch
        keys.append({k for k, _ in source.stream.samples(0, 0)})  # what this rank's batches were cut from
        skipped += sum(b.skipped for b in batches)
    assert keys[0] and keys[1] and not keys[0] & keys[1]
    assert skipped == 1


def test_shard_stream_resume_with_workers(tmp_path):
    make_toy_shards(tmp_path, shards=4, per_shard=6, corrupt=0)
    shards = expand_shards(str(tmp_path / "*.tar"))

    def take(n, state=None):
        src = _stream(shards, 0, 1, 2, state)
        out = [(b.position, b.pixels.sum().item()) for b in itertools.islice(iter(src), n)]
        return out, src.state()

    full, _ = take(11)
    first, state = take(5)
    rest, _ = take(6, state)
    assert first + rest == full


def test_latent_cache_tool_needs_no_base_when_the_encoders_are_named(tmp_path, capsys):
    """`python -m training.cache` for a later stage: its recipe names the text encoder and VAE, so the previous
    stage's export (model.init_from) need not exist yet; bad input is one `error:` line with exit 2."""
    from training.cache import main as cache_main
    from training.toy_data import make_toy_folder

    make_toy_folder(tmp_path / "imgs", n=4)
    tiny = str(Path(__file__).resolve().parents[1] / "training" / "recipes" / "tiny_cpu.toml")
    base = ["--config", tiny, f"data.path={tmp_path / 'imgs'}", "model.init_from=runs/stage1/export/stage1.safetensors"]
    assert cache_main([*base, f"data.cache={tmp_path / 'cache'}"]) == 0
    assert len(list((tmp_path / "cache").rglob("*.safetensors"))) == 4
    assert cache_main(base) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err == ["error: set data.cache=<folder> (on the command line or in the recipe)"]
