"""The trainer end to end on CPU with the tiny recipe: DDP, stop/resume, SIGTERM, export, muP, TREAD."""

from __future__ import annotations

import csv
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from hdm_core import PRESETS, XUT
from hdm_core.checkpoint import load_components
from hdm_core.tread import keep_count, random_keep_mask
from training.checkpointing import latest_checkpoint, load_checkpoint
from training.encoders import build_text_encoder
from training.optim import WarmupCosine, fan_in, mup_param_groups
from training.runtime import mix_seed
from training.toy_data import make_toy_folder
from training.train import main, parse_args

REPO = Path(__file__).resolve().parents[1]
TINY = str(REPO / "training" / "recipes" / "tiny_cpu.toml")


def _train(tmp_path: Path, *overrides: str, config: str = TINY, extra: tuple[str, ...] = ()) -> list[Path]:
    data = tmp_path / "imgs"
    if not data.is_dir():
        make_toy_folder(data, n=24, corrupt=1)
    args = ["--config", config, *extra, f"data.path={data}", f"run.out_dir={tmp_path / 'runs'}", *overrides]
    return main(parse_args(args))


def _losses(run_dir: Path) -> list[float]:
    with (run_dir / "log.csv").open() as f:
        return [float(r["loss"]) for r in csv.DictReader(f)]


# ---------------------------------------------------------------------------------------------------
# Pieces
# ---------------------------------------------------------------------------------------------------

def test_mup_groups_are_lr_over_fan_in():
    with torch.device("meta"):
        model = XUT(PRESETS["xut-base"])
    groups = mup_param_groups(model, lr=0.5, weight_decay=0.02)
    # TRAINING.md §2: 254 tensors in 7 fan_in groups
    assert [(g["fan_in"], len(g["params"])) for g in groups] == [
        (1, 1), (16, 2), (32, 24), (1024, 178), (3072, 23), (4096, 6), (6144, 20)]
    lr_of = {id(p): g["lr"] for g in groups for p in g["params"]}
    named = dict(model.named_parameters())
    assert lr_of[id(named["backbone.enc_blocks.0.0.attn.qkv.weight"])] == 0.5 / 1024
    assert lr_of[id(named["backbone.enc_blocks.0.0.mlp.w3.weight"])] == 0.5 / 3072
    assert lr_of[id(named["in_patch.proj.weight"])] == 0.5 / 16  # conv: C_in·k·k
    assert lr_of[id(named["addon_info_embs_proj.0.weight"])] == 0.5  # Linear 1 → 1024
    assert lr_of[id(named["backbone.enc_blocks.0.0.mlp.w12.bias"])] == 0.5 / 6144  # vectors: numel
    assert all(g["lr"] == 0.5 / fan_in(p) for g in groups for p in g["params"])
    assert all(g["weight_decay"] == 0.02 for g in groups)


def test_warmup_cosine_schedule():
    f = WarmupCosine(warmup=1000, total=5000, floor=0.01)
    assert f(0) == 0 and f(500) == 0.5 and f(1000) == 1.0
    values = [f(s) for s in range(1000, 5001)]
    assert all(a >= b for a, b in zip(values, values[1:]))
    assert values[-1] == pytest.approx(0.01, abs=1e-6)


def test_mix_seed_keeps_the_data_order_and_noise_seeds():
    """The seeds a run (and a resume) depends on: (seed, epoch) for the data order, (seed, rank, step, micro) for
    the noise; any change here changes what a resumed run reads and draws."""
    p = 1_000_003
    assert mix_seed(20090220, 3) == 20090220 * p + 3
    assert mix_seed(20090220, 1, 500, 2) == (((20090220 * p + 1) * p + 500) * p + 2) % 2**63
    assert mix_seed(0, 0, 0, 1) != mix_seed(0, 0, 1, 0)


@pytest.mark.parametrize("n,rate", [(256, 0.5), (1024, 0.5), (100, 0.3), (64, 0.0), (7, 0.9)])
def test_tread_keep_counts(n, rate):
    assert keep_count(n, rate) == n - math.floor(n * rate)
    mask = random_keep_mask(3, n, rate, generator=torch.Generator().manual_seed(0))
    assert mask.sum(1).tolist() == [keep_count(n, rate)] * 3


def test_training_forward_routes_the_recipe_rate():
    """With tread_rate 0.5 the routed backbone sees K image tokens + all text tokens; 0 routes nothing."""
    torch.manual_seed(0)
    model = XUT(PRESETS["xut-tiny"]).train()
    seen = []
    model.backbone.enc_blocks[0][0].register_forward_hook(lambda m, a, o: seen.append(a[0].shape[1]))
    x, ctx = torch.randn(2, 4, 16, 16), torch.randn(2, 5, 48)
    for rate in (0.5, 0.0):
        model(x, torch.rand(2), ctx, tread_rate=rate or None, generator=torch.Generator().manual_seed(0))
    n = (16 // 2) ** 2
    assert seen == [keep_count(n, 0.5) + 5, n + 5]


# ---------------------------------------------------------------------------------------------------
# End to end
# ---------------------------------------------------------------------------------------------------

def test_stop_resume_matches_uninterrupted_run_and_export_loads(tmp_path):
    steps = ["train.max_steps=8", "run.save_every=4", "run.log_every=2"]
    (full_export,) = _train(tmp_path / "a", *steps)
    _train(tmp_path / "b", *steps, extra=("--stop-at", "3"))  # stops after step 3, checkpoint at 3
    run_b = tmp_path / "b" / "runs" / "tiny_cpu"
    assert latest_checkpoint(run_b).name == "step_00000003.pt" and not (run_b / "done.json").exists()
    with pytest.raises(FileExistsError, match="--resume"):
        _train(tmp_path / "b", *steps)
    _train(tmp_path / "b", *steps, extra=("--resume",))

    a = load_checkpoint(latest_checkpoint(tmp_path / "a" / "runs" / "tiny_cpu"))
    b = load_checkpoint(latest_checkpoint(run_b))
    assert a["step"] == b["step"] == 8 and a["data"] == b["data"]
    for key in a["model"]:
        torch.testing.assert_close(a["model"][key], b["model"][key], rtol=1e-5, atol=1e-6)
    assert _losses(tmp_path / "a" / "runs" / "tiny_cpu")[-1] == pytest.approx(_losses(run_b)[-1], rel=1e-4)
    with (run_b / "log.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert int(rows[-1]["skipped"]) >= 1  # the corrupt image was skipped and counted, not fatal
    assert (run_b / "loss.png").is_file()

    # export → hdm_core: same weights, same text encoder, pixel-space "VAE"
    comp = load_components(full_export)
    for key, value in comp.model.state_dict().items():
        torch.testing.assert_close(value, a["model"][key])
    te = build_text_encoder("random:tiny", torch.float32, torch.device("cpu"))
    torch.testing.assert_close(comp.text_encoder.encode_padded(["red, square"], 16),
                               te.encode_padded(["red, square"], 16))
    assert comp.vae.downscale_factor == 1 and comp.config.input_dim == 3


def test_progressive_chain_and_sample_grid(tmp_path):
    second = tmp_path / "second.toml"
    second.write_text(Path(TINY).read_text().replace('name = "tiny_cpu"', 'name = "tiny_stage2"'))
    exports = _train(tmp_path, "train.max_steps=2", "run.sample_every=2", "run.log_every=1",
                     extra=("--config", str(second)))
    assert [p.name for p in exports] == ["tiny_cpu.safetensors", "tiny_stage2.safetensors"]
    stage2 = load_checkpoint(latest_checkpoint(tmp_path / "runs" / "tiny_stage2"))
    assert stage2["recipe"]["model"]["init_from"] == str(exports[0])
    assert stage2["optimizer"]["state"][0]["step"].item() == 2  # fresh optimizer: only this stage's steps
    assert (tmp_path / "runs" / "tiny_stage2" / "samples" / "step_00000002.png").is_file()
    assert _train(tmp_path, "train.max_steps=2", extra=("--config", str(second), "--resume")) == exports


def _env() -> dict:
    env = dict(os.environ, PYTHONPATH=str(REPO), OMP_NUM_THREADS="1")
    env.pop("RANK", None)
    return env


def test_two_process_gloo_ddp_loss_goes_down(tmp_path):
    data = make_toy_folder(tmp_path / "imgs", n=32, corrupt=1)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           "-m", "training.train", "--config", TINY, f"data.path={data}", f"run.out_dir={tmp_path / 'runs'}",
           "train.max_steps=30", "train.grad_accum=2", "run.log_every=3", "run.save_every=30"]
    proc = subprocess.run(cmd, cwd=REPO, env=_env(), capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stderr[-3000:]
    run = tmp_path / "runs" / "tiny_cpu"
    losses = _losses(run)
    assert len(losses) == 10 and sum(losses[-3:]) < 0.8 * sum(losses[:3]), losses
    ckpt = load_checkpoint(latest_checkpoint(run))
    assert ckpt["world_size"] == 2 and len(ckpt["data"]) == 2
    assert (run / "export" / "tiny_cpu.safetensors").is_file()


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_stop_saves_a_checkpoint_and_exits_128_plus_the_signal(tmp_path, signum):
    """SIGTERM (a scheduler) exits 143 and Ctrl-C 130, after saving: never 0, so `train && next` does not go on."""
    data = make_toy_folder(tmp_path / "imgs", n=16, corrupt=0)
    run = tmp_path / "runs" / "tiny_cpu"
    cmd = [sys.executable, "-m", "training.train", "--config", TINY, f"data.path={data}",
           f"run.out_dir={tmp_path / 'runs'}", "train.max_steps=100000", "run.log_every=1", "run.save_every=100000"]
    proc = subprocess.Popen(cmd, cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 60
    while not ((run / "log.csv").is_file() and len((run / "log.csv").read_text().splitlines()) > 2):
        assert proc.poll() is None and time.time() < deadline, proc.communicate()[1][-2000:]
        time.sleep(0.2)
    proc.send_signal(signum)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 128 + signum, err[-2000:]
    ckpt = latest_checkpoint(run)
    assert ckpt is not None and 0 < load_checkpoint(ckpt)["step"] < 100000 and "--resume" in out + err
    assert not (run / "done.json").exists()


def test_sigterm_while_starting_stops_at_once_and_leaves_no_run_folder(tmp_path, monkeypatch, capsys):
    """A stop before the training steps (here: while the stage is built) exits 143 with one line, and the run
    folder the start made is gone."""
    import training.stage
    from training.train import cli_main

    def killed(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGTERM)
        raise AssertionError("the SIGTERM handler should have stopped the start")
    monkeypatch.setattr(training.stage, "build_stage", killed)
    data, before = make_toy_folder(tmp_path / "imgs", n=4, corrupt=0), signal.getsignal(signal.SIGTERM)
    code = cli_main(["--config", TINY, f"data.path={data}", f"run.out_dir={tmp_path / 'runs'}"])
    assert code == 128 + signal.SIGTERM
    assert capsys.readouterr().err.strip().startswith("stopped at once by SIGTERM")
    assert not (tmp_path / "runs").exists()
    assert signal.getsignal(signal.SIGTERM) is before  # the previous handler is back


def test_frozen_encoders_read_from_a_released_single_file(tiny_parts, tmp_path):
    """The trainer's encoders read from a file written by hand in the released layout (literal key prefixes, stats
    that are not the EQ-VAE defaults) equal reference modules built straight from the known state dicts."""
    from safetensors.torch import save_file

    from hdm_core.text_encoder import QWEN3_PRESETS, build_qwen3, load_tokenizer, tokenize
    from hdm_core.vae import VAE_PRESETS, build_autoencoder
    from training.encoders import build_text_encoder, build_vae

    mean, std = torch.tensor([0.5, -0.25, 1.0, 2.0]), torch.tensor([2.0, 3.0, 0.5, 4.0])
    tensors = {**{"unet.model." + k: v for k, v in tiny_parts["unet"].items()},
               **{"te.text_models.0." + k: v for k, v in tiny_parts["te"].items()},
               **{"vae." + k: v for k, v in tiny_parts["vae"].items()},
               "vae_mean": mean.reshape(1, 4, 1, 1), "vae_std": std.reshape(1, 4, 1, 1)}
    path = tmp_path / "released.safetensors"
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))

    cpu = torch.device("cpu")
    te = build_text_encoder(str(path), torch.float32, cpu)
    vae = build_vae(str(path), torch.float32, cpu)
    assert not any(p.requires_grad for p in te.parameters()) and not any(p.requires_grad for p in vae.parameters())

    ref_te = build_qwen3(QWEN3_PRESETS["tiny"])
    ref_te.load_state_dict(tiny_parts["te"])
    ids = torch.tensor([tokenize(load_tokenizer(), "a red circle")])
    expected = ref_te(input_ids=ids, attention_mask=torch.ones_like(ids)).last_hidden_state
    torch.testing.assert_close(te.encode("a red circle")[0], expected)

    ref_vae = build_autoencoder(VAE_PRESETS["tiny"]).eval()
    ref_vae.load_state_dict(tiny_parts["vae"])
    images = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    with torch.no_grad():
        z = ref_vae.encode(images).latent_dist.mode()
    torch.testing.assert_close(vae.encode(images, sample=False), (z - mean.view(1, 4, 1, 1)) / std.view(1, 4, 1, 1))
