"""Bad input to the trainer never gives a silent wrong result, a hang or a half-written file: changed
recipes on resume, damaged checkpoints, NaN recipe values, unwritable folders, huge images, damaged shards, full
disks. Tiny recipe, a few steps, small toy data."""

from __future__ import annotations

import csv
import logging
import random
import shutil
import struct
import types
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from full_disk import disk_full_after
from PIL import Image

import training.train as train_module
from training.captions import CaptionRules
from training.checkpointing import (
    CHECKPOINT_KEYS,
    DamagedCheckpoint,
    find_resume,
    latest_checkpoint,
    load_checkpoint,
    save_checkpoint,
)
from training.data import FolderDataset, SampleSpec, header_size, load_image
from training.monitor import CSV_FIELDS, plot_loss_curve
from training.recipe import Recipe, load_recipe, resume_conflicts
from training.shards import count_samples
from training.toy_data import make_toy_folder, make_toy_shards
from training.train import main, parse_args

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "training" / "recipes" / "tiny_cpu.toml")


def _run(data: Path, out: Path, *overrides: str, extra: tuple[str, ...] = ()) -> list[Path]:
    return main(parse_args(["--config", TINY, *extra, f"data.path={data}", f"run.out_dir={out}", *overrides]))


@pytest.fixture(scope="module")
def stopped(tmp_path_factory) -> tuple[Path, Path]:
    """(image folder, run.out_dir) of a tiny run stopped with a checkpoint at step 1 of 4."""
    root = tmp_path_factory.mktemp("stopped")
    data = make_toy_folder(root / "imgs", n=8, corrupt=0)
    _run(data, root / "runs", "train.max_steps=4", extra=("--stop-at", "1"))
    return data, root / "runs"


# ---------------------------------------------------------------------------------------------------
# 1. Resume refuses another recipe, names each key, and allows what may change
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override,expected", [
    ("model.text_encoder=random:tiny,seed=3", r"model.text_encoder: 'random:tiny' → 'random:tiny,seed=3'"),
    ("train.batch_size=2", r"train.batch_size: 4 → 2"),
    ("model.config={input_dim=3,dim=32}", r"model.config.dim: \(not set\) → 32"),
    ("optim.lr=0.1", r"optim.lr: 0.5 → 0.1"),
    ("model.tread_rate=0.25", r"model.tread_rate: 0.5 → 0.25"),
])
def test_resume_refuses_a_changed_recipe_naming_each_key(stopped, override, expected):
    data, out = stopped
    before = sorted(p.name for p in (out / "tiny_cpu").rglob("*"))
    with pytest.raises(ValueError, match=expected) as err:
        _run(data, out, "train.max_steps=4", override, extra=("--resume",))
    message = str(err.value)
    assert "step_00000001.pt" in message and "run.out_dir" in message and "data.path may move" in message
    assert sorted(p.name for p in (out / "tiny_cpu").rglob("*")) == before  # refused before writing anything


def test_resume_refuses_folder_data_onto_shards(stopped, tmp_path):
    data, out = stopped
    make_toy_shards(tmp_path / "shards", shards=2, per_shard=8, corrupt=0)
    with pytest.raises(ValueError, match=r"data.path: folder .* → tar shards"):
        _run(data, out, f"data.path={tmp_path / 'shards'}/*.tar", extra=("--resume",))


def test_resume_refuses_shard_data_onto_a_folder(tmp_path):
    shards = make_toy_shards(tmp_path / "shards", shards=2, per_shard=8, corrupt=0)
    pattern = str(shards[0].parent / "*.tar")
    _run(Path(pattern), tmp_path / "runs", "train.max_steps=4", extra=("--stop-at", "1"))
    folder = make_toy_folder(tmp_path / "imgs", n=8, corrupt=0)
    with pytest.raises(ValueError, match=r"data.path: tar shards .* → folder"):
        _run(folder, tmp_path / "runs", "train.max_steps=4", extra=("--resume",))


def test_resume_allows_moved_data_new_logging_and_more_steps(stopped, tmp_path):
    data, out = stopped
    shutil.copytree(data, tmp_path / "moved")
    shutil.copytree(out, tmp_path / "runs")
    (export,) = _run(tmp_path / "moved", tmp_path / "runs", "train.max_steps=6", "run.log_every=1",
                     "run.save_every=3", "notes='moved'", extra=("--resume",))
    assert export.is_file() and load_checkpoint(latest_checkpoint(tmp_path / "runs" / "tiny_cpu"))["step"] == 6


def test_resume_rule_allows_and_refuses_by_key():
    old = Recipe().to_dict()
    allowed = Recipe().to_dict()
    allowed["data"].update(path="/elsewhere", workers=2, cache="/cache", num_samples=10)
    allowed["train"].update(max_steps=99, epochs=3.0, precision="fp16")
    allowed["run"].update(out_dir="/x", log_every=1, sample_prompts=["a"], keep_last=9)
    allowed["model"].update(compile=True, gradient_checkpointing=False)
    assert resume_conflicts(old, allowed) == []
    refused = Recipe().to_dict()
    refused["data"].update(resolution=512, path="s/*.tar")
    refused["data"]["captions"]["tag_dropout"] = 0.5
    refused["train"].update(seed=1, grad_accum=2, ema_decay=0.9)
    refused["model"].update(vae="other.safetensors", init_from="x.safetensors")
    keys = [line.split(":")[0] for line in resume_conflicts(old, refused)]
    assert keys == ["data.path", "data.captions.tag_dropout", "data.resolution", "model.init_from", "model.vae",
                    "train.ema_decay", "train.grad_accum", "train.seed"]


# ---------------------------------------------------------------------------------------------------
# 2. A damaged newest checkpoint falls back to the newest intact one
# ---------------------------------------------------------------------------------------------------

def _state(step: int) -> dict:
    return {k: {} for k in CHECKPOINT_KEYS} | {"step": step, "model": {"w": torch.ones(2)}}


def test_damaged_newest_checkpoints_fall_back_to_the_newest_intact_one(tmp_path, caplog):
    run = tmp_path / "run"
    for step in (1, 2, 3):
        good = save_checkpoint(run, step, _state(step), keep_last=5)
    empty, cut = good.with_name("step_00000002.pt"), good
    empty.write_bytes(b"")
    cut.write_bytes(cut.read_bytes()[:100])
    with caplog.at_level(logging.WARNING, logger="training.checkpointing"):
        path, state = find_resume(run, "auto")
    assert path.name == "step_00000001.pt" and state["step"] == 1
    assert "step_00000003.pt" in caplog.text and "step_00000002.pt" in caplog.text and "damaged" in caplog.text
    assert empty.is_file() and cut.is_file()  # left in place
    with pytest.raises(DamagedCheckpoint, match=r"step_00000003.pt \(100 bytes\) is damaged"):
        find_resume(run, str(cut))  # --resume-from names the file
    (run / "checkpoints" / "step_00000001.pt").write_bytes(b"\0" * 10)
    with pytest.raises(DamagedCheckpoint, match="every checkpoint in .* is damaged"):
        find_resume(run, "auto")


def test_restart_after_a_zero_byte_checkpoint_resumes(stopped, tmp_path, caplog):
    data, out = stopped
    shutil.copytree(out, tmp_path / "runs")
    run = tmp_path / "runs" / "tiny_cpu"
    shutil.copy(latest_checkpoint(run), run / "checkpoints" / "step_00000002.pt")
    (run / "checkpoints" / "step_00000003.pt").write_bytes(b"")  # a crash while writing, without atomic_write
    with caplog.at_level(logging.WARNING, logger="training.checkpointing"):
        _run(data, tmp_path / "runs", "train.max_steps=4", extra=("--resume",))
    assert "step_00000003.pt (0 bytes) is damaged" in caplog.text
    assert load_checkpoint(latest_checkpoint(run))["step"] == 4


# ---------------------------------------------------------------------------------------------------
# 3. Clear, early messages
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("override,key", [
    ("optim.lr=nan", "optim.lr"), ("optim.lr=inf", "optim.lr"), ("train.epochs=nan", "train.epochs"),
    ("run.sample_cfg=nan", "run.sample_cfg"), ("optim.betas=[0.9, nan]", r"optim.betas\[1\]"),
    ("data.captions.tag_dropout=nan", "data.captions.tag_dropout"), ("optim.grad_clip=-inf", "optim.grad_clip"),
])
def test_nan_and_inf_recipe_values_are_refused_by_key(override, key):
    with pytest.raises(ValueError, match=rf"{key} in the command-line overrides is -?(nan|inf); it must be a finite"):
        load_recipe(TINY, [override])


@pytest.mark.parametrize("value", [0, -4])
def test_batch_size_below_one_is_refused(value):
    with pytest.raises(ValueError, match=rf"train.batch_size {value} .* must be >= 1"):
        load_recipe(TINY, [f"train.batch_size={value}"])


def test_toml_syntax_error_names_the_file_and_line(tmp_path):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[optim\nlr = 0.1\n')
    with pytest.raises(ValueError, match=rf"recipe {bad} is not valid TOML: .*line 2"):
        load_recipe(bad)


def _no_steps(*args, **kwargs):
    raise AssertionError("a training step ran before the unwritable folder was reported")


def test_unwritable_checkpoint_folder_fails_before_the_first_step(tmp_path, monkeypatch):
    data = make_toy_folder(tmp_path / "imgs", n=8, corrupt=0)
    (tmp_path / "runs" / "tiny_cpu").mkdir(parents=True)
    (tmp_path / "runs" / "tiny_cpu" / "checkpoints").write_text("a file where the folder goes")
    monkeypatch.setattr(train_module, "optimizer_step", _no_steps)
    with pytest.raises(OSError, match=r"cannot write to .*tiny_cpu/checkpoints .*run.out_dir"):
        _run(data, tmp_path / "runs", "train.max_steps=2")
    blocker = tmp_path / "blocker"
    blocker.write_text("")
    with pytest.raises(OSError, match=rf"cannot write to {blocker}/tiny_cpu"):
        _run(data, blocker, "train.max_steps=2")


def test_a_failed_checkpoint_write_names_the_path_and_leaves_nothing(tmp_path, monkeypatch):
    def full_disk(obj, f):
        Path(f).write_bytes(b"PK partial")
        raise RuntimeError("PytorchStreamWriter failed writing file data/0: file write failed")

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(OSError, match=r"could not write .*step_00000007.pt: .*file write failed"):
        save_checkpoint(tmp_path, 7, _state(7), keep_last=2)
    assert list((tmp_path / "checkpoints").iterdir()) == []


# ---------------------------------------------------------------------------------------------------
# 4. Bounded cost: huge images are not decoded, one damaged shard does not stop the run; images read right
# ---------------------------------------------------------------------------------------------------

def _png_header(width: int, height: int) -> bytes:
    """A 1-bit PNG that claims width x height but holds only a few rows (never meant to be decoded)."""
    def chunk(kind: bytes, payload: bytes) -> bytes:
        return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", zlib.crc32(kind + payload))

    rows = zlib.compress(b"\0" * (1 + (width + 7) // 8) * 4)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0))
            + chunk(b"IDAT", rows) + chunk(b"IEND", b""))


SPEC = SampleSpec(32, 1, CaptionRules())


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # Pillow's own note, at 89 MP
def test_a_169_megapixel_image_is_skipped_unread(tmp_path, caplog):
    data = make_toy_folder(tmp_path / "imgs", n=4, corrupt=0)
    huge = data / "00000.png"  # first in sorted order
    huge.write_bytes(_png_header(13000, 13000))
    ds = FolderDataset(data, SPEC, seed=0)
    with caplog.at_level(logging.WARNING, logger="training.data"):
        sample = ds[(0, 0, 32, 32)]
    assert sample.skipped == 1 and sample.pixels.shape == (3, 32, 32)
    assert str(huge) in caplog.text and "13000x13000 is over the 64 MP limit" in caplog.text


def _image_file(tmp_path: Path, name: str, img: Image.Image, **save) -> Path:
    img.save(tmp_path / name, **save)
    return tmp_path / name


def test_training_images_are_read_upright_scaled_and_flattened(tmp_path):
    rng = random.Random(0)
    grey16 = Image.fromarray(np.full((32, 32), 32896, dtype=np.uint16))  # half of 65535
    s = load_image(_image_file(tmp_path, "g16.png", grey16), "", (32, 32), SPEC, rng)
    assert s.pixels.unique().tolist() == [128]  # scaled, not clipped to 255
    clear = Image.new("RGBA", (32, 32), (0, 0, 0, 0))
    s = load_image(_image_file(tmp_path, "clear.png", clear), "", (32, 32), SPEC, rng)
    assert s.pixels.unique().tolist() == [255]  # transparent is white, not the black under it
    exif = Image.Exif()
    exif[0x0112] = 6  # rotate 90°: stored 48 x 32 (w x h), shown 32 x 48
    path = _image_file(tmp_path, "phone.jpg", Image.new("RGB", (48, 32), "red"), exif=exif)
    assert header_size(path) == (48, 32)  # (h, w) upright: buckets see the image as shown
    assert load_image(path, "", (32, 32), SPEC, rng).aspect == pytest.approx(np.log(32 / 48))


def test_a_truncated_shard_is_counted_as_far_as_it_goes_and_training_runs(tmp_path, caplog):
    shards = make_toy_shards(tmp_path / "shards", shards=4, per_shard=4, corrupt=0)
    shards[2].write_bytes(shards[2].read_bytes()[:600])  # cut inside its first member
    with caplog.at_level(logging.WARNING, logger="training.shards"):
        assert count_samples([str(p) for p in shards]) == 13  # 12 + the cut member's header; the stream drops it
        (export,) = _run(Path(str(tmp_path / "shards" / "*.tar")), tmp_path / "runs", "train.max_steps=3")
    assert export.is_file() and str(shards[2]) in caplog.text and "damaged" in caplog.text


# ---------------------------------------------------------------------------------------------------
# 5. A full disk never leaves a half-written file
# ---------------------------------------------------------------------------------------------------

def _leftovers(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.rglob("*.tmp"))


def test_loss_plot_is_whole_or_untouched(tmp_path):
    log_csv, png = tmp_path / "log.csv", tmp_path / "loss.png"
    with log_csv.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows({"step": s, "loss": 1 / s} for s in range(1, 20))
    plot_loss_curve(log_csv, png)
    before = png.read_bytes()
    with disk_full_after(2000), pytest.raises(OSError, match="could not write .*loss.png"):
        plot_loss_curve(log_csv, png)
    assert png.read_bytes() == before and _leftovers(tmp_path) == []


def test_sample_grid_and_recipe_json_are_never_half_written(tmp_path, monkeypatch):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    monkeypatch.setattr(train_module, "sample_grid", lambda *a: noise)
    st = types.SimpleNamespace(recipe=types.SimpleNamespace(run_dir=tmp_path), step=3, ema=None, model=None,
                               encoders=types.SimpleNamespace(text=None, vae=None), autocast=None)
    with disk_full_after(1000), pytest.raises(OSError, match="could not write .*step_00000003.png"):
        train_module.save_samples(st)
    assert list((tmp_path / "samples").iterdir()) == []

    data = make_toy_folder(tmp_path / "imgs", n=4, corrupt=0)
    monkeypatch.setattr(train_module, "optimizer_step", _no_steps)
    with disk_full_after(200), pytest.raises(OSError, match="could not write .*recipe.json"):
        _run(data, tmp_path / "runs", "train.max_steps=2")
    assert not (tmp_path / "runs" / "tiny_cpu" / "recipe.json").exists()
    assert _leftovers(tmp_path) == []


# ---------------------------------------------------------------------------------------------------
# A diverged loss: found without a host sync per step, before anything diverged is logged or saved
# ---------------------------------------------------------------------------------------------------

def test_a_diverged_loss_stops_the_run_before_it_is_saved(tmp_path):
    data = make_toy_folder(tmp_path / "imgs", n=8, corrupt=0)
    with pytest.raises(FloatingPointError, match="loss became NaN or Inf before step 3; nothing after it was saved"):
        _run(data, tmp_path / "runs", "train.max_steps=6", "optim.lr=1e30", "optim.warmup_steps=0",
             "optim.grad_clip=0.0", "run.log_every=3", "run.save_every=100")
    assert not list((tmp_path / "runs" / "tiny_cpu" / "checkpoints").glob("*.pt"))
