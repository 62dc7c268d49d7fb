"""Fine-tuners' datasets: kohya-style folder repeats, several weighted image folders in one recipe, a
regularisation (prior-preservation) set, and the deterministic validation split (docs/training.md,
"Fine-tuning datasets").

* A subfolder `<N>_<name>` directly under a dataset folder (kohya: `10_mychar/`) repeats each of its images N
  times per epoch, 1 ≤ N ≤ MAX_REPEATS; a count that looks like a year (`2024_photos/`) or is larger is refused with
  the fix, and `data.folder_repeats = false` reads such names as plain names.
* `[[data.datasets]]` entries (`DatasetEntry`) each add a folder read `repeats` times per epoch (at most
  MAX_REPEATS); a fractional part is drawn per (seed, epoch). Folder and dataset repeats multiply.
* A `regularization = true` entry gives as many samples per epoch as the other datasets together, drawn from its
  images (each file in proportion to its folder's N, so a small set cycles); its `loss_weight` is kohya's
  prior_loss_weight.
* `data.validation_split` holds out the files whose path hash falls below it (`held_out`), never trained on.

What an epoch reads is `EpochCounts(epoch)`: how many times each file is read, a pure function of (seed, epoch), so a
resumed run reads exactly what an uninterrupted one would; every read (copy) has its own crop and caption
randomness. Every count is ⌊e⌋ or ⌈e⌉ of the file's expected count e. The epoch itself is cut into batches lazily
(training/epochs.py): memory in proportion to the files, whatever the repeats.
"""

from __future__ import annotations

import bisect
import dataclasses
import hashlib
import itertools
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from .data import FolderDataset, LoadSample, Sample, SampleKey, SampleSpec, list_images, load_image
from .runtime import mix_seed

REPEAT_FOLDER = re.compile(r"(\d+)_(.+)")  # kohya: `<N>_<name>` directly under a dataset folder
MAX_REPEATS = 10_000  # per folder and per [[data.datasets]] entry: far above kohya's usual 1-100
YEARS = range(1900, 2101)  # a folder count in this range is a year (`2024_photos`), not a repeat count
ITEMS_STREAM = 1  # mix_seed(seed, epoch, ITEMS_STREAM) draws an epoch's counts; mix_seed(seed, epoch) its order
REPEATS_RESOLUTION = 1 << 20  # fractional expected counts are rounded to multiples of 2⁻²⁰


# ---------------------------------------------------------------------------------------------------
# [[data.datasets]] entries
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class DatasetEntry:
    """One [[data.datasets]] table."""

    path: str                            # image folder with same-name .txt captions
    repeats: float = 1.0                 # times each image is read per epoch, on average (x its folder's N)
    loss_weight: float = 1.0             # multiplies its samples' loss (on a reg set: kohya's prior_loss_weight)
    regularization: bool = False         # reg / prior-preservation images: as many per epoch as all the others


def _entry(value: Any, i: int) -> DatasetEntry:
    """One entry from its TOML table, every key and range checked; errors name `data.datasets[i].key`."""
    where = f"data.datasets[{i}]"
    value = dataclasses.asdict(value) if isinstance(value, DatasetEntry) else value
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a table like {{path = \"/data/set\", repeats = 2}}, got {value!r}")
    keys = [f.name for f in dataclasses.fields(DatasetEntry)]
    unknown = sorted(set(value) - set(keys))
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {where}; allowed keys are {keys}")
    if not isinstance(value.get("path"), str) or not value["path"]:
        raise ValueError(f"{where}.path must name a folder of images, got {value.get('path')!r}")
    for key, high in (("repeats", MAX_REPEATS), ("loss_weight", math.inf)):
        x = value.get(key, 1.0)
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not (math.isfinite(x) and 0 <= x <= high):
            raise ValueError(f"{where}.{key} {x!r} must be a finite number >= 0 (default 1.0)"
                             + (f" and at most {high:,}" if math.isfinite(high) else ""))
    if not isinstance(value.get("regularization", False), bool):
        raise ValueError(f"{where}.regularization must be true or false, got {value['regularization']!r}")
    entry = DatasetEntry(value["path"], float(value.get("repeats", 1.0)), float(value.get("loss_weight", 1.0)),
                         value.get("regularization", False))
    if entry.regularization and entry.repeats != 1.0:
        raise ValueError(f"{where}.repeats {entry.repeats}: a regularization set is read as often as the other "
                         f"datasets together; remove its repeats (folder repeats `<N>_name` weight its folders)")
    return entry


def parse_datasets(entries: list) -> list[DatasetEntry]:
    """Checked `DatasetEntry`s from [[data.datasets]] tables (or entries already built)."""
    out = [_entry(value, i) for i, value in enumerate(entries)]
    if out and not any(e.repeats for e in out if not e.regularization):
        raise ValueError("data.datasets has no dataset to train on: every entry is a regularization set or has "
                         "repeats 0; add one with regularization = false and repeats > 0")
    return out


def dataset_entries(d: Any) -> list[DatasetEntry]:
    """A DataSection's datasets: its [[data.datasets]], or data.path as the only one."""
    return list(d.datasets) or [DatasetEntry(d.path)]


def entry_key(d: Any, i: int) -> str:
    """How errors name dataset i's folder: `data.datasets[i].path`, or `data.path`."""
    return f"data.datasets[{i}].path" if d.datasets else "data.path"


# ---------------------------------------------------------------------------------------------------
# Folder repeats and the validation split
# ---------------------------------------------------------------------------------------------------

def folder_repeats(relative: Path, root: Path) -> int:
    """N for an image under a folder `<N>_<name>` directly below its dataset folder, else 1; ValueError naming the
    folder and the fix for N < 1, N > MAX_REPEATS or an N that looks like a year."""
    match = REPEAT_FOLDER.fullmatch(relative.parts[0]) if len(relative.parts) > 1 else None
    if match is None:
        return 1
    n, fix = int(match.group(1)), (f"rename it (e.g. 10_{match.group(2)}), or set data.folder_repeats = false to "
                                   f"read folder names as plain names")
    if n < 1:
        raise ValueError(f"folder {root / relative.parts[0]}: a kohya repeat count must be >= 1; {fix}")
    if n > MAX_REPEATS or n in YEARS:
        why = "looks like a year or a date" if n in YEARS or len(match.group(1)) in (6, 8) else \
            f"is more than {MAX_REPEATS:,}"
        raise ValueError(f"folder {root / relative.parts[0]}: its name asks kohya-style for {n:,} repeats of each "
                         f"image per epoch, which {why}; {fix}")
    return n


def held_out(relative: Path, fraction: float) -> bool:
    """Whether a file (path relative to its dataset folder) is in the validation split: a hash of its path, with a
    kohya `<N>_` prefix dropped so a new repeat count moves nothing, below `fraction`. Adding other files moves
    nothing either."""
    if fraction <= 0:
        return False
    parts = list(relative.parts)
    match = REPEAT_FOLDER.fullmatch(parts[0]) if len(parts) > 1 else None
    if match is not None:
        parts[0] = match.group(2)
    digest = hashlib.sha256("/".join(parts).encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") < fraction * 2**64


def split_files(root: str | Path, fraction: float, key: str) -> tuple[list[Path], list[Path]]:
    """(training files, held-out files) of a dataset folder; errors name the recipe `key`."""
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"{key} {root} is not a folder; point it at a folder of images with same-name "
                                f".txt captions")
    files = list_images(root)
    held = {f for f in files if held_out(f.relative_to(root), fraction)}
    if len(held) == len(files):
        raise ValueError(f"data.validation_split {fraction} holds out all {len(files)} images of {key} {root}; "
                         f"lower it")
    return [f for f in files if f not in held], [f for f in files if f in held]


def check_validation_path(d: Any) -> None:
    """data.validation_path must not overlap a training folder (its images would be trained on)."""
    if not d.validation_path:
        return
    val = Path(d.validation_path).resolve()
    for i, e in enumerate(dataset_entries(d)):
        root = Path(e.path).resolve()
        if val == root or val.is_relative_to(root) or root.is_relative_to(val):
            raise ValueError(f"data.validation_path {d.validation_path} overlaps {entry_key(d, i)} {e.path}, so "
                             f"its images would be trained on; use a separate folder (or data.validation_split)")


# ---------------------------------------------------------------------------------------------------
# What an epoch reads
# ---------------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class EpochCounts:
    """How many times each of `files` files is read in an epoch, a pure function of (seed, epoch): each training
    file its `expected` reads (its folder's N × its dataset's repeats), then the regularisation files as many reads
    together as the training files got, each in proportion to its `reg_weights` (its folder's N)."""

    seed: int
    files: int
    expected: tuple[tuple[int, float], ...]          # (training file index, expected reads per epoch)
    reg_weights: tuple[tuple[int, int], ...] = ()    # (regularisation file index, weight)

    def __call__(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, ITEMS_STREAM))
        counts = [0] * self.files
        train = rounded([round(e * REPEATS_RESOLUTION) for _, e in self.expected], REPEATS_RESOLUTION, g)
        for (i, _), c in zip(self.expected, train):
            counts[i] = c
        if self.reg_weights:
            total, weight = sum(train), sum(w for _, w in self.reg_weights)
            for (i, _), c in zip(self.reg_weights, rounded([total * w for _, w in self.reg_weights], weight, g)):
                counts[i] = c
        return counts


def rounded(numerators: list[int], denominator: int, g: torch.Generator) -> list[int]:
    """Integers ⌊x⌋ or ⌈x⌉ of each x = numerator / denominator, each ⌈x⌉ with probability x − ⌊x⌋ and their sum
    within 1 of Σx (exactly Σx when that is whole): systematic sampling over a seeded permutation."""
    out = [n // denominator for n in numerators]
    offset, cumulative = int(torch.randint(denominator, (), generator=g)), 0
    for j in torch.randperm(len(numerators), generator=g).tolist():
        before, cumulative = cumulative, cumulative + numerators[j] % denominator
        out[j] += (cumulative + offset) // denominator - (before + offset) // denominator
    return out


# ---------------------------------------------------------------------------------------------------
# The datasets as one map-style dataset
# ---------------------------------------------------------------------------------------------------

class DatasetMix(torch.utils.data.Dataset):
    """Several FolderDatasets as one index space (each one's files after the previous one's). Samples carry their
    dataset's loss weight when any weight is not 1; an unreadable file is replaced within its own dataset.
    `counts` is what an epoch reads (None: every file once), `summary` lines describe the datasets."""

    def __init__(self, parts: list[FolderDataset], weights: list[float], counts: EpochCounts | None = None,
                 summary: tuple[str, ...] = ()) -> None:
        self.parts, self.weights, self.counts, self.summary = parts, weights, counts, summary
        self.offsets = list(itertools.accumulate((len(p) for p in parts), initial=0))
        self.spec = parts[0].spec
        self.weighted = any(w != 1.0 for w in weights)

    def __len__(self) -> int:
        return self.offsets[-1]

    @property
    def files(self) -> list[Path]:
        """Every dataset's files, in index order."""
        return [f for part in self.parts for f in part.files]

    def locate(self, index: int) -> tuple[int, int]:
        """(dataset, index within it) of a global file index."""
        part = bisect.bisect_right(self.offsets, index) - 1
        return part, index - self.offsets[part]

    def image_size(self, index: int) -> tuple[int, int] | None:
        part, i = self.locate(index)
        return self.parts[part].image_size(i)

    def __getitem__(self, key: SampleKey | tuple[int, ...]) -> Sample:
        key = SampleKey(*key)
        part, i = self.locate(key.index)
        sample = self.parts[part][key._replace(index=i)]
        if self.weighted:
            sample.loss_weight = torch.tensor(self.weights[part], dtype=torch.float32)
        return sample


def open_datasets(d: Any, spec: SampleSpec, seed: int, load_sample: LoadSample = load_image) -> DatasetMix:
    """The training side of a DataSection (data.path or [[data.datasets]]): held-out files removed, folder and
    dataset repeats, the regularisation set. Dataset 0 keeps the plain folder's seed, so a single folder without
    repeats reads exactly what FolderDataset + FolderSource read."""
    check_validation_path(d)
    parts, expected, reg, summary, offset = [], [], [], [], 0
    for k, entry in enumerate(dataset_entries(d)):
        key = entry_key(d, k)
        fraction = 0.0 if entry.regularization else d.validation_split
        train, held = split_files(entry.path, fraction, key)
        by_count = _by_folder_repeats(train, Path(entry.path), offset, d.folder_repeats)
        if entry.regularization:
            reg += [(i, n) for n, indices in by_count.items() for i in indices]
        else:
            expected += [(i, n * entry.repeats) for n, indices in by_count.items() for i in indices]
        parts.append(FolderDataset(entry.path, spec, mix_seed(seed, k) if k else seed, load_sample, train))
        summary.append(_describe(key, entry, train, held, by_count))
        offset += len(train)
    plain = all(e == 1.0 for _, e in expected) and not reg
    counts = None if plain else EpochCounts(seed, offset, tuple(sorted(expected)), tuple(sorted(reg)))
    notable = d.datasets or d.validation_split or any(len(line.splitlines()) > 1 for line in summary)
    return DatasetMix(parts, [e.loss_weight for e in dataset_entries(d)], counts, tuple(summary) if notable else ())


def _by_folder_repeats(files: list[Path], root: Path, offset: int, enabled: bool) -> dict[int, list[int]]:
    """{N: global indices of the files read N times per epoch by their folder} (all N = 1 when not enabled)."""
    out: dict[int, list[int]] = {}
    for j, f in enumerate(files):
        out.setdefault(folder_repeats(f.relative_to(root), root) if enabled else 1, []).append(offset + j)
    return out


def _describe(key: str, entry: DatasetEntry, train: list[Path], held: list[Path], by_count: dict) -> str:
    """'data.path /x: 40 images (+5 held out for validation), repeats 1.0, loss weight 1.0' and its N_ folders."""
    kind = "regularization set" if entry.regularization else f"repeats {entry.repeats:g}"
    line = (f"{key} {entry.path}: {len(train)} images" + (f" (+{len(held)} held out for validation)" if held else "")
            + f", {kind}, loss weight {entry.loss_weight:g}")
    return "\n".join([line, *(f"  {len(idx)} images in <{n}>_* folders: x{n}" for n, idx in sorted(by_count.items())
                               if n != 1)])


# ---------------------------------------------------------------------------------------------------
# Captions: one start-up line for what would otherwise pass without a word
# ---------------------------------------------------------------------------------------------------

CAPTION_CHECKS = 20_000  # the start-up caption report reads at most this many captions (an even sample)


def caption_report(images: list[Path], max_length: int) -> str:
    """'captions of 40 images: 3 have none (…); 1 are not text (…); …': the images without a caption (no .txt or an
    empty one), the captions that are not text (a NUL byte, or not UTF-8) and those longer than model.max_length
    tokens before the caption rules (cut to it in training); "" when every caption is fine. Above CAPTION_CHECKS
    images an evenly spaced sample is read, so a start on millions of files is not held up."""
    from hdm_core.text_encoder import load_tokenizer

    sample = images[::math.ceil(len(images) / CAPTION_CHECKS)] if len(images) > CAPTION_CHECKS else images
    missing, binary, texts = 0, 0, []
    for image in sample:
        txt = image.with_suffix(".txt")
        raw = txt.read_bytes() if txt.is_file() else b""
        if not raw.strip():
            missing += 1
            continue
        try:
            texts.append(raw.decode("utf-8"))
            binary += "\0" in texts[-1]
        except UnicodeDecodeError:
            binary += 1
    tokenizer = load_tokenizer()
    long = sum(len(ids) > max_length for k in range(0, len(texts), 1024)
               for ids in tokenizer(texts[k:k + 1024], add_special_tokens=False)["input_ids"])
    notes = [f"{missing} have none (trained with an empty caption, as unconditional samples)" if missing else "",
             f"{binary} are not text (a NUL byte or not UTF-8; read with replacement characters)" if binary else "",
             f"{long} are longer than model.max_length = {max_length} tokens and are cut to it" if long else ""]
    notes = [n for n in notes if n]
    scope = f"{len(images)} images" if sample is images else f"{len(sample)} of {len(images)} images (an even sample)"
    return f"captions of {scope}: " + "; ".join(notes) if notes else ""
