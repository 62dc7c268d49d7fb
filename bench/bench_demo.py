"""Where the CPU demo's training time goes: one optimizer step of demo/recipe.toml split into data (read, crop,
collate), forward (encoders + XUT + loss), backward and optimizer, for the recipe as committed beside the previous
one (2,000 steps, TREAD 0.5, lr 0.5: the baseline), measured in the same run on the demo's own dataset.

    python bench/bench_demo.py                  # ~1 min on one CPU thread; writes the dataset to /tmp/hdm_bench_demo

The demo's wall time is the step time × the recipe's steps plus the dataset (~4 s) and sampling (~10 s).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from demo.run import RECIPE, write_dataset  # noqa: E402
from training.loss import training_loss  # noqa: E402
from training.recipe import load_recipe  # noqa: E402
from training.runtime import set_cpu_threads  # noqa: E402
from training.stage import build_stage  # noqa: E402
from training.train import forever  # noqa: E402

PREVIOUS = ["train.max_steps=2000", "model.tread_rate=0.5", "optim.lr=0.5"]  # the recipe before the shapes grew
PHASES = ("data", "forward", "backward", "optimizer")


def profile(data: Path, overrides: list[str], steps: int, warmup: int = 5) -> tuple[dict[str, float], int]:
    """Median ms per phase of `steps` optimizer steps (after `warmup`), and the recipe's step count."""
    recipe = load_recipe(RECIPE, [f"data.path={data}", "run.out_dir=/tmp/hdm_bench_demo/runs", *overrides])
    st = build_stage(recipe, 0, 1, torch.device("cpu"), None, None)
    batches, times = forever(st.source), {k: [] for k in PHASES}
    for i in range(warmup + steps):
        t0 = time.perf_counter()
        batch = next(batches)
        t1 = time.perf_counter()
        st.opt.zero_grad(set_to_none=True)
        loss = training_loss(st.forward, batch, st.encoders.text, st.encoders.vae, recipe.model,
                             torch.Generator().manual_seed(i), st.autocast, st.config.patch_size)
        t2 = time.perf_counter()
        loss.backward()
        t3 = time.perf_counter()
        torch.nn.utils.clip_grad_norm_(st.model.parameters(), recipe.optim.grad_clip)
        st.opt.step()
        st.sched.step()
        t4 = time.perf_counter()
        if i >= warmup:
            for k, dt in zip(PHASES, (t1 - t0, t2 - t1, t3 - t2, t4 - t3)):
                times[k].append(dt * 1000)
    return {k: statistics.median(v) for k, v in times.items()}, recipe.train.max_steps


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40, help="measured steps per recipe")
    args = p.parse_args()
    threads = set_cpu_threads()
    data = Path("/tmp/hdm_bench_demo/data")
    if not data.is_dir():
        write_dataset(data, 3000, seed=0)
    rows = {"previous: 2,000 steps, TREAD 0.5 (baseline)": PREVIOUS, "demo/recipe.toml as committed": []}
    print(f"CPU demo training step, batch 32 at 32 px, {threads} thread(s), median of {args.steps} steps (ms)")
    print("| recipe | data | forward | backward | optimizer | step | vs baseline | steps | training |")
    print("|---|---|---|---|---|---|---|---|---|")
    base = None
    for name, overrides in rows.items():
        ms, steps = profile(data, overrides, args.steps)
        step = sum(ms.values())
        base = base or step * steps
        print(f"| {name} | " + " | ".join(f"{ms[k]:.1f}" for k in PHASES) +
              f" | {step:.1f} | {step / (base / 2000):.2f}x | {steps:,} | {step * steps / 1000:.0f} s "
              f"({step * steps / base:.2f}x) |", flush=True)


if __name__ == "__main__":
    main()
