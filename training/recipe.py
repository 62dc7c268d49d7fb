"""Training recipes: one TOML file per stage, parsed into a `Recipe` dataclass. Unknown keys are an error.

A recipe has a top-level `name`, an optional `notes` string, and six tables: [model], [data] (with its
[data.captions] sub-table), [finetune] (training/finetune.py), [optim], [train], [run]. Overrides use dotted
keys (`optim.lr=0.1`, `data.path="/data/set"`, `data.captions.tag_dropout=0.1`); values are parsed as TOML,
and anything that is not valid TOML is taken as a string. Every number must be finite (TOML's `nan` and `inf`
are refused by key); each section checks its own ranges when it is built (`__post_init__`). `resume_conflicts`
is the rule for which keys a resumed run may change.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hdm_core.weights import DTYPES

from .captions import CaptionRules
from .finetune import FinetuneSection

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10
    import tomli as tomllib

PRECISIONS = tuple(DTYPES)  # ("fp32", "bf16", "fp16")
# The official trainer's caption augmentation: the [data.captions] defaults of a recipe.
HDM_CAPTIONS = CaptionRules(tag_dropout=0.25, group_dropout=0.3, shuffle=True)


@dataclass
class ModelSection:
    preset: str = "xut-base"             # a name in hdm_core.config.PRESETS
    config: dict = field(default_factory=dict)  # XUTConfig fields that override the preset
    init_from: str = ""                  # "" = from scratch; else the base: a .safetensors export or a training .pt
    text_encoder: str = ""               # checkpoint / Qwen3 safetensors path, or "random:<spec>"; "" = init_from's
    vae: str = ""                        # checkpoint / VAE safetensors path, or "pixel"; "" = init_from's
    max_length: int = 256                # text tokens per caption (right-padded, as the official trainer)
    tread_rate: float = 0.5              # fraction of image tokens routed around the backbone; 0 = off
    gradient_checkpointing: bool = True
    compile: bool = False
    encoder_dtype: str = "fp16"          # dtype of the frozen text encoder and VAE on GPU (fp32 on CPU)

    def __post_init__(self) -> None:
        if not 0.0 <= self.tread_rate < 1.0:
            raise ValueError(f"model.tread_rate {self.tread_rate} must be in [0, 1); 0 disables TREAD")
        if self.max_length < 1:
            raise ValueError(f"model.max_length {self.max_length} must be >= 1 (the official value is 256)")
        if self.encoder_dtype not in PRECISIONS:
            raise ValueError(f"model.encoder_dtype {self.encoder_dtype!r} must be one of {PRECISIONS}")


@dataclass
class DataSection:
    path: str = ""                       # image folder, or tar shards ("shards/*.tar", "s/{000..099}.tar")
    resolution: int = 256                # short side after resize = side of the square crop
    bucketing: bool = False              # aspect-ratio buckets of ~resolution² area instead of square crops
    bucket_step: int = 64                # bucket side granularity in pixels
    bucket_max_ratio: float = 2.0        # longest/shortest side allowed for a bucket
    captions: CaptionRules = HDM_CAPTIONS  # [data.captions]: separators, tag/group dropout, shuffle, dropout
    workers: int = 8
    shuffle_buffer: int = 1000           # tar streams: samples held for shuffling within a rank
    num_samples: int = 0                 # tar streams: dataset size (0 = count the shards at start-up)
    cache: str = ""                      # folder written by `python -m training.cache` (latents, text)
    # Fine-tuning datasets (training/datasets.py, docs/training.md):
    datasets: list = field(default_factory=list)  # [[data.datasets]]: path, repeats, loss_weight, regularization
    folder_repeats: bool = True          # a subfolder `<N>_<name>` repeats its images N times per epoch (kohya)
    validation_split: float = 0.0        # fraction of each dataset's files held out by path hash; 0 = off
    validation_path: str = ""            # a folder of validation images (never trained on)

    def __post_init__(self) -> None:
        if self.resolution < 2 or self.resolution % 2:
            raise ValueError(f"data.resolution {self.resolution} must be an even number of pixels (a multiple "
                             f"of 16 with a VAE)")
        if self.bucket_step < 1 or not self.bucket_max_ratio >= 1.0:
            raise ValueError(f"data.bucket_step {self.bucket_step} must be >= 1 and data.bucket_max_ratio "
                             f"{self.bucket_max_ratio} >= 1")
        if self.workers < 0 or self.shuffle_buffer < 1 or self.num_samples < 0:
            raise ValueError(f"data.workers {self.workers} and data.num_samples {self.num_samples} must be >= 0, "
                             f"data.shuffle_buffer {self.shuffle_buffer} >= 1")
        self._check_datasets()

    def _check_datasets(self) -> None:
        from .datasets import parse_datasets  # imported here: a new module, kept out of this file's imports

        self.datasets = parse_datasets(self.datasets)
        if self.datasets and self.path:
            raise ValueError(f"set either data.path ({self.path!r}) or [[data.datasets]], not both; a single "
                             f"folder can be one [[data.datasets]] entry")
        if self.datasets and self.cache:
            raise ValueError("data.cache (cached latents) supports a single data.path; remove it to read the "
                             "[[data.datasets]] images")
        shards = [f"data.datasets[{i}].path {e.path!r}" for i, e in enumerate(self.datasets)
                  if data_kind(e.path) != "folder"]
        if shards:
            raise ValueError(f"{shards[0]} is tar shards; tar shards are one dataset: set data.path to them and "
                             f"remove [[data.datasets]]")
        if not 0.0 <= self.validation_split <= 0.5:
            raise ValueError(f"data.validation_split {self.validation_split} must be in [0, 0.5] (0 = off), "
                             f"e.g. 0.05")
        if self.validation_split and self.kind == "tar shards":
            raise ValueError("data.validation_split needs image folders; with tar shards set data.validation_path "
                             "to a folder of held-out images")

    @property
    def kind(self) -> str:
        return data_kind(self.path)


def data_kind(path: str) -> str:
    """'tar shards' for a .tar, a glob, a brace pattern or a comma list; 'folder' otherwise."""
    return "tar shards" if path.endswith(".tar") or any(c in path for c in "*{,") else "folder"


@dataclass
class OptimSection:
    lr: float = 0.5                      # muP with base_dim: the LR of a tensor is lr * base_dim / fan_in
    base_dim: int = 1
    betas: list = field(default_factory=lambda: [0.9, 0.98])
    eps: float = 1e-8
    weight_decay: float = 0.02
    warmup_steps: int = 1000
    min_lr_ratio: float = 0.01           # cosine ends at this fraction of the peak
    grad_clip: float = 3.0               # global L2 norm; 0 = off

    def __post_init__(self) -> None:
        if len(self.betas) != 2 or not all(0.0 <= b < 1.0 for b in self.betas):
            raise ValueError(f"optim.betas {self.betas} must be two numbers in [0, 1), e.g. [0.9, 0.995]")
        # Written as `not x > 0` rather than `x <= 0`, so NaN fails too (every comparison with NaN is false).
        if not self.lr > 0 or self.base_dim < 1 or self.warmup_steps < 0 or not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim: lr {self.lr} must be > 0, base_dim {self.base_dim} >= 1, warmup_steps "
                             f"{self.warmup_steps} >= 0 and min_lr_ratio {self.min_lr_ratio} in [0, 1]")
        if not self.eps > 0 or not self.weight_decay >= 0 or not self.grad_clip >= 0:
            raise ValueError(f"optim: eps {self.eps} must be > 0, weight_decay {self.weight_decay} and grad_clip "
                             f"{self.grad_clip} >= 0 (grad_clip 0 = off)")


@dataclass
class TrainSection:
    epochs: float = 1.0
    max_steps: int = 0                   # > 0 overrides epochs
    batch_size: int = 128                # per GPU (per process)
    grad_accum: int = 1
    reference_world_size: int = 4        # GPUs the recipe was tuned for; a different global batch warns
    precision: str = "bf16"              # fp32, bf16 (autocast) or fp16 (autocast + GradScaler)
    ema_decay: float = 0.0               # 0 = no EMA
    seed: int = 20090220

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision {self.precision!r} must be one of {PRECISIONS}")
        if self.batch_size < 1 or self.grad_accum < 1:
            raise ValueError(f"train.batch_size {self.batch_size} and train.grad_accum {self.grad_accum} must "
                             f"be >= 1")
        if self.max_steps < 0 or not self.epochs >= 0 or (self.max_steps == 0 and self.epochs == 0):
            raise ValueError(f"set train.epochs > 0 or train.max_steps > 0 (got epochs {self.epochs}, max_steps "
                             f"{self.max_steps})")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"train.ema_decay {self.ema_decay} must be in [0, 1); 0 disables EMA (DiT uses "
                             f"0.9999)")


@dataclass
class RunSection:
    out_dir: str = "runs"                # the run folder is out_dir/name
    log_every: int = 10
    save_every: int = 500                # optimizer steps between checkpoints
    keep_last: int = 3
    sample_every: int = 0                # optimizer steps between sample grids; 0 = off
    val_every: int = 100                 # optimizer steps between validation losses (with validation data)
    sample_prompts: list = field(default_factory=list)
    sample_steps: int = 32
    sample_cfg: float = 2.5
    sample_seed: int = 0
    tensorboard: bool = True
    export_dtype: str = "fp16"           # dtype of the released-layout export written at the end

    def __post_init__(self) -> None:
        if self.export_dtype not in PRECISIONS:
            raise ValueError(f"run.export_dtype {self.export_dtype!r} must be one of {PRECISIONS}")
        if self.keep_last < 1 or self.save_every < 1 or self.log_every < 1 or self.val_every < 1:
            raise ValueError("run.keep_last, run.save_every, run.log_every and run.val_every must be >= 1")
        if self.sample_every < 0 or self.sample_steps < 1:
            raise ValueError(f"run.sample_every {self.sample_every} must be >= 0 (0 = off) and run.sample_steps "
                             f"{self.sample_steps} >= 1")


@dataclass
class Recipe:
    name: str = "run"
    notes: str = ""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataSection = field(default_factory=DataSection)
    finetune: FinetuneSection = field(default_factory=FinetuneSection)
    optim: OptimSection = field(default_factory=OptimSection)
    train: TrainSection = field(default_factory=TrainSection)
    run: RunSection = field(default_factory=RunSection)

    @property
    def run_dir(self) -> Path:
        return Path(self.run.out_dir) / self.name

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


_SECTION_CLASSES = {"model": ModelSection, "data": DataSection, "finetune": FinetuneSection, "optim": OptimSection,
                    "train": TrainSection, "run": RunSection}


def _sub_tables(section: Any) -> dict[str, set[str]]:
    """The keys of each dataclass-valued field of a section (its sub-tables, e.g. data.captions)."""
    return {f.name: {g.name for g in dataclasses.fields(getattr(section, f.name))}
            for f in dataclasses.fields(section) if dataclasses.is_dataclass(getattr(section, f.name))}


@dataclass(frozen=True)
class Origin:
    """Where a recipe's values come from: the file, except the dotted keys set on the command line (an override of
    a table, e.g. `data.captions={…}`, covers every key in it)."""

    file: str = "recipe"
    overridden: frozenset[str] = frozenset()

    def of(self, key: str) -> str:
        parts = key.split(".")
        if any(".".join(parts[:i]) in self.overridden for i in range(1, len(parts) + 1)):
            return "the command-line overrides"
        return self.file

    def of_all(self, keys: Iterable[str]) -> str:
        return " and ".join(sorted({self.of(k) for k in keys}))


def _build(defaults: Any, values: dict, table: str, origin: Origin) -> Any:
    """`defaults` with `values` replaced, each checked against the type of its default; a dataclass default
    is a sub-table (e.g. [data.captions]) built the same way. The section's own range checks then run."""
    fields = sorted(f.name for f in dataclasses.fields(defaults))
    unknown = sorted(set(values) - set(fields))
    if unknown:
        hint = "".join(f"; {sorted(set(unknown) & keys)} belong in [{table}.{name}]"
                       for name, keys in _sub_tables(defaults).items() if set(unknown) & keys)
        raise ValueError(f"unknown key(s) {unknown} in [{table}] of {origin.of_all(f'{table}.{k}' for k in unknown)}; "
                         f"allowed keys are {fields}{hint}")
    out = {}
    for key, value in values.items():
        default, where = getattr(defaults, key), origin.of(f"{table}.{key}")
        if dataclasses.is_dataclass(default):
            if not isinstance(value, dict):
                raise ValueError(f"[{table}.{key}] in {where} must be a table, got {value!r}")
            value = _build(default, value, f"{table}.{key}", origin)
        elif isinstance(default, bool) and not isinstance(value, bool):
            raise ValueError(f"{table}.{key} in {where} must be true or false, got {value!r}")
        elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        elif type(default) in (int, float, str, list, dict) and not isinstance(value, type(default)):
            raise ValueError(f"{table}.{key} in {where} must be of type {type(default).__name__}, got {value!r}")
        _check_finite(value, f"{table}.{key}", where)
        out[key] = value
    return dataclasses.replace(defaults, **out)


def _check_finite(value: Any, key: str, where: str) -> None:
    """TOML has `nan` and `inf`; no recipe number may be either (a range check like `x <= 0` lets NaN through)."""
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{key} in {where} is {value}; it must be a finite number")
    for i, item in enumerate(value) if isinstance(value, list) else ():
        _check_finite(item, f"{key}[{i}]", where)
    for name, item in value.items() if isinstance(value, dict) else ():
        _check_finite(item, f"{key}.{name}", where)


def recipe_from_dict(d: dict, where: str | Origin = "recipe") -> Recipe:
    """Build and validate a Recipe from a nested dict (as tomllib returns it); errors name where each value came
    from (`where`: the file's name, or an `Origin` that also knows the command-line keys)."""
    origin = where if isinstance(where, Origin) else Origin(where)
    d = dict(d)
    top = {k: d.pop(k) for k in ("name", "notes") if k in d}
    unknown = sorted(k for k in d if k not in _SECTION_CLASSES)
    if unknown:
        raise ValueError(f"unknown key(s) {unknown} in {origin.of_all(unknown)}; allowed are name, notes and the "
                         f"tables {sorted(_SECTION_CLASSES)}")
    sections = {}
    for name, cls in _SECTION_CLASSES.items():
        value = d.get(name, {})
        if not isinstance(value, dict):
            raise ValueError(f"[{name}] in {origin.of(name)} must be a table, got {value!r}")
        sections[name] = _build(cls(), value, name, origin)
    return Recipe(**top, **sections)


def parse_value(raw: str) -> Any:
    """A TOML value ('0.1', '[0.9, 0.99]', '"x"', 'true'), or the text itself when it is not valid TOML."""
    try:
        return tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError:
        return raw


def parse_override(text: str) -> tuple[list[str], Any]:
    """'optim.lr=0.1' -> (['optim', 'lr'], 0.1)."""
    if "=" not in text:
        raise ValueError(f"override {text!r} must look like section.key=value, e.g. optim.lr=0.1")
    key, raw = text.split("=", 1)
    return key.strip().split("."), parse_value(raw)


def apply_overrides(d: dict, overrides: Iterable[str]) -> dict:
    """Apply dotted-key overrides to a nested recipe dict (a copy)."""
    d = copy.deepcopy(d)
    for text in overrides:
        path, value = parse_override(text)
        node = d
        for part in path[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ValueError(f"override {text!r}: {part!r} is not a table")
        node[path[-1]] = value
    return d


def load_recipe(path: str | Path, overrides: Iterable[str] = ()) -> Recipe:
    """Read a recipe TOML, apply overrides, build (and so validate) the Recipe."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"recipe {path} not found; the shipped ones are in training/recipes/")
    with path.open("rb") as f:
        try:
            d = tomllib.load(f)
        except tomllib.TOMLDecodeError as err:  # its message has the line and column, not the file
            raise ValueError(f"recipe {path} is not valid TOML: {err}") from err
    overrides = list(overrides)
    keys = frozenset(".".join(parse_override(text)[0]) for text in overrides)
    return recipe_from_dict(apply_overrides(d, overrides), where=Origin(str(path), keys))


# ---------------------------------------------------------------------------------------------------
# Resuming: which keys a resumed run may change
# ---------------------------------------------------------------------------------------------------

# Keys (or "section." prefixes) a resumed run may change: where things are and how the run is watched, saved and
# stopped, and settings that change speed or memory but not what is trained. Every other key (model shape and
# encoders, data kind, resolution, buckets and captions, optimizer, batch size, accumulation, seed, EMA) must
# equal the checkpoint's: the optimizer state, schedule and data position in the checkpoint belong to them, and
# some (optim.*) would even be silently replaced by the checkpoint's values. data.path may move, but not between
# a folder and tar shards; data.workers with tar shards must give the same number of streams (the stream says so).
RESUME_MAY_CHANGE = ("name", "notes", "run.", "data.path", "data.cache", "data.workers", "data.num_samples",
                     "data.validation_path",
                     "train.epochs", "train.max_steps", "train.precision", "train.reference_world_size",
                     "model.compile", "model.gradient_checkpointing", "model.encoder_dtype")


def _flatten(d: dict, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in d.items():
        if isinstance(value, dict):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def resume_conflicts(old: dict, new: dict) -> list[str]:
    """'key: old → new' for each key that differs between a checkpoint's recipe and this run's and may not change
    on resume (see RESUME_MAY_CHANGE); keys a checkpoint predates count as their default."""
    defaults = _flatten(Recipe().to_dict())
    old_flat, new_flat = defaults | _flatten(old), defaults | _flatten(new)

    def show(flat: dict, key: str) -> str:
        return repr(flat[key]) if key in flat else "(not set)"

    out = [f"{key}: {show(old_flat, key)} → {show(new_flat, key)}" for key in sorted(old_flat.keys() | new_flat.keys())
           if not key.startswith(RESUME_MAY_CHANGE) and old_flat.get(key) != new_flat.get(key)]
    old_kind, new_kind = data_kind(old_flat["data.path"]), data_kind(new_flat["data.path"])
    if old_kind != new_kind:
        out.insert(0, f"data.path: {old_kind} {old_flat['data.path']!r} → {new_kind} {new_flat['data.path']!r}")
    return out


def check_resumable(old: dict, new: dict, checkpoint: str | Path) -> None:
    """Raise ValueError listing every key that differs from the checkpoint's recipe and may not change."""
    conflicts = resume_conflicts(old, new)
    if conflicts:
        lines = "\n  ".join(conflicts)
        allowed = ", ".join(k + "*" if k.endswith(".") else k for k in RESUME_MAY_CHANGE)
        raise ValueError(
            f"cannot resume {checkpoint}: this run's recipe differs from the checkpoint's in\n  {lines}\n"
            f"Set these back to the checkpoint's values (left of the arrow), or start a new run with another "
            f"name or run.out_dir (model.init_from={checkpoint} starts it from these weights with a fresh "
            f"optimizer). A resume may change only {allowed}; data.path may move but not between a folder and "
            f"tar shards.")
