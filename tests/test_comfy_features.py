"""ComfyUI's speed, cache, attention and fp8 machinery on HDM, in a real ComfyUI server (CPU): EasyCache and
LazyCache, block patches (`patches_replace`), attention backend and overrides, the text-key mask through
ComfyUI's attention, fp8 weight dtypes and TorchCompileModel.

Skipped unless COMFYUI_PATH points to a ComfyUI checkout (0.8.0 or later); the server, the tiny models and the
test-only probe pack (tests/comfy_probe) are set up once per run by tests/comfy_harness.py.

Environment: HDM_TEST_COMPILE=1 runs the TorchCompileModel test (Inductor on CPU: a C++ compiler and 50–60 s on 2
cores, see test_torch_compile_model); HDM_CACHE_BENCH_SIZE=512 runs the cache tests at 512² px, the size of the
EasyCache numbers in BENCHMARKS.md (default 256: a few seconds).
"""

from __future__ import annotations

import os
import re
import time
import uuid
from pathlib import Path

import pytest
import torch
from comfy_harness import (
    HDM_SAMPLER,
    Server,
    output_files,
    read_probe,
    run_seconds,
    saved_latent,
    session,
    txt2img_graph,
)

KSAMPLER = {"seed": 11, "steps": 3, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}


@pytest.fixture(scope="module")
def server(request, tmp_path_factory) -> Server:
    return session(request, tmp_path_factory).server


def patched(graph: dict, class_type: str, **inputs) -> dict:
    """The graph with a MODEL → MODEL node (node "8") between the loader and the sampler."""
    graph["8"] = {"class_type": class_type, "inputs": {"model": ["1", 0], **inputs}}
    graph["6"]["inputs"]["model"] = ["8", 0]
    return graph


def with_image(graph: dict) -> dict:
    """The graph with its latent decoded and saved as an image too."""
    graph["9"] = {"class_type": "VAEDecode", "inputs": {"samples": ["6", 0], "vae": ["1", 2]}}
    graph["10"] = {"class_type": "SaveImage", "inputs": {"images": ["9", 0], "filename_prefix": "features"}}
    return graph


def probe_log(server: Server) -> str:
    return str(server.base / "output" / f"probe_{uuid.uuid4().hex}.jsonl")


def change(got: torch.Tensor, want: torch.Tensor) -> tuple[float, float]:
    """(relative L2, max-abs) difference of two latents."""
    return ((got - want).norm() / want.norm()).item(), (got - want).abs().max().item()


# ---------------------------------------------------------------------------------------------------
# Block patches and attention
# ---------------------------------------------------------------------------------------------------

def test_block_patches_receive_block_index(server):
    """patches_replace["dit"][("double_block", i)] replaces block i (execution order over all XUT blocks); the
    patch sees block_index = i, total_blocks, the stream as args["img"], and its original_block runs the block."""
    plain = saved_latent(server, server.run(txt2img_graph(sampler=("KSampler", KSAMPLER))))
    log = probe_log(server)
    got = saved_latent(server, server.run(patched(txt2img_graph(sampler=("KSampler", KSAMPLER)),
                                                  "HDMProbeBlockPatch", log=log)))
    assert torch.equal(got, plain)  # original_block is the block
    records = read_probe(Path(log))
    total = records[0]["total_blocks"]
    calls = len(records) // total
    assert calls == 2 * KSAMPLER["steps"] and len(records) == calls * total  # cond and uncond: 2 calls per step
    for r in records:
        assert r["block_index"] == r["key"] and r["block_type"] == "double" and r["total_blocks"] == total
    names = [r["name"] for r in records[:total]]
    assert names[0].startswith("prev_tread_trns.") and names[-1].startswith("post_tread_trns.")
    assert any(r["cross"] for r in records) and records[0]["img"][0] == 1


def test_skip_layer_guidance_acts_on_hdm(server):
    """ComfyUI's generic DiT block node (SkipLayerGuidanceDiTSimple: skip block 2 in the uncond pass) changes the
    result, through the same patches_replace keys."""
    plain = saved_latent(server, server.run(txt2img_graph(sampler=("KSampler", KSAMPLER))))
    slg = patched(txt2img_graph(sampler=("KSampler", KSAMPLER)), "SkipLayerGuidanceDiTSimple", double_layers="2",
                  single_layers="", start_percent=0.0, end_percent=1.0)
    got = saved_latent(server, server.run(slg))
    assert torch.isfinite(got).all() and (got - plain).abs().max().item() > 1e-3


def test_attention_runs_through_comfyui(server):
    """Every attention call goes to ComfyUI's optimized_attention: the backend the flags chose (on CPU without
    --use-pytorch-cross-attention: attention_sub_quad), via transformer_options["optimized_attention_override"]
    when a node sets one, which sees block_index."""
    plain = saved_latent(server, server.run(txt2img_graph(sampler=("KSampler", KSAMPLER))))
    log = probe_log(server)
    got = saved_latent(server, server.run(patched(txt2img_graph(sampler=("KSampler", KSAMPLER)),
                                                  "HDMProbeAttentionOverride", log=log)))
    assert torch.equal(got, plain)  # the override passes through to the same backend
    records = read_probe(Path(log))
    assert {r["func"] for r in records} == {"attention_sub_quad"}
    indices = {r["block_index"] for r in records}
    assert indices == set(range(max(indices) + 1)) and len(indices) > 4
    assert all(len(r["q"]) == 4 for r in records)  # (B, H, S, d): heads split, skip_reshape


def test_text_mask_works_through_comfyui_attention(server):
    """ctx_mask (padded text keys, hdm_core's batched CFG) through ComfyUI's attention: the padded prompt gives what
    the unpadded one gives alone; without the mask the padding would change it."""
    log = probe_log(server)
    graph = {"1": {"class_type": "HDMLoader", "inputs": {"ckpt_name": "hdm-xut-340M-1024px-note.safetensors"}},
             "2": {"class_type": "HDMProbeMaskedAttention", "inputs": {"model": ["1", 0], "log": log}}}
    server.run(graph)
    (record,) = read_probe(Path(log))
    print(f"masked attention in ComfyUI: {record['masked']:.1e} from the unpadded prompt ({record['unmasked']:.1e} "
          f"unmasked)")
    assert record["masked"] <= 1e-5 and record["unmasked"] > 1e-2


# ---------------------------------------------------------------------------------------------------
# EasyCache / LazyCache
# ---------------------------------------------------------------------------------------------------

def skipped_steps(log: str, kind: str) -> tuple[int, int]:
    found = re.findall(rf"{kind} - skipped (\d+)/(\d+) steps", log)
    assert found, f"no {kind} report in the server log"
    return int(found[-1][0]), int(found[-1][1])


def cache_run(server: Server, kind: str | None, side: int, threshold: float = 0.2) -> tuple[dict, int, int]:
    """A 20-step KSampler run at side² px, with the cache node `kind` (None: without); (entry, skipped, steps)."""
    graph = txt2img_graph(sampler=("KSampler", {**KSAMPLER, "steps": 20, "seed": 5}), width=side, height=side)
    if kind is None:
        return server.run(graph), 0, 20
    start = len(server.log.read_text())
    entry = server.run(patched(graph, kind, reuse_threshold=threshold, start_percent=0.15, end_percent=0.95,
                               verbose=False))
    return entry, *skipped_steps(server.log.read_text()[start:], kind)


@pytest.mark.parametrize("kind", ["EasyCache", "LazyCache"])
def test_cache_nodes_skip_model_calls(server, kind):
    """EasyCache (a DIFFUSION_MODEL wrapper around HDM's forward) and LazyCache (a PREDICT_NOISE wrapper) skip
    model calls of a 20-step KSampler run and still give an image close to the uncached one. On this random-weight
    model the output changes by ~100 % of its norm per step (a trained flow model's changes far less), so at the
    default reuse_threshold 0.2 nothing is skipped; threshold 1.0 shows the skipping. HDM_CACHE_BENCH_THRESHOLDS
    (default "0.2,1.0") and HDM_CACHE_BENCH_SIZE choose what is printed."""
    side = int(os.environ.get("HDM_CACHE_BENCH_SIZE", "256"))
    thresholds = [float(v) for v in os.environ.get("HDM_CACHE_BENCH_THRESHOLDS", "0.2,1.0").split(",")]
    server.run(txt2img_graph(sampler=("KSampler", {**KSAMPLER, "steps": 1}), width=side, height=side))  # warm-up
    plain_entry, _, _ = cache_run(server, None, side)
    plain = saved_latent(server, plain_entry)
    for threshold in sorted({*thresholds, 1.0}):
        entry, skipped, steps = cache_run(server, kind, side, threshold)
        rel, max_abs = change(saved_latent(server, entry), plain)
        t_plain, t_cached = run_seconds(plain_entry), run_seconds(entry)
        print(f"{kind} {threshold} at {side}² px: skipped {skipped}/{steps}, {t_plain:.2f} s → {t_cached:.2f} s "
              f"({t_plain / t_cached:.2f}×), latent change {rel:.3f} relative L2, {max_abs:.3f} max-abs")
        if threshold == 1.0:
            assert steps == 20 and skipped >= 3 and 0 < rel < 0.3  # 0.92 if EasyCache hit the sampler's x
    graph = patched(txt2img_graph(sampler=("KSampler", {**KSAMPLER, "steps": 20, "seed": 5}), width=side,
                                  height=side), kind, reuse_threshold=1.0, start_percent=0.15, end_percent=0.95,
                    verbose=False)
    assert output_files(server, server.run(with_image(graph)), "images")  # decodes to an image


# ---------------------------------------------------------------------------------------------------
# fp8 weights
# ---------------------------------------------------------------------------------------------------

def split_loader(weight_dtype: str) -> tuple[str, dict]:
    return ("HDMSplitLoader", {"unet_name": "hdm_xut_tiny.safetensors", "clip_name": "qwen3_tiny.safetensors",
                               "vae_name": "eq_sdxl_vae_random.safetensors", "weight_dtype": weight_dtype})


# Relative L2 of the 4-step latent against fp32 (measured 0.056 for e4m3fn, 0.088 for e5m2 with its 2 mantissa
# bits; see docs/comfyui.md). With the small tensors quantised too it would be ~1.
FP8_TOLERANCE = {"fp8_e4m3fn": 0.10, "fp8_e4m3fn_fast": 0.10, "fp8_e5m2": 0.15}


@pytest.mark.parametrize("weight_dtype", list(FP8_TOLERANCE))
def test_fp8_weights_run_to_an_image_close_to_fp32(server, weight_dtype):
    """The split loader stores the diffusion model in fp8 and ComfyUI casts each layer to fp32 on CPU (manual
    cast; the _fast variant's fp8 matmuls need an Ada/Hopper GPU, so on CPU it equals fp8_e4m3fn)."""
    want = saved_latent(server, server.run(txt2img_graph(loader=split_loader("fp32"), sampler=("HDMSampler",
                                                                                                HDM_SAMPLER))))
    start = len(server.log.read_text())
    entry = server.run(with_image(txt2img_graph(loader=split_loader(weight_dtype),
                                                sampler=("HDMSampler", HDM_SAMPLER))))
    log = server.log.read_text()[start:]
    storage = "float8_e5m2" if weight_dtype == "fp8_e5m2" else "float8_e4m3fn"
    assert f"model weight dtype torch.{storage}, manual cast: torch.float32" in log
    got = saved_latent(server, entry)
    rel, max_abs = change(got, want)
    print(f"{weight_dtype} vs fp32 (HDM Sampler, 4 steps): {rel:.4f} relative L2, {max_abs:.3f} max-abs")
    assert output_files(server, entry, "images") and rel <= FP8_TOLERANCE[weight_dtype]


# ---------------------------------------------------------------------------------------------------
# TorchCompileModel
# ---------------------------------------------------------------------------------------------------

@pytest.mark.skipif(os.environ.get("HDM_TEST_COMPILE") != "1",
                    reason="Inductor compiles C++ kernels on CPU (50–60 s on 2 cores): set HDM_TEST_COMPILE=1")
def test_torch_compile_model(server):
    """TorchCompileModel (inductor) compiles HDM's diffusion model, block hooks and ComfyUI attention included,
    and gives the eager result."""
    params = {**KSAMPLER, "seed": 21}
    want = saved_latent(server, server.run(txt2img_graph(sampler=("KSampler", params))))
    start = time.time()
    entry = server.run(patched(txt2img_graph(sampler=("KSampler", params)), "TorchCompileModel", backend="inductor"),
                       timeout=900)
    got = saved_latent(server, entry)
    print(f"TorchCompileModel (inductor, CPU): {time.time() - start:.0f} s with compilation, max-abs "
          f"{(got - want).abs().max().item():.1e} from eager")
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


# ---------------------------------------------------------------------------------------------------
# LoRA / LoKr through ComfyUI's stock loaders
# ---------------------------------------------------------------------------------------------------

def test_stock_lora_loaders_match_hdm_core_adapters(request, tmp_path_factory, server):
    """A LoRA (linear and conv weights) through LoraLoaderModelOnly, then a LoKr + LoHa file chained through
    LoraLoader, in ComfyUI's `diffusion_model.<XUT key>` format: ComfyUI maps every key with no HDM code, and the
    sampled latent equals hdm_core's apply_adapters + generate (fp32)."""
    from comfy_harness import CKPT, NEG, POS, normalise

    from hdm_core.adapters import apply_adapters, save_adapter
    from hdm_core.checkpoint import load_components
    from hdm_core.pipeline import GenerationParams, generate

    models = session(request, tmp_path_factory).models
    fresh = lambda: load_components(models["checkpoints"] / CKPT, dtype=torch.float32)  # noqa: E731
    weights = fresh().model.state_dict()
    g, lora = torch.Generator().manual_seed(5), {}
    for key in ("in_patch.proj.weight", "backbone.enc_blocks.0.0.attn.qkv.weight",
                "backbone.dec_blocks.0.0.mlp.w3.weight"):
        shape, base = weights[key].shape, "diffusion_model." + key[:-len(".weight")]
        lora[f"{base}.lora_up.weight"] = torch.randn(shape[0], 4, *[1] * (len(shape) - 2), generator=g) * 0.2
        lora[f"{base}.lora_down.weight"] = torch.randn(4, *shape[1:], generator=g) * 0.2
        lora[f"{base}.alpha"] = torch.tensor(2.0)
    out, inp = weights["backbone.enc_blocks.0.0.attn.qkv.weight"].shape
    base = "diffusion_model.backbone.enc_blocks.0.0.attn.qkv"
    lokr = {f"{base}.lokr_w1": torch.randn(4, 8, generator=g) * 0.3,
            f"{base}.lokr_w2_a": torch.randn(out // 4, 2, generator=g) * 0.3,
            f"{base}.lokr_w2_b": torch.randn(2, inp // 8, generator=g) * 0.3, f"{base}.alpha": torch.tensor(3.0)}
    base = "diffusion_model.backbone.dec_blocks.0.0.attn.qkv"  # a LoHa in the same file
    lokr |= {f"{base}.hada_{n}": torch.randn(*((out, 3) if n.endswith("a") else (3, inp)), generator=g) * 0.3
             for n in ("w1_a", "w1_b", "w2_a", "w2_b")} | {f"{base}.alpha": torch.tensor(1.5)}
    loras = server.base / "models" / "loras"
    names = {kind: f"hdm_{kind}_{uuid.uuid4().hex[:8]}.safetensors" for kind in ("lora", "lokr")}
    save_adapter(loras / names["lora"], lora)
    save_adapter(loras / names["lokr"], lokr)

    params = GenerationParams(prompt=POS, negative_prompt=NEG, width=192, height=128, steps=4, cfg=3.0, seed=42)
    plain = generate(fresh(), params, decode=False)
    one = patched(txt2img_graph(sampler=("HDMSampler", HDM_SAMPLER)), "LoraLoaderModelOnly",
                  lora_name=names["lora"], strength_model=0.8)
    two = patched(txt2img_graph(sampler=("HDMSampler", HDM_SAMPLER)), "LoraLoaderModelOnly",
                  lora_name=names["lora"], strength_model=0.8)
    two["11"] = {"class_type": "LoraLoader", "inputs": {"model": ["8", 0], "clip": ["1", 1], "lora_name": names["lokr"],
                                                        "strength_model": -0.6, "strength_clip": 0.0}}
    two["6"]["inputs"]["model"] = ["11", 0]
    start = len(server.log.read_text())
    runs = (("LoRA", one, [(lora, 0.8)]), ("LoRA + LoKr/LoHa", two, [(lora, 0.8), (lokr, -0.6)]))
    for label, graph, adapters in runs:
        got = normalise(saved_latent(server, server.run(graph)), models)
        comps = fresh()
        apply_adapters(comps.model, adapters)
        want = generate(comps, params, decode=False)
        err = (got - want).abs().max().item()
        print(f"{label} (ComfyUI stock loaders) vs hdm_core apply_adapters: max-abs {err:.2e}, change from no "
              f"adapter {(want - plain).abs().max().item():.2e}")
        assert err <= 1e-4 and (want - plain).abs().max().item() > 1e-2
    log = server.log.read_text()[start:]
    assert "lora key not loaded" not in log and "ERROR" not in log, log[-2000:]
