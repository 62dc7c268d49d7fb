"""bench/gpu_check.py sections that check results: XUT precisions and devices, the golden vectors on the device, the
absence of host synchronisation, and the text encoder and VAE on the device. Each fills rec["checks"]."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import torch
from gpu_check_common import Run, compare, within
from safetensors.torch import load_file

from hdm_core import PRESETS, XUT, Camera, XUTConfig, canvas_position_map
from hdm_core.pipeline import make_denoiser, pad_contexts
from hdm_core.sampling import flow_sigmas, sample_euler
from hdm_core.tread import keep_index, random_keep_index, random_keep_mask

GOLDEN = Path(__file__).resolve().parents[1] / "tests" / "data" / "golden_public"
PROMPT = ("1girl, solo, long hair, smile, looking at viewer, outdoors, cherry blossoms, blue sky, cloud, dress, "
          "hat, flower, red eyes, masterpiece, best quality, detailed background, sunlight, wind, petals")

# A reduced-precision forward is checked against the fp32 forward of the SAME rounded weights and inputs, so that
# only its arithmetic differs: unit roundoff u (bf16 2^-9 ≈ 2e-3, fp16 2^-12 ≈ 2.4e-4) per operation, amplified
# over ~20 blocks whose stream grows (measured on the CPU: xut-small ‖Δ‖/‖ref‖ = 1.9e-2 in bf16, 3.4e-3 in fp16).
# Against the original fp32 weights the error is larger and only reported ("info"): rounding the weights, the
# inputs and the stored time-embedding frequencies (kept in the model dtype, as the official model does; at
# τ = 1000·t their rounding moves the sinusoids) is what a low-precision model is, not an arithmetic fault.
WHY = {
    "bf16": "bf16 arithmetic, u ≈ 2e-3, ~20 blocks: expect ‖Δ‖/‖ref‖ ≈ 2e-2",
    "fp16": "fp16 arithmetic, u ≈ 2.4e-4, ~20 blocks: expect ‖Δ‖/‖ref‖ ≈ 4e-3",
    "fp32": "both fp32 (TF32 off): only kernels and summation order differ, ~1e-7 per operation",
}
TOL = {"bf16": (5e-2, 1e-1), "fp16": (1e-2, 2e-2), "fp32": (1e-5, 1e-4)}  # (rel_rms, rel_max)
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def checked(errors: dict[str, float], precision: str) -> dict[str, Any]:
    return within(errors, *TOL[precision], WHY[precision])


def info(errors: dict[str, float]) -> dict[str, Any]:
    """Reported, not judged: weights, inputs and time frequencies rounded to the model dtype as well."""
    return {**errors, "ok": None, "why": "includes the rounding of weights, inputs and time frequencies"}


def rounded(sd: dict[str, torch.Tensor], dtype: torch.dtype) -> dict[str, torch.Tensor]:
    """The state dict rounded to `dtype` and back to float32: the fp32 twin of a low-precision model."""
    return {k: v.to(dtype).float() if v.is_floating_point() else v for k, v in sd.items()}


def xut(run: Run, dtype: torch.dtype) -> XUT:
    """The run's random XUT (default init, so every adaLN and output layer is non-zero) in `dtype`, cached."""
    key = f"xut_{dtype}"
    if key not in run.cache:
        if "xut_fp32" not in run.cache:
            torch.manual_seed(0)
            run.cache["xut_fp32"] = XUT(PRESETS[run.preset]).to(run.device).eval().requires_grad_(False)
        run.cache[key] = copy.deepcopy(run.cache["xut_fp32"]).to(dtype)
    return run.cache[key]


def xut_inputs(run: Run, batch: int, lat: int, tokens: int, dtype: torch.dtype = torch.float32,
               device: torch.device | None = None, seed: int = 0) -> dict[str, torch.Tensor]:
    cfg = PRESETS[run.preset]
    g = torch.Generator().manual_seed(seed)
    kw = dict(x=torch.randn(batch, cfg.input_dim, lat, lat, generator=g), t=torch.rand(batch, generator=g),
              ctx=torch.randn(batch, tokens, cfg.ctx_dim, generator=g), aspect=torch.full((batch,), 0.1))
    kw = {k: v.to(device or run.device, dtype) for k, v in kw.items()}
    return {**kw, "pos_map": canvas_position_map(lat, lat, Camera(0.1, -0.1, 1.2)).to(device or run.device)}


@torch.no_grad()
def correctness_section(run: Run, rec: dict) -> None:
    """fp16 / bf16 against fp32 on the device at full size; the device against the CPU (fp32); batched CFG."""
    checks = rec.setdefault("checks", {})
    lat = run.res // 8
    ref_in = xut_inputs(run, 2, lat, run.prompt_tokens[0])
    keep = random_keep_index(2, (lat // 2) ** 2, 0.5, generator=torch.Generator().manual_seed(0)).to(run.device)
    for name in ("bf16", "fp16"):
        low_model = xut(run, DTYPES[name])
        twin = copy.deepcopy(low_model).float()
        low = {k: (v.to(DTYPES[name]) if k != "pos_map" else v) for k, v in ref_in.items()}
        up = {k: v.float() for k, v in low.items()}
        for label, kw in (("", {}), (", TREAD 0.5", {"tread_keep": keep})):
            checks[f"xut {name} vs fp32, {run.res}²{label}"] = checked(compare(low_model(**low, **kw),
                                                                               twin(**up, **kw)), name)
        del twin
        checks[f"xut {name} vs the fp32 original (info)"] = info(compare(low_model(**low),
                                                                        xut(run, torch.float32)(**ref_in)))
    if run.cuda:  # the same fp32 weights on the CPU, at a quarter of the tokens to keep the CPU time short
        small = xut_inputs(run, 1, lat // 2, run.prompt_tokens[0], device=torch.device("cpu"))
        cpu_model = copy.deepcopy(xut(run, torch.float32)).cpu()
        on_device = xut(run, torch.float32)(**{k: v.to(run.device) for k, v in small.items()})
        checks[f"xut fp32 {run.device.type} vs cpu, {run.res // 2}²"] = checked(compare(on_device, cpu_model(**small)),
                                                                                "fp32")
        del cpu_model
    for name in ("fp32", "bf16"):
        checks[f"batched masked CFG vs separate, {name}"] = batched_vs_separate(run, DTYPES[name], lat, name)


def batched_vs_separate(run: Run, dtype: torch.dtype, lat: int, precision: str) -> dict[str, Any]:
    """One forward over [cond; uncond] with the shorter context padded + ctx_mask == two forwards."""
    lc, lu = run.prompt_tokens
    base = xut_inputs(run, 1, lat, lc, dtype)
    short = xut_inputs(run, 1, lat, lu, dtype, seed=1)["ctx"]
    model = xut(run, dtype)
    ctx, mask = pad_contexts([base["ctx"], short], 1)
    two = {k: (torch.cat((v, v)) if k in ("x", "t", "aspect") else v) for k, v in base.items()}
    batched = model(**{**two, "ctx": ctx, "ctx_mask": mask})
    separate = torch.cat((model(**base), model(**{**base, "ctx": short})))
    out = checked(compare(batched, separate), precision)
    return {**out, "why": out["why"] + "; on CUDA the masked call uses another attention kernel than flash"}


@torch.no_grad()
def golden_section(run: Run, rec: dict) -> None:
    """tests/test_golden.py's vectors on this device (fp32, TF32 off; 1e-4 max-abs, fp64 1e-6)."""
    checks = rec.setdefault("checks", {})
    config = json.loads((GOLDEN / "config.json").read_text())
    g = {n: load_file(GOLDEN / f"{n}.safetensors", device=str(run.device))
         for n in ("weights", "inputs", "outputs", "sampling")}
    model = XUT(XUTConfig.from_dict(config["config"])).to(run.device).eval()
    model.load_state_dict(g["weights"], strict=True)
    i, o = g["inputs"], g["outputs"]
    cases = {"out_camera": dict(pos_map=i["pos_map_camera_latent"]), "out_default": {},
             "out_identity_camera": dict(pos_map=i["pos_map_identity_latent"]),
             "out_tread": dict(tread_keep=keep_index(i["tread_keep_mask"]))}
    for name, kw in cases.items():
        err = compare(model(i["x"], i["t"], i["ctx"], aspect=i["addon_info"], **kw), o[name])
        checks[f"golden {name}"] = {**err, "tol_max_abs": 1e-4, "ok": err["max_abs"] < 1e-4}
    m64 = copy.deepcopy(model).double()
    y64 = m64(i["x"].double(), i["t"].double(), i["ctx"].double(), pos_map=i["pos_map_camera_latent"],
              aspect=i["addon_info"].double())
    err = compare(y64, o["out_camera_fp64"])
    checks["golden out_camera_fp64"] = {**err, "tol_max_abs": 1e-6, "ok": err["max_abs"] < 1e-6}
    s, sc = g["sampling"], config["sampling"]
    for batched in (False, True):
        denoise = make_denoiser(model, s["cond_ctx"], s["uncond_ctx"], sc["cfg_scale"], pos_map=s["pos_map_latent"],
                                aspect=s["addon_info"], batch_cfg=batched)
        steps: list[dict] = []
        final = sample_euler(denoise, s["noise"], flow_sigmas(sc["steps"]).to(run.device), callback=steps.append)
        worst = max([compare(steps[k - 1]["x"], s[f"x_step{k}"])["max_abs"] for k in range(1, sc["steps"])] +
                    [compare(final, s["final_latent"])["max_abs"]])
        label = "batched masked CFG" if batched else "separate CFG"
        checks[f"golden sampler loop ({label}), every step"] = {"max_abs": worst, "tol_max_abs": 1e-4,
                                                                "ok": worst < 1e-4}


@torch.no_grad()
def sync_section(run: Run, rec: dict) -> None:
    """torch.cuda.set_sync_debug_mode("error") around each call: any host synchronisation raises."""
    checks = rec.setdefault("checks", {})
    if not run.cuda:
        rec["skipped"] = "set_sync_debug_mode needs CUDA; on the CPU, tests/test_fast_paths.py proves one graph"
        return
    lat, (lc, lu) = 32, run.prompt_tokens
    model = xut(run, torch.bfloat16)
    inp = xut_inputs(run, 2, lat, lc, torch.bfloat16)
    n = (lat // 2) ** 2
    keep = random_keep_index(2, n, 0.5, generator=torch.Generator(run.device).manual_seed(0), device=run.device)
    mask = torch.ones(2, lc, dtype=torch.bool, device=run.device)
    mask[1, lu:] = False
    cond, uncond = inp["ctx"][:1], inp["ctx"][1:, :lu]
    sigmas = flow_sigmas(4).to(run.device)
    noise = torch.randn(1, inp["x"].shape[1], lat, lat, device=run.device)
    gen = torch.Generator(run.device).manual_seed(0)

    def sampler(**kw: Any) -> Any:
        denoise = make_denoiser(model, cond, uncond, 3.0, pos_map=inp["pos_map"], aspect=inp["aspect"][:1], **kw)
        return sample_euler(denoise, noise, sigmas)

    calls = {
        "forward": lambda: model(**inp),
        "forward, TREAD indices + ctx_mask": lambda: model(**inp, tread_keep=keep, ctx_mask=mask),
        "forward, TREAD random (CUDA generator)": lambda: model(**inp, tread_rate=0.5, generator=gen),
        "forward, TREAD bool mask (must sync: detector check)":
            lambda: model(**inp, tread_keep=random_keep_mask(2, n, 0.5, device=run.device)),
        "Euler loop, batched masked CFG": lambda: sampler(batch_cfg=True),
        "Euler loop, separate CFG + TREAD guidance": lambda: sampler(batch_cfg=False, gamma_uncond=0.5,
                                                                     generator=gen),
    }
    for name, call in calls.items():
        call()  # warm-up: lazy library initialisation is not the forward's doing
        torch.cuda.synchronize()
        torch.cuda.set_sync_debug_mode("error")
        try:
            call()
            checks[name] = {"result": "no host sync", "ok": "must sync" not in name}
        except RuntimeError as err:
            checks[name] = {"result": f"host sync: {str(err)[:160]}", "ok": "must sync" in name}
        finally:
            torch.cuda.set_sync_debug_mode(0)
        torch.cuda.synchronize()


@torch.no_grad()
def encoders_section(run: Run, rec: dict) -> None:
    """Qwen3 (random, real shapes) and the VAE on the device: fp32 against the CPU, bf16 / fp16 against fp32."""
    from hdm_core.text_encoder import QWEN3_PRESETS, TextEncoder, build_qwen3, load_qwen3

    checks = rec.setdefault("checks", {})
    torch.manual_seed(0)
    cpu = build_qwen3(QWEN3_PRESETS["tiny" if run.smoke else "qwen3-0.6b"])
    sd = cpu.state_dict()
    encoders = {"cpu": TextEncoder(cpu), "fp32": TextEncoder(load_qwen3(sd, dtype=torch.float32, device=run.device)),
                "bf16": TextEncoder(load_qwen3(sd, dtype=torch.bfloat16, device=run.device)),
                "twin": TextEncoder(load_qwen3(rounded(sd, torch.bfloat16), dtype=torch.float32, device=run.device))}
    prompts = [PROMPT, ""]
    out = {k: te.encode(prompts)[0].float() for k, te in encoders.items()}
    padded = {k: encoders[k].encode_padded(prompts * 2, max_length=64).float() for k in ("bf16", "twin")}
    if run.cuda:
        checks["qwen3 fp32 cuda vs cpu"] = checked(compare(out["fp32"], out["cpu"]), "fp32")
    checks["qwen3 bf16 vs fp32"] = checked(compare(out["bf16"], out["twin"]), "bf16")
    checks["qwen3 bf16 vs fp32, padded batch"] = checked(compare(padded["bf16"], padded["twin"]), "bf16")
    checks["qwen3 bf16 vs the fp32 original (info)"] = info(compare(out["bf16"], out["fp32"]))
    del encoders, cpu, sd
    vae_checks(run, checks)


def vae_checks(run: Run, checks: dict) -> None:
    from hdm_core.vae import VAE_PRESETS, LatentVAE, build_autoencoder

    torch.manual_seed(0)
    cpu = LatentVAE(build_autoencoder(VAE_PRESETS["tiny" if run.smoke else "sdxl"]))
    sd = cpu.vae.state_dict()

    def vae(dtype: torch.dtype, twin_of: torch.dtype | None = None) -> LatentVAE:
        return LatentVAE.from_state_dict(rounded(sd, twin_of) if twin_of else sd, dtype=dtype, device=run.device)

    def decode(v: LatentVAE, z: torch.Tensor) -> torch.Tensor:  # raw decoder output, before the clamp to [0, 1]
        return v.vae.decode(z.to(v._device, v.dtype), return_dict=False)[0].float()

    g = torch.Generator().manual_seed(0)
    lat = run.res // 8
    z = torch.randn(1, 4, lat, lat, generator=g)
    images = torch.rand(2, 3, run.res // 4, run.res // 4, generator=g) * 2 - 1
    for name in ("bf16", "fp16") if run.cuda else ("bf16",):
        low, twin, zr = vae(DTYPES[name]), vae(torch.float32, DTYPES[name]), z.to(DTYPES[name])
        checks[f"vae decode {name} vs fp32, {run.res}²"] = checked(compare(decode(low, zr), decode(twin, zr)), name)
        imr = images.to(DTYPES[name])
        checks[f"vae encode {name} vs fp32"] = checked(compare(low.encode(imr, sample=False),
                                                               twin.encode(imr, sample=False)), name)
        del low, twin
    if run.cuda:
        fp32, small = vae(torch.float32), z[..., : lat // 4, : lat // 4]
        checks["vae decode fp32 cuda vs cpu"] = checked(compare(decode(fp32, small), decode(cpu, small)), "fp32")
        checks["vae encode fp32 cuda vs cpu"] = checked(compare(fp32.encode(images, sample=False),
                                                                cpu.encode(images, sample=False)), "fp32")
