"""Fine-tuners' datasets: kohya-style folder repeats, several weighted image folders in one recipe, a
regularisation (prior-preservation) set, and the deterministic validation split (docs/training.md,
"Fine-tuning datasets").

* A subfolder `<N>_<name>` directly under a dataset folder (kohya: `10_mychar/`) repeats each of its images N
  times per epoch; `data.folder_repeats = false` ignores such names (e.g. for folders called `2024_photos`).
* `[[data.datasets]]` entries (`DatasetEntry`) each add a folder read `repeats` times per epoch; a fractional part
  is drawn per (seed, epoch) by stochastic rounding. Folder and dataset repeats multiply.
* A `regularization = true` entry gives as many samples per epoch as the other datasets together, drawn from its
  images (seeded permutations one after another, so a small set cycles); its `loss_weight` is kohya's
  prior_loss_weight.
* `data.validation_split` holds out the files whose path hash falls below it (`held_out`), never trained on.

What an epoch reads is `EpochItems(epoch)`: (file index, copy) pairs, a pure function of (seed, epoch), so a resumed
run reads exactly what an uninterrupted one would; every copy has its own crop and caption randomness.
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

from .data import FolderDataset, LoadSample, Sample, SampleSpec, list_images, load_image
from .runtime import mix_seed

REPEAT_FOLDER = re.compile(r"(\d+)_(.+)")  # kohya: `<N>_<name>` directly under a dataset folder
ITEMS_STREAM = 1  # mix_seed(seed, epoch, ITEMS_STREAM) draws an epoch's items; mix_seed(seed, epoch) its order


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
    for key in ("repeats", "loss_weight"):
        x = value.get(key, 1.0)
        if isinstance(x, bool) or not isinstance(x, (int, float)) or not (math.isfinite(x) and x >= 0):
            raise ValueError(f"{where}.{key} {x!r} must be a finite number >= 0 (default 1.0)")
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
    """N for an image under a folder `<N>_<name>` directly below its dataset folder, else 1."""
    match = REPEAT_FOLDER.fullmatch(relative.parts[0]) if len(relative.parts) > 1 else None
    if match is None:
        return 1
    if int(match.group(1)) < 1:
        raise ValueError(f"folder {root / relative.parts[0]}: a kohya repeat count must be >= 1; rename it, or "
                         f"set data.folder_repeats = false to read folder names as plain names")
    return int(match.group(1))


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
class EpochItems:
    """An epoch's (file index, copy) pairs, a pure function of (seed, epoch): each group of training files read
    `repeats` times, then the regularisation pool (a file once per folder repeat) filling as many places."""

    seed: int
    groups: tuple[tuple[tuple[int, ...], float], ...]   # (file indices, repeats per epoch)
    reg_pool: tuple[int, ...] = ()

    def __call__(self, epoch: int) -> list[tuple[int, int]]:
        g = torch.Generator().manual_seed(mix_seed(self.seed, epoch, ITEMS_STREAM))
        files = [i for indices, repeats in self.groups for i in repeat(indices, repeats, g)]
        files += cycle(self.reg_pool, len(files), g)
        copies: dict[int, int] = {}
        out = []
        for i in files:
            out.append((i, copies.get(i, 0)))
            copies[i] = copies.get(i, 0) + 1
        return out


def repeat(files: tuple[int, ...], repeats: float, g: torch.Generator) -> list[int]:
    """Each file ⌊repeats⌋ times, plus ⌊frac·n + u⌋ of them (u uniform) chosen at random for the fractional part,
    so each file is read `repeats` times per epoch on average."""
    whole = math.floor(repeats)
    out = list(files) * whole
    if repeats > whole:
        extra = math.floor((repeats - whole) * len(files) + torch.rand((), generator=g).item())
        out += [files[j] for j in torch.randperm(len(files), generator=g)[:extra].tolist()]
    return out


def cycle(pool: tuple[int, ...], n: int, g: torch.Generator) -> list[int]:
    """n files from the pool: seeded permutations of it, one after another."""
    out: list[int] = []
    while pool and len(out) < n:
        out += [pool[j] for j in torch.randperm(len(pool), generator=g).tolist()]
    return out[:n]


# ---------------------------------------------------------------------------------------------------
# The datasets as one map-style dataset
# ---------------------------------------------------------------------------------------------------

class DatasetMix(torch.utils.data.Dataset):
    """Several FolderDatasets as one index space (each one's files after the previous one's). Samples carry their
    dataset's loss weight when any weight is not 1; an unreadable file is replaced within its own dataset.
    `items` is what an epoch reads (None: every file once), `summary` lines describe the datasets."""

    def __init__(self, parts: list[FolderDataset], weights: list[float], items: EpochItems | None = None,
                 summary: tuple[str, ...] = ()) -> None:
        self.parts, self.weights, self.items, self.summary = parts, weights, items, summary
        self.offsets = list(itertools.accumulate((len(p) for p in parts), initial=0))
        self.spec = parts[0].spec
        self.weighted = any(w != 1.0 for w in weights)

    def __len__(self) -> int:
        return self.offsets[-1]

    def locate(self, index: int) -> tuple[int, int]:
        """(dataset, index within it) of a global file index."""
        part = bisect.bisect_right(self.offsets, index) - 1
        return part, index - self.offsets[part]

    def image_size(self, index: int) -> tuple[int, int] | None:
        part, i = self.locate(index)
        return self.parts[part].image_size(i)

    def __getitem__(self, key: tuple[int, ...]) -> Sample:
        part, i = self.locate(key[0])
        sample = self.parts[part][(i, *key[1:])]
        if self.weighted:
            sample.loss_weight = torch.tensor(self.weights[part], dtype=torch.float32)
        return sample


def open_datasets(d: Any, spec: SampleSpec, seed: int, load_sample: LoadSample = load_image) -> DatasetMix:
    """The training side of a DataSection (data.path or [[data.datasets]]): held-out files removed, folder and
    dataset repeats, the regularisation pool. Dataset 0 keeps the plain folder's seed, so a single folder without
    repeats reads exactly what FolderDataset + FolderSource read."""
    check_validation_path(d)
    parts, groups, pool, summary, offset = [], [], [], [], 0
    for k, entry in enumerate(dataset_entries(d)):
        key = entry_key(d, k)
        fraction = 0.0 if entry.regularization else d.validation_split
        train, held = split_files(entry.path, fraction, key)
        by_count = _by_folder_repeats(train, Path(entry.path), offset, d.folder_repeats)
        if entry.regularization:
            pool += [i for n, indices in by_count.items() for i in indices for _ in range(n)]
        else:
            groups += [(tuple(indices), n * entry.repeats) for n, indices in sorted(by_count.items())]
        parts.append(FolderDataset(entry.path, spec, mix_seed(seed, k) if k else seed, load_sample, train))
        summary.append(_describe(key, entry, train, held, by_count))
        offset += len(train)
    plain = all(r == 1.0 for _, r in groups) and not pool
    items = None if plain else EpochItems(seed, tuple(groups), tuple(pool))
    notable = d.datasets or d.validation_split or any(len(line.splitlines()) > 1 for line in summary)
    return DatasetMix(parts, [e.loss_weight for e in dataset_entries(d)], items, tuple(summary) if notable else ())


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
