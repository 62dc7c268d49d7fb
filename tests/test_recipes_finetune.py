"""The shipped fine-tuning recipes: they load, their [finetune] and batch settings are the ones their headers state,
and their adapters on XUT-base (built on the meta device: no memory, no init) have the stated parameter counts."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from hdm_core.config import PRESETS
from hdm_core.xut import XUT
from training.finetune import attach
from training.recipe import Recipe, load_recipe

RECIPES = Path(__file__).resolve().parents[1] / "training" / "recipes"
LOKR, LORA = RECIPES / "finetune_lokr_1024.toml", RECIPES / "finetune_lora_24gb.toml"
CPU = RECIPES / "finetune_demo_cpu.toml"
DEMO = RECIPES.parents[1] / "demo" / "pretrained" / "hdm-demo.safetensors"


def header(path: Path) -> str:
    """The recipe's leading comment block, as one string."""
    lines = path.read_text().splitlines()
    return "\n".join(line[1:] for line in lines[:next(i for i, s in enumerate(lines) if not s.startswith("#"))])


def trainable_on_xut_base(recipe: Recipe) -> tuple[int, int, object]:
    """(adapter parameters, XUT-base parameters, adapters) for the recipe's [finetune] on a meta-device XUT-base."""
    model = XUT(PRESETS["xut-base"], device="meta")
    adapters = attach(recipe.finetune, model, text_encoder=None)
    assert not any(p.requires_grad for p in model.parameters())  # the base is frozen
    return sum(p.numel() for p in adapters.parameters()), sum(p.numel() for p in model.parameters()), adapters


def test_lokr_recipe_is_the_official_finetune():
    r = load_recipe(LOKR)
    ft = r.finetune
    assert (ft.method, ft.factor, ft.full_matrix, ft.train_norm) == ("lokr", 4, True, True)
    assert ft.modules == ["attention", "mlp", "adaln", "embed"]
    assert (r.optim.lr, r.train.batch_size, r.train.grad_accum, r.data.resolution) == (0.1, 8, 4, 1024)
    assert r.train.ema_decay == 0 and r.model.tread_rate == 0


def test_lokr_adapter_on_xut_base():
    n, base, adapters = trainable_on_xut_base(load_recipe(LOKR))
    assert base == 343_176_208 and n == 21_488_228
    # The header's arithmetic: full matrix, factor 4 → kron(4 × 4, out/4 × in/4), 1/16 of each Linear's weight.
    for lo in adapters.unet.loras:
        sd, weight = lo.state_dict(), getattr(lo.org_module[0], "weight", None)
        if "lokr_w1" in sd and weight is not None and weight.dim() == 2 and weight.shape[0] % 4 == 0:
            assert sd["lokr_w1"].shape == (4, 4) and sd["lokr_w2"].numel() * 16 == weight.numel(), lo.lora_name


def test_lora_24gb_recipe_matches_its_header():
    r, text = load_recipe(LORA), header(LORA)
    rank = int(re.search(r"Rank (\d+) on attention, MLP and the shared adaLN", text).group(1))
    batch, accum = map(int, re.search(r"batch (\d+) × accumulation (\d+)", text).groups())
    stated = int(re.search(r"([\d,]+) trainable parameters", text).group(1).replace(",", ""))
    ft = r.finetune
    assert (ft.method, ft.dim, ft.modules) == ("lora", rank, ["attention", "mlp", "adaln"])
    assert (r.train.batch_size, r.train.grad_accum) == (batch, accum) and batch * accum == 8  # global batch 8
    assert r.data.resolution == 1024 and r.model.gradient_checkpointing and r.model.tread_rate == 0
    assert r.train.precision == "bf16" and r.model.encoder_dtype == "fp16" and r.train.ema_decay == 0
    assert "ESTIMATE_MEMORY" not in text and "RANK_PARAMS" not in text

    n, base, _ = trainable_on_xut_base(r)
    assert n == stated
    assert f"{100 * n / base:.1f} %" in text  # "(3.9 % of the 343M XUT)"


@pytest.mark.parametrize("path", [LOKR, LORA], ids=lambda p: p.stem)
def test_finetune_recipes_start_from_the_released_model(path):
    r = load_recipe(path)
    assert r.model.init_from and r.model.preset == "" and r.finetune.adapter


def test_cpu_recipe_fine_tunes_the_shipped_demo_model_naming_its_base_once(tmp_path, capsys):
    """finetune_demo_cpu.toml: only model.init_from names the base (the text encoder and the pixel-space marker come
    from the same file); two steps train, and the export records the demo file as its base."""
    from hdm_core.checkpoint import SafetensorsFile, fingerprint
    from training.toy_data import make_dataset
    from training.train import main, parse_args

    r = load_recipe(CPU)
    assert (r.model.init_from, r.model.text_encoder, r.model.vae) == ("demo/pretrained/hdm-demo.safetensors", "", "")
    assert r.finetune.method == "lora" and r.model.max_length == 3 and r.run.sample_every and r.data.validation_split
    data = make_dataset(tmp_path / "orange", n=24, seed=1, colours=("orange",))
    (export,) = main(parse_args(["--config", str(CPU), f"data.path={data}", f"run.out_dir={tmp_path / 'runs'}",
                                 f"model.init_from={DEMO}", "train.max_steps=2", "train.batch_size=4",
                                 "data.validation_split=0.3", "run.sample_every=2", "run.val_every=2",
                                 "run.sample_steps=2"]))
    meta = SafetensorsFile(export).metadata
    assert meta["hdm.base"] == "hdm-demo.safetensors" and meta["hdm.base_fingerprint"] == fingerprint(DEMO)
    out = capsys.readouterr().out
    assert "step 2: validation loss" in out and "captions of" not in out  # three-token captions: nothing cut
    assert sorted(p.name for p in (tmp_path / "runs" / "finetune_demo_cpu" / "samples").iterdir()) == [
        "step_00000000.png", "step_00000002.png"]
