"""Validation loss on fixed, held-out batches: data.validation_split (files held out of each training folder by a
hash of their path, training/datasets.py) and/or data.validation_path (a separate folder).

The batches are square centre crops at data.resolution with captions taken as they are (separators applied, no
dropout or shuffle), and the loss draws its noise and t from a generator seeded by the batch index alone, so the
value changes between two evaluations only when the weights do: a curve comparable across steps.
"""

from __future__ import annotations

import dataclasses
import logging
import random
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from .captions import CaptionRules
from .data import Batch, Sample, SampleSpec, collate, list_images, make_sample, open_image, read_caption
from .datasets import dataset_entries, entry_key, split_files
from .loss import training_loss
from .recipe import ModelSection, Recipe
from .runtime import mix_seed

if TYPE_CHECKING:
    from hdm_core.text_encoder import TextEncoder

    from .encoders import Vae

log = logging.getLogger("training.validation")


class CentreCrop(random.Random):
    """A stand-in generator whose randint is the midpoint, so `make_sample` takes the centre crop."""

    def randint(self, a: int, b: int) -> int:
        return (a + b) // 2


def validation_files(recipe: Recipe) -> list[Path]:
    """Held-out files of every non-regularisation dataset, then the images of data.validation_path."""
    d = recipe.data
    files: list[Path] = []
    if d.validation_split:
        for i, entry in enumerate(dataset_entries(d)):
            if not entry.regularization:
                files += split_files(entry.path, d.validation_split, entry_key(d, i))[1]
    if d.validation_path:
        if not Path(d.validation_path).is_dir():
            raise FileNotFoundError(f"data.validation_path {d.validation_path} is not a folder of images")
        files += list_images(d.validation_path)
    return files


def validation_sample(path: Path, spec: SampleSpec) -> Sample | None:
    """The centre square crop of an image at spec.resolution with its plain caption; None when unreadable."""
    try:
        img = open_image(path)
    except Exception as err:  # noqa: BLE001 - an unreadable validation file is left out, whatever the decoder raises
        log.warning("leaving unreadable validation image %s out (%s: %s)", path, type(err).__name__, err)
        return None
    return make_sample(img, read_caption(path), (spec.resolution, spec.resolution), spec, CentreCrop(0))


def open_validation(recipe: Recipe, factor: int, rank: int, world: int) -> list[Batch] | None:
    """This rank's share of the fixed validation batches (train.batch_size each, the last one may be smaller),
    each with `position = (index,)` among all ranks' batches; None when validation is off (no data.validation_split
    and no data.validation_path)."""
    d = recipe.data
    if not d.validation_split and not d.validation_path:
        return None
    files = validation_files(recipe)
    if not files:
        raise ValueError(f"data.validation_split {d.validation_split} holds out none of the images; raise it or set "
                         f"data.validation_path to a folder of validation images")
    c = d.captions
    spec = SampleSpec(d.resolution, factor, CaptionRules(c.keep_separator, c.group_separator, c.tag_separator))
    n = recipe.train.batch_size
    batches = [files[k:k + n] for k in range(0, len(files), n)]
    out = []
    for index in range(rank, len(batches), world):
        samples = [s for s in (validation_sample(f, spec) for f in batches[index]) if s is not None]
        if samples:
            out.append(dataclasses.replace(collate(samples), position=(index,)))
    return out


@torch.no_grad()
def validation_loss(forward: torch.nn.Module, batches: list[Batch], text_encoder: TextEncoder, vae: Vae,
                    model_section: ModelSection, autocast: Any, patch_size: int, seed: int, device: torch.device,
                    world: int) -> float:
    """Mean flow-matching loss per sample over every rank's validation batches (one all_reduce when world > 1).

    Deterministic: batch i's posterior sample, noise and t come from a generator seeded with (seed, i), whatever the
    training step; no TREAD, the model in eval mode (its mode is restored after). Pass the bare model or the EMA:
    a DDP wrapper is unwrapped, since its forward syncs buffers and ranks may hold different numbers of batches.
    """
    model = forward.module if isinstance(forward, DistributedDataParallel) else forward
    plain = dataclasses.replace(model_section, tread_rate=0.0)
    loss_sum, count = torch.zeros((), dtype=torch.float64, device=device), 0
    was_training = model.training
    model.eval()
    try:
        for batch in batches:
            gen = torch.Generator(device).manual_seed(mix_seed(seed, batch.position[0]))
            loss = training_loss(model, batch.to(device), text_encoder, vae, plain, gen, autocast, patch_size)
            loss_sum += loss.double() * len(batch.captions)
            count += len(batch.captions)
    finally:
        model.train(was_training)
    total = torch.stack([loss_sum, loss_sum.new_tensor(count)])                       # (loss sum, samples)
    if world > 1:
        dist.all_reduce(total)
    if total[1] == 0:
        raise ValueError("no validation image could be read; check data.validation_path / data.validation_split")
    return (total[0] / total[1]).item()
