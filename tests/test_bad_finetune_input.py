"""Bad input to fine-tuning, datasets, adapters, merge and the converter, as a careless or unlucky user gives it: the
battery's BAD cases (bounded memory, checked base identity) and one test per group of its POOR cases (raw library
errors, wrong context, late failures, things ignored without a word, debris, presentation)."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from full_disk import disk_full_after
from safetensors.torch import save_file

import training.datasets
import training.stage as stage_module
from hdm_core import PRESETS, XUT
from hdm_core.adapters import adapters_applied, apply_adapters, save_adapter
from hdm_core.checkpoint import CONFIG_METADATA_KEY, load_components, load_xut, save_single_file
from hdm_core.convert_lycoris import main as convert_main
from hdm_core.generate import main as generate_main
from hdm_core.layout import LORA_UNET_PREFIX
from hdm_core.merge import main as merge_main
from hdm_core.pipeline import GenerationParams, generate
from hdm_core.weights import CheckpointError, check_writable
from training.datasets import caption_report
from training.encoders import build_text_encoder, build_vae
from training.finetune import FinetuneSection, attach, check_recipe
from training.recipe import load_recipe
from training.toy_data import make_dataset, make_toy_folder
from training.train import cli_main, main, parse_args

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "training" / "recipes" / "tiny_cpu.toml")
LINEAR = "backbone.enc_blocks.0.0.attn.qkv"  # [192, 64] in xut-tiny


def _lora(up: torch.Tensor, down: torch.Tensor, module: str = LINEAR) -> dict[str, torch.Tensor]:
    return {f"{LORA_UNET_PREFIX}{module}.lora_up.weight": up, f"{LORA_UNET_PREFIX}{module}.lora_down.weight": down}


def _one_error_line(capsys, *expected: str) -> str:
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1, err
    assert all(e in err for e in expected), (expected, err)
    return err


@pytest.fixture(scope="module")
def xut(tiny_parts) -> XUT:
    m = XUT(PRESETS["xut-tiny"]).eval()
    m.load_state_dict(tiny_parts["unet"])
    return m


# ---------------------------------------------------------------------------------------------------
# BAD: repeat counts without a bound (run as the battery ran them: a subprocess under an address-space cap)
# ---------------------------------------------------------------------------------------------------

REFUSED = textwrap.dedent("""
    import resource, sys
    from pathlib import Path
    from training.recipe import recipe_from_dict
    from training.sources import build_data
    from training.toy_data import make_dataset

    root = Path(sys.argv[1])
    vm = int(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmSize"))) * 1024
    resource.setrlimit(resource.RLIMIT_AS, (vm + 1_000_000_000, resource.RLIM_INFINITY))
    for folder, repeats in (("20240101_photos", None), ("1000000000_big", None), ("2024_photos", None),
                            ("plain", 1e9)):
        make_dataset(root / folder / folder, n=8, seed=0)
        data = {"path": str(root / folder)} if repeats is None else \
            {"datasets": [{"path": str(root / folder), "repeats": repeats}]}
        try:
            build_data(recipe_from_dict({"data": data, "train": {"batch_size": 4}}), 1, 0, 1, None)
            print("ACCEPTED", folder)
        except ValueError as err:
            print(str(err).replace("\\n", " "))
""")


@pytest.mark.skipif(not Path("/proc/self/status").is_file(), reason="needs /proc to set the address-space cap")
def test_implausible_repeat_counts_are_refused_in_bounded_memory(tmp_path):
    done = subprocess.run([sys.executable, "-c", REFUSED, str(tmp_path)], cwd=REPO, capture_output=True, text=True,
                          timeout=120, env={"PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"})
    assert done.returncode == 0, done.stderr[-2000:]
    dated, huge, year, repeats = done.stdout.strip().splitlines()
    fix = "or set data.folder_repeats = false to read folder names as plain names"
    assert "20240101_photos: its name asks kohya-style for 20,240,101 repeats" in dated and "a year or a date" in dated
    assert "rename it (e.g. 10_photos)" in dated and fix in dated
    assert "1000000000_big" in huge and "is more than 10,000" in huge and fix in huge
    assert "2024_photos" in year and "looks like a year" in year
    assert "data.datasets[0].repeats 1000000000.0 must be a finite number >= 0 (default 1.0) and at most 10,000" \
        in repeats


# ---------------------------------------------------------------------------------------------------
# Raw library errors become errors that name the file and the fix
# ---------------------------------------------------------------------------------------------------

def test_raw_library_errors_are_named(xut, tiny_checkpoint, tmp_path, capsys):
    # factors that disagree in rank: the API and the CLI say so, not torch's matmul
    bad_rank = _lora(torch.zeros(192, 4), torch.zeros(8, 64))
    with pytest.raises(CheckpointError, match=r"lora_up.weight \[192, 4\] and lora_down.weight \[8, 64\] disagree"):
        apply_adapters(xut, [(bad_rank, 1.0)])
    path = save_adapter(tmp_path / "rank.safetensors", bad_rank)
    assert merge_main([str(tiny_checkpoint), str(tmp_path / "out.safetensors"), "--lora", str(path)]) == 2
    _one_error_line(capsys, "rank.safetensors", "disagree in rank")
    # a full disk while merging: safetensors' own error becomes one line naming the file, nothing left behind
    good = save_adapter(tmp_path / "good.safetensors", _lora(torch.zeros(192, 2), torch.zeros(2, 64)))
    with disk_full_after(4096):
        code = merge_main([str(tiny_checkpoint), str(tmp_path / "full.safetensors"), "--lora", str(good)])
    assert code == 2 and not list(tmp_path.glob("full.safetensors*"))
    _one_error_line(capsys, "could not write", "full.safetensors")
    # a pickle named .safetensors given to the converter
    torch.save({"lycoris_x.lokr_w1": torch.zeros(2, 2)}, tmp_path / "net.safetensors")
    assert convert_main([str(tmp_path / "net.safetensors"), str(tmp_path / "c.safetensors"), "--allow-pickle"]) == 2
    _one_error_line(capsys, "net.safetensors is a torch pickle named .safetensors: rename it .pt")
    # torch's "Weights only load failed", with the file's name (generate --allow-pickle, the trainer's init_from)
    torch.save({"layer": torch.nn.Linear(2, 2)}, tmp_path / "model.pt")
    assert generate_main(["--checkpoint", str(tmp_path / "model.pt"), "--allow-pickle", "--prompt", "x", "--width",
                          "32", "--height", "32", "--out", str(tmp_path / "png")]) == 2
    _one_error_line(capsys, "model.pt holds objects other than tensors")
    with pytest.raises(ValueError, match="model.init_from: .*model.pt is not a training checkpoint: it holds objects"):
        main(parse_args(["--config", TINY, f"model.init_from={tmp_path / 'model.pt'}", f"data.path={tmp_path}",
                         f"run.out_dir={tmp_path / 'runs'}"]))
    # a rank asking for more than the weights it adapts (it once asked for 165 GB), refused before allocating
    with pytest.raises(ValueError, match="finetune.dim 100000 is more than the smaller side of every layer"):
        attach(FinetuneSection(method="lora", dim=100_000), XUT(PRESETS["xut-tiny"], device="meta"), None)
    # a value that is not a tensor
    with pytest.raises(CheckpointError, match="1 values are not tensors, e.g. 'note' is a str"):
        apply_adapters(xut, [({**good_sd(), "note": "trained on cats"}, 1.0)])
    # sizes negative or too large: random encoders and a checkpoint's config metadata
    with pytest.raises(ValueError, match="'random:tiny,hidden_size=-4' cannot be built"):
        build_text_encoder("random:tiny,hidden_size=-4", torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match=r"asks for [\d,]+ parameters .* lower its sizes"):
        build_text_encoder("random:tiny,hidden_size=1000000", torch.float32, torch.device("cpu"))
    with pytest.raises(ValueError, match="'random:tiny,latent_channels=-1' cannot be built"):
        build_vae("random:tiny,latent_channels=-1", torch.float32, torch.device("cpu"))
    sd = {f"unet.model.{k}": v for k, v in XUT(PRESETS["xut-tiny"]).state_dict().items()}
    for bad, message in ((-64, r"dim -64 must be a whole number in \[1, 65536\]"),
                         (2**70, "dim 1180591620717411303424 must be")):
        save_file(sd, str(tmp_path / "meta.safetensors"),
                  metadata={CONFIG_METADATA_KEY: json.dumps(PRESETS["xut-tiny"].to_dict() | {"dim": bad})})
        with pytest.raises(CheckpointError, match=message):
            load_xut(tmp_path / "meta.safetensors")


def good_sd() -> dict[str, torch.Tensor]:
    return _lora(torch.zeros(192, 2), torch.zeros(2, 64))


# ---------------------------------------------------------------------------------------------------
# Wrong context: an adapter given as a model, the converter without --base, a strength that overflows
# ---------------------------------------------------------------------------------------------------

def test_errors_name_the_right_context(tiny_checkpoint, tiny_parts, tmp_path, capsys):
    adapter = save_adapter(tmp_path / "style.safetensors", good_sd())
    with pytest.raises(CheckpointError, match="looks like an adapter .*not a model: apply it to its base model with "
                                              "--lora FILE:STRENGTH"):
        load_components(adapter)
    assert merge_main([str(adapter), str(tmp_path / "m.safetensors"), "--lora", str(adapter)]) == 2
    _one_error_line(capsys, "style.safetensors is not an HDM/XUT checkpoint: it looks like an adapter")
    # the converter names the file (not "adapter:") and suggests --base when its preset does not fit
    torch.save({"lycoris_backbone_enc_blocks_0_0_attn_qkv.lora_up.weight": torch.zeros(3072, 2),
                "lycoris_backbone_enc_blocks_0_0_attn_qkv.lora_down.weight": torch.zeros(2, 1024)}, tmp_path / "b.pt")
    assert convert_main([str(tmp_path / "b.pt"), str(tmp_path / "c.safetensors"), "--allow-pickle", "--preset",
                         "xut-tiny"]) == 2
    _one_error_line(capsys, "b.pt: diffusion_model.backbone.enc_blocks.0.0.attn.qkv.weight", "does not fit",
                    "pass the checkpoint it was trained on as --base")
    # a strength of 1e30 is refused up front (it used to reach sampling and be blamed on the dtype)
    comps = load_components(tiny_checkpoint)
    with pytest.raises(ValueError, match=r"strength must be a finite number in \[-100, 100\], got 1e\+30"):
        generate(comps, GenerationParams("x", width=32, height=32, steps=1), loras=[(good_sd(), 1e30)])
    assert generate_main(["--checkpoint", str(tiny_checkpoint), "--prompt", "x", "--lora", f"{adapter}:1e30",
                          "--out", str(tmp_path / "png")]) == 2
    _one_error_line(capsys, "style.safetensors: the strength must be a finite number in [-100, 100]")


# ---------------------------------------------------------------------------------------------------
# Late failures: the cheap checks first, values checked before anything changes or is written
# ---------------------------------------------------------------------------------------------------

def test_failures_come_before_the_expensive_work(xut, tiny_checkpoint, tiny_parts, tmp_path, monkeypatch, capsys):
    data = make_toy_folder(tmp_path / "imgs", n=8, corrupt=0)
    built = []
    real = stage_module.build_encoder
    monkeypatch.setattr(stage_module, "build_encoder", lambda key, *a: built.append(key) or real(key, *a))
    with pytest.raises(FileNotFoundError, match="model.init_from .*absent.safetensors not found"):
        main(parse_args(["--config", TINY, f"data.path={data}", f"run.out_dir={tmp_path / 'runs'}",
                         "model.init_from=" + str(tmp_path / "absent.safetensors")]))
    assert built == [] and not (tmp_path / "runs").exists()  # no encoder loaded, no run folder left
    make_dataset(data / "2024_photos", n=2)
    with pytest.raises(ValueError, match="2024_photos: its name asks kohya-style for 2,024 repeats"):
        main(parse_args(["--config", TINY, f"data.path={data}", f"run.out_dir={tmp_path / 'runs'}"]))
    assert built == ["vae"] and not (tmp_path / "runs").exists()  # the data before the text encoder
    # huge finite adapter values: refused by merge and apply_adapters, the model unchanged
    huge = _lora(torch.full((192, 2), 1e3), torch.full((2, 64), 1e3))
    before = xut.state_dict()[LINEAR + ".weight"].clone()
    with pytest.raises(CheckpointError, match=r"adapter at strength 1 make this weight reach 2e\+06, beyond ±65504"):
        apply_adapters(xut, [(good_sd(), 1.0), (huge, 1.0)])
    assert torch.equal(xut.state_dict()[LINEAR + ".weight"], before)
    # adapters_applied writes weight after weight: the one written before the huge one is restored
    first = _lora(torch.ones(192, 2), torch.ones(2, 64), module="prev_tread_trns.blocks.0.attn.qkv")
    every = {k: v.clone() for k, v in xut.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"make this weight reach 2e\+06"):
        with adapters_applied(xut, [(first, 1.0), (huge, 1.0)]):
            raise AssertionError("the with block must not run")
    assert all(torch.equal(xut.state_dict()[k], v) for k, v in every.items())
    path = save_adapter(tmp_path / "huge.safetensors", huge)
    assert merge_main([str(tiny_checkpoint), str(tmp_path / "m.safetensors"), "--lora", str(path)]) == 2
    _one_error_line(capsys, "huge.safetensors at strength 1 make this weight reach")
    # merge checks its base for NaN
    unet = dict(tiny_parts["unet"], **{"ctx_proj.weight": torch.full_like(tiny_parts["unet"]["ctx_proj.weight"],
                                                                          float("nan"))})
    save_single_file(tmp_path / "nan.safetensors", unet, tiny_parts["config"], te_sd=tiny_parts["te"])
    good = save_adapter(tmp_path / "good.safetensors", good_sd())
    assert merge_main([str(tmp_path / "nan.safetensors"), str(tmp_path / "m.safetensors"), "--lora", str(good)]) == 2
    _one_error_line(capsys, "nan.safetensors: 1 tensors hold NaN or Inf values, e.g. ['unet.model.ctx_proj.weight']")
    assert not (tmp_path / "m.safetensors").exists()


# ---------------------------------------------------------------------------------------------------
# Ignored without a word: now an error, a warning or a start-up line
# ---------------------------------------------------------------------------------------------------

def test_nothing_is_ignored_without_a_word(xut, tmp_path, capsys, monkeypatch):
    save_file({}, str(tmp_path / "empty.safetensors"))
    with pytest.raises(CheckpointError, match="empty.safetensors holds no tensors"):
        apply_adapters(xut, [(tmp_path / "empty.safetensors", 1.0)])
    ints = {k: v.to(torch.int8) for k, v in good_sd().items()}
    with pytest.raises(CheckpointError, match="2 tensors are stored as torch.int8"):
        apply_adapters(xut, [(ints, 1.0)])
    wrong = _lora(torch.zeros(64, 2), torch.zeros(2, 64))  # [64, 64] for a [192, 64] weight
    with pytest.raises(CheckpointError, match=r"does not fit the weight \[192, 64\]"):
        apply_adapters(xut, [(wrong, 0.0)])  # checked at strength 0 too, as the docs promise
    adapters = attach(FinetuneSection(method="lokr", factor=4, modules=["attention", "embed"]),
                      XUT(PRESETS["xut-tiny"]), None)
    assert adapters.factors_used == {"diffusion_model.in_patch.proj": [4, 1]}  # recorded, not silently changed
    with pytest.raises(ValueError, match=r"finetune.dim, finetune.modules set, but finetune.method is 'full'"):
        check_recipe(FinetuneSection(dim=8, modules=["mlp"]), "", 0.0, False, "")
    root = make_dataset(tmp_path / "set", n=6)
    (root / "00000.txt").unlink()
    (root / "00001.txt").write_bytes(b"\x89PNG\x00\xff binary")
    (root / "00002.txt").write_text("a very long caption " * 10)
    line = caption_report(sorted(root.glob("*.png")), max_length=8)
    assert line == ("captions of 6 images: 1 have none (trained with an empty caption, as unconditional samples); 1 "
                    "are not text (a NUL byte or not UTF-8; read with replacement characters); 1 are longer than "
                    "model.max_length = 8 tokens and are cut to it")
    monkeypatch.setattr(training.datasets, "CAPTION_CHECKS", 3)  # a huge folder: an even sample is read
    assert caption_report(sorted(root.glob("*.png")), max_length=8) == (
        "captions of 3 of 6 images (an even sample): 1 have none (trained with an empty caption, as unconditional "
        "samples); 1 are longer than model.max_length = 8 tokens and are cut to it")


# ---------------------------------------------------------------------------------------------------
# Debris and presentation
# ---------------------------------------------------------------------------------------------------

def test_a_full_disk_leaves_no_write_probe(tmp_path):
    with disk_full_after(1), pytest.raises(OSError, match="cannot write to .*out .*choose another"):
        check_writable(tmp_path / "out", "choose another --out")
    assert list((tmp_path / "out").iterdir()) == []


def test_trainer_errors_are_one_line_and_name_where_a_key_came_from(tmp_path, capsys):
    data = make_toy_folder(tmp_path / "imgs", n=8, corrupt=0)
    common = ["--config", TINY, f"data.path={data}", f"run.out_dir={tmp_path / 'runs'}"]
    assert cli_main([*common, "optim.lerning_rate=0.1"]) == 2
    _one_error_line(capsys, "unknown key(s) ['lerning_rate'] in [optim] of the command-line overrides")
    with pytest.raises(SystemExit) as usage:
        cli_main([*common, "--no-such-flag"])
    assert usage.value.code == 2
    _one_error_line(capsys, "unrecognized arguments: --no-such-flag", "see python -m training.train --help")
    assert cli_main([*common, "finetune.method=lora", "model.init_from=/nowhere.safetensors"]) == 2
    _one_error_line(capsys, "model.init_from /nowhere.safetensors not found")
    assert not (tmp_path / "runs").exists()
    args = parse_args(["--config", TINY, "data.path=x", "--resume-from", "c.pt", "optim.lr=0.1", "--stop-at", "3",
                       "train.seed=2"])  # overrides before, between and after the options
    assert (args.resume, args.stop_at, args.overrides) == ("c.pt", 3, ["data.path=x", "optim.lr=0.1", "train.seed=2"])
    bad = tmp_path / "bad.toml"
    bad.write_text(Path(TINY).read_text().replace("[optim]", "[optim]\nlerning_rate = 0.1"))
    with pytest.raises(ValueError, match=f"unknown key.*'lerning_rate'.* of {bad}"):
        load_recipe(bad, ["optim.lr=0.2"])
