"""bench/gpu_check.py sections that measure speed: sampling (eager, torch.compile, CUDA graphs), the VAE, end to end,
and training throughput. Each appends rows to rec["rows"]; the report groups rows by their "table"."""

from __future__ import annotations

import copy
import functools
import time
from collections.abc import Callable
from typing import Any

import torch
from bench_train import bench_variant, make_batch
from gpu_check_common import Run, graph_breaks, median_time, peak_gib, reset_peak
from gpu_check_correct import DTYPES, PROMPT, xut

from hdm_core import PRESETS
from hdm_core.canvas import canvas_position_map
from hdm_core.flops import xut_flops
from hdm_core.pipeline import make_denoiser
from hdm_core.sampling import flow_sigmas, sample_euler
from hdm_core.tread import keep_count


def encoders(run: Run) -> tuple[Any, Any]:
    """The run's random text encoder and VAE (real shapes on the device, bf16; tiny fp32 in the smoke run)."""
    if "encoders" not in run.cache:
        from training.encoders import build_text_encoder, build_vae

        dtype = torch.bfloat16 if run.cuda else torch.float32
        run.cache["encoders"] = (build_text_encoder(run.te_spec, dtype, run.device),
                                 build_vae(run.vae_spec, dtype, run.device))
    return run.cache["encoders"]


def remember_best(run: Run, key: str, seconds: float, payload: Any) -> None:
    """Keep the fastest variant measured so far under `key` (end_to_end uses the fastest backbone and VAE)."""
    if key not in run.cache or seconds < run.cache[key][0]:
        run.cache[key] = (seconds, payload)


# ---------------------------------------------------------------------------------------------------
# Sampling: the backbone alone, 32 Euler steps with CFG
# ---------------------------------------------------------------------------------------------------

def sampler(run: Run, model: Any, batch_cfg: bool | None, cond: torch.Tensor,
            uncond: torch.Tensor) -> Callable[[], torch.Tensor]:
    cfg = PRESETS[run.preset]
    lat = run.res // 8
    denoise = make_denoiser(model, cond, uncond, 3.0, pos_map=canvas_position_map(lat, lat).to(run.device),
                            aspect=torch.zeros(1, device=run.device), batch_cfg=batch_cfg)
    sigmas = flow_sigmas(run.steps).to(run.device)
    noise = torch.randn(1, cfg.input_dim, lat, lat, generator=torch.Generator().manual_seed(0)).to(run.device)
    return lambda: sample_euler(denoise, noise, sigmas)


def image_flops(run: Run, tokens: tuple[int, int], batched: bool) -> float:
    """XUT FLOPs of one image: `steps` CFG steps, the batched form padding both contexts to the longer one."""
    cfg = PRESETS[run.preset]
    n = (run.res // 8 // cfg.patch_size) ** 2
    per_step = 2 * xut_flops(cfg, n, max(tokens)) if batched else sum(xut_flops(cfg, n, t) for t in tokens)
    return run.steps * per_step


def sampler_row(run: Run, mode: str, precision: str, model: Any, batched: bool, tokens: tuple[int, int]) -> dict:
    g = torch.Generator().manual_seed(1)
    cond, uncond = (torch.randn(1, n, PRESETS[run.preset].ctx_dim, generator=g).to(run.device) for n in tokens)
    sample = sampler(run, model, batched, cond, uncond)
    reset_peak(run)
    breaks, start = graph_breaks(), time.perf_counter()
    first = sample()  # compiles and records CUDA graphs where the mode does
    run.sync()
    first_s, breaks = time.perf_counter() - start, graph_breaks() - breaks
    sec = median_time(sample, run, iters=1 if run.smoke else 2, warmup=0)  # the first run warmed up
    flops = image_flops(run, tokens, batched)
    remember_best(run, "best_backbone", sec, (f"{mode} {precision}", model, batched))
    return {"table": "inference", "mode": mode, "dtype": precision, "cfg": "batched" if batched else "separate",
            "ctx_tokens": f"{tokens[0]}/{tokens[1]}", "s_per_image": sec, "first_run_s": first_s,
            "tflops": flops / sec / 1e12, "of_matmul": flops / sec / run.cache["matmul_flops"],
            "peak_gib": peak_gib(run), "graph_breaks": breaks, "finite": bool(torch.isfinite(first).all())}


def inference_eager_section(run: Run, rec: dict) -> None:
    """Eager bf16 / fp16: separate CFG, batched masked CFG; bf16 also batched CFG of equal lengths (no mask)."""
    lc, lu = run.prompt_tokens
    plan = [("bf16", False, (lc, lu)), ("bf16", True, (lc, lu)), ("bf16", True, (lc, lc)),
            ("fp16", False, (lc, lu)), ("fp16", True, (lc, lu))]
    for precision, batched, tokens in plan:
        model = xut(run, DTYPES[precision])
        rec.setdefault("rows", []).append(sampler_row(run, "eager", precision, model, batched, tokens))


def compiled_rows(run: Run, rec: dict, precision: str, mode: str | None, batched: bool = True) -> None:
    label = {None: "torch.compile", "reduce-overhead": "compile + CUDA graphs"}[mode]
    label += "" if run.cuda else f" (smoke: {run.backend}, no CUDA graphs)"
    compiled = run.compile(xut(run, DTYPES[precision]), mode if run.cuda else None)
    rec.setdefault("rows", []).append(sampler_row(run, label, precision, compiled, batched, run.prompt_tokens))


def inference_compiled_section(run: Run, rec: dict) -> None:
    compiled_rows(run, rec, "bf16", None)


def inference_cudagraphs_section(run: Run, rec: dict) -> None:
    compiled_rows(run, rec, "bf16", "reduce-overhead")


def inference_cudagraphs_fp16_section(run: Run, rec: dict) -> None:
    compiled_rows(run, rec, "fp16", "reduce-overhead")


def inference_cudagraphs_separate_section(run: Run, rec: dict) -> None:
    """Separate CFG under CUDA graphs: two context lengths, so two graphs (and two compiles)."""
    compiled_rows(run, rec, "bf16", "reduce-overhead", batched=False)


# ---------------------------------------------------------------------------------------------------
# VAE: decode (inference) and encode (online training) options
# ---------------------------------------------------------------------------------------------------

def vae_variant(run: Run, base: Any, dtype: torch.dtype, channels_last: bool, compiled: str | None) -> Any:
    """A copy of the LatentVAE in `dtype`, channels-last or not, with its decoder or encoder compiled."""
    vae = copy.deepcopy(base)
    vae.vae.to(dtype)
    if channels_last:
        vae.vae.to(memory_format=torch.channels_last)
    if compiled:
        setattr(vae.vae, compiled, run.compile(getattr(vae.vae, compiled)))
    return vae


def vae_row(run: Run, op: str, label: str, fn: Callable[[], torch.Tensor]) -> dict:
    reset_peak(run)
    start = time.perf_counter()
    out = fn()
    run.sync()
    first_s = time.perf_counter() - start
    sec = median_time(fn, run, iters=1 if run.smoke else 3, warmup=0)  # the first run warmed up
    return {"table": "vae", "op": op, "variant": label, "ms": sec * 1e3, "first_run_s": first_s,
            "peak_gib": peak_gib(run), "finite": bool(torch.isfinite(out).all())}


def vae_jobs(run: Run) -> tuple[Any, list[tuple[str, str, Callable[[Any], torch.Tensor]]]]:
    """The base VAE and (op, compiled part, call) for decoding one image at the inference size and encoding the
    256² training batch."""
    base = encoders(run)[1]
    lat, (res, batch) = run.res // 8, run.train[0]
    z = torch.randn(1, base.latent_channels, lat, lat, device=run.device)
    images = torch.rand(batch, 3, res, res, device=run.device) * 2 - 1
    gen = torch.Generator(run.device)
    return base, [("decode", "decoder", lambda v: v.decode(z)),
                  ("encode", "encoder", lambda v: v.encode(images, generator=gen.manual_seed(0)))]


def vae_section(run: Run, rec: dict) -> None:
    """Eager: the fp32 baseline, the inference dtype (bf16) contiguous and channels-last, and fp16."""
    base, jobs = vae_jobs(run)
    low, low_name = (torch.bfloat16, "bf16") if run.cuda else (torch.float32, "fp32")
    for op, _, call in jobs:
        variants = [("fp32 eager (base)", torch.float32, False), (f"{low_name} eager", low, False),
                    (f"{low_name} channels-last", low, True)]
        variants += [("fp16 eager", torch.float16, False)] if run.cuda else []
        for label, dtype, cl in variants:
            vae = vae_variant(run, base, dtype, cl, None)
            rec.setdefault("rows", []).append(vae_row(run, op, label, functools.partial(call, vae)))
            if label.startswith(low_name):
                run.cache[f"vae_{op}_{cl}_ms"] = rec["rows"][-1]["ms"]
                if op == "decode":
                    remember_best(run, "best_vae", rec["rows"][-1]["ms"], (label, vae))


def vae_compiled_section(run: Run, rec: dict) -> None:
    """torch.compile of the decoder (inference) and the encoder (online training), in the faster memory format."""
    base, jobs = vae_jobs(run)
    low, low_name = (torch.bfloat16, "bf16") if run.cuda else (torch.float32, "fp32")
    for op, part, call in jobs:
        cl = run.cache.get(f"vae_{op}_True_ms", 1.0) < run.cache.get(f"vae_{op}_False_ms", 0.0)
        label = f"{low_name}{' channels-last' if cl else ''} compiled"
        vae = vae_variant(run, base, low, cl, part)
        rec.setdefault("rows", []).append(vae_row(run, op, label, functools.partial(call, vae)))
        if op == "decode":
            remember_best(run, "best_vae", rec["rows"][-1]["ms"], (label, vae))


# ---------------------------------------------------------------------------------------------------
# End to end: prompt → image
# ---------------------------------------------------------------------------------------------------

def end_to_end_section(run: Run, rec: dict) -> None:
    """Text encoding of the prompt and an empty negative, 32 Euler steps with CFG, VAE decode; per part."""
    te, vae = encoders(run)
    choices = [("eager bf16", xut(run, torch.bfloat16), None, vae),
               ("eager fp16 (VAE bf16)", xut(run, torch.float16), None, vae)]
    if "best_backbone" in run.cache and "best_vae" in run.cache:
        (label, model, batched), (vae_label, best_vae) = run.cache["best_backbone"][1], run.cache["best_vae"][1]
        choices.append((f"fastest: {label} + VAE {vae_label}", model, batched, best_vae))
    for label, model, batched, decoder in choices:
        once = functools.partial(prompt_to_image, run, te, model, batched, decoder)
        once()
        parts = sorted((once() for _ in range(1 if run.smoke else 3)), key=sum)[0 if run.smoke else 1]
        rec.setdefault("rows", []).append({"table": "end_to_end", "mode": label, "text_s": parts[0],
                                           "backbone_s": parts[1], "vae_s": parts[2], "total_s": sum(parts)})


def prompt_to_image(run: Run, te: Any, model: Any, batched: bool | None, vae: Any) -> tuple[float, float, float]:
    """Seconds of text encoding, sampling and decoding of one image (batch_cfg None = make_denoiser's default)."""
    lat = run.res // 8
    noise = torch.randn(1, vae.latent_channels, lat, lat, generator=torch.Generator().manual_seed(0)).to(run.device)
    marks = [time.perf_counter()]
    cond, uncond = te.encode([PROMPT, ""])
    run.sync()
    marks.append(time.perf_counter())
    denoise = make_denoiser(model, cond, uncond, 3.0, pos_map=canvas_position_map(lat, lat).to(run.device),
                            aspect=torch.zeros(1, device=run.device), batch_cfg=batched)
    latents = sample_euler(denoise, noise, flow_sigmas(run.steps).to(run.device))
    run.sync()
    marks.append(time.perf_counter())
    vae.decode(latents)
    run.sync()
    marks.append(time.perf_counter())
    return marks[1] - marks[0], marks[2] - marks[1], marks[3] - marks[2]


# ---------------------------------------------------------------------------------------------------
# Training: the real step (training.loss + backward + muP AdamW), online encoders
# ---------------------------------------------------------------------------------------------------

def train_row(run: Run, label: str, res: int, batch: int, *, compiled: bool = False, cached: bool = False,
              grad_ckpt: bool = False, tread: float = 0.5) -> dict:
    te, vae = encoders(run)
    cfg = PRESETS[run.preset].replace(input_dim=vae.latent_channels, ctx_dim=te.hidden_size)
    max_length = 16 if run.smoke else 256
    steps, warmup = (2, 1) if run.smoke else (5, 2)
    reset_peak(run)
    sec = bench_variant(cfg, te, vae, make_batch(batch, res, vae.downscale_factor), run.device, "bf16", tread,
                        compiled, cached, max_length, steps, warmup, grad_ckpt, backend=run.backend)
    n = (res // vae.downscale_factor // cfg.patch_size) ** 2
    flops = 3 * xut_flops(cfg, n, max_length, keep_count(n, tread) if tread else None) * batch / sec
    nominal = run.results.get("env", {}).get("nominal_bf16_peak_tflops")
    return {"table": "training", "variant": label, "res": res, "batch": batch, "ms_per_step": sec * 1e3,
            "samples_per_s": batch / sec, "mfu_measured": flops / run.cache["matmul_flops"],
            "mfu_nominal": flops / (nominal * 1e12) if nominal else None, "peak_gib": peak_gib(run)}


def training_eager_section(run: Run, rec: dict) -> None:
    (res1, batch1), (res2, batch2) = run.train
    rows = rec.setdefault("rows", [])
    rows.append(train_row(run, "bf16, TREAD 0.5, online encoders", res1, batch1))
    rows.append(train_row(run, "bf16, TREAD 0.5, cached encoders (XUT only)", res1, batch1, cached=True))
    rows.append(train_row(run, "bf16, TREAD 0.5, online, grad ckpt", res2, batch2, grad_ckpt=True))


def training_compiled_section(run: Run, rec: dict) -> None:
    res, batch = run.train[0]
    rec.setdefault("rows", []).append(train_row(run, "bf16, TREAD 0.5, online, compiled", res, batch, compiled=True))
