"""Rank-0 run monitoring: progress bar, CSV log, TensorBoard (optional), loss-curve PNG, sample grids."""

from __future__ import annotations

import csv
import math
import sys
import time
from pathlib import Path
from typing import Any

import torch
from PIL import Image, ImageDraw

from hdm_core.flow import denoised_from_velocity
from hdm_core.rope import make_axial_pos
from hdm_core.sampling import cfg_velocity, flow_sigmas, sample_euler

CSV_FIELDS = ["step", "epoch", "loss", "lr", "grad_norm", "samples_per_s", "image_tokens_per_s", "skipped",
              "elapsed_s"]


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
            with self.csv_path.open("w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
                writer.writeheader()
                writer.writerows(rows)
            new = False
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
        text = f"loss {row['loss']:.4f}  lr {row['lr']:.2e}  {row['samples_per_s']:.1f} samples/s"
        if self.bar is not None:
            self.bar.set_postfix_str(text)
        else:
            print(f"step {row['step']}: {text}", flush=True)

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


def plot_loss_curve(csv_path: Path, out: Path) -> None:
    """loss against step as a PNG: matplotlib when installed, else a plain PIL line plot."""
    with Path(csv_path).open() as f:
        rows = [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f) if r["loss"]]
    if not rows:
        return
    steps, losses = zip(*rows)
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        fig, ax = plt.subplots(figsize=(8, 4.5))
        ax.plot(steps, losses)
        ax.set(xlabel="step", ylabel="loss", title=Path(csv_path).parent.name)
        ax.grid(alpha=0.3)
        fig.savefig(out, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return
    except ImportError:
        pass
    w, h, pad = 800, 450, 50
    img = Image.new("RGB", (w, h), "white")
    draw = ImageDraw.Draw(img)
    lo, hi = min(losses), max(losses)
    s0, s1 = steps[0], max(steps[-1], steps[0] + 1)
    pts = [(pad + (s - s0) / (s1 - s0) * (w - 2 * pad), h - pad - (v - lo) / ((hi - lo) or 1) * (h - 2 * pad))
           for s, v in rows]
    draw.rectangle((pad, pad, w - pad, h - pad), outline="gray")
    if len(pts) > 1:
        draw.line(pts, fill="blue", width=2)
    draw.text((pad, 10), f"loss  max {hi:.4f}  min {lo:.4f}", fill="black")
    draw.text((pad, h - pad + 10), f"step {s0} … {s1}", fill="black")
    img.save(out)


@torch.no_grad()
def sample_grid(model: torch.nn.Module, text_encoder: Any, vae: Any, prompts: list[str], resolution: int,
                steps: int, cfg: float, seed: int, max_length: int, autocast: Any) -> Image.Image:
    """Euler + CFG samples of fixed prompts and seeds at the training resolution, as one grid image."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    ctx = text_encoder.encode_padded(list(prompts) + [""], max_length=max_length).float()
    cond, uncond = ctx[:-1], ctx[-1:].expand(len(prompts), -1, -1)
    side = resolution // vae.downscale_factor
    noise = torch.stack([torch.randn(vae.latent_channels, side, side, generator=torch.Generator().manual_seed(seed + i))
                         for i in range(len(prompts))]).to(device)
    pos = make_axial_pos(side, side, device=device)[None]

    def denoise(x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        with autocast():
            v = model(torch.cat((x, x)), torch.cat((sigma, sigma)), torch.cat((cond, uncond)), pos_map=pos,
                      aspect=torch.zeros(2 * len(prompts), device=device)).float()
        v_c, v_u = v.chunk(2)
        return denoised_from_velocity(x, cfg_velocity(v_c, v_u, cfg), sigma)

    latents = sample_euler(denoise, noise, flow_sigmas(steps).to(device))
    images = vae.decode(latents).cpu()  # (P, 3, H, W) in [0, 1]
    model.train(was_training)
    cols = math.ceil(math.sqrt(len(prompts)))
    rows = math.ceil(len(prompts) / cols)
    size = images.shape[-1]
    grid = Image.new("RGB", (cols * size, rows * size))
    for i, im in enumerate(images):
        arr = (im.permute(1, 2, 0) * 255).round().to(torch.uint8).numpy()
        grid.paste(Image.fromarray(arr), ((i % cols) * size, (i // cols) * size))
    return grid
