"""Training data: kohya-style captions, the shifted square crop with its position map (SPEC §4.4), aspect-ratio
buckets, and an image-folder source whose order is a pure function of (seed, epoch), so a resumed run reads
exactly the batches an uninterrupted one would.

Every sample's randomness (crop offset, tag dropout and shuffle) comes from a `random.Random` seeded with
(seed, epoch, index), so results do not depend on the number of loader workers. Unreadable images are
replaced by the next readable one and counted in `Batch.skipped`, never fatal; so are images over
MAX_IMAGE_PIXELS, refused before they are decoded. Images are read by `hdm_core.images.open_rgb` (EXIF orientation,
16-bit greyscale, alpha on white). How a file becomes a `Sample` is injected (`FolderDataset(load_sample=...)`):
`load_image` decodes it, `training.cache.CachedSamples` reads its cached latents.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math
import os
import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import torch
from PIL import Image

from hdm_core.images import MAX_PIXELS, open_rgb, to_rgb
from hdm_core.rope import axis_coords

from .captions import CaptionRules, process_caption
from .epochs import Group, RepeatedPlan
from .runtime import mix_seed

log = logging.getLogger("training.data")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".webp", ".bmp")
MAX_CORRUPT_IN_A_ROW = 50
MAX_IMAGE_PIXELS = MAX_PIXELS  # a larger training image is skipped, unread (64 MP: 8000 x 8000)
EXIF_ORIENTATION, EXIF_TRANSPOSED = 0x0112, (5, 6, 7, 8)  # orientations that swap width and height


# ---------------------------------------------------------------------------------------------------
# Crops, position maps, buckets
# ---------------------------------------------------------------------------------------------------

def resize_and_crop(img: Image.Image, height: int, width: int,
                    rng: random.Random) -> tuple[Image.Image, int, int, int, int]:
    """Resize (bicubic) so the image covers height × width, then take a random window of that size.

    With height == width == S this is HDM's shifted square crop: short side → S, random offset along the long
    side. Returns (crop, top, left, resized_h, resized_w); the offset is uniform in [0, excess] (the official
    loader never draws the last offset; including it is harmless and keeps the crop symmetric).
    """
    w0, h0 = img.size
    scale = max(width / w0, height / h0)
    rw, rh = max(width, round(w0 * scale)), max(height, round(h0 * scale))
    if (rw, rh) != (w0, h0):
        img = img.resize((rw, rh), Image.BICUBIC)
    top, left = rng.randint(0, rh - height), rng.randint(0, rw - width)
    return img.crop((left, top, left + width, top + height)), top, left, rh, rw


def crop_position_map(full_h: int, full_w: int, top: int, left: int, height: int, width: int,
                      factor: int) -> torch.Tensor:
    """Latent-resolution position map [(height/f)·(width/f), 2] of a crop of a full_h × full_w image (SPEC §4.4):
    the crop's slice of the whole image's map (`hdm_core.canvas.canvas_position_map` of that region), averaged
    over f × f pixels. Computed per axis, since the map is separable (no full-resolution map is ever built)."""
    if height % factor or width % factor:
        raise ValueError(f"crop {height}x{width} is not divisible by the VAE factor {factor}")
    long_side = max(full_h, full_w)
    ys = axis_coords(full_h, long_side, top, height).reshape(-1, factor).mean(1)
    xs = axis_coords(full_w, long_side, left, width).reshape(-1, factor).mean(1)
    return torch.stack(torch.meshgrid(ys, xs, indexing="ij"), -1).reshape(-1, 2).float()


def make_buckets(resolution: int, step: int, max_ratio: float) -> list[tuple[int, int]]:
    """(height, width) buckets of about resolution² pixels, sides multiples of `step`, ratio <= max_ratio."""
    area, buckets = resolution * resolution, {(resolution, resolution)}
    w = step
    while w <= resolution * max_ratio:
        h = (area // w) // step * step
        if h >= step and max(w, h) / min(w, h) <= max_ratio:
            buckets.update({(h, w), (w, h)})
        w += step
    return sorted(buckets)


def nearest_bucket(buckets: list[tuple[int, int]], height: int, width: int) -> tuple[int, int]:
    """The bucket whose log aspect ratio is closest to the image's."""
    target = math.log(width / height)
    return min(buckets, key=lambda b: (abs(math.log(b[1] / b[0]) - target), b))


# ---------------------------------------------------------------------------------------------------
# Samples and batches
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class SampleSpec:
    """How a decoded image becomes a training sample."""

    resolution: int
    factor: int                  # pixels per latent cell (8 for the EQ-VAE, 1 for pixel space)
    rules: CaptionRules


@dataclass
class Sample:
    """One training example: pixels, or the cached VAE posterior of the crop (and maybe its text embedding)."""

    pos: torch.Tensor                          # (h/f · w/f, 2) position map of the crop
    aspect: float                              # ln(W/H) of the uncropped image
    caption: str
    pixels: torch.Tensor | None = None         # (3, h, w) uint8
    latent_mean: torch.Tensor | None = None    # (C, h/f, w/f) cached posterior
    latent_std: torch.Tensor | None = None
    ctx: torch.Tensor | None = None            # (L, D) cached text embedding of the caption
    skipped: int = 0                           # unreadable files this sample replaced
    position: tuple[int, ...] = ()             # where the source's plan is (see FolderSource / ShardSource)
    loss_weight: torch.Tensor | None = None    # () its dataset's loss weight (training.datasets); None = 1


@dataclass
class Batch:
    """Samples of one size, stacked; `pixels` or (`latent_mean`, `latent_std`) is set, `ctx` when cached."""

    pos: torch.Tensor                          # (B, N, 2)
    aspect: torch.Tensor                       # (B,)
    captions: list[str]
    pixels: torch.Tensor | None = None         # (B, 3, H, W) uint8
    latent_mean: torch.Tensor | None = None    # (B, C, H/f, W/f)
    latent_std: torch.Tensor | None = None
    ctx: torch.Tensor | None = None            # (B, L, D)
    skipped: int = 0                           # unreadable files replaced or dropped while reading it
    position: tuple[int, ...] = ()
    loss_weight: torch.Tensor | None = None    # (B,) multiplies each sample's loss; None = all 1

    def to(self, device: torch.device | str) -> Batch:
        """The same batch with its tensors on `device` (asynchronous copies from pinned memory)."""
        return self._map(lambda t: t.to(device, non_blocking=True))

    def pin_memory(self) -> Batch:
        """Called by the DataLoader's pinning thread (pin_memory=True on CUDA machines)."""
        return self._map(torch.Tensor.pin_memory)

    def _map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> Batch:
        return dataclasses.replace(self, **{f.name: fn(getattr(self, f.name)) for f in dataclasses.fields(self)
                                            if isinstance(getattr(self, f.name), torch.Tensor)})


def collate(samples: list[Sample]) -> Batch:
    def stack(name: str) -> torch.Tensor | None:
        first = getattr(samples[0], name)
        return None if first is None else torch.stack([getattr(s, name) for s in samples])

    return Batch(pos=stack("pos"), aspect=torch.tensor([s.aspect for s in samples], dtype=torch.float32),
                 captions=[s.caption for s in samples], pixels=stack("pixels"), latent_mean=stack("latent_mean"),
                 latent_std=stack("latent_std"), ctx=stack("ctx"), skipped=sum(s.skipped for s in samples),
                 position=samples[0].position, loss_weight=stack("loss_weight"))


def make_sample(img: Image.Image, caption: str, size: tuple[int, int], spec: SampleSpec,
                rng: random.Random) -> Sample:
    """Crop an image (as `open_image` returns it: RGB, upright) to `size` (h, w) with its position map and aspect;
    augment the caption."""
    crop, top, left, rh, rw = resize_and_crop(img if img.mode == "RGB" else to_rgb(img), size[0], size[1], rng)
    pixels = torch.frombuffer(bytearray(crop.tobytes()), dtype=torch.uint8).reshape(size[0], size[1], 3)
    return Sample(pos=crop_position_map(rh, rw, top, left, size[0], size[1], spec.factor),
                  aspect=math.log(rw / rh),
                  caption=process_caption(caption, spec.rules, rng),
                  pixels=pixels.permute(2, 0, 1).contiguous())


def open_image(source: str | os.PathLike | bytes) -> Image.Image:
    """8-bit RGB, upright, decoded fully (so truncated files fail here, not later); ValueError naming the file on
    anything unreadable or over MAX_IMAGE_PIXELS (refused before decoding)."""
    return open_rgb(source, max_pixels=MAX_IMAGE_PIXELS)


def read_caption(image: Path) -> str:
    """The caption of an image: its same-stem .txt file, or "" when there is none."""
    txt = Path(image).with_suffix(".txt")
    return txt.read_text(encoding="utf-8", errors="replace") if txt.is_file() else ""


def header_size(source: str | os.PathLike | bytes) -> tuple[int, int]:
    """(height, width) of the upright image (EXIF orientation applied) from the file header, without decoding."""
    with Image.open(io.BytesIO(source) if isinstance(source, bytes) else source) as img:
        h, w = img.height, img.width
        # only an EXIF block already read with the header (PNG's getexif() would decode the image to look further)
        if "exif" in img.info and img.getexif().get(EXIF_ORIENTATION) in EXIF_TRANSPOSED:
            h, w = w, h
    return h, w


# (image path, caption text, (h, w), spec, rng) -> Sample; raises on an unreadable file.
LoadSample = Callable[[Path, str, tuple[int, int], SampleSpec, random.Random], Sample]


def load_image(path: Path, caption: str, size: tuple[int, int], spec: SampleSpec, rng: random.Random) -> Sample:
    """The default `LoadSample`: decode the image file and crop it."""
    return make_sample(open_image(path), caption, size, spec, rng)


# ---------------------------------------------------------------------------------------------------
# Image folder (map-style) with a deterministic, resumable batch plan
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class BatchPlan:
    """How a rank cuts the data into batches; the same for folders and tar shards."""

    seed: int                                  # the recipe's train.seed, shared by all ranks
    batch_size: int                            # per rank
    rank: int = 0
    world: int = 1
    buckets: list[tuple[int, int]] | None = None   # (h, w) aspect-ratio buckets; None = square crops


def list_images(root: str | os.PathLike) -> list[Path]:
    """All images under root (recursively), sorted, so every rank sees the same list."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"data.path {root} is not a folder; point it at a folder of images with "
                                f"same-name .txt captions, or at tar shards (*.tar)")
    files = sorted(p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file())
    if not files:
        raise ValueError(f"no images ({', '.join(IMAGE_EXTS)}) found under {root}")
    return files


class SampleKey(NamedTuple):
    """What a map-style dataset is asked for: file `index` of `epoch`, cropped to (height, width); `batch` is the
    batch's number in the epoch (the sample's `position`), `copy` which of the file's reads in the epoch it is (a
    file read several times, training.datasets; copy 0 has the seed of a file read once)."""

    index: int
    epoch: int
    height: int
    width: int
    batch: int = 0
    copy: int = 0


class FolderDataset(torch.utils.data.Dataset):
    """Images with same-stem .txt captions (a missing .txt is an empty caption), indexed by `SampleKey` (or a tuple
    of its fields); `load_sample` turns a file into a Sample (see `LoadSample`). `files` (default: every image
    under root) is the list to read, e.g. without held-out validation files."""

    def __init__(self, root: str | os.PathLike, spec: SampleSpec, seed: int,
                 load_sample: LoadSample = load_image, files: list[Path] | None = None) -> None:
        self.root, self.spec, self.seed = Path(root), spec, seed
        self.files = list_images(root) if files is None else files
        self.load_sample = load_sample
        self._warned: set[int] = set()

    def __len__(self) -> int:
        return len(self.files)

    def caption(self, i: int) -> str:
        return read_caption(self.files[i])

    def image_size(self, i: int) -> tuple[int, int] | None:
        """(height, width) from the header only; None when unreadable."""
        try:
            return header_size(self.files[i])
        except Exception:  # noqa: BLE001 - any unreadable file is skipped, whatever the decoder raises
            return None

    def __getitem__(self, key: SampleKey | tuple[int, ...]) -> Sample:
        key = SampleKey(*key)
        copy = f"/{key.copy}" if key.copy else ""  # copy 0 keeps the seed of a file read once
        for skipped in range(MAX_CORRUPT_IN_A_ROW):
            i = (key.index + skipped) % len(self.files)
            rng = random.Random(f"{self.seed}/{key.epoch}/{i}{copy}")
            try:
                sample = self.load_sample(self.files[i], self.caption(i), (key.height, key.width), self.spec, rng)
                break
            except Exception as err:  # noqa: BLE001
                if i not in self._warned:
                    self._warned.add(i)
                    log.warning("skipping unreadable image %s (%s: %s)", self.files[i], type(err).__name__, err)
        else:
            raise RuntimeError(f"{MAX_CORRUPT_IN_A_ROW} unreadable images in a row near {self.files[key.index]}; "
                               f"check the dataset (e.g. with PIL) before training")
        sample.skipped, sample.position = skipped, (key.epoch, key.batch)
        return sample


def epoch_plan(sizes: list[tuple[int, int] | None], epoch: int,
               plan: BatchPlan) -> list[list[tuple[int, int, int, int]]]:
    """This rank's batches for one epoch: a seeded permutation cut into batches (one bucket per batch),
    the global batch list shuffled, then dealt round-robin so every rank gets the same number of batches."""
    g = torch.Generator().manual_seed(mix_seed(plan.seed, epoch))
    order = torch.randperm(len(sizes), generator=g).tolist()
    by_bucket: dict[tuple[int, int] | None, list[int]] = {}
    for i in order:
        if plan.buckets is None:
            size = None
        elif sizes[i] is None:
            continue  # unreadable header: never planned (counted at start-up)
        else:
            size = nearest_bucket(plan.buckets, *sizes[i])
        by_bucket.setdefault(size, []).append(i)
    n = plan.batch_size
    batches = [(b, idx[k:k + n]) for b, idx in sorted(by_bucket.items(), key=lambda kv: str(kv[0]))
               for k in range(0, len(idx) - n + 1, n)]
    perm = torch.randperm(len(batches), generator=g).tolist()
    batches = [batches[p] for p in perm]
    per_rank = len(batches) // plan.world
    if per_rank == 0:
        raise ValueError(f"{len(sizes)} images give {len(batches)} full batches of {n}, fewer than the "
                         f"{plan.world} ranks; lower train.batch_size or add data")
    return [[(i, epoch, *(size or (0, 0))) for i in idx] for size, idx in batches[plan.rank::plan.world][:per_rank]]


ReadCounts = Callable[[int], list[int]]  # epoch -> reads of each file in it (a training.datasets.EpochCounts)


class PlanSampler(torch.utils.data.Sampler):
    """Endless batch sampler over epochs from (epoch, batch), yielding lists of `SampleKey`. `counts` says how often
    each file is read in an epoch when files repeat (a lazy `training.epochs.RepeatedPlan`: memory in proportion to
    the files); None reads every file once (`epoch_plan`)."""

    def __init__(self, sizes: list, plan: BatchPlan, resolution: int, start: tuple[int, int] = (0, 0),
                 counts: ReadCounts | None = None) -> None:
        self.sizes, self.plan, self.resolution, self.start, self.counts = sizes, plan, resolution, start, counts
        self.lengths: dict[int, int] = {}
        self.batches_per_epoch = self.epoch_length(0)

    def epoch(self, epoch: int) -> Sequence[list[SampleKey]]:
        """This rank's batches of one epoch, as dataset keys (computed batch by batch when files repeat)."""
        r = self.resolution
        if self.counts is None:
            batches = epoch_plan(self.sizes, epoch, self.plan)
            self.lengths[epoch] = len(batches)
            return [[SampleKey(i, e, h or r, w or r, b) for i, e, h, w in batch] for b, batch in enumerate(batches)]
        plan = RepeatedPlan(self.counts(epoch), self.groups(), epoch, self.plan.seed, self.plan.batch_size,
                            self.plan.rank, self.plan.world)
        self.lengths[epoch] = len(plan)
        return _Keys(plan, epoch, r)

    def groups(self) -> list[Group]:
        """The files by bucket, buckets in epoch_plan's order (files with an unreadable header are left out)."""
        if self.plan.buckets is None:
            return [Group(None, list(range(len(self.sizes))))]
        by_bucket: dict[tuple[int, int], list[int]] = {}
        for i, size in enumerate(self.sizes):
            if size is not None:
                by_bucket.setdefault(nearest_bucket(self.plan.buckets, *size), []).append(i)
        return [Group(b, files) for b, files in sorted(by_bucket.items(), key=lambda kv: str(kv[0]))]

    def epoch_length(self, epoch: int) -> int:
        """Batches in this rank's epoch (the same every epoch unless fractional repeats vary it)."""
        return self.lengths[epoch] if epoch in self.lengths else len(self.epoch(epoch))

    def __iter__(self) -> Iterator[list[SampleKey]]:
        epoch, first = self.start
        while True:
            batches = self.epoch(epoch)
            for b in range(first, len(batches)):
                yield batches[b]
            epoch, first = epoch + 1, 0


class _Keys(Sequence):
    """A RepeatedPlan's batches as dataset keys."""

    def __init__(self, plan: RepeatedPlan, epoch: int, resolution: int) -> None:
        self.plan, self.epoch, self.resolution = plan, epoch, resolution

    def __len__(self) -> int:
        return len(self.plan)

    def __getitem__(self, b: int) -> list[SampleKey]:
        r = self.resolution
        return [SampleKey(i, self.epoch, *(size or (r, r)), b, copy) for i, copy, size in self.plan[b]]


class FolderSource:
    """Endless iterator of collated batches from an image folder (or a training.datasets.DatasetMix, with its
    `counts`); `state()` is the next (epoch, batch)."""

    def __init__(self, dataset: FolderDataset, plan: BatchPlan, workers: int = 0, state: dict | None = None,
                 counts: ReadCounts | None = None) -> None:
        sizes = [dataset.image_size(i) for i in range(len(dataset))] if plan.buckets else [None] * len(dataset)
        self.unreadable_at_start = sum(s is None for s in sizes) if plan.buckets else 0
        self.position = (state["epoch"], state["batch"]) if state else (0, 0)
        self.sampler = PlanSampler(sizes, plan, dataset.spec.resolution, self.position, counts)
        self.batches_per_epoch = self.sampler.batches_per_epoch
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=self.sampler, num_workers=workers, collate_fn=collate,
            prefetch_factor=4 if workers > 0 else None, pin_memory=torch.cuda.is_available())

    def __iter__(self) -> Iterator[Batch]:
        for batch in self.loader:
            epoch, b = batch.position
            self.position = (epoch, b + 1) if b + 1 < self.sampler.epoch_length(epoch) else (epoch + 1, 0)
            yield batch

    def state(self) -> dict:
        return {"epoch": self.position[0], "batch": self.position[1]}
