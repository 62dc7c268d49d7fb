"""End-to-end tests of the node pack inside a real ComfyUI server (CPU).

Skipped unless COMFYUI_PATH points to a ComfyUI checkout (0.8.0 or later). The server runs with ComfyUI's own
interpreter: COMFYUI_PYTHON if set, else the first of <checkout>/../venv, <checkout>/venv, <checkout>/.venv
(bin/python or Scripts/python.exe) that exists, else this interpreter. The test process itself only needs
torch, transformers, diffusers and safetensors (for hdm_core, the reference the server is compared with).

What runs: a tiny checkpoint in the released single-file layout (tiny XUT, tiny Qwen3, a random full-size
SDXL-shaped VAE, fp16 like the released file) plus split files are written to a temporary models folder; the
pack is symlinked into an isolated base directory; every example workflow is converted from UI format to an API
prompt (with the server's /object_info), shrunk (small size, 3 steps) and run; HDM Sampler and KSampler latents
are compared with hdm_core; error messages and built-in-node compatibility are checked.
"""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
CKPT = "hdm-xut-340M-1024px-note.safetensors"
POS, NEG = "a watercolor fox in a snowy forest, soft light", "blurry, lowres"  # different token counts
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


# ---------------------------------------------------------------------------------------------------
# Locating ComfyUI
# ---------------------------------------------------------------------------------------------------

def comfy_paths() -> tuple[Path, str]:
    root = os.environ.get("COMFYUI_PATH")
    if not root:
        pytest.skip("COMFYUI_PATH is not set: point it at a ComfyUI checkout (>= 0.8.0) to run the integration tests")
    root = Path(root).resolve()
    if not (root / "main.py").is_file() or not (root / "comfy").is_dir():
        pytest.skip(f"COMFYUI_PATH={root} is not a ComfyUI checkout (no main.py / comfy/)")
    python = os.environ.get("COMFYUI_PYTHON")
    if not python:
        candidates = [base / sub for base in (root.parent / "venv", root / "venv", root / ".venv")
                      for sub in ("bin/python", "Scripts/python.exe")]
        python = str(next((c for c in candidates if c.is_file()), sys.executable))
    probe = subprocess.run([python, "-c", "import torch, aiohttp, transformers"], capture_output=True, text=True)
    if probe.returncode:
        pytest.skip(f"{python} cannot run ComfyUI ({probe.stderr.strip().splitlines()[-1:]}); set COMFYUI_PYTHON")
    return root, python


# ---------------------------------------------------------------------------------------------------
# Tiny models in the released layouts
# ---------------------------------------------------------------------------------------------------

def tiny_configs():
    from hdm_core.config import PRESETS
    from hdm_core.text_encoder import QWEN3_PRESETS

    return PRESETS["xut-tiny"], QWEN3_PRESETS["tiny"]  # the tiny Qwen3's width is xut-tiny's ctx_dim


def make_models(root: Path) -> dict[str, Path]:
    """checkpoints/ (HDM single file, one without text encoder, a non-HDM file), diffusion_models/,
    text_encoders/, vae/ — all fp16, as the released file."""
    from safetensors.torch import save_file

    from hdm_core.checkpoint import save_single_file, save_xut
    from hdm_core.text_encoder import build_qwen3
    from hdm_core.vae import EQVAE_MEAN, EQVAE_STD, build_autoencoder
    from hdm_core.xut import XUT

    torch.manual_seed(0)
    config, qwen = tiny_configs()
    xut = XUT(config).eval()
    with torch.no_grad():  # larger random weights than the default init, so outputs are far from trivial
        for p in xut.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    te_sd = build_qwen3(qwen).state_dict()
    vae_sd = build_autoencoder().state_dict()
    mean, std = torch.tensor(EQVAE_MEAN), torch.tensor(EQVAE_STD)
    paths = {k: root / k for k in ("checkpoints", "diffusion_models", "text_encoders", "vae")}
    for p in paths.values():
        p.mkdir(parents=True, exist_ok=True)
    f16 = torch.float16
    save_single_file(paths["checkpoints"] / CKPT, xut.state_dict(), config, te_sd=te_sd, vae_sd=vae_sd,
                     vae_mean=mean, vae_std=std, dtype=f16)
    save_single_file(paths["checkpoints"] / "hdm_no_te.safetensors", xut.state_dict(), config, vae_sd=vae_sd, dtype=f16)
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "conditioner.embedders.1.model.ln_final.weight": torch.zeros(4)},
              str(paths["checkpoints"] / "sdxl_like.safetensors"))
    save_xut(paths["diffusion_models"] / "hdm_xut_tiny.safetensors", xut, dtype=f16)
    save_file({k: v.to(f16).contiguous() for k, v in te_sd.items()},
              str(paths["text_encoders"] / "qwen3_tiny.safetensors"))
    vae_file = {k: v.to(f16).contiguous() for k, v in vae_sd.items()}
    vae_file.update(vae_mean=mean.reshape(1, 4, 1, 1).to(f16), vae_std=std.reshape(1, 4, 1, 1).to(f16))
    save_file(vae_file, str(paths["vae"] / "eq_sdxl_vae_random.safetensors"))
    return paths


# ---------------------------------------------------------------------------------------------------
# Server
# ---------------------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, comfy: Path, python: str, base: Path, models: Path, extra_args: tuple[str, ...] = ()):
        self.base, self.port = base, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        for d in ("custom_nodes", "input", "output", "user"):
            (base / d).mkdir(parents=True, exist_ok=True)
        (base / "custom_nodes" / "comfyui-hdm").symlink_to(REPO, target_is_directory=True)
        yaml = base / "extra_model_paths.yaml"
        folders = "".join(f"  {k}: {k}\n" for k in ("checkpoints", "diffusion_models", "text_encoders", "vae"))
        yaml.write_text(f"hdm_test:\n  base_path: {models}\n{folders}")
        self.log = base / "server.log"
        cmd = [python, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port), "--disable-auto-launch",
               "--disable-api-nodes", "--base-directory", str(base), "--extra-model-paths-config", str(yaml),
               "--database-url", f"sqlite:///{base / 'user' / 'comfyui.db'}", *extra_args]
        self.proc = subprocess.Popen(cmd, cwd=comfy, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
                                     start_new_session=True)
        deadline = time.time() + 240
        while True:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited early:\n{self.log.read_text()[-4000:]}")
            try:
                self.get("/system_stats")
                break
            except (urllib.error.URLError, ConnectionError) as err:
                if time.time() > deadline:
                    self.stop()
                    raise RuntimeError(f"ComfyUI did not answer in 240 s:\n{self.log.read_text()[-4000:]}") from err
                time.sleep(0.5)

    def get(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=30) as r:
            return json.loads(r.read())

    def post(self, path: str, body: dict):
        req = urllib.request.Request(self.url + path, data=json.dumps(body).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=30) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as err:
            return err.code, json.loads(err.read() or b"{}")

    def run(self, prompt: dict, timeout: float = 300) -> dict:
        """Queue an API prompt and wait for its history entry (raises on rejection)."""
        status, body = self.post("/prompt", {"prompt": prompt, "client_id": uuid.uuid4().hex})
        if status != 200:
            raise PromptRejected(body)
        prompt_id, deadline = body["prompt_id"], time.time() + timeout
        while time.time() < deadline:
            history = self.get(f"/history/{prompt_id}")
            if prompt_id in history and history[prompt_id].get("status", {}).get("completed") is not None:
                return history[prompt_id]
            time.sleep(0.25)
        self.post("/interrupt", {})
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, 15)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, 9)


class PromptRejected(Exception):
    pass


def execution_error(entry: dict) -> dict | None:
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_error":
            return data
    return None


def output_files(server: Server, entry: dict, key: str) -> list[Path]:
    err = execution_error(entry)
    assert err is None, f"{err['node_type']}: {err['exception_message']}\n{''.join(err['traceback'][-3:])}"
    files = [server.base / item.get("type", "output") / item["subfolder"] / item["filename"]
             for out in entry["outputs"].values() for item in out.get(key, [])]
    return [f for f in files if f.is_file()]


def saved_latent(server: Server, entry: dict) -> torch.Tensor:
    from safetensors.torch import load_file

    files = output_files(server, entry, "latents")
    assert len(files) == 1, entry["outputs"]
    return load_file(str(files[0]))["latent_tensor"].float()


# ---------------------------------------------------------------------------------------------------
# UI workflow → API prompt (what the frontend does; checked against it by hand with the frontend driver)
# ---------------------------------------------------------------------------------------------------

def is_widget(spec: list) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    return (isinstance(spec[0], list) or spec[0] in WIDGET_TYPES) and not opts.get("forceInput")


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    links = {link[0]: link for link in workflow["links"]}
    prompt = {}
    for node in workflow["nodes"]:
        info = object_info.get(node["type"])
        if info is None:
            if node["type"] in ("Note", "MarkdownNote"):
                continue
            raise KeyError(f"node type {node['type']!r} is not installed on the server")
        linked = {i["name"]: links[i["link"]] for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        specs = {**info["input"].get("required", {}), **info["input"].get("optional", {})}
        order = info.get("input_order", {})
        inputs = {}
        for name in order.get("required", []) + order.get("optional", []):
            spec = specs[name]
            if is_widget(spec):
                value = values.pop(0) if values else None
                if len(spec) > 1 and spec[1].get("control_after_generate"):
                    values.pop(0)
                if value is not None:
                    inputs[name] = value
            if name in linked:
                inputs[name] = [str(linked[name][1]), linked[name][2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def shrink(prompt: dict, width: int = 192, height: int = 128, steps: int = 3, frames: int = 3) -> dict:
    """Make a shipped workflow fast on CPU: small image, few steps, few sweep frames."""
    for node in prompt.values():
        inputs, kind = node["inputs"], node["class_type"]
        if kind in ("EmptyLatentImage", "HDMEmptyLatent"):
            inputs.update(width=width, height=height, batch_size=1)
            if kind == "HDMEmptyLatent":
                inputs["resolution"] = "custom (width x height below)"
        if "steps" in inputs and not isinstance(inputs["steps"], list):
            inputs["steps"] = steps
        if kind == "HDMCameraSweep":
            inputs["frames"] = frames
    return prompt


# ---------------------------------------------------------------------------------------------------
# Fixtures
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    comfy_paths()  # skip early (before writing 0.4 GB) when ComfyUI is not available
    return make_models(tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def server(models, tmp_path_factory):
    comfy, python = comfy_paths()
    srv = Server(comfy, python, tmp_path_factory.mktemp("base"), models["checkpoints"].parent)
    try:
        log = srv.log.read_text()  # built-in audio nodes may fail without torchaudio; our pack must not
        failed = [line for line in log.splitlines() if "IMPORT FAILED" in line and "custom_nodes" in line]
        assert not failed, log[-3000:]
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def object_info(server) -> dict:
    return server.get("/object_info")


@pytest.fixture(scope="module")
def reference(models):
    """hdm_core components from the same file (fp16 values computed in fp32)."""
    from hdm_core.checkpoint import load_components

    return load_components(models["checkpoints"] / CKPT, dtype=torch.float32)


def normalise(latent: torch.Tensor, models: dict[str, Path]) -> torch.Tensor:
    """VAE-space LATENT → model space, with the vae_mean / vae_std stored (in fp16) in the checkpoint."""
    from safetensors import safe_open

    with safe_open(str(models["checkpoints"] / CKPT), "pt") as f:
        mean, std = f.get_tensor("vae_mean").float(), f.get_tensor("vae_std").float()
    return (latent - mean) / std


def comfy_simple_sigmas(steps: int) -> torch.Tensor:
    """ComfyUI's 'simple' scheduler on a flow model with shift 1: the official schedule on a 1/1000 grid."""
    table = torch.arange(1, 1001, 1) / 1000
    return torch.FloatTensor([float(table[-(1 + int(i * 1000 / steps))]) for i in range(steps)] + [0.0])


# ---------------------------------------------------------------------------------------------------
# Graph snippets
# ---------------------------------------------------------------------------------------------------

def txt2img_graph(*, loader=("HDMLoader", {"ckpt_name": CKPT}), encode="HDMTextEncode", camera=None, sampler=None,
                  width=192, height=128, batch=1) -> dict:
    g = {"1": {"class_type": loader[0], "inputs": loader[1]},
         "2": {"class_type": encode, "inputs": {"clip": ["1", 1], "text": POS}},
         "3": {"class_type": encode, "inputs": {"clip": ["1", 1], "text": NEG}},
         "4": {"class_type": "EmptyLatentImage", "inputs": {"width": width, "height": height, "batch_size": batch}}}
    pos, neg = ["2", 0], ["3", 0]
    if camera is not None:
        g["5"] = {"class_type": "HDMCameraParam", "inputs": {"positive": pos, "negative": neg, **camera}}
        pos, neg = ["5", 0], ["5", 1]
    kind, params = sampler
    g["6"] = {"class_type": kind, "inputs": {"model": ["1", 0], "positive": pos, "negative": neg,
                                             "latent_image": ["4", 0], **params}}
    g["7"] = {"class_type": "SaveLatent", "inputs": {"samples": ["6", 0], "filename_prefix": f"t/{uuid.uuid4().hex}"}}
    return g


HDM_SAMPLER = {"seed": 42, "steps": 4, "cfg": 3.0, "sampler_name": "euler", "shift": 1.0, "denoise": 1.0}


# ---------------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------------

def test_nodes_registered(object_info):
    for node_id in ("HDMLoader", "HDMSplitLoader", "HDMTextEncode", "HDMCameraParam", "HDMTreadGamma", "HDMSampler",
                    "HDMCameraSweep", "HDMEmptyLatent"):
        assert node_id in object_info, node_id
    assert CKPT in object_info["HDMLoader"]["input"]["required"]["ckpt_name"][0]
    assert object_info["HDMCameraParam"]["input_order"]["required"] == ["positive", "negative", "x_shift", "y_shift",
                                                                        "zoom"]
    assert object_info["HDMTreadGamma"]["input_order"]["required"] == ["positive", "negative", "positive_gamma",
                                                                       "negative_gamma"]


def test_example_workflows_are_templates(server):
    templates = server.get("/workflow_templates")
    assert sorted(templates.get("comfyui-hdm", [])) == sorted(p.stem for p in WORKFLOWS)


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.stem for p in WORKFLOWS])
def test_example_workflow_runs(server, object_info, path):
    prompt = shrink(ui_to_api(json.loads(path.read_text()), object_info))
    start = time.time()
    images = output_files(server, server.run(prompt), "images")
    assert images, f"{path.name} produced no image"
    print(f"{path.name}: {len(images)} image(s) in {time.time() - start:.1f} s")


def test_hdm_sampler_matches_pipeline(server, reference, models):
    """HDM Sampler in ComfyUI == hdm_core.generate (fp32, cond/uncond of different lengths, camera moved)."""
    from hdm_core.pipeline import GenerationParams, generate

    camera = {"x_shift": 0.3, "y_shift": -0.2, "zoom": 1.25}
    for sampler, shift in (("euler", 1.0), ("dpmpp_2m", 2.0)):
        params = {**HDM_SAMPLER, "sampler_name": sampler, "shift": shift}
        got = normalise(saved_latent(server, server.run(txt2img_graph(camera=camera, sampler=("HDMSampler", params)))),
                        models)
        want = generate(reference, GenerationParams(prompt=POS, negative_prompt=NEG, width=192, height=128,
                                                    steps=4, cfg=3.0, sampler=sampler, shift=shift, seed=42,
                                                    **camera), decode=False)
        err = (got - want).abs().max().item()
        print(f"HDM Sampler vs hdm_core ({sampler}, shift {shift}): max-abs {err:.2e}")
        assert err <= 1e-4


def test_hdm_sampler_without_camera_node_uses_identity_camera(server, reference, models):
    from hdm_core.pipeline import GenerationParams, generate

    got = normalise(saved_latent(server, server.run(txt2img_graph(sampler=("HDMSampler", HDM_SAMPLER)))), models)
    want = generate(reference, GenerationParams(prompt=POS, negative_prompt=NEG, width=192, height=128, steps=4,
                                                cfg=3.0, seed=42), decode=False)
    assert (got - want).abs().max().item() <= 1e-4


def test_ksampler_without_camera_node_uses_the_identity_camera(server):
    """Every path gives the official pipeline's result: without an HDM Camera node the model still gets the
    identity camera map, so KSampler with and without the node (0 / 0 / 1) give the same latent."""
    params = {"seed": 3, "steps": 3, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}
    plain = saved_latent(server, server.run(txt2img_graph(sampler=("KSampler", params))))
    identity = saved_latent(server, server.run(txt2img_graph(
        camera={"x_shift": 0.0, "y_shift": 0.0, "zoom": 1.0}, sampler=("KSampler", params))))
    assert torch.equal(plain, identity)


def test_sizes_off_the_patch_grid_are_padded_and_cropped(server):
    """EmptyLatentImage at 8-px steps gives latent sides that are not whole patches (200x136 px → 25x17); the model
    pads them to a patch and crops back, so the sampler returns the size it was given."""
    params = {"seed": 3, "steps": 2, "cfg": 3.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}
    latent = saved_latent(server, server.run(txt2img_graph(sampler=("KSampler", params), width=200, height=136)))
    assert latent.shape[-2:] == (17, 25) and torch.isfinite(latent).all()
    latent = saved_latent(server, server.run(txt2img_graph(sampler=("HDMSampler", HDM_SAMPLER), width=200,
                                                           height=136)))
    assert latent.shape[-2:] == (17, 25) and torch.isfinite(latent).all()


def ksampler_reference(reference, steps, sigmas, camera=True):
    from hdm_core.pipeline import make_denoiser, seeded_noise
    from hdm_core.rope import aspect_info, camera_position_map
    from hdm_core.sampling import sample_euler

    cond, uncond = reference.text_encoder.encode([POS, NEG])
    pos_map = camera_position_map(16, 24) if camera else None
    denoise = make_denoiser(reference.model, cond, uncond, 5.0, pos_map=pos_map,
                            aspect=torch.full((1,), aspect_info(16, 24)))
    return sample_euler(denoise, seeded_noise((1, 4, 16, 24), 7), sigmas)


def test_ksampler_path_matches_official_up_to_schedule(server, reference, models):
    """Built-in KSampler (euler/simple) + CLIPTextEncode + HDM Camera == hdm_core Euler on ComfyUI's 1/1000-quantised
    schedule; against the official schedule it differs only by that quantisation."""
    from hdm_core.sampling import flow_sigmas

    steps = 7  # 1/7 is not on the 1/1000 grid
    params = {"seed": 7, "steps": steps, "cfg": 5.0, "sampler_name": "euler", "scheduler": "simple", "denoise": 1.0}
    graph = txt2img_graph(encode="CLIPTextEncode", camera={"x_shift": 0.0, "y_shift": 0.0, "zoom": 1.0},
                          sampler=("KSampler", params))
    got = normalise(saved_latent(server, server.run(graph)), models)
    quantised = ksampler_reference(reference, steps, comfy_simple_sigmas(steps))
    official = ksampler_reference(reference, steps, flow_sigmas(steps))
    err_q, err_o = (got - quantised).abs().max().item(), (got - official).abs().max().item()
    print(f"KSampler vs hdm_core: quantised schedule {err_q:.2e}, official schedule {err_o:.2e}")
    assert err_q <= 1e-4
    # KSampler really runs the quantised schedule: against the official one the error is far larger.
    assert err_o > 100 * err_q
    # Sensitivity: had ComfyUI repeated the shorter context (CONDCrossAttn), the result would be far off.
    assert reference.text_encoder.encode([POS])[0].shape[1] != reference.text_encoder.encode([NEG])[0].shape[1]


def test_img2img_and_builtin_nodes(server, models):
    """VAEEncode(Tiled) → HDM Sampler denoise 0.5; ModelSamplingAuraFlow + ModelMergeSimple +
    SamplerCustomAdvanced; VAEDecodeTiled; HDM Tread Gamma on both branches; split loader."""
    g = {
        "1": {"class_type": "HDMSplitLoader", "inputs": {"unet_name": "hdm_xut_tiny.safetensors",
                                                         "clip_name": "qwen3_tiny.safetensors",
                                                         "vae_name": "eq_sdxl_vae_random.safetensors",
                                                         "weight_dtype": "default"}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": POS}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"clip": ["1", 1], "text": ""}},
        "4": {"class_type": "HDMTreadGamma", "inputs": {"positive": ["2", 0], "negative": ["3", 0],
                                                        "positive_gamma": 0.1, "negative_gamma": 0.3}},
        "5": {"class_type": "ModelSamplingAuraFlow", "inputs": {"model": ["1", 0], "shift": 3.0}},
        "6": {"class_type": "ModelMergeSimple", "inputs": {"model1": ["5", 0], "model2": ["1", 0], "ratio": 0.5}},
        "7": {"class_type": "HDMEmptyLatent", "inputs": {"resolution": "custom (width x height below)", "width": 128,
                                                         "height": 128, "batch_size": 2}},
        "8": {"class_type": "CFGGuider", "inputs": {"model": ["6", 0], "positive": ["4", 0], "negative": ["4", 1],
                                                    "cfg": 4.0}},
        "9": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "heun"}},
        "10": {"class_type": "BasicScheduler", "inputs": {"model": ["6", 0], "scheduler": "simple", "steps": 3,
                                                          "denoise": 1.0}},
        "11": {"class_type": "RandomNoise", "inputs": {"noise_seed": 3}},
        "12": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["11", 0], "guider": ["8", 0],
                                                                 "sampler": ["9", 0], "sigmas": ["10", 0],
                                                                 "latent_image": ["7", 0]}},
        "13": {"class_type": "VAEDecodeTiled", "inputs": {"samples": ["12", 0], "vae": ["1", 2], "tile_size": 512,
                                                          "overlap": 64, "temporal_size": 64, "temporal_overlap": 8}},
        "14": {"class_type": "VAEEncode", "inputs": {"pixels": ["13", 0], "vae": ["1", 2]}},
        "15": {"class_type": "HDMSampler", "inputs": {"model": ["1", 0], "positive": ["4", 0], "negative": ["4", 1],
                                                      "latent_image": ["14", 0], **HDM_SAMPLER, "denoise": 0.5}},
        "16": {"class_type": "VAEDecode", "inputs": {"samples": ["15", 0], "vae": ["1", 2]}},
        "17": {"class_type": "SaveImage", "inputs": {"images": ["16", 0], "filename_prefix": "compat"}},
    }
    images = output_files(server, server.run(g), "images")
    assert len(images) == 2


def test_split_loader_matches_single_file(server):
    split = ("HDMSplitLoader", {"unet_name": "hdm_xut_tiny.safetensors", "clip_name": "qwen3_tiny.safetensors",
                                "vae_name": "eq_sdxl_vae_random.safetensors", "weight_dtype": "fp32"})
    a = saved_latent(server, server.run(txt2img_graph(sampler=("HDMSampler", HDM_SAMPLER))))
    b = saved_latent(server, server.run(txt2img_graph(loader=split, sampler=("HDMSampler", HDM_SAMPLER))))
    assert torch.equal(a, b)


@pytest.mark.parametrize("ckpt, expected", [
    ("sdxl_like.safetensors", "is not an HDM/XUT checkpoint: it looks like SDXL"),
    ("hdm_no_te.safetensors", "no text-encoder weights"),
])
def test_loader_errors_are_clear(server, ckpt, expected):
    graph = txt2img_graph(loader=("HDMLoader", {"ckpt_name": ckpt}), sampler=("HDMSampler", HDM_SAMPLER))
    err = execution_error(server.run(graph))
    assert err is not None and expected in err["exception_message"], err
    assert "models/" in err["exception_message"]


def test_missing_checkpoint_is_reported_before_running(server):
    graph = txt2img_graph(loader=("HDMLoader", {"ckpt_name": "not_there.safetensors"}),
                          sampler=("HDMSampler", HDM_SAMPLER))
    with pytest.raises(PromptRejected) as info:
        server.run(graph)
    text = json.dumps(info.value.args[0])
    assert "not_there.safetensors" in text and "models/checkpoints" in text


def test_camera_sweep_frames_differ_but_share_noise(server, reference):
    """The sweep renders one frame per camera; frame k equals a single HDM Sampler run with camera k."""
    g = txt2img_graph(sampler=("HDMSampler", HDM_SAMPLER))
    g["5"] = {"class_type": "HDMCameraSweep", "inputs": {"positive": ["2", 0], "negative": ["3", 0],
                                                         "latent": ["4", 0], "frames": 3, "x_start": -0.4,
                                                         "y_start": 0.0, "zoom_start": 1.0, "x_end": 0.4,
                                                         "y_end": 0.0, "zoom_end": 2.0, "easing": "linear"}}
    g["6"]["inputs"].update(positive=["5", 0], negative=["5", 1], latent_image=["5", 2])
    frames = saved_latent(server, server.run(g))
    assert frames.shape[0] == 3
    single = txt2img_graph(camera={"x_shift": 0.0, "y_shift": 0.0, "zoom": math.sqrt(2.0)},
                           sampler=("HDMSampler", HDM_SAMPLER))
    middle = saved_latent(server, server.run(single))
    assert (frames[1:2] - middle).abs().max().item() <= 1e-4
    assert (frames[0] - frames[2]).abs().max().item() > 1e-2


# Run with ComfyUI's interpreter (it has aiohttp): queue a prompt over HTTP and listen on the websocket.
WS_LISTENER = r"""
import asyncio, json, sys, uuid
import aiohttp

url, graph, interrupt_at = sys.argv[1], json.loads(sys.stdin.read()), int(sys.argv[2])

async def main():
    cid, out, sent = uuid.uuid4().hex, {"progress": [], "previews": 0, "jpeg_previews": 0, "end": None}, False
    async with aiohttp.ClientSession() as session, session.ws_connect(f"{url}/ws?clientId={cid}") as ws:
        body = {"prompt": graph, "client_id": cid, "extra_data": {"preview_method": "latent2rgb"}}
        async with session.post(f"{url}/prompt", json=body) as r:
            prompt_id = (await r.json())["prompt_id"]
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                if int.from_bytes(msg.data[:4], "big") in (1, 4):  # PREVIEW_IMAGE (with metadata)
                    out["previews"] += 1
                    out["jpeg_previews"] += msg.data.find(b"\xff\xd8\xff") >= 0
                continue
            m = json.loads(msg.data)
            data = m.get("data") or {}
            if data.get("prompt_id", prompt_id) != prompt_id:
                continue
            if m["type"] == "progress":
                out["progress"].append([data["node"], data["value"], data["max"]])
                if interrupt_at and data["value"] >= interrupt_at and not sent:
                    sent = True
                    await session.post(f"{url}/interrupt", json={})
            if m["type"] in ("execution_success", "execution_error", "execution_interrupted"):
                out["end"] = m["type"]
                break
    print(json.dumps(out))

asyncio.run(main())
"""


def listen(server: Server, graph: dict, interrupt_at: int = 0) -> dict:
    _, python = comfy_paths()
    proc = subprocess.run([python, "-c", WS_LISTENER, server.url, str(interrupt_at)], input=json.dumps(graph),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_progress_previews_and_interrupt(server):
    graph = txt2img_graph(sampler=("HDMSampler", {**HDM_SAMPLER, "steps": 5}))
    out = listen(server, graph)
    assert out["end"] == "execution_success"
    assert [p[1:] for p in out["progress"] if p[0] == "6"] == [[i, 5] for i in range(1, 6)]
    assert out["previews"] >= 5 and out["jpeg_previews"] == out["previews"]  # Latent2RGB with our factors
    graph = txt2img_graph(sampler=("HDMSampler", {**HDM_SAMPLER, "steps": 1000, "seed": 99}))
    out = listen(server, graph, interrupt_at=2)
    assert out["end"] == "execution_interrupted" and max(p[1] for p in out["progress"]) < 1000


def test_checkpoint_save_round_trip(server):
    """CheckpointSave writes the released single-file layout; HDM Checkpoint Loader reads it back unchanged."""
    prefix = f"checkpoints/hdm_saved_{uuid.uuid4().hex[:8]}"
    g = {"1": {"class_type": "HDMLoader", "inputs": {"ckpt_name": CKPT}},
         "2": {"class_type": "ModelMergeSimple", "inputs": {"model1": ["1", 0], "model2": ["1", 0], "ratio": 0.5}},
         "3": {"class_type": "CheckpointSave", "inputs": {"model": ["2", 0], "clip": ["1", 1], "vae": ["1", 2],
                                                          "filename_prefix": prefix}}}
    assert execution_error(server.run(g)) is None
    saved = sorted((server.base / "output").glob(prefix + "*.safetensors"))
    assert len(saved) == 1
    from safetensors import safe_open

    with safe_open(str(saved[0]), "pt") as f:
        keys = list(f.keys())
    assert "unet.model.in_patch.proj.weight" in keys and "te.text_models.0.embed_tokens.weight" in keys
    assert "vae_mean" in keys and any(k.startswith("vae.decoder.") for k in keys)
    name = saved[0].relative_to(server.base / "output" / "checkpoints").as_posix()
    a = saved_latent(server, server.run(txt2img_graph(sampler=("HDMSampler", HDM_SAMPLER))))
    b = saved_latent(server, server.run(txt2img_graph(loader=("HDMLoader", {"ckpt_name": name}),
                                                      sampler=("HDMSampler", HDM_SAMPLER))))
    assert (a - b).abs().max().item() <= 1e-5

