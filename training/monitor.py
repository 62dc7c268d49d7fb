"""Rank-0 run monitoring: progress bar, CSV log, TensorBoard (optional), loss-curve PNG (matplotlib), sample grids
labelled with their prompts (PNG files and TensorBoard images)."""

from __future__ import annotations

import csv
import sys
import textwrap
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
import torch.distributed as dist
from PIL import Image, ImageDraw

from hdm_core.pipeline import image_grid, make_denoiser, seeded_noise, to_pil
from hdm_core.rope import make_axial_pos
from hdm_core.sampling import flow_sigmas, sample_euler
from hdm_core.weights import atomic_write

from .recipe import Recipe

if TYPE_CHECKING:
    from hdm_core.text_encoder import TextEncoder

    from .encoders import Vae

CSV_FIELDS = ["step", "epoch", "loss", "val_loss", "lr", "grad_norm", "samples_per_s", "image_tokens_per_s",
              "skipped", "elapsed_s"]
MIN_TILE = 192       # sample tiles are upscaled (nearest) to at least this width, so their labels fit
LABEL_LINES = 3      # lines of prompt text under each tile


class Monitor:
    """Everything a run reports; a no-op on ranks other than 0."""

    def __init__(self, run_dir: Path, total_steps: int, start_step: int, enabled: bool, tensorboard: bool) -> None:
        self.enabled, self.run_dir, self.start = enabled, Path(run_dir), time.time()
        self.bar = self.tb = None
        if not enabled:
            return
        self.csv_path = self.run_dir / "log.csv"
        new = not self.csv_path.exists()
        if not new:  # a resumed run drops the rows logged after its checkpoint
            with self.csv_path.open() as f:
                rows = [r for r in csv.DictReader(f) if r["step"] and int(r["step"]) <= start_step]
            atomic_write(self.csv_path, lambda tmp: _write_csv(tmp, rows))
        self.csv_file = self.csv_path.open("a", newline="")
        self.csv = csv.DictWriter(self.csv_file, fieldnames=CSV_FIELDS)
        if new:
            self.csv.writeheader()
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.tb = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError:
                print("tensorboard is not installed; logging to log.csv only (pip install tensorboard)")
        try:
            from tqdm import tqdm
            self.bar = tqdm(total=total_steps, initial=start_step, dynamic_ncols=True, file=sys.stdout,
                            mininterval=0.5 if sys.stdout.isatty() else 30.0)
        except ImportError:
            pass

    def step(self, n: int = 1) -> None:
        if self.bar is not None:
            self.bar.update(n)

    def log(self, row: dict[str, Any]) -> None:
        if not self.enabled:
            return
        row = {k: row.get(k, "") for k in CSV_FIELDS} | {"elapsed_s": round(time.time() - self.start, 2)}
        self.csv.writerow(row)
        self.csv_file.flush()
        if self.tb is not None:
            for key in ("loss", "lr", "grad_norm", "samples_per_s", "image_tokens_per_s", "skipped"):
                self.tb.add_scalar(f"train/{key}", float(row[key]), int(row["step"]))
            if row["val_loss"] != "":
                self.tb.add_scalar("val/loss", float(row["val_loss"]), int(row["step"]))
        text = f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  {row['samples_per_s']:.1f} samples/s"
        if self.bar is not None:
            self.bar.set_postfix_str(text)
        else:
            print(f"step {row['step']}: {text}", flush=True)
        if row["val_loss"] != "":  # a line of its own: the bar's postfix is gone by the next step
            self.message(f"step {row['step']}: validation loss {row['val_loss']:.4f} (training loss "
                         f"{row['loss']:.4f})")

    def image(self, tag: str, image: Image.Image, step: int, prompts: list[str]) -> None:
        """A sample grid in TensorBoard (an image, and its prompts as text); nothing without TensorBoard."""
        if self.enabled and self.tb is not None:
            self.tb.add_image(tag, np.asarray(image.convert("RGB")), step, dataformats="HWC")
            self.tb.add_text(f"{tag}/prompts", "\n".join(f"{i + 1}. {p}" for i, p in enumerate(prompts)), step)

    def message(self, text: str) -> None:
        if self.enabled:
            (self.bar.write if self.bar is not None else print)(text)

    def close(self) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.close()
        if self.tb is not None:
            self.tb.close()
        self.csv_file.close()
        plot_loss_curve(self.csv_path, self.run_dir / "loss.png")


def _write_csv(path: Path, rows: list[dict]) -> None:
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
        writer.writeheader()
        writer.writerows(rows)


class Meter:
    """Loss sum, micro-batches, samples and image tokens since the last `read`, which sums them over ranks."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.diverged = torch.zeros((), device=device)  # 1 once a loss was NaN or Inf (never reset)
        self.reset()

    def reset(self) -> None:
        self.loss = torch.zeros((), dtype=torch.float64, device=self.device)  # on device: no sync per step
        self.micro_batches, self.samples, self.tokens = 0, 0, 0
        self.start = time.time()

    def add(self, loss: torch.Tensor, samples: int, tokens: int) -> None:
        self.diverged = torch.maximum(self.diverged, (~torch.isfinite(loss.detach())).float())  # still no sync
        self.loss += loss.detach()
        self.micro_batches, self.samples, self.tokens = self.micro_batches + 1, self.samples + samples, \
            self.tokens + tokens

    def raise_if_diverged(self, world: int, step: int) -> None:
        """Raise on every rank (one all-reduce) if any rank's loss has been NaN or Inf; called before each log
        line and checkpoint, so no diverged weights are saved and the steps between need no host sync."""
        flag = self.diverged.clone()
        if world > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            raise FloatingPointError(f"the loss became NaN or Inf before step {step}; nothing after it was saved. "
                                     f"Lower optim.lr, or use train.precision='bf16', and resume")

    def read(self, world: int, skipped: int = 0) -> dict[str, float]:
        """Mean loss and throughput over all ranks, and the sum of the ranks' `skipped` counts (one all-reduce),
        then start a new window."""
        counts = torch.tensor([self.micro_batches, self.samples, self.tokens, skipped], dtype=torch.float64,
                              device=self.device)
        stats = torch.cat((self.loss[None], counts))
        if world > 1:
            dist.all_reduce(stats)
        elapsed = max(time.time() - self.start, 1e-9)
        loss, micro_batches, samples, tokens, skipped = stats.tolist()
        self.reset()
        return {"loss": loss / max(micro_batches, 1), "samples_per_s": samples / elapsed,
                "image_tokens_per_s": tokens / elapsed, "skipped": int(skipped)}


def plot_loss_curve(csv_path: Path, out: Path) -> None:
    """Training (and, when logged, validation) loss against step as a PNG, written atomically (skipped, with a note,
    when matplotlib is not installed)."""
    with Path(csv_path).open() as f:
        logged = list(csv.DictReader(f))
    rows = [(int(r["step"]), float(r["loss"])) for r in logged if r["loss"]]
    val = [(int(r["step"]), float(r["val_loss"])) for r in logged if r.get("val_loss")]
    if not rows:
        return
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed; no loss.png (pip install matplotlib)")
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 4.5))
    ax.plot(*zip(*rows), label="training")
    if val:
        ax.plot(*zip(*val), "o-", label="validation")
        ax.legend()
    ax.set(xlabel="step", ylabel="loss", title=Path(csv_path).parent.name)
    ax.grid(alpha=0.3)
    try:
        atomic_write(out, lambda tmp: fig.savefig(tmp, format="png", dpi=100, bbox_inches="tight"))
    finally:
        plt.close(fig)


@torch.no_grad()
def sample_grid(model: torch.nn.Module, text_encoder: TextEncoder, vae: Vae, recipe: Recipe,
                autocast: Any) -> Image.Image:
    """Euler + CFG samples of run.sample_prompts (prompt i with seed run.sample_seed + i) at the training
    resolution, as one grid image."""
    rn, prompts = recipe.run, list(recipe.run.sample_prompts)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ctx = text_encoder.encode_padded(prompts + [""], max_length=recipe.model.max_length).float()
    side = recipe.data.resolution // vae.downscale_factor
    pos = make_axial_pos(side, side, device=device)[None]
    denoise = make_denoiser(model, ctx[:-1], ctx[-1:], rn.sample_cfg, pos_map=pos,
                            aspect=torch.zeros(len(prompts), device=device))
    noise = seeded_noise((len(prompts), vae.latent_channels, side, side), rn.sample_seed).to(device)
    with autocast():
        latents = sample_euler(denoise, noise, flow_sigmas(rn.sample_steps).to(device))
    images = vae.decode(latents.float()).cpu()  # (P, 3, H, W) in [0, 1]
    model.train(was_training)
    return image_grid([labelled(im, p) for im, p in zip(to_pil(images), prompts)], pad=2, background="black")


def labelled(image: Image.Image, prompt: str) -> Image.Image:
    """The image (upscaled to MIN_TILE wide when smaller) above a strip with its prompt, wrapped."""
    if image.width < MIN_TILE:
        scale = -(-MIN_TILE // image.width)
        image = image.resize((image.width * scale, image.height * scale), Image.NEAREST)
    lines = textwrap.wrap(prompt or '""', width=max(8, image.width // 7))
    if len(lines) > LABEL_LINES:
        lines = lines[:LABEL_LINES - 1] + [lines[LABEL_LINES - 1][:-1] + "…"]
    tile = Image.new("RGB", (image.width, image.height + 4 + 12 * LABEL_LINES), "black")
    tile.paste(image, (0, 0))
    ImageDraw.Draw(tile).multiline_text((3, image.height + 2), "\n".join(lines), fill="white", spacing=2)
    return tile
