"""Peak GPU memory of an adapter fine-tuning recipe, estimated on a machine without a GPU.

    python bench/estimate_finetune_memory.py                      # training/recipes/finetune_lora_24gb.toml
    python bench/estimate_finetune_memory.py --recipe training/recipes/finetune_lokr_1024.toml --batch 8
    python bench/estimate_finetune_memory.py --skip-real          # only the fake-tensor estimate (~30 s)

Persistent: the parameter counts are exact (XUT, adapters, Qwen3-0.6B and the SDXL VAE built on the meta device),
at the trainer's dtypes: the frozen XUT in fp32, the encoders in model.encoder_dtype, each adapter parameter with
its fp32 gradient and two fp32 AdamW states (16 bytes).

Transient: `LiveBytes` counts the bytes of every tensor the operators create while they are alive (what CUDA's
caching allocator must hold, rounded as it rounds) and keeps the peak. It runs the real training step
(training.loss.training_loss on the adapted XUT, backward, recipe precision and gradient checkpointing), the VAE
encode of a pixel batch and the text-encoder forward at the recipe's full size under FakeTensorMode, so nothing
is computed or allocated. The same counter then runs real CPU steps at small sizes beside the process's peak RSS
(each in its own subprocess), which checks the counter against memory the OS actually handed out, and a fit
peak = W + B·(c + b·N) to the fake small sizes, extrapolated to the full size, checks the linear-scaling story.
Attention: CPU and CUDA both pick a flash kernel for the XUT (no N×N matrix), so CPU counts carry over.
Not counted (add on the card): the CUDA context (~0.5 GB), the caching allocator's slack (~5–15 %), cuDNN
convolution workspaces (the VAE at 1024²).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import resource
import subprocess
import sys
import weakref
from collections.abc import Iterator
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from hdm_core import XUT  # noqa: E402
from hdm_core.config import PRESETS, XUTConfig  # noqa: E402
from hdm_core.rope import make_axial_pos  # noqa: E402
from hdm_core.text_encoder import QWEN3_06B, build_qwen3  # noqa: E402
from hdm_core.vae import PixelSpace, build_autoencoder  # noqa: E402
from hdm_core.weights import DTYPES  # noqa: E402
from training.data import Batch  # noqa: E402
from training.finetune import AdaptedXUT, Adapters  # noqa: E402
from training.loss import training_loss  # noqa: E402
from training.recipe import Recipe, load_recipe  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
GB = 1e9


class LiveBytes(TorchDispatchMode):
    """Live bytes of the tensors created under this mode (each storage once, rounded up to CUDA's 512-byte
    blocks) and their peak. Tensors that existed before entering (weights, inputs) are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.live = self.peak = 0
        self._seen: set[int] = set()

    def _free(self, key: int, size: int) -> None:
        self._seen.discard(key)
        self.live -= size

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor):
                continue
            st = t.untyped_storage()
            key = st._cdata
            if key in self._seen or key in inputs or st.nbytes() == 0:  # counted, or a view / in-place result
                continue
            size = 512 * math.ceil(st.nbytes() / 512)
            self._seen.add(key)
            self.live += size
            weakref.finalize(st, self._free, key, size)
        self.peak = max(self.peak, self.live)
        return out


# ---------------------------------------------------------------------------------------------------
# What is measured
# ---------------------------------------------------------------------------------------------------


def adapted_xut(recipe: Recipe, cfg: XUTConfig) -> AdaptedXUT:
    """The frozen fp32 XUT with the recipe's adapters, as training.model.build_trainee makes it (attach() minus
    its final .to(device), which FakeTensorMode cannot do in place)."""
    model = XUT(cfg)
    model.gradient_checkpointing = recipe.model.gradient_checkpointing
    model.train().requires_grad_(False)
    return AdaptedXUT(model, Adapters(recipe.finetune, model, None))


def step_peak(net: AdaptedXUT, recipe: Recipe, latent: int, batch: int) -> int:
    """Peak live bytes of one micro-step (inputs, training_loss forward, backward) on fresh adapter gradients."""
    cfg, m = net.model.config, recipe.model
    precision = recipe.train.precision
    autocast = lambda: torch.autocast("cpu", dtype=DTYPES[precision], enabled=precision != "fp32")  # noqa: E731
    net.adapters.zero_grad(set_to_none=True)
    with LiveBytes() as mem:
        b = Batch(pos=make_axial_pos(latent, latent)[None].expand(batch, -1, -1), aspect=torch.zeros(batch),
                  captions=[""] * batch, latent_mean=torch.randn(batch, cfg.input_dim, latent, latent),
                  latent_std=torch.zeros(batch, cfg.input_dim, latent, latent),
                  ctx=torch.randn(batch, m.max_length, cfg.ctx_dim))
        loss = training_loss(net, b, None, PixelSpace(), m, torch.Generator().manual_seed(0), autocast,
                             cfg.patch_size)
        loss.backward()
    return mem.peak


@contextlib.contextmanager
def default_dtype(dtype: torch.dtype) -> Iterator[None]:
    """Build modules directly in `dtype` (FakeTensorMode cannot convert a built module's parameters)."""
    saved = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        yield
    finally:
        torch.set_default_dtype(saved)


def vae_encode_peak(pixels: int, batch: int, dtype: torch.dtype) -> int:
    """Peak live bytes of encoding a (batch, 3, pixels, pixels) image batch and drawing the posterior sample."""
    with default_dtype(dtype):
        vae = build_autoencoder().eval().requires_grad_(False)
    with LiveBytes() as mem, torch.no_grad():
        x = torch.randn(batch, 3, pixels, pixels).to(dtype)
        vae.encode(x).latent_dist.sample()
    return mem.peak


def vae_decode_peak(pixels: int, batch: int, dtype: torch.dtype) -> int:
    """Peak live bytes of decoding `batch` latents to pixels² images (the sample grid at run.sample_every)."""
    with default_dtype(dtype):
        vae = build_autoencoder().eval().requires_grad_(False)
    with LiveBytes() as mem, torch.no_grad():
        vae.decode(torch.randn(batch, 4, pixels // 8, pixels // 8).to(dtype))
    return mem.peak


def text_encoder_peak(batch: int, length: int, dtype: torch.dtype) -> int:
    """Peak live bytes of the Qwen3-0.6B forward over a padded (batch, length) token batch under no_grad."""
    from transformers import Qwen3Config, Qwen3Model

    with default_dtype(dtype):  # build_qwen3's .to(dtype) is a conversion FakeTensorMode cannot do
        te = Qwen3Model(Qwen3Config(**QWEN3_06B)).eval().requires_grad_(False)
    with LiveBytes() as mem, torch.no_grad():
        ids = torch.randint(0, 1000, (batch, length))
        mask = torch.ones(batch, length, dtype=torch.long)
        mask[:, length // 4:] = 0  # right padding, as encode_padded
        te(input_ids=ids, attention_mask=mask, use_cache=False)
    return mem.peak


def param_bytes(module: torch.nn.Module, dtype: torch.dtype | None = None) -> tuple[int, int]:
    """(parameter count, bytes of parameters and buffers at `dtype`, or at their own dtype)."""
    n = sum(p.numel() for p in module.parameters())
    size = sum(t.numel() * (dtype.itemsize if dtype and t.is_floating_point() else t.element_size())
               for t in [*module.parameters(), *module.buffers()])
    return n, size


# ---------------------------------------------------------------------------------------------------
# Real CPU steps in subprocesses: the counter against the process's peak RSS
# ---------------------------------------------------------------------------------------------------


def rss_bytes() -> int:
    return int(Path("/proc/self/statm").read_text().split()[1]) * resource.getpagesize()


def real_step(recipe_path: str, preset: str, latent: int, batch: int) -> dict:
    """One real CPU micro-step; run in a fresh process so ru_maxrss is this step's."""
    recipe = load_recipe(recipe_path)
    torch.manual_seed(0)
    net = adapted_xut(recipe, PRESETS[preset])
    before = rss_bytes()
    counted = step_peak(net, recipe, latent, batch)
    peak_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"counted": counted, "rss": peak_rss - before}


def run_real(recipe_path: str, preset: str, latent: int, batch: int) -> dict:
    code = (f"import json, sys; sys.path.insert(0, {str(REPO / 'bench')!r}); import estimate_finetune_memory as e; "
            f"print(json.dumps(e.real_step({recipe_path!r}, {preset!r}, {latent}, {batch})))")
    # A fixed mmap threshold makes glibc return freed tensors to the OS at once: otherwise heap fragmentation
    # adds ~1 GB of RSS that is no tensor's (and that CUDA's caching allocator does not have).
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "131072"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=REPO, env=env)
    return json.loads(out.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------------------------------------------
# The estimate
# ---------------------------------------------------------------------------------------------------


def fit_and_extrapolate(points: dict[tuple[int, int], int], tokens: int, batch: int) -> float:
    """Least squares of peak = W + B·c + B·N·b over (N image tokens, B batch) points, evaluated at the target."""
    rows = [[1.0, b, b * n] for (n, b) in points]
    w, c, slope = torch.linalg.lstsq(torch.tensor(rows, dtype=torch.float64),
                                     torch.tensor([float(v) for v in points.values()], dtype=torch.float64)[:, None]
                                     ).solution.flatten().tolist()
    return w + batch * c + batch * tokens * slope


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--recipe", default=str(REPO / "training/recipes/finetune_lora_24gb.toml"))
    p.add_argument("--preset", default="xut-base", help="the XUT the recipe's init_from holds")
    p.add_argument("--batch", type=int, default=0, help="micro-batch (default: the recipe's train.batch_size)")
    p.add_argument("--real-sides", default="256,384,512", help="pixel sides of the real CPU steps (batch 1)")
    p.add_argument("--skip-real", action="store_true", help="no real CPU steps (~3 min on one thread)")
    args = p.parse_args()
    recipe = load_recipe(args.recipe)
    cfg, batch, px = PRESETS[args.preset], args.batch or recipe.train.batch_size, recipe.data.resolution
    latent, enc_dtype = px // 8, DTYPES[recipe.model.encoder_dtype]
    tokens = (latent // cfg.patch_size) ** 2
    print(f"{Path(args.recipe).name}: {args.preset}, {recipe.finetune.method} {recipe.finetune.modules}, "
          f"{px}² ({tokens} image + {recipe.model.max_length} text tokens), batch {batch}, {recipe.train.precision}, "
          f"gradient checkpointing {recipe.model.gradient_checkpointing}, encoders {recipe.model.encoder_dtype}")

    # (a) Persistent memory: exact counts.
    with torch.device("meta"):
        net = adapted_xut(recipe, cfg)
        te, vae = build_qwen3(device="meta"), build_autoencoder(device="meta")
    n_xut, xut_b = param_bytes(net.model)
    n_ad = sum(p.numel() for p in net.adapters.parameters())
    n_te, te_b = param_bytes(te, enc_dtype)
    n_vae, vae_b = param_bytes(vae, enc_dtype)
    ad_b = 16 * n_ad  # fp32 weight + fp32 grad + 2 fp32 AdamW states
    print(f"XUT {n_xut:,} params: {xut_b / GB:.3f} GB fp32 (frozen)\n"
          f"adapters {n_ad:,} params ({len(net.adapters.paths)} modules): {ad_b / GB:.3f} GB with grads and AdamW\n"
          f"Qwen3-0.6B {n_te:,} params: {te_b / GB:.3f} GB; SDXL VAE {n_vae:,} params: {vae_b / GB:.3f} GB")

    # (b) Transient memory at the full size, counted on fake tensors; the step also at small sizes for the fit.
    with FakeTensorMode(allow_non_fake_inputs=True):
        torch.manual_seed(0)
        net = adapted_xut(recipe, cfg)
        step = step_peak(net, recipe, latent, batch)
        small = {((s // 16) ** 2, b): step_peak(net, recipe, s // 8, b)
                 for s, b in [(256, 1), (384, 1), (512, 1), (256, 2), (512, 2)]}
        vae_enc = vae_encode_peak(px, batch, enc_dtype)
        n_samples = len(recipe.run.sample_prompts)
        vae_dec = vae_decode_peak(px, n_samples, enc_dtype)
        te_fwd = text_encoder_peak(batch, recipe.model.max_length, enc_dtype)
    print(f"training micro-step: {step / GB:.2f} GB counted at full size; "
          f"{fit_and_extrapolate(small, tokens, batch) / GB:.2f} GB fitted on the small sizes and extrapolated")
    print("  small sizes: " + ", ".join(f"{n} tok × {b}: {v / GB:.3f}" for (n, b), v in small.items()) + " GB")
    print(f"VAE encode {px}² × {batch}: {vae_enc / GB:.2f} GB; sample-grid decode {px}² × {n_samples}: "
          f"{vae_dec / GB:.2f} GB; text encoder × {batch}: {te_fwd / GB:.3f} GB")

    # (c) The counter against real CPU memory.
    for side in map(int, args.real_sides.split(",")) if not args.skip_real else ():
        r = run_real(args.recipe, args.preset, side // 8, 1)
        print(f"  real CPU step {side}² × 1: counted {r['counted'] / GB:.3f} GB, peak RSS growth "
              f"{r['rss'] / GB:.3f} GB, fake count {small.get(((side // 16) ** 2, 1), float('nan')) / GB:.3f} GB")

    weights = xut_b + te_b + vae_b
    transient = {"activations": step, "VAE encode": vae_enc, "sample decode": vae_dec, "text encoder": te_fwd}
    worst = max(transient, key=transient.get)
    print(f"\nestimated peak (allocated) ≈ {(weights + ad_b + transient[worst]) / GB:.1f} GB = weights "
          f"{weights / GB:.2f} + adapter+optimizer {ad_b / GB:.2f} + {worst} {transient[worst] / GB:.2f} (the "
          f"transients run one after another: " + ", ".join(f"{k} {v / GB:.2f}" for k, v in transient.items()) + ")")


if __name__ == "__main__":
    main()
