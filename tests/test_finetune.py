"""Adapter fine-tuning on CPU with the tiny recipe: LoRA / LoKr trained by the launcher, exported in ComfyUI's keys,
applied by hdm_core, merged, resumed exactly, under DDP, and the recipe errors."""

from __future__ import annotations

import copy
import csv
import json
import math
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from hdm_core.adapters import apply_adapters, load_adapter, save_adapter
from hdm_core.checkpoint import SafetensorsFile, fingerprint, load_components
from hdm_core.merge import merge_checkpoint
from hdm_core.rope import make_axial_pos
from training.checkpointing import latest_checkpoint, load_checkpoint
from training.finetune import attach
from training.recipe import load_recipe
from training.toy_data import make_toy_folder
from training.train import main, parse_args

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "training" / "recipes" / "tiny_cpu.toml")
LOKR = ("finetune.method=lokr", "finetune.factor=4", "finetune.train_norm=true",
        'finetune.modules=["attention", "mlp", "adaln", "embed"]')


def _train(root: Path, name: str, *overrides: str, extra: tuple[str, ...] = ()) -> list[Path]:
    data = root / "imgs"
    if not data.is_dir():
        make_toy_folder(data, n=24, corrupt=1)
    args = ["--config", TINY, *extra, f"data.path={data}", f"run.out_dir={root / 'runs'}", f"name={name}",
            "run.log_every=2", *overrides]
    return main(parse_args(args))


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[Path, Path]:
    """(work folder, a briefly trained tiny base model in the released layout)."""
    root = tmp_path_factory.mktemp("ft")
    (export,) = _train(root, "base", "train.max_steps=6")
    return root, export


def _adapter_run(root: Path, export: Path, name: str, *overrides: str, extra: tuple[str, ...] = ()) -> list[Path]:
    return _train(root, name, f"model.init_from={export}", "optim.lr=0.05", "optim.warmup_steps=0",
                  "train.max_steps=6", "run.save_every=3", *overrides, extra=extra)


def _last_logged(run: Path, column: str) -> str:
    with (run / "log.csv").open() as f:
        return list(csv.DictReader(f))[-1][column]


def _velocity(model: torch.nn.Module, te, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(2, 3, 16, 16, generator=g)
    ctx = te.encode_padded(["red, square", "blue, circle"], 16)
    with torch.no_grad():
        return model(x, torch.tensor([0.3, 0.8]), ctx, pos_map=make_axial_pos(16, 16)[None].expand(2, -1, -1),
                     aspect=torch.zeros(2))


@pytest.mark.parametrize("method", ["lora", "lokr"])
def test_trained_adapter_exports_in_comfy_keys_and_hdm_core_applies_it(base, method):
    root, export = base
    overrides = LOKR if method == "lokr" else ("finetune.method=lora", "finetune.dim=4", "finetune.alpha=2")
    (adapter,) = _adapter_run(root, export, method, *overrides)
    sd, meta = load_adapter(adapter), SafetensorsFile(adapter).metadata
    assert all(k.startswith("diffusion_model.") for k in sd) and meta["ss_network_module"] == "lycoris.kohya"
    assert json.loads(meta["hdm.adapter"])["method"] == method and meta["hdm.base"] == export.name
    if method == "lokr":
        assert any(k.endswith(".lokr_w1") for k in sd) and any(k.endswith(".w_norm") for k in sd)

    comps = load_components(export)
    before = _velocity(comps.model, comps.text_encoder)
    same = _velocity(apply_adapters(copy.deepcopy(comps.model), [(adapter, 0.0)]), comps.text_encoder)
    assert torch.equal(same, before)  # strength 0 changes nothing
    applied = _velocity(apply_adapters(copy.deepcopy(comps.model), [(adapter, 1.0)]), comps.text_encoder)
    assert (applied - before).abs().max() > 1e-3  # a few steps changed the output
    merged = merge_checkpoint(export, root / f"merged_{method}.safetensors", [(str(adapter), 1.0)])
    merged_comps = load_components(merged)
    torch.testing.assert_close(_velocity(merged_comps.model, merged_comps.text_encoder), applied, rtol=0, atol=1e-5)

    # The training-time model (frozen base + LyCORIS adapters from the last checkpoint) gives the same output.
    state = load_checkpoint(latest_checkpoint(root / "runs" / method))
    recipe = load_recipe(TINY, list(overrides))
    trained = copy.deepcopy(comps.model)
    adapters = attach(recipe.finetune, trained, comps.text_encoder)
    adapters.load_state_dict(state["model"])
    trained.eval()
    torch.testing.assert_close(applied, _velocity(trained, comps.text_encoder), rtol=0, atol=1e-5)


def test_adapter_resume_equals_uninterrupted_run(base):
    root, export = base
    (a,) = _adapter_run(root, export, "whole", *LOKR)
    _adapter_run(root, export, "split", *LOKR, extra=("--stop-at", "5"))
    stopped = load_checkpoint(latest_checkpoint(root / "runs" / "split"))
    assert stopped["step"] == 5 and stopped["skipped"] >= 1  # the corrupt image is met before the stop
    (b,) = _adapter_run(root, export, "split", *LOKR, extra=("--resume",))
    sa, sb = load_adapter(a), load_adapter(b)
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    ca = load_checkpoint(latest_checkpoint(root / "runs" / "whole"))
    cb = load_checkpoint(latest_checkpoint(root / "runs" / "split"))
    assert ca["skipped"] == cb["skipped"] >= 1  # the count from before the stop is carried over, not redone
    assert _last_logged(root / "runs" / "whole", "skipped") == _last_logged(root / "runs" / "split", "skipped")
    assert set(ca["model"]) == set(cb["model"]) and not any(k.startswith("model.") for k in ca["model"])


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_adapter_run_with_checkpointing_buckets_autocast_and_tread(base, precision):
    root, export = base
    (adapter,) = _adapter_run(root, export, f"mixed_{precision}", "finetune.method=loha", "finetune.dim=4",
                              "model.gradient_checkpointing=true", "data.bucketing=true", "data.bucket_step=8",
                              f"train.precision={precision}", "model.tread_rate=0.5", "train.max_steps=3")
    sd = load_adapter(adapter)
    assert any(k.endswith(".hada_w1_a") for k in sd) and all(torch.isfinite(v).all() for v in sd.values())


def test_two_process_ddp_adapter_run(base, tmp_path):
    root, export = base
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "training.train", "--config", TINY, f"data.path={root / 'imgs'}", f"run.out_dir={tmp_path}",
           f"model.init_from={export}", "finetune.method=lora", "finetune.dim=4", "train.max_steps=4",
           "run.save_every=4", "optim.lr=0.05"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    state = load_checkpoint(latest_checkpoint(tmp_path / "tiny_cpu"))
    assert state["world_size"] == 2 and all(".lora_" in k for k in state["model"] if not k.endswith("alpha"))
    logged = int(_last_logged(tmp_path / "tiny_cpu", "skipped"))
    assert logged == state["skipped"] >= 1  # summed over both ranks, in the log and the checkpoint
    assert (tmp_path / "tiny_cpu" / "export" / "tiny_cpu.safetensors").is_file()


@pytest.mark.parametrize("overrides, message", [
    (("finetune.method=lora",), "set model.init_from"),
    (("finetune.method=lora", "model.init_from=X", "train.ema_decay=0.99"), "train.ema_decay"),
    (("finetune.method=dora",), "finetune.method 'dora'"),
    (('finetune.modules=["attn"]',), "finetune.modules"),
    (("finetune.method=lokr", "finetune.factor=0"), "factor 0"),
])
def test_bad_finetune_recipes_are_refused_early(tmp_path, overrides, message):
    with pytest.raises(ValueError, match=message):
        _train(tmp_path, "bad", *overrides)
    assert not (tmp_path / "runs" / "bad" / "checkpoints").exists()


def test_adapter_stage_must_be_last_and_adapter_checkpoint_is_no_base(base, tmp_path):
    root, export = base
    with pytest.raises(ValueError, match="last stage"):
        _train(tmp_path, "chain", f"model.init_from={export}", "finetune.method=lora", extra=("--config", TINY))
    _adapter_run(tmp_path, export, "lora1", "finetune.method=lora", "train.max_steps=1")
    lora_ckpt = latest_checkpoint(tmp_path / "runs" / "lora1")
    with pytest.raises(ValueError, match="adapter run"):
        _train(tmp_path, "from_adapter", f"model.init_from={lora_ckpt}", "train.max_steps=1")


def test_text_encoder_adapter_trains_exports_and_applies(base):
    root, export = base
    (adapter,) = _adapter_run(root, export, "te", "finetune.method=lora", "finetune.dim=4",
                              'finetune.modules=["attention", "text_encoder"]', "optim.lr=0.5")
    sd = load_adapter(adapter)
    te_keys = [k for k in sd if k.startswith("text_encoders.qwen3_06b.transformer.model.layers.")]
    assert te_keys and any(".self_attn.q_proj.lora_up.weight" in k for k in te_keys)
    comps = load_components(export)
    before = comps.text_encoder.encode_padded(["red, square"], 16)
    apply_adapters(comps.model, [(adapter, 1.0)], text_encoder=comps.text_encoder)
    after = comps.text_encoder.encode_padded(["red, square"], 16)
    assert (after - before).abs().max() > 1e-4  # the text encoder's adapter was trained and applies


def test_validation_loss_messages_and_tensorboard_samples(base, capsys):
    root, export = base
    _adapter_run(root, export, "watched", "finetune.method=lora", "data.validation_split=0.3", "run.val_every=3",
                 "run.sample_every=6", "run.tensorboard=true", "train.reference_world_size=4")
    out = capsys.readouterr().out
    assert f"starts from {export}" in out and "trainable parameters" in out
    assert "tuned for a global batch of 16" in out  # the recipe's 4 per rank × 4 ranks × 1
    run = root / "runs" / "watched"
    with (run / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    val = {int(r["step"]): float(r["val_loss"]) for r in rows if r["val_loss"]}
    assert sorted(val) == [3, 6] and all(math.isfinite(v) for v in val.values())

    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(run / "tensorboard"), size_guidance={"images": 0, "tensors": 0}).Reload()
    assert [e.step for e in events.Images("samples")] == [0, 6]  # the base's grid first: the baseline
    assert [e.step for e in events.Scalars("val/loss")] == [3, 6]
    assert "samples/prompts/text_summary" in events.Tags()["tensors"]


def test_adapter_resume_refuses_another_base_and_the_export_records_it(base, tmp_path):
    """The file at model.init_from replaced by another model between stop and resume: refused, naming both
    fingerprints; the export records its base's fingerprint, and applying it to another base warns."""
    root, export = base
    copy_of_base = tmp_path / "base.safetensors"
    copy_of_base.write_bytes(export.read_bytes())
    _adapter_run(tmp_path, copy_of_base, "moved", "finetune.method=lora", extra=("--stop-at", "2"))
    state = load_checkpoint(latest_checkpoint(tmp_path / "runs" / "moved"))
    assert state["base"] == {"path": str(copy_of_base), "fingerprint": fingerprint(export)}
    other = merge_checkpoint(export, tmp_path / "other.safetensors",  # the same shapes, other weights and metadata
                             [(str(save_adapter(tmp_path / "a.safetensors", _delta(export))), 1.0)])
    copy_of_base.write_bytes(other.read_bytes())
    with pytest.raises(ValueError, match=rf"its adapter was trained on {copy_of_base} \(hdm-fp1:.*\), but "
                                         rf"model.init_from {copy_of_base} is now another file \(hdm-fp1:.*\)"):
        _adapter_run(tmp_path, copy_of_base, "moved", "finetune.method=lora", extra=("--resume",))
    copy_of_base.write_bytes(export.read_bytes())  # the original back: the resume goes on
    (adapter,) = _adapter_run(tmp_path, copy_of_base, "moved", "finetune.method=lora", extra=("--resume",))
    meta = SafetensorsFile(adapter).metadata
    assert meta["hdm.base_fingerprint"] == fingerprint(export) and meta["hdm.base"] == "base.safetensors"
    comps = load_components(other)
    with pytest.warns(UserWarning, match="moved.safetensors was trained on base.safetensors .*not on this model"):
        apply_adapters(comps.model, [(adapter, 1.0)], base=fingerprint(other))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        apply_adapters(load_components(export).model, [(adapter, 1.0)], base=fingerprint(export))


def _delta(export: Path) -> dict[str, torch.Tensor]:
    """A small LoRA for the tiny base's first attention projection."""
    w = SafetensorsFile(export)["unet.model.backbone.enc_blocks.0.0.attn.qkv.weight"]
    g = torch.Generator().manual_seed(0)
    module = "diffusion_model.backbone.enc_blocks.0.0.attn.qkv"
    return {f"{module}.lora_up.weight": torch.randn(w.shape[0], 2, generator=g),
            f"{module}.lora_down.weight": torch.randn(2, w.shape[1], generator=g)}


def test_fingerprint_is_cheap_and_sees_what_changes(tmp_path):
    big = tmp_path / "big.safetensors"
    save_file({"w": torch.arange(3_000_000, dtype=torch.float32)}, str(big), metadata={"a": "1"})
    first = fingerprint(big)
    copy = tmp_path / "copy.safetensors"
    copy.write_bytes(big.read_bytes())
    assert fingerprint(copy) == first and first.startswith("hdm-fp1:")
    save_file({"w": torch.arange(3_000_000, dtype=torch.float32)}, str(big), metadata={"a": "2"})
    assert fingerprint(big) != first                      # the header (metadata) is covered
    save_file({"w": torch.arange(3_000_000, dtype=torch.float32).flip(0)}, str(big), metadata={"a": "1"})
    assert fingerprint(big) != first                      # and blocks across the tensor data
