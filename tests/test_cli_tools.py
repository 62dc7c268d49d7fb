"""What every command-line tool does the same way (hdm_core/cli.py): one `error:` line and exit code 2 for every user
error, usage errors included; one CPU thread unless OMP_NUM_THREADS says otherwise; PNGs that record the model and
the adapters with their strengths and hashes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from hdm_core.adapters import save_adapter
from hdm_core.cli import PICKLE_SUFFIXES, set_cpu_threads
from hdm_core.convert_lycoris import main as convert_main
from hdm_core.generate import main as generate_main
from hdm_core.layout import LORA_UNET_PREFIX
from hdm_core.merge import main as merge_main
from training.train import cli_main as train_main

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "training" / "recipes" / "tiny_cpu.toml")
LINEAR = "backbone.enc_blocks.0.0.attn.qkv"


def _adapter(folder: Path, seed: int = 0) -> Path:
    g = torch.Generator().manual_seed(seed)
    return save_adapter(folder / f"style{seed}.safetensors",
                        {f"{LORA_UNET_PREFIX}{LINEAR}.lora_up.weight": torch.randn(192, 2, generator=g) * 0.1,
                         f"{LORA_UNET_PREFIX}{LINEAR}.lora_down.weight": torch.randn(2, 64, generator=g) * 0.1})


def _cases(tmp: Path, ckpt: Path) -> list[tuple]:
    """(tool, argv, what the one line must say): a user error for each tool, and a usage error for each."""
    out = str(tmp / "out.safetensors")
    return [
        (generate_main, ["--checkpoint", str(tmp / "absent.safetensors"), "--prompt", "x", "--out", str(tmp)],
         "checkpoint not found"),
        (generate_main, ["--prompt", "x", "--steps", "many"], "argument --steps: invalid int value: 'many'"),
        (merge_main, [str(ckpt), out, "--lora", str(tmp / "gone.safetensors")], "--lora"),
        (merge_main, [str(ckpt), out], "the following arguments are required: --lora"),
        (convert_main, [str(tmp / "net.pt"), out], "net.pt is a pickle file"),
        (convert_main, [str(tmp / "net.pt")], "the following arguments are required: OUT"),
        (train_main, ["--config", TINY, "train.batch_size=0"], "train.batch_size 0"),
        (train_main, ["--config", TINY, "--device", "tpu"], "argument --device: invalid choice: 'tpu'"),
    ]


def test_every_tool_reports_a_user_error_as_one_line_and_exit_2(tiny_checkpoint, tmp_path, capsys):
    torch.save({"lycoris_x.lokr_w1": torch.zeros(2, 2)}, tmp_path / "net.pt")
    for tool, argv, expected in _cases(tmp_path, tiny_checkpoint):
        try:
            code = tool(argv)
        except SystemExit as usage:  # argparse exits from parse_args
            code = usage.code
        err = capsys.readouterr().err
        assert code == 2 and err.startswith("error: ") and err.count("\n") == 1 and expected in err, (argv, err)


def test_every_tool_runs_one_cpu_thread_unless_told(tmp_path, monkeypatch, capsys):
    for env, expected in ((None, 1), ("3", 3)):
        if env is None:
            monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        else:
            monkeypatch.setenv("OMP_NUM_THREADS", env)
        for tool, argv in ((merge_main, [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors"), "--lora",
                                         str(tmp_path / "c.safetensors")]),
                           (convert_main, [str(tmp_path / "a.pt"), str(tmp_path / "b.safetensors")]),
                           (generate_main, ["--checkpoint", str(tmp_path / "a.safetensors"), "--prompt", "x",
                                            "--out", str(tmp_path)])):
            torch.set_num_threads(2)
            assert tool(argv) == 2 and torch.get_num_threads() == expected, (tool, env)
    assert set_cpu_threads() == 3 and PICKLE_SUFFIXES == (".ckpt", ".pt", ".pth", ".bin")
    capsys.readouterr()


def test_pngs_record_the_model_and_the_adapters(tiny_checkpoint, tmp_path):
    a, b = _adapter(tmp_path, 0), _adapter(tmp_path, 1)
    out = tmp_path / "png"
    assert generate_main(["--checkpoint", str(tiny_checkpoint), "--prompt", "x", "--width", "32", "--height", "32",
                          "--steps", "1", "--out", str(out), "--lora", f"{a}:0.8", "--lora", f"{b}:-0.5"]) == 0
    (png,) = out.glob("*.png")
    sha = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in (tiny_checkpoint, a, b)}
    text = Image.open(png).text
    assert text["parameters"].endswith(
        f"Model hash: {sha[tiny_checkpoint.name][:10]}, Model: tiny_hdm, "
        f'Lora hashes: "style0: {sha[a.name][:12]}, style1: {sha[b.name][:12]}", '
        f'Lora strengths: "style0: 0.8, style1: -0.5"')
    info = json.loads(text["hdm"])
    assert info["model"] == {"file": tiny_checkpoint.name, "sha256": sha[tiny_checkpoint.name]}
    assert info["loras"] == [{"file": a.name, "sha256": sha[a.name], "strength": 0.8},
                             {"file": b.name, "sha256": sha[b.name], "strength": -0.5}]
    plain = tmp_path / "plain"
    assert generate_main(["--checkpoint", str(tiny_checkpoint), "--prompt", "x", "--width", "32", "--height", "32",
                          "--steps", "1", "--out", str(plain)]) == 0
    (png,) = plain.glob("*.png")
    assert "Lora" not in Image.open(png).text["parameters"] and json.loads(Image.open(png).text["hdm"])["loras"] == []


@pytest.mark.parametrize("module", ["hdm_core.generate", "hdm_core.merge", "hdm_core.convert_lycoris",
                                    "training.train"])
def test_help_runs(module, capsys):
    import importlib

    with pytest.raises(SystemExit) as done:
        importlib.import_module(module).parse_args(["--help"])
    assert done.value.code == 0 and "usage: python -m" in capsys.readouterr().out
