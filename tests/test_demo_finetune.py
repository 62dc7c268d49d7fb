"""A fine-tune of the shipped demo checkpoint learns a concept it never saw: the colour orange, with a LoRA trained by
the bundled launcher (demo/finetune.py's default budget: 400 images, 60 steps of 16; this file takes about 40 s on
one thread of a 2-core machine), measured before and after by demo/measure.py with orange added to its palette.

Asked for "an orange circle / square / triangle", the demo model draws another colour (purple); with the adapter it
draws orange, and it still draws the five colours it knew. Deterministic with the thread count fixed (tests run one
thread); measured here (torch 2.13.0+cpu, 2-core AMD EPYC): orange 0/12 -> 12/12, old colours 30 -> 30/30, old
shapes 29 -> 27/30.
"""

from __future__ import annotations

import hashlib
import json
import time

import pytest
import torch

from demo.finetune import (
    NEW_COLOUR,
    NEW_SEEDS,
    PALETTE,
    THRESHOLDS,
    before_after,
    finetune,
    verdict,
    write_dataset,
)
from demo.measure import binomial_tail, chance_level, measure
from demo.run import PRETRAINED
from hdm_core.adapters import load_adapter
from hdm_core.checkpoint import SafetensorsFile, load_components
from hdm_core.layout import LORA_UNET_PREFIX as UNET_PREFIX
from training.toy_data import ALL_COLOURS, COLOURS, NEW_COLOURS, SHAPES, prompts, render, toy_samples

# The captions of the demo's dataset (toy_samples(n, seed 0)); a new colour added to training/toy_data.py must leave
# them, and so the shipped checkpoint's training data, as they are.
DEMO_CAPTIONS_SHA256 = "c778b7ab9b7ac691"


@pytest.fixture(scope="module")
def figures(tmp_path_factory):
    root = tmp_path_factory.mktemp("finetune")
    t0 = time.perf_counter()
    adapter = finetune(write_dataset(root / "data"), root / "runs", quiet=True)
    t1 = time.perf_counter()
    fig = before_after(load_components(PRETRAINED, dtype=torch.float32), adapter)
    print(f"\n[test_demo_finetune] dataset + LoRA {t1 - t0:.1f} s, before/after {time.perf_counter() - t1:.1f} s")
    print("[test_demo_finetune] " + verdict(fig)[1])
    return adapter, fig


# ---------------------------------------------------------------------------------------------------
# The new concept in the generator and the measure (no model)
# ---------------------------------------------------------------------------------------------------

def test_the_demo_dataset_is_unchanged_and_never_shows_the_new_colour():
    captions = [c for _, _, c in toy_samples(300, 0)]
    assert hashlib.sha256("\n".join(captions).encode()).hexdigest()[:16] == DEMO_CAPTIONS_SHA256
    assert not any(word in NEW_COLOURS for c in captions for word in c.split())
    assert prompts() == [f"a {c} {s}" for c in COLOURS for s in SHAPES]


def test_measure_reads_the_new_colour_only_when_asked():
    for shape in SHAPES:
        img = render(NEW_COLOUR, shape, (32, 32))
        assert (measure(img, PALETTE).colour, measure(img, PALETTE).shape) == (NEW_COLOUR, shape)
        assert measure(img).colour in COLOURS     # the demo's own measure keeps its five colours
    for colour in COLOURS:                        # the extended palette still reads the old colours
        assert measure(render(colour, "circle", (32, 32)), ALL_COLOURS).colour == colour


# ---------------------------------------------------------------------------------------------------
# Before and after the fine-tune
# ---------------------------------------------------------------------------------------------------

def test_the_adapter_is_a_comfyui_lora_of_the_demo_model(figures):
    adapter, _ = figures
    tensors, meta = load_adapter(adapter), SafetensorsFile(adapter).metadata
    assert tensors and all(k.startswith(UNET_PREFIX) for k in tensors)
    assert json.loads(meta["hdm.adapter"])["method"] == "lora" and meta["hdm.base"] == PRETRAINED.name


def test_learns_the_new_colour(figures):
    _, fig = figures
    before, after = fig["before"]["new"], fig["after"]["new"]
    chance, n = chance_level(PALETTE)["colour"], after["n"]
    report = verdict(fig)[1]
    assert n == len(SHAPES) * len(NEW_SEEDS)
    # Never trained on the word, the demo model draws a known colour: at most chance's average (2 of 12; measured
    # 0, all purple). After 60 steps at least 9 of 12 orange: a model picking one of the 6 colours at random gets
    # there with P = 1.3e-5 (measured 12 of 12, P = 5e-10).
    assert before["colour_hits"] <= THRESHOLDS["new_before_max"], report
    assert after["colour_hits"] >= THRESHOLDS["new_after_min"], report
    assert binomial_tail(n, THRESHOLDS["new_after_min"], chance) < 1e-4


def test_keeps_the_old_colours_and_shapes(figures):
    _, fig = figures
    before, after = fig["before"]["old"], fig["after"]["old"]
    report = verdict(fig)[1]
    # The 15 old prompts x 2 seeds: the demo model reads 30/30 colours and 29/30 shapes with these sampling
    # settings, and the adapter keeps 30/30 and 27/30. The bounds allow a little forgetting (4 colours, 7 shapes of
    # 30) but not an adapter that paints everything orange (on orange-only data: 12 of 30 colours right).
    assert before["colour_hits"] >= THRESHOLDS["old_colour_after_min"], report
    assert after["colour_hits"] >= THRESHOLDS["old_colour_after_min"], report
    assert after["shape_hits"] >= THRESHOLDS["old_shape_after_min"], report
    assert verdict(fig)[0], report
