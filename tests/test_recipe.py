"""Recipes: the shipped stages reproduce the recipe table; unknown keys and bad values are errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from training.captions import CaptionRules
from training.recipe import apply_overrides, load_recipe, parse_override, recipe_from_dict

RECIPES = Path(__file__).resolve().parents[1] / "training" / "recipes"

# resolution, epochs, batch/GPU, accum, lr, betas, weight decay, clip, tread, ctx, init_from stage, bucketing
TABLE = {
    "stage1_256": (256, 20, 128, 4, 0.5, [0.9, 0.98], 0.02, 3.0, 0.5, 256, None, False),
    "stage2_512": (512, 5, 64, 2, 0.1, [0.9, 0.995], 0.005, 1.0, 0.5, 256, "stage1_256", False),
    "stage3_768": (768, 1, 64, 2, 0.05, [0.9, 0.995], 0.002, 1.0, 0.5, 256, "stage2_512", False),
    "stage4_1024": (1024, 1, 16, 4, 0.02, [0.9, 0.995], 0.002, 1.0, 0.0, 512, "stage3_768", True),
}


@pytest.mark.parametrize("name", sorted(TABLE))
def test_stage_recipes_match_the_table(name):
    r = load_recipe(RECIPES / f"{name}.toml")
    res, epochs, batch, accum, lr, betas, wd, clip, tread, ctx, parent, buckets = TABLE[name]
    assert r.name == name and r.model.preset == "xut-base"
    assert (r.data.resolution, r.train.epochs, r.train.batch_size, r.train.grad_accum) == (res, epochs, batch, accum)
    assert (r.optim.lr, r.optim.betas, r.optim.weight_decay, r.optim.grad_clip) == (lr, betas, wd, clip)
    assert (r.optim.base_dim, r.optim.warmup_steps, r.optim.min_lr_ratio) == (1, 1000, 0.01)
    assert (r.model.tread_rate, r.model.max_length, r.data.bucketing) == (tread, ctx, buckets)
    assert r.train.precision == "fp16" and r.model.gradient_checkpointing
    assert r.train.batch_size * r.train.grad_accum * r.train.reference_world_size in (2048, 512, 256)
    assert r.train.ema_decay == 0 and r.data.captions.caption_dropout == 0  # the official trainer has neither
    if parent is None:
        assert r.model.init_from == ""
    else:
        assert f"{parent}/export/{parent}.safetensors" in r.model.init_from


def test_tiny_cpu_recipe():
    r = load_recipe(RECIPES / "tiny_cpu.toml", ["data.path=/tmp/x"])
    assert r.model.preset == "xut-tiny" and r.model.vae == "pixel" and r.model.text_encoder.startswith("random:")
    assert r.data.path == "/tmp/x" and r.train.precision == "fp32"


def test_unknown_keys_are_errors(tmp_path):
    with pytest.raises(ValueError, match="learning_rate"):
        recipe_from_dict({"optim": {"learning_rate": 0.1}})
    with pytest.raises(ValueError, match="trainer"):
        recipe_from_dict({"trainer": {}})
    with pytest.raises(ValueError, match="'resoluton'"):
        load_recipe(RECIPES / "tiny_cpu.toml", ["data.resoluton=64"])
    with pytest.raises(ValueError, match=r"'tag_dropot'.*allowed keys are \['caption_dropout'"):
        load_recipe(RECIPES / "tiny_cpu.toml", ["data.captions.tag_dropot=0.1"])
    with pytest.raises(ValueError, match=r"\['tag_dropout'\] belong in \[data.captions\]"):
        recipe_from_dict({"data": {"tag_dropout": 0.1}})


def test_bad_values_name_the_value_and_the_fix():
    with pytest.raises(ValueError, match=r"tread_rate 1.0 must be in \[0, 1\)"):
        recipe_from_dict({"model": {"tread_rate": 1.0}})
    with pytest.raises(ValueError, match="precision 'fp8'"):
        recipe_from_dict({"train": {"precision": "fp8"}})
    with pytest.raises(ValueError, match="must be of type int"):
        recipe_from_dict({"train": {"batch_size": "big"}})
    with pytest.raises(ValueError, match="betas"):
        recipe_from_dict({"optim": {"betas": [0.9]}})
    with pytest.raises(ValueError, match="true or false"):
        recipe_from_dict({"data": {"bucketing": 1}})
    with pytest.raises(ValueError, match=r"tag_dropout 1.5 must be a probability in \[0, 1\]"):
        recipe_from_dict({"data": {"captions": {"tag_dropout": 1.5}}})


def test_overrides():
    assert parse_override("optim.lr=0.1") == (["optim", "lr"], 0.1)
    assert parse_override("model.vae=pixel") == (["model", "vae"], "pixel")
    assert parse_override("optim.betas=[0.9, 0.99]") == (["optim", "betas"], [0.9, 0.99])
    d = apply_overrides({"optim": {"lr": 0.5}}, ["optim.lr=0.2", "train.epochs=3", "name=x"])
    assert d == {"optim": {"lr": 0.2}, "train": {"epochs": 3}, "name": "x"}
    r = recipe_from_dict(d)
    assert r.train.epochs == 3.0 and isinstance(r.train.epochs, float)
    with pytest.raises(ValueError, match="section.key=value"):
        parse_override("optim.lr")
    r = load_recipe(RECIPES / "tiny_cpu.toml", ["data.captions.tag_dropout=0.3", "data.captions.shuffle=false"])
    assert (r.data.captions.tag_dropout, r.data.captions.shuffle, r.data.captions.tag_separator) == (0.3, False, ",")
    assert recipe_from_dict({}).data.captions == CaptionRules(tag_dropout=0.25, group_dropout=0.3, shuffle=True)
