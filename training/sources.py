"""The trainer's data source: image folders (data.path, or several [[data.datasets]] with repeats, a
regularisation set and a validation split: training/datasets.py) or tar shards (training/shards.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from .cache import CachedSamples
from .data import BatchPlan, FolderSource, SampleSpec, load_image, make_buckets
from .datasets import caption_report, open_datasets
from .recipe import Recipe
from .shards import open_shards


def build_data(recipe: Recipe, factor: int, rank: int, world: int, state: dict | None) -> tuple[Any, int]:
    """The rank's endless batch iterator (folders or tar shards) and its micro-batches per epoch (epoch 0's when
    fractional repeats vary it); `state` is the rank's data position in a checkpoint, None to start."""
    d = recipe.data
    if not d.path and not d.datasets:
        raise ValueError("data.path is empty; pass data.path=/path/to/images (a folder with .txt captions) or "
                         "data.path='/path/to/shards/*.tar', or list folders as [[data.datasets]] tables")
    spec = SampleSpec(d.resolution, factor, d.captions)
    buckets = make_buckets(d.resolution, d.bucket_step, d.bucket_max_ratio) if d.bucketing else None
    plan = BatchPlan(recipe.train.seed, recipe.train.batch_size, rank, world, buckets)
    if d.kind == "tar shards":
        return open_shards(d, spec, plan, state)
    load_sample = CachedSamples(Path(d.cache), Path(d.path)) if d.cache else load_image
    mix = open_datasets(d, spec, recipe.train.seed, load_sample)
    if rank == 0:
        lines = [*mix.summary, "" if d.cache else caption_report(mix.files, recipe.model.max_length)]
        if any(lines):
            print("\n".join(line for line in lines if line))
    source = FolderSource(mix, plan, d.workers, state, mix.counts)
    return source, source.batches_per_epoch
