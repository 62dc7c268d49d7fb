"""Adapters made by the trainer, in a real ComfyUI server (CPU): a tiny pixel-space base model, then a LoRA, a LoKr
with train_norm and a text-encoder LoRA trained on it by training.train, loaded with ComfyUI's stock LoraLoader and
LoraLoaderModelOnly. ComfyUI maps every key of the exports (its log has no "lora key not loaded"), patches exactly
the weights (and norm biases) the trainer adapted, and samples the latent hdm_core samples with the same adapter.

Skipped unless COMFYUI_PATH points to a ComfyUI checkout (0.8.0 or later); the server is the one
tests/comfy_harness.py starts for every ComfyUI test module, the trained files are copied into its model folders.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch
from comfy_harness import HDM_SAMPLER, NEG, POS, REPO, Server, read_probe, saved_latent, session, txt2img_graph

TINY = str(REPO / "training" / "recipes" / "tiny_cpu.toml")
UNET_GROUPS = 'finetune.modules=["attention", "mlp", "adaln", "embed"]'
RECIPES = {  # adapter name → recipe overrides, on top of the tiny recipe and the trained base
    "lora": ("finetune.method=lora", "finetune.dim=4", "finetune.alpha=2", UNET_GROUPS),
    "lokr": ("finetune.method=lokr", "finetune.factor=4", "finetune.train_norm=true", UNET_GROUPS),
    "te_lora": ("finetune.method=lora", "finetune.dim=4", "finetune.alpha=2",
                'finetune.modules=["text_encoder", "attention"]'),
}
STRENGTH = 0.8
WIDTH, HEIGHT = 64, 48  # pixel space: the latent is the image
CUSTOM = "custom (width x height below)"  # HDMEmptyLatent's resolution choice for width/height
TEXT_ENCODER_KEY = "text_encoders.qwen3_06b.transformer.model."  # the exported text-encoder keys' prefix


# ---------------------------------------------------------------------------------------------------
# Training (once per module): base, then the adapters on it
# ---------------------------------------------------------------------------------------------------

@dataclass
class Trained:
    base: Path                     # the base export
    ckpt_name: str                 # its name in the server's checkpoints folder
    files: dict[str, Path] = field(default_factory=dict)        # adapter → export
    lora_names: dict[str, str] = field(default_factory=dict)    # adapter → name in the server's loras folder
    unavailable: dict[str, str] = field(default_factory=dict)   # adapter → why the trainer could not make it


def train(root: Path, name: str, *overrides: str) -> Path:
    from training.train import main, parse_args

    args = ["--config", TINY, f"data.path={root / 'imgs'}", f"run.out_dir={root / 'runs'}", f"name={name}",
            "run.log_every=100", *overrides]
    (export,) = main(parse_args(args))
    return export


@pytest.fixture(scope="module")
def server(request, tmp_path_factory) -> Server:
    return session(request, tmp_path_factory).server


@pytest.fixture(scope="module")
def trained(request, tmp_path_factory, server) -> Trained:
    """The tiny recipe's base (pixel space, random tiny Qwen3; 6 steps) and each adapter of RECIPES (6 steps at lr
    0.05), copied into the server's checkpoints and loras folders under fresh names."""
    from training.toy_data import make_toy_folder

    pytest.importorskip("lycoris", reason="adapter training needs lycoris-lora in the test environment")
    models = session(request, tmp_path_factory).models
    root = tmp_path_factory.mktemp("comfy_finetune")
    make_toy_folder(root / "imgs", n=24)
    base = train(root, "base", "train.max_steps=6")
    out = Trained(base, f"hdm_trained_base_{uuid.uuid4().hex[:8]}.safetensors")
    shutil.copy(base, models["checkpoints"] / out.ckpt_name)
    loras = server.base / "models" / "loras"
    loras.mkdir(parents=True, exist_ok=True)
    for name, overrides in RECIPES.items():
        try:
            out.files[name] = train(root, name, f"model.init_from={base}", "optim.lr=0.05", "optim.warmup_steps=0",
                                    "train.max_steps=6", *overrides)
        except Exception as err:  # the text-encoder adapter is the newest trainer feature
            if name != "te_lora":
                raise
            out.unavailable[name] = f"{type(err).__name__}: {err}"
            continue
        out.lora_names[name] = f"hdm_trained_{name}_{uuid.uuid4().hex[:8]}.safetensors"
        shutil.copy(out.files[name], loras / out.lora_names[name])
    return out


def expected_patches(base: Path, name: str) -> tuple[dict[str, str], dict[str, str]]:
    """What ComfyUI should patch for adapter `name`, from the trainer's own list of adapted modules (its LyCORIS
    networks over a fresh base): ({diffusion-model state-dict key: module}, {CLIP state-dict key: module}), one
    `.weight` per adapted module and a `.bias` per norm adapter with a bias (LyCORIS b_norm)."""
    from hdm_core.checkpoint import load_components
    from hdm_core.layout import LORA_TE_PREFIX as TEXT_ENCODER_PREFIX
    from hdm_core.layout import LORA_UNET_PREFIX as UNET_PREFIX
    from training.finetune import attach
    from training.recipe import load_recipe

    comps = load_components(base)
    adapters = attach(load_recipe(TINY, list(RECIPES[name])).finetune, comps.model, comps.text_encoder)
    unet, clip = {}, {}
    for net in (adapters.unet, adapters.te):
        for lo in net.loras if net is not None else ():
            module = adapters.paths[lo.lora_name]
            keys = {f"{module}.bias" if t == "b_norm" else f"{module}.weight" for t in lo.state_dict() if t != "alpha"}
            if module.startswith(UNET_PREFIX):  # ComfyUI's MODEL keys are diffusion_model.<XUT key> too
                unet |= dict.fromkeys(keys, module)
            else:  # ComfyUI's CLIP keys: the adapter key without "text_encoders."
                assert module.startswith(TEXT_ENCODER_PREFIX), module
                clip |= {k[len("text_encoders."):]: module for k in keys}
    return unet, clip


# ---------------------------------------------------------------------------------------------------
# Graphs and the reference
# ---------------------------------------------------------------------------------------------------

def lora_graph(trained: Trained, name: str, loader: str, log: str, lora_name: str | None = None) -> dict:
    """Base → LoraLoader / LoraLoaderModelOnly (node 8) → HDM Sampler; node 9 records the patches."""
    g = txt2img_graph(loader=("HDMLoader", {"ckpt_name": trained.ckpt_name}), sampler=("HDMSampler", HDM_SAMPLER))
    g["4"] = {"class_type": "HDMEmptyLatent", "inputs": {"resolution": CUSTOM, "width": WIDTH, "height": HEIGHT,
                                                         "batch_size": 1, "vae": ["1", 2]}}
    lora = {"lora_name": lora_name or trained.lora_names[name], "strength_model": STRENGTH}
    if loader == "LoraLoader":
        g["8"] = {"class_type": loader, "inputs": {"model": ["1", 0], "clip": ["1", 1], **lora,
                                                   "strength_clip": STRENGTH}}
        for encode in ("2", "3"):
            g[encode]["inputs"]["clip"] = ["8", 1]
        g["9"] = {"class_type": "HDMProbePatches", "inputs": {"model": ["8", 0], "clip": ["8", 1], "log": log}}
    else:
        g["8"] = {"class_type": loader, "inputs": {"model": ["1", 0], **lora}}
        g["9"] = {"class_type": "HDMProbePatches", "inputs": {"model": ["8", 0], "log": log}}
    g["6"]["inputs"]["model"] = ["8", 0]
    return g


def run_logged(server: Server, graph: dict) -> tuple[dict, str]:
    """(history entry, the server log lines written while it ran)."""
    start = len(server.log.read_text())
    entry = server.run(graph)
    return entry, server.log.read_text()[start:]


def hdm_core_latent(trained: Trained, loras: list) -> torch.Tensor:
    """hdm_core's latent for the graph's prompt and sampler: the same base in fp32, `loras` applied with
    hdm_core.adapters to the XUT and the text encoder."""
    from hdm_core.checkpoint import load_components
    from hdm_core.pipeline import GenerationParams, generate

    s = HDM_SAMPLER
    params = GenerationParams(prompt=POS, negative_prompt=NEG, width=WIDTH, height=HEIGHT, steps=s["steps"],
                              cfg=s["cfg"], sampler=s["sampler_name"], shift=s["shift"], seed=s["seed"])
    return generate(load_components(trained.base, dtype=torch.float32), params, decode=False, loras=loras)


def probe_log(server: Server) -> Path:
    return server.base / "output" / f"probe_{uuid.uuid4().hex}.jsonl"


# ---------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------

def test_comfyui_loads_the_trained_pixel_space_base(server, trained):
    """The trainer's export (pixel space, tiny Qwen3, no VAE weights) loads in HDMLoader and samples hdm_core's
    latent: the reference the adapter tests below build on."""
    graph = lora_graph(trained, "lora", "LoraLoaderModelOnly", str(probe_log(server)))
    graph["8"]["inputs"]["strength_model"] = 0.0  # LoraLoader returns the model untouched at strength 0
    got = saved_latent(server, server.run(graph))
    want = hdm_core_latent(trained, [])
    print(f"trained pixel-space base, ComfyUI vs hdm_core: max-abs {(got - want).abs().max().item():.2e}")
    assert got.shape == (1, 3, HEIGHT, WIDTH)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-4)


@pytest.mark.parametrize("loader", ["LoraLoaderModelOnly", "LoraLoader"])
@pytest.mark.parametrize("name", ["lora", "lokr"])
def test_trained_adapter_maps_every_key_and_matches_hdm_core(server, trained, name, loader):
    """A trainer-exported LoRA / LoKr (+ w_norm / b_norm) through a stock loader: no key left unloaded, one patch
    per adapted module (plus each norm bias), and the sampled latent equals hdm_core.apply_adapters' (1e-4)."""
    log = probe_log(server)
    entry, server_log = run_logged(server, lora_graph(trained, name, loader, str(log)))
    got = saved_latent(server, entry)
    assert "lora key not loaded" not in server_log and "NOT LOADED" not in server_log, server_log[-3000:]

    (record,) = read_probe(log)
    want_unet, _ = expected_patches(trained.base, name)
    modules = len(set(want_unet.values()))
    biases = sum(k.endswith(".bias") for k in want_unet)
    print(f"{name} via {loader}: {len(record['model'])} weights patched = {modules} adapted modules + {biases} norm "
          f"biases; kinds {sorted({k for v in record['model'].values() for k in v})}")
    assert set(record["model"]) == set(want_unet) and len(record["model"]) == modules + biases
    assert all(len(kinds) == 1 for kinds in record["model"].values())
    if loader == "LoraLoader":
        assert record["clip"] == {}  # a diffusion-model adapter leaves the text encoder alone
    if name == "lokr":  # train_norm: every RMSNorm / adaLN LayerNorm as a "diff" patch, some with a bias
        assert biases > 0 and sum(v == ["diff"] for v in record["model"].values()) > biases

    want = hdm_core_latent(trained, [(trained.files[name], STRENGTH)])
    plain = hdm_core_latent(trained, [])
    err, moved = (got - want).abs().max().item(), (want - plain).abs().max().item()
    print(f"{name} via {loader}, ComfyUI vs hdm_core: max-abs {err:.2e} (the adapter moves the latent by {moved:.2e})")
    assert err <= 1e-4 and moved > 1e-3


def test_text_encoder_adapter_through_lora_loader(server, trained):
    """An adapter on the text encoder and the XUT (finetune.modules with "text_encoder"): LoraLoader patches the
    XUT and ComfyUI's Qwen3 (CLIP) with every key mapped, one patch per adapted module, and the latent equals
    hdm_core's with the adapter applied to both (its text-encoder part visibly changes the latent)."""
    from hdm_core.adapters import load_adapter

    if "te_lora" in trained.unavailable:
        pytest.skip(f"the trainer cannot train text-encoder adapters yet ({trained.unavailable['te_lora']})")
    log = probe_log(server)
    entry, server_log = run_logged(server, lora_graph(trained, "te_lora", "LoraLoader", str(log)))
    got = saved_latent(server, entry)
    assert "lora key not loaded" not in server_log and "NOT LOADED" not in server_log, server_log[-3000:]

    (record,) = read_probe(log)
    want_unet, want_clip = expected_patches(trained.base, "te_lora")
    print(f"te_lora via LoraLoader: {len(record['model'])} XUT weights and {len(record['clip'])} Qwen3 weights "
          f"patched, for {len(set(want_unet.values()))} + {len(set(want_clip.values()))} adapted modules")
    assert want_clip and set(record["clip"]) == set(want_clip) and set(record["model"]) == set(want_unet)
    assert all(kinds == ["lora"] for kinds in [*record["model"].values(), *record["clip"].values()])

    tensors = load_adapter(trained.files["te_lora"])
    want = hdm_core_latent(trained, [(tensors, STRENGTH)])
    unet_only = {k: v for k, v in tensors.items() if not k.startswith(TEXT_ENCODER_KEY)}
    te_moved = (want - hdm_core_latent(trained, [(unet_only, STRENGTH)])).abs().max().item()
    err = (got - want).abs().max().item()
    print(f"te_lora via LoraLoader, ComfyUI vs hdm_core: max-abs {err:.2e} (the text-encoder part moves the latent "
          f"by {te_moved:.2e})")
    assert err <= 1e-4
    assert te_moved > 5e-4, "the exported text-encoder part changes nothing: did training update it?"


def test_unmapped_keys_are_seen_in_the_log(server, trained):
    """The control for the "no key left unloaded" checks above: keys ComfyUI cannot place are logged, and found in
    the captured server log: a made-up module, and the text-encoder part of an adapter given to
    LoraLoaderModelOnly (which maps diffusion-model keys only)."""
    from hdm_core.adapters import load_adapter, save_adapter

    tensors = load_adapter(trained.files["lora"]) | {"diffusion_model.no_such_module.w_norm": torch.zeros(3)}
    name = f"hdm_unmapped_{uuid.uuid4().hex[:8]}.safetensors"
    save_adapter(server.base / "models" / "loras" / name, tensors)
    _, server_log = run_logged(server, lora_graph(trained, "lora", "LoraLoaderModelOnly", str(probe_log(server)),
                                                  lora_name=name))
    assert "lora key not loaded: diffusion_model.no_such_module.w_norm" in server_log, server_log[-3000:]
    if "te_lora" in trained.files:
        _, server_log = run_logged(server, lora_graph(trained, "te_lora", "LoraLoaderModelOnly",
                                                      str(probe_log(server))))
        assert f"lora key not loaded: {TEXT_ENCODER_KEY}" in server_log, server_log[-3000:]
