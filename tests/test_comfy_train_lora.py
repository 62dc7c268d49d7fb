"""ComfyUI's own LoRA training on HDM, in a real ComfyUI server (CPU): TrainLoraNode on the shipped demo model with
the LoRA-training example's pictures (example_workflows/hdm_orange: 9 orange shapes, a colour the demo model never
saw, and 9 red / blue / green ones), then the LoRA through SaveLoRA, LoraLoader, LoraLoaderModelOnly and
LoraModelLoader, and through hdm_core.

* the loss falls: on the very samples a control run sees (same seed: same pictures, noise and sigmas; learning rate
  at the node's minimum, so the LoRA stays near zero), with and without gradient checkpointing (which give the same
  losses);
* what reaches the model while it trains: gradients on, no camera, TREAD off, unless HDM Camera / HDM Tread Gamma
  sit on the training conditioning (then they do reach it);
* SaveLoRA's file: every key mapped by ComfyUI's loaders (no "lora key not loaded"), every module patched, and the
  sampled latent equal to hdm_core's with the same file (≤ 1e-4); the LoRA draws orange where the model drew
  another colour.

Skipped unless COMFYUI_PATH points to a ComfyUI checkout (0.8.0 or later); the server is tests/comfy_harness.py's.
"""

from __future__ import annotations

import shutil
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from comfy_harness import DEMO_CKPT, TRAIN_FOLDER, Server, execution_error, read_probe, session

STEPS, LR, CONTROL_LR = 100, 0.003, 1e-7  # CONTROL_LR: TrainLoraNode's minimum learning rate
TRAIN = {"batch_size": 1, "grad_accumulation_steps": 1, "steps": STEPS, "rank": 8, "optimizer": "AdamW",
         "loss_function": "MSE", "seed": 0, "training_dtype": "fp32", "lora_dtype": "fp32", "algorithm": "LoRA",
         "existing_lora": "[None]", "bucket_mode": False}
PROMPT, SIZE, SEEDS = "an orange circle", 32, 4   # sampled with HDM Sampler: seeds 0..3 (seed + batch index)
SAMPLER = {"seed": 0, "steps": 12, "cfg": 3.0, "sampler_name": "euler", "shift": 1.0, "denoise": 1.0}
CAMERA_AND_TREAD = {"x_shift": 0.25, "y_shift": 0.0, "zoom": 1.5, "tread_gamma": 0.5}
SUFFIXES = {"lora_up.weight": "weight", "lora_down.weight": "weight", "alpha": "weight", "diff": "weight",
            "diff_b": "bias"}  # SaveLoRA's tensor names → the parameter of the module they change


@dataclass
class Run:
    loss: list[float]
    calls: list[dict]
    lora: Path
    base: torch.Tensor       # the demo model's latents for PROMPT
    with_lora: torch.Tensor  # the same through LoraModelLoader with the trained LoRA


def training_graph(log: str, prefix: str, *, lr: float, checkpointing: bool, steps: int = STEPS,
                   camera_and_tread: bool = False, folder: str = TRAIN_FOLDER) -> dict:
    """Demo model → TrainLoraNode on the example's pictures (every model call recorded) → SaveLoRA, the loss history
    recorded; PROMPT sampled on the demo model (node 14) and through LoraModelLoader (node 15)."""
    g = {"1": {"class_type": "HDMLoader", "inputs": {"ckpt_name": DEMO_CKPT}},
         "2": {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": folder}},
         "3": {"class_type": "MakeTrainingDataset", "inputs": {"images": ["2", 0], "vae": ["1", 2], "clip": ["1", 1],
                                                               "texts": ["2", 1]}},
         "4": {"class_type": "HDMProbeModelCalls", "inputs": {"model": ["1", 0], "log": log}},
         "5": {"class_type": "TrainLoraNode", "inputs": {
             "model": ["4", 0], "latents": ["3", 0], "positive": ["3", 1], **TRAIN, "steps": steps,
             "learning_rate": lr, "gradient_checkpointing": checkpointing}},
         "6": {"class_type": "HDMProbeLossMap", "inputs": {"loss": ["5", 2], "log": log}},
         "7": {"class_type": "SaveLoRA", "inputs": {"lora": ["5", 1], "prefix": f"loras/{prefix}", "steps": ["5", 3]}},
         "8": {"class_type": "LoraModelLoader", "inputs": {"model": ["1", 0], "lora": ["5", 1], "strength_model": 1.0}},
         "9": {"class_type": "HDMTextEncode", "inputs": {"clip": ["1", 1], "text": PROMPT}},
         "10": {"class_type": "HDMTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
         "11": {"class_type": "HDMEmptyLatent", "inputs": {"resolution": "custom (width x height below)",
                                                           "width": SIZE, "height": SIZE, "batch_size": SEEDS,
                                                           "vae": ["1", 2]}}}
    for node, model in (("12", "1"), ("13", "8")):
        g[node] = {"class_type": "HDMSampler", "inputs": {"model": [model, 0], "positive": ["9", 0],
                                                          "negative": ["10", 0], "latent_image": ["11", 0], **SAMPLER}}
    for node, samples in (("14", "12"), ("15", "13")):
        g[node] = {"class_type": "SaveLatent", "inputs": {"samples": [samples, 0], "filename_prefix": f"t/{prefix}"}}
    if camera_and_tread:  # HDM Camera and HDM Tread Gamma on the training conditioning
        c = CAMERA_AND_TREAD
        g["20"] = {"class_type": "HDMCameraParam", "inputs": {"positive": ["3", 1], "negative": ["3", 1],
                                                              "x_shift": c["x_shift"], "y_shift": c["y_shift"],
                                                              "zoom": c["zoom"]}}
        g["21"] = {"class_type": "HDMTreadGamma", "inputs": {"positive": ["20", 0], "negative": ["20", 1],
                                                             "positive_gamma": c["tread_gamma"],
                                                             "negative_gamma": 0.0}}
        g["5"]["inputs"]["positive"] = ["21", 0]
    return g


def node_latent(server: Server, entry: dict, node: str) -> torch.Tensor:
    from safetensors.torch import load_file

    (item,) = entry["outputs"][node]["latents"]
    return load_file(str(server.base / "output" / item["subfolder"] / item["filename"]))["latent_tensor"].float()


def train(server: Server, **options) -> Run:
    prefix = f"hdm_train_{uuid.uuid4().hex[:8]}"
    log = server.base / "output" / f"{prefix}.jsonl"
    entry = server.run(training_graph(str(log), prefix, **options), timeout=600)
    err = execution_error(entry)
    assert err is None, f"{err['node_type']}: {err['exception_message']}\n{''.join(err['traceback'][-4:])}"
    records = read_probe(log)
    (lora,) = (server.base / "output" / "loras").glob(f"{prefix}_*.safetensors")
    return Run(loss=next(r["loss"] for r in records if "loss" in r), calls=[r for r in records if "x" in r],
               lora=lora, base=node_latent(server, entry, "14"), with_lora=node_latent(server, entry, "15"))


@pytest.fixture(scope="module")
def server(request, tmp_path_factory) -> Server:
    return session(request, tmp_path_factory).server


@pytest.fixture(scope="module")
def runs(server) -> dict[str, Run]:
    """A control run and two trainings (with and without gradient checkpointing), all with seed 0."""
    return {"control": train(server, lr=CONTROL_LR, checkpointing=True),
            "checkpointing": train(server, lr=LR, checkpointing=True),
            "plain": train(server, lr=LR, checkpointing=False)}


def hdm_core_latent(lora: Path | None) -> torch.Tensor:
    """hdm_core's latents for the graphs' prompt and sampler on the demo model, with `lora` merged at strength 1."""
    from hdm_core.checkpoint import load_components
    from hdm_core.pipeline import GenerationParams, generate

    params = GenerationParams(prompt=PROMPT, width=SIZE, height=SIZE, steps=SAMPLER["steps"], cfg=SAMPLER["cfg"],
                              seed=SAMPLER["seed"], batch_size=SEEDS)
    components = load_components(Path(__file__).resolve().parents[1] / "demo" / "pretrained" / DEMO_CKPT,
                                 dtype=torch.float32)
    return generate(components, params, decode=False, loras=[(lora, 1.0)] if lora else [])


def colours(latents: torch.Tensor) -> list[str | None]:
    """The colour demo/measure.py reads in each pixel-space latent (the image in [-1, 1])."""
    from demo.measure import measure
    from training.toy_data import ALL_COLOURS

    return [measure((x / 2 + 0.5).clamp(0, 1), ALL_COLOURS).colour for x in latents]


# ---------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------

def test_loss_falls_with_and_without_gradient_checkpointing(runs):
    """Mean loss over the second half of training, on the samples the control run sees too: the LoRA's is well
    below the untrained model's. Gradient checkpointing recomputes the same forward: the same losses."""
    control = runs["control"].loss
    half = slice(STEPS // 2, STEPS)
    for name in ("checkpointing", "plain"):
        loss = runs[name].loss
        assert len(loss) == STEPS
        ratio = sum(loss[half]) / sum(control[half])
        print(f"TrainLoraNode ({name}): mean loss over steps {STEPS // 2 + 1}-{STEPS} "
              f"{sum(loss[half]) / len(loss[half]):.4f} vs {sum(control[half]) / len(control[half]):.4f} untrained "
              f"on the same samples (x{ratio:.2f}); first step {loss[0]:.4f}")
        assert ratio < 0.7
    torch.testing.assert_close(torch.tensor(runs["plain"].loss), torch.tensor(runs["checkpointing"].loss),
                               rtol=1e-4, atol=1e-7)


def test_what_reaches_the_model_while_it_trains(runs, server):
    """Every training call has gradients on (outside inference mode); from MakeTrainingDataset's conditioning no
    camera reaches the model (the identity camera: the picture's own position map) and TREAD is off (gamma 0).
    HDM Camera / HDM Tread Gamma on the training conditioning do reach it, on every call."""
    calls = runs["checkpointing"].calls
    assert len(calls) == STEPS
    assert all(c["grad"] and not c["inference"] for c in calls)
    assert all(c["camera"] == {} and c["tread_gamma"] == 0.0 for c in calls)
    assert all(c["x"] == [1, 3, SIZE, SIZE] for c in calls)
    moved = train(server, lr=LR, checkpointing=True, steps=3, camera_and_tread=True).calls
    c = CAMERA_AND_TREAD
    assert len(moved) == 3 and all(m["tread_gamma"] == c["tread_gamma"] for m in moved)
    assert all(m["camera"] == {k: [c[k]] for k in ("x_shift", "y_shift", "zoom")} for m in moved)


def test_pictures_of_several_sizes_train(server):
    """Pictures of several sizes (the toy data's 40x32 to 32x64 canvases) train one per step, TrainLoraNode's
    multi-resolution mode: its conds are built for the first picture's size, and each call still gets its own
    picture's position map."""
    from training.toy_data import make_dataset

    folder = f"hdm_shapes_{uuid.uuid4().hex[:8]}"
    make_dataset(server.base / "input" / folder, 6, seed=1)  # 32x64, 32x48 and 32x40 px
    run = train(server, lr=LR, checkpointing=True, steps=6, folder=folder)
    assert len(run.loss) == 6 and all(0 < v < 1 for v in run.loss)
    assert len({tuple(c["x"]) for c in run.calls}) >= 2, run.calls


def test_the_lora_draws_the_new_colour(runs):
    """Asked for an orange circle, the demo model draws another colour; with the LoRA ComfyUI trained, orange."""
    run = runs["checkpointing"]
    before, after = colours(run.base), colours(run.with_lora)
    print(f"'{PROMPT}', seeds 0-{SEEDS - 1}: demo model {before}, with the LoRA {after}")
    assert "orange" not in before and after.count("orange") >= SEEDS - 1


def expected_patches(lora: Path) -> set[str]:
    """The model state-dict keys SaveLoRA's file changes: <module>.weight for lora / diff, <module>.bias for diff_b."""
    from safetensors import safe_open

    with safe_open(str(lora), "pt") as f:
        keys = list(f.keys())
    out = set()
    for key in keys:
        suffix = next(s for s in SUFFIXES if key.endswith("." + s))
        out.add(f"{key[:-len(suffix) - 1]}.{SUFFIXES[suffix]}")
    return out


def loader_graph(lora_name: str, loader: str, log: str) -> dict:
    """Demo model → LoraLoader / LoraLoaderModelOnly (node 8) → HDM Sampler; node 16 records the patches."""
    g = training_graph(log, "unused", lr=LR, checkpointing=False)
    g = {k: g[k] for k in ("1", "9", "10", "11", "13", "15")}
    lora = {"lora_name": lora_name, "strength_model": 1.0}
    if loader == "LoraLoader":
        g["8"] = {"class_type": loader, "inputs": {"model": ["1", 0], "clip": ["1", 1], **lora, "strength_clip": 1.0}}
    else:
        g["8"] = {"class_type": loader, "inputs": {"model": ["1", 0], **lora}}
    g["16"] = {"class_type": "HDMProbePatches", "inputs": {"model": ["8", 0], "log": log}}
    g["15"]["inputs"]["filename_prefix"] = f"t/{uuid.uuid4().hex}"
    return g


@pytest.mark.parametrize("loader", ["LoraModelLoader", "LoraLoaderModelOnly", "LoraLoader"])
def test_saved_lora_maps_every_key_and_matches_hdm_core(runs, server, loader):
    """SaveLoRA's file in ComfyUI's loaders (LoraModelLoader: the LORA_MODEL itself, in the training graph): every
    key placed, one patch per changed parameter, and the latent hdm_core samples with the same file (≤ 1e-4)."""
    run = runs["checkpointing"]
    want, plain = hdm_core_latent(run.lora), hdm_core_latent(None)
    got = run.with_lora
    if loader != "LoraModelLoader":
        name = f"{run.lora.stem}_{loader}.safetensors"
        loras = server.base / "models" / "loras"
        loras.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(run.lora, loras / name)
        log = server.base / "output" / f"probe_{uuid.uuid4().hex}.jsonl"
        start = len(server.log.read_text())
        entry = server.run(loader_graph(name, loader, str(log)))
        server_log = server.log.read_text()[start:]
        assert "lora key not loaded" not in server_log and "NOT LOADED" not in server_log, server_log[-3000:]
        (record,) = read_probe(log)
        assert set(record["model"]) == expected_patches(run.lora)
        print(f"{loader}: {len(record['model'])} parameters patched "
              f"({sorted({k for v in record['model'].values() for k in v})})")
        got = node_latent(server, entry, "15")
    err, moved = (got - want).abs().max().item(), (want - plain).abs().max().item()
    print(f"TrainLoraNode's LoRA via {loader}, ComfyUI vs hdm_core: max-abs {err:.2e} (the LoRA moves the latent by "
          f"{moved:.2e})")
    assert err <= 1e-4 and moved > 0.1
