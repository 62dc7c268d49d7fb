"""Fine-tuning datasets: kohya folder repeats, weighted [[data.datasets]], a regularisation set, loss weights, the
validation split and validation loss, resume, and the plain single folder read exactly as before."""

from __future__ import annotations

import collections
import contextlib
import copy
import dataclasses
import itertools
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from hdm_core import PRESETS, XUT
from hdm_core.config import XUTConfig
from training.data import Batch, BatchPlan, FolderDataset, FolderSource, SampleSpec, make_buckets
from training.datasets import held_out, open_datasets
from training.encoders import build_text_encoder, build_vae
from training.loss import training_loss, weighted_mse
from training.recipe import recipe_from_dict, tomllib
from training.sources import build_data
from training.toy_data import make_dataset, make_toy_folder
from training.validation import open_validation, validation_loss

TINY = Path(__file__).resolve().parents[1] / "training" / "recipes" / "tiny_cpu.toml"


def _recipe(batch_size: int = 2, **data):
    with TINY.open("rb") as f:
        d = tomllib.load(f)
    d["data"].update(data)
    d["train"].update(batch_size=batch_size, seed=3)
    return recipe_from_dict(d)


def _spec(recipe) -> SampleSpec:
    return SampleSpec(recipe.data.resolution, 1, recipe.data.captions)


def _counts(mix, epoch: int) -> collections.Counter:
    """How often each file (path) is read in an epoch."""
    return collections.Counter(dict(zip(mix.files, mix.counts(epoch))))


def _view(batches) -> list:
    return [(b.captions, b.pixels.tolist(), b.pos.tolist(), b.aspect.tolist(), b.position, b.skipped,
             None if b.loss_weight is None else b.loss_weight.tolist()) for b in batches]


# ---------------------------------------------------------------------------------------------------
# The plain single folder reads exactly what it read before
# ---------------------------------------------------------------------------------------------------

# (captions, first token's (y, x) of each sample, position) of the first batches, recorded with the FolderSource that
# came before training/datasets.py (tiny_cpu captions, seed 3, batch 3, the folder below).
BEFORE = [(["a blue triangle", "", "a purple circle"], [-0.775, -0.875, -0.4844, -0.4844, -0.875, -0.775], (0, 0)),
          (["a red triangle", "a purple square", "a yellow circle"],
           [-0.6458, -0.5625, -0.4844, -0.2969, -0.7708, -0.6458], (0, 1)),
          (["a red triangle", "a yellow circle", "a red circle"],
           [-0.5469, -0.4844, -0.6458, -0.7708, -0.4844, -0.5156], (0, 2)),
          (["a red circle", "a purple square", "a purple square"],
           [-0.1094, -0.4844, -0.6458, -0.7292, -0.975, -0.775], (0, 3))]


@pytest.mark.parametrize("bucketing", [False, True])
def test_plain_single_folder_is_unchanged(tmp_path, bucketing):
    root = make_toy_folder(tmp_path / "imgs", n=14, corrupt=1)
    make_dataset(root / "misc", n=3, seed=5)             # a subfolder that is not `<N>_name`
    recipe = _recipe(batch_size=3, path=str(root), bucketing=bucketing, bucket_step=8)
    plan = BatchPlan(3, 3, buckets=make_buckets(32, 8, 2.0) if bucketing else None)
    old = FolderSource(FolderDataset(root, _spec(recipe), seed=3), plan)
    new, per_epoch = build_data(recipe, 1, 0, 1, None)
    assert per_epoch == old.batches_per_epoch and new.sampler.counts is None
    n = 2 * per_epoch + 1                                  # crosses two epoch boundaries
    batches = list(itertools.islice(iter(new), n))
    assert _view(batches) == _view(itertools.islice(iter(old), n))
    assert new.state() == old.state()
    if not bucketing:
        assert [(b.captions, [round(x, 4) for x in b.pos[:, 0].flatten().tolist()], b.position)
                for b in batches[:4]] == BEFORE


# ---------------------------------------------------------------------------------------------------
# Repeats, weighted datasets, regularisation
# ---------------------------------------------------------------------------------------------------

def test_kohya_folder_repeats_count_per_epoch(tmp_path):
    root = make_dataset(tmp_path / "set", n=5, seed=0)
    make_dataset(root / "3_char", n=4, seed=1)
    make_dataset(root / "notes_x", n=2, seed=2)          # not a repeat folder
    mix = open_datasets(_recipe(path=str(root)).data, _spec(_recipe()), seed=3)
    for epoch in range(3):
        counts = _counts(mix, epoch)
        assert {f: c for f, c in counts.items() if f.parent.name == "3_char"} == \
            {f: 3 for f in (root / "3_char").glob("*.png")}
        assert sum(counts.values()) == 4 * 3 + 5 + 2 and set(counts.values()) == {1, 3}
    copies = [mix[(i, 0, 32, 32, 0, k)] for i, n in enumerate(mix.counts(0)) for k in range(n)
              if mix.files[i].parent.name == "3_char"]
    assert len({c.pixels.sum().item() + c.pos.sum().item() for c in copies}) > 4  # each copy its own crop
    off = open_datasets(_recipe(path=str(root), folder_repeats=False).data, _spec(_recipe()), seed=3)
    assert off.counts is None


def test_weighted_datasets_exact_and_fractional_repeats(tmp_path):
    a = make_dataset(tmp_path / "a", n=4, seed=0)
    make_dataset(a / "2_best", n=2, seed=1)
    b = make_dataset(tmp_path / "b", n=6, seed=2)
    c = make_dataset(tmp_path / "c", n=3, seed=3)
    recipe = _recipe(datasets=[{"path": str(a), "repeats": 2}, {"path": str(b), "loss_weight": 0.5},
                               {"path": str(c), "repeats": 2.5}])
    mix = open_datasets(recipe.data, _spec(recipe), seed=3)
    totals = collections.Counter()
    for epoch in range(200):
        counts = _counts(mix, epoch)
        assert all(counts[f] == (4 if f.parent.name == "2_best" else 2) for f in a.rglob("*.png"))
        assert all(counts[f] == 1 for f in b.glob("*.png"))
        assert all(counts[f] in (2, 3) for f in c.glob("*.png")) and sum(counts[f] for f in c.glob("*.png")) in (7, 8)
        totals.update({f: counts[f] for f in c.glob("*.png")})
    assert all(abs(t / 200 - 2.5) < 0.15 for t in totals.values())   # 2.5 per epoch on average, file by file
    assert mix.counts(7) == mix.counts(7) and len({tuple(mix.counts(e)) for e in range(10)}) > 1
    weights = {mix.parts[mix.locate(i)[0]].root: mix[(i, 0, 32, 32)].loss_weight.item() for i in (0, 7, 13)}
    assert weights == {a: 1.0, b: 0.5, c: 1.0}


def test_weights_of_one_keep_the_plain_loss_path(tmp_path):
    a, b = make_dataset(tmp_path / "a", n=4, seed=0), make_dataset(tmp_path / "b", n=4, seed=1)
    recipe = _recipe(datasets=[{"path": str(a)}, {"path": str(b)}])
    source, _ = build_data(recipe, 1, 0, 1, None)
    assert source.sampler.counts is None and next(iter(source)).loss_weight is None


def test_regularization_set_matches_the_training_count_and_carries_its_weight(tmp_path):
    train = make_dataset(tmp_path / "train", n=5, seed=0)
    reg = make_dataset(tmp_path / "reg", n=3, seed=1)
    recipe = _recipe(datasets=[{"path": str(train), "repeats": 2},
                               {"path": str(reg), "regularization": True, "loss_weight": 0.3}])
    mix = open_datasets(recipe.data, _spec(recipe), seed=3)
    for epoch in range(4):
        counts = _counts(mix, epoch)
        assert sum(counts[f] for f in reg.glob("*.png")) == 10 == sum(counts[f] for f in train.glob("*.png"))
        assert sorted(counts[f] for f in reg.glob("*.png")) == [3, 3, 4]  # cycles through seeded permutations
    source, per_epoch = build_data(recipe, 1, 0, 1, None)
    weights = torch.cat([b.loss_weight for b in itertools.islice(iter(source), per_epoch)])
    assert per_epoch == 10 and sorted(weights.tolist()) == pytest.approx([0.3] * 10 + [1.0] * 10)


# ---------------------------------------------------------------------------------------------------
# Loss weights
# ---------------------------------------------------------------------------------------------------

def test_weighted_mse_math_and_ones_are_bit_identical():
    g = torch.Generator().manual_seed(0)
    pred, target = torch.randn(4, 3, 8, 8, generator=g), torch.randn(4, 3, 8, 8, generator=g)
    assert torch.equal(weighted_mse(pred, target, torch.ones(4)), F.mse_loss(pred, target))
    w = torch.tensor([1.0, 0.5, 0.0, 2.0])
    per_sample = ((pred - target) ** 2).mean((1, 2, 3))
    torch.testing.assert_close(weighted_mse(pred, target, w), (w * per_sample).mean())


def _tiny():
    recipe = _recipe()
    cfg = PRESETS["xut-tiny"].to_dict() | {"input_dim": 3}
    torch.manual_seed(0)
    model = XUT(XUTConfig.from_dict(cfg)).train()
    model.init_for_training()
    te = build_text_encoder("random:tiny", torch.float32, torch.device("cpu"))
    return recipe, model, te, build_vae("pixel", torch.float32, torch.device("cpu"))


def test_training_loss_with_weights_of_one_is_bit_identical(tmp_path):
    recipe, model, te, vae = _tiny()
    source, _ = build_data(_recipe(path=str(make_dataset(tmp_path / "a", n=4))), 1, 0, 1, None)
    batch: Batch = next(iter(source))

    def loss(b: Batch) -> torch.Tensor:
        gen = torch.Generator().manual_seed(1)
        return training_loss(model, b, te, vae, recipe.model, gen, contextlib.nullcontext, 2)

    plain = loss(batch)
    ones = copy.copy(batch)
    ones.loss_weight = torch.ones(2)
    assert torch.equal(loss(ones), plain)
    half = copy.copy(batch)
    half.loss_weight = torch.full((2,), 0.5)
    torch.testing.assert_close(loss(half), plain * 0.5)


# ---------------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------------

def _held(root: Path, split: float) -> set[str]:
    return {str(f.relative_to(root)) for f in root.rglob("*.png") if held_out(f.relative_to(root), split)}


def test_validation_split_is_disjoint_and_stable(tmp_path):
    root = make_dataset(tmp_path / "set", n=40, seed=0)
    make_dataset(root / "3_char", n=8, seed=1)
    recipe = _recipe(path=str(root), validation_split=0.25)
    mix = open_datasets(recipe.data, _spec(recipe), seed=3)
    trained = {str(f.relative_to(root)) for f in mix.parts[0].files}
    held = _held(root, 0.25)
    assert held and not trained & held and len(trained | held) == 48
    val = open_validation(recipe, 1, 0, 1)
    assert sum(len(b.captions) for b in val) == len(held)
    assert _view(val) == _view(open_validation(recipe, 1, 0, 1))           # fixed batches
    shards = [open_validation(recipe, 1, r, 2) for r in range(2)]
    assert sorted(b.position[0] for s in shards for b in s) == list(range(len(val)))

    make_dataset(root / "new", n=20, seed=7)                                # files added elsewhere
    shutil.move(root / "3_char", root / "5_char")                           # a new repeat count
    after = {name.replace("5_char", "3_char") for name in _held(root, 0.25) if not name.startswith("new")}
    assert after == held


def test_validation_path_and_overlap(tmp_path):
    root = make_dataset(tmp_path / "set", n=6, seed=0)
    val_dir = make_dataset(tmp_path / "val", n=3, seed=1)
    recipe = _recipe(batch_size=2, path=str(root), validation_path=str(val_dir))
    val = open_validation(recipe, 1, 0, 1)
    assert [len(b.captions) for b in val] == [2, 1] and val[0].pixels.shape == (2, 3, 32, 32)
    assert open_validation(_recipe(path=str(root)), 1, 0, 1) is None
    inside = _recipe(path=str(root), validation_path=str(root / "sub"))
    with pytest.raises(ValueError, match="data.validation_path .* overlaps data.path"):
        build_data(inside, 1, 0, 1, None)


def test_validation_loss_is_deterministic_and_restores_the_mode(tmp_path):
    recipe, model, te, vae = _tiny()
    root = make_dataset(tmp_path / "set", n=12, seed=0)
    recipe = _recipe(path=str(root), validation_split=0.5)
    batches = open_validation(recipe, 1, 0, 1)

    def val(section=recipe.model):
        return validation_loss(model, batches, te, vae, section, contextlib.nullcontext, 2, seed=0,
                               device=torch.device("cpu"), world=1)

    first = val()
    assert model.training
    torch.randn(100)                                                        # the global RNG plays no part
    assert val() == first
    assert recipe.model.tread_rate > 0 and val(dataclasses.replace(recipe.model, tread_rate=0.0)) == first
    snapshot = copy.deepcopy(model.state_dict())
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    source, _ = build_data(recipe, 1, 0, 1, None)
    training_loss(model, next(iter(source)), te, vae, recipe.model, torch.Generator().manual_seed(0),
                  contextlib.nullcontext, 2).backward()
    opt.step()
    assert val() != first                                                   # only the weights move it
    model.load_state_dict(snapshot)
    assert val() == first
    model.eval()
    val()
    assert not model.training


# ---------------------------------------------------------------------------------------------------
# Resume, workers, ranks
# ---------------------------------------------------------------------------------------------------

def _mixed(tmp_path: Path, batch_size: int = 3, **extra):
    a = make_dataset(tmp_path / "a", n=5, seed=0)
    make_dataset(a / "2_best", n=2, seed=1)
    b = make_dataset(tmp_path / "b", n=4, seed=2)
    reg = make_dataset(tmp_path / "reg", n=3, seed=3)
    return _recipe(batch_size=batch_size, datasets=[
        {"path": str(a), "repeats": 1.5}, {"path": str(b), "loss_weight": 2.0},
        {"path": str(reg), "regularization": True, "loss_weight": 0.25}], **extra)


def test_resume_mid_epoch_with_datasets_and_repeats(tmp_path):
    recipe = _mixed(tmp_path)

    def take(n, state=None, workers=0):
        r = copy.deepcopy(recipe)
        r.data.workers = workers
        source, _ = build_data(r, 1, 0, 1, state)
        return _view(itertools.islice(iter(source), n)), source.state()

    full, _ = take(25)                                                     # about 2.5 epochs
    first, state = take(9)
    rest, _ = take(16, state)
    assert first + rest == full
    assert take(25, workers=2)[0] == full                                  # independent of the loader workers


def test_ranks_get_equal_disjoint_batches(tmp_path):
    recipe = _mixed(tmp_path, batch_size=2)
    sources = [build_data(recipe, 1, r, 3, None)[0] for r in range(3)]
    for epoch in range(4):
        plans = [s.sampler.epoch(epoch) for s in sources]
        assert len({len(p) for p in plans}) == 1
        keys = [(k[0], k[5]) for p in plans for batch in p for k in batch]
        assert len(keys) == len(set(keys))


# ---------------------------------------------------------------------------------------------------
# Bad values name the key
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("data,match", [
    ({"datasets": [{"path": "x", "repeats": -1}]}, r"data.datasets\[0\].repeats -1"),
    ({"datasets": [{"path": "x"}, {"path": "y", "weight": 2}]}, r"unknown key.*'weight'.*data.datasets\[1\]"),
    ({"datasets": [{"path": "x", "loss_weight": "high"}]}, r"data.datasets\[0\].loss_weight"),
    ({"datasets": [{"repeats": 2}]}, r"data.datasets\[0\].path"),
    ({"datasets": ["x"]}, r"data.datasets\[0\] must be a table"),
    ({"datasets": [{"path": "x", "repeats": float("nan")}]}, r"data.datasets\[0\].repeats"),
    ({"path": "x", "datasets": [{"path": "y"}]}, r"either data.path .* or \[\[data.datasets\]\]"),
    ({"cache": "c", "datasets": [{"path": "y"}]}, r"data.cache"),
    ({"datasets": [{"path": "s/*.tar"}]}, r"data.datasets\[0\].path 's/\*.tar' is tar shards"),
    ({"datasets": [{"path": "x"}, {"path": "r", "regularization": True, "repeats": 2}]},
     r"data.datasets\[1\].repeats"),
    ({"datasets": [{"path": "r", "regularization": True}]}, r"no dataset to train on"),
    ({"validation_split": 0.9}, r"data.validation_split 0.9 must be in \[0, 0.5\]"),
    ({"path": "s/*.tar", "validation_split": 0.1}, r"data.validation_split needs image folders"),
])
def test_bad_values_name_the_key(data, match):
    with pytest.raises(ValueError, match=match):
        recipe_from_dict({"data": data})


def test_zero_repeat_folder_is_refused(tmp_path):
    root = make_dataset(tmp_path / "set", n=2)
    make_dataset(root / "0_none", n=1)
    with pytest.raises(ValueError, match="0_none: a kohya repeat count must be >= 1"):
        build_data(_recipe(path=str(root)), 1, 0, 1, None)
