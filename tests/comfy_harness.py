"""The real-ComfyUI test harness, shared by tests/test_comfy_integration.py, tests/test_comfy_features.py and
tests/test_comfy_finetune.py (not a test module itself).

The server runs with ComfyUI's own interpreter: COMFYUI_PYTHON if set, else the first of <checkout>/../venv,
<checkout>/venv, <checkout>/.venv (bin/python or Scripts/python.exe) that exists, else this interpreter. The test
process itself only needs torch, transformers, diffusers and safetensors (for hdm_core, the reference the server
is compared with).

What it sets up, once per test run (`session`): a tiny checkpoint in the released single-file layout (tiny XUT,
tiny Qwen3, a random full-size SDXL-shaped VAE, fp16 like the released file) plus split files and the shipped demo
model in a temporary models folder; an isolated base directory with the pack symlinked into custom_nodes next to a
test-only probe pack (`PROBE_PACK`) and the LoRA-training example's pictures in input/; one `main.py --cpu` server
on loopback for every test module.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((REPO / "example_workflows").glob("*.json"))
FIRST_RELEASE = REPO / "tests" / "data" / "first_release"  # workflows and /object_info of the classic-API pack
CKPT = "hdm-xut-340M-1024px-note.safetensors"
DEMO_CKPT = "hdm-demo.safetensors"  # the shipped demo model (pixel space, 32 px shapes), in checkpoints/ too
STYLE_LORA = "hdm_style_lora.safetensors"  # the LoRA example_workflows/hdm_lora.json loads from models/loras
TRAIN_FOLDER = "hdm_orange"  # example_workflows/hdm_orange: the LoRA-training example's pictures, in input/
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
    shutil.copyfile(REPO / "demo" / "pretrained" / DEMO_CKPT, paths["checkpoints"] / DEMO_CKPT)
    paths["loras"] = root / "loras"
    paths["loras"].mkdir()
    save_style_lora(paths["loras"] / STYLE_LORA, xut)
    return paths


def save_style_lora(path: Path, xut) -> None:
    """A small random LoRA (rank 4, ComfyUI keys) on the text projection and every self-attention qkv of the tiny XUT:
    what the example workflow hdm_lora.json loads as its style LoRA."""
    from hdm_core.adapters import save_adapter
    from hdm_core.layout import LORA_UNET_PREFIX

    g, tensors = torch.Generator().manual_seed(1), {}
    for name, module in xut.named_modules():
        if name == "ctx_proj" or name.endswith("attn.qkv"):
            out_f, in_f = module.weight.shape
            key = LORA_UNET_PREFIX + name
            tensors[f"{key}.lora_up.weight"] = torch.randn(out_f, 4, generator=g) * 0.05
            tensors[f"{key}.lora_down.weight"] = torch.randn(4, in_f, generator=g) * 0.05
            tensors[f"{key}.alpha"] = torch.tensor(4.0)
    save_adapter(path, {k: v.half() for k, v in tensors.items()})


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
        folders = "".join(f"  {k}: {k}\n" for k in ("checkpoints", "diffusion_models", "text_encoders", "vae", "loras"))
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


def run_seconds(entry: dict) -> float:
    """Server-side execution time of a prompt (execution_start → execution_success timestamps)."""
    stamps = {kind: data.get("timestamp") for kind, data in entry["status"]["messages"]}
    return (stamps["execution_success"] - stamps["execution_start"]) / 1000


def custom_node_imports(log: str) -> dict[str, bool]:
    """{pack folder name: imported} from the server log's "Import times for custom nodes" list."""
    found = re.findall(r"^\s*[\d.]+ seconds( \(IMPORT FAILED\))?: (.+)$", log, flags=re.MULTILINE)
    return {Path(path.strip()).name: not failed for failed, path in found}


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


def has_control_widget(name: str, spec: list) -> bool:
    """The frontend adds a "control after generate" widget (one more saved value) to such inputs, and to every INT
    called seed / noise_seed (e.g. TrainLoraNode's)."""
    opts = spec[1] if len(spec) > 1 else {}
    return bool(opts.get("control_after_generate")) or (spec[0] == "INT" and name in ("seed", "noise_seed"))


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
                if has_control_widget(name, spec):
                    values.pop(0)
                if value is not None:
                    inputs[name] = value
            if name in linked:
                inputs[name] = [str(linked[name][1]), linked[name][2]]
        prompt[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return prompt


def shrink(prompt: dict, width: int = 192, height: int = 128, steps: int = 3, frames: int = 3) -> dict:
    """Make a shipped workflow fast on CPU: small image, few steps, few sweep frames; area prompts and tiles scaled
    with the image (tiles to half its size, so a tiled workflow still runs in 2 x 2 tiles)."""
    sizes = [(n["inputs"]["width"], n["inputs"]["height"]) for n in prompt.values()
             if n["class_type"] in ("EmptyLatentImage", "HDMEmptyLatent")]
    fx, fy = (width / sizes[0][0], height / sizes[0][1]) if sizes else (1.0, 1.0)
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
        if kind == "ConditioningSetArea":  # whole latent cells, at least one
            scaled = {k: round(inputs[k] * f / 8) * 8 for k, f in (("width", fx), ("x", fx), ("height", fy), ("y", fy))}
            inputs.update(scaled, width=max(8, scaled["width"]), height=max(8, scaled["height"]))
        if kind == "HDMTiledDiffusion":
            inputs.update(tile_width=width // 2 + 32, tile_height=height // 2 + 32, overlap=32)
    return prompt


def normalise(latent: torch.Tensor, models: dict[str, Path]) -> torch.Tensor:
    """VAE-space LATENT → model space, with the vae_mean / vae_std stored (in fp16) in the checkpoint."""
    from safetensors import safe_open

    with safe_open(str(models["checkpoints"] / CKPT), "pt") as f:
        mean, std = f.get_tensor("vae_mean").float(), f.get_tensor("vae_std").float()
    return (latent - mean) / std


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
# The probe pack: test-only nodes that record what HDM hands to ComfyUI's patch and attention machinery
# ---------------------------------------------------------------------------------------------------

PROBE_PACK = REPO / "tests" / "comfy_probe"  # symlinked into custom_nodes as hdm_probe


def read_probe(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.is_file() else []


# ---------------------------------------------------------------------------------------------------
# One server per test run
# ---------------------------------------------------------------------------------------------------

@dataclass
class Session:
    models: dict[str, Path]
    server: Server
    object_info: dict


_SESSION: list[Session] = []


def session(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> Session:
    """The run's one model folder and server, started by the first test module that asks, stopped at exit."""
    if not _SESSION:
        comfy, python = comfy_paths()  # skip early (before writing 0.4 GB) when ComfyUI is not available
        models = make_models(tmp_path_factory.mktemp("models"))
        base = tmp_path_factory.mktemp("base")
        (base / "custom_nodes").mkdir()
        (base / "custom_nodes" / "hdm_probe").symlink_to(PROBE_PACK, target_is_directory=True)
        shutil.copytree(REPO / "example_workflows" / TRAIN_FOLDER, base / "input" / TRAIN_FOLDER)
        srv = Server(comfy, python, base, models["checkpoints"].parent)
        request.config.add_cleanup(srv.stop)
        imports = custom_node_imports(srv.log.read_text())
        if not imports.get("comfyui-hdm"):  # the pack must import; other packages' failures are not ours
            raise RuntimeError(f"the pack did not import: {imports}\n{srv.log.read_text()[-3000:]}")
        _SESSION.append(Session(models, srv, srv.get("/object_info")))
    return _SESSION[0]
