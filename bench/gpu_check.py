"""The GPU check: CUDA correctness, inference speed and training throughput of HDM in at most 8 minutes on one
H100 / H200, written to OUT/gpu_check.json (everything) and OUT/gpu_check.md (the tables).

Sections, in order (each guarded and time-boxed; the JSON is rewritten after every section, so a timeout keeps
what was measured): env (versions, measured bf16 matmul rate) · correctness (XUT-base fp16 / bf16 vs fp32, GPU vs
CPU, batched-masked CFG vs separate) · golden (tests/data/golden_public on CUDA, sampler loop included) · sync
(no host synchronisation in the forward and the sampler loop) · encoders (Qwen3-0.6B and the SDXL VAE on CUDA) ·
inference_eager · training_eager · inference_compiled (torch.compile, CUDA graphs) · vae (decode / encode:
eager, channels-last, compiled) · end_to_end · training_compiled. Weights are random, of the real shapes.

On any machine with a CUDA GPU, from a checkout of this repository:

    pip install -e ".[train]"      # with a CUDA build of torch; brings transformers, diffusers (the VAE), Pillow
    bash bench/gpu_check.sh        # at most 8 minutes; OUT=folder to choose where results land
    python bench/gpu_check.py --only inference_eager,vae --budget 200   # a subset, another time budget

Results land in $OUT (default ./gpu_check_out): gpu_check.json, gpu_check.md and gpu_check.log. For a machine that has
torch and transformers but cannot download packages, fetch diffusers and Pillow elsewhere into .whl/ at the
repository root (git ignores it) and copy the folder over; bench/gpu_check.sh installs them with pip --no-index into
/tmp/site:

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \\
        --platform manylinux2014_x86_64 -d .whl diffusers==0.42.1 pillow

(`unzip -p .whl/diffusers-*.whl '*/METADATA' | grep ^Requires-Dist` lists what diffusers needs; transformers brings
all of it but Pillow. If the env section shows a huggingface-hub older than 1.32 and diffusers failing to import,
add huggingface_hub to the download.)

CPU smoke run of every section with tiny models (about 2–3 minutes on 2 cores):
    python bench/gpu_check.py --smoke
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing
from gpu_check_common import Run, median_time, time_box  # noqa: E402

PEAKS = {"H200": 989e12, "H100": 989e12, "A100": 312e12, "L40S": 362e12, "L4": 121e12}  # dense bf16, FLOP/s
AIMS = {"backbone_s_per_image": 0.5, "end_to_end_s_per_image": 0.7, "train_samples_per_s": 300.0}


# ---------------------------------------------------------------------------------------------------
# Section: environment and the card's measured matmul rate
# ---------------------------------------------------------------------------------------------------

def matmul_rate(run: Run, dtype: torch.dtype) -> float:
    """Measured dense matmul FLOP/s of this device in `dtype` (8192² on CUDA, 1024² on CPU)."""
    n = 8192 if run.cuda else 1024
    a, b = torch.randn(n, n, device=run.device, dtype=dtype), torch.randn(n, n, device=run.device, dtype=dtype)
    reps = 20 if run.cuda else 3
    sec = median_time(lambda: [a @ b for _ in range(reps)], run, iters=3, warmup=1)
    return reps * 2 * n**3 / sec


def env_section(run: Run, rec: dict) -> None:
    rec["torch"] = torch.__version__
    rec["cuda"] = torch.version.cuda
    for name in ("transformers", "diffusers", "huggingface_hub", "safetensors", "PIL", "triton"):
        try:
            rec[name] = getattr(importlib.import_module(name), "__version__", "?")
        except Exception as err:  # noqa: BLE001 - a missing wheel is a finding, not a crash
            rec[name] = f"unavailable: {type(err).__name__}: {err}"
    if run.cuda:
        props = torch.cuda.get_device_properties(run.device)
        rec["device"] = props.name
        rec["memory_gib"] = round(props.total_memory / 2**30, 1)
        rec["sm_count"] = props.multi_processor_count
        rec["nominal_bf16_peak_tflops"] = next((v / 1e12 for k, v in PEAKS.items() if k in props.name), None)
    else:
        rec["device"] = f"cpu ({torch.get_num_threads()} threads)"
    rate_dtype = torch.bfloat16 if run.cuda else torch.float32
    rec["matmul_tflops"] = round(matmul_rate(run, rate_dtype) / 1e12, 2)
    rec["matmul_dtype"] = str(rate_dtype).removeprefix("torch.")
    run.cache["matmul_flops"] = rec["matmul_tflops"] * 1e12


# ---------------------------------------------------------------------------------------------------
# Runner and report
# ---------------------------------------------------------------------------------------------------

def sections() -> list[tuple[str, Callable[[Run, dict], None], float]]:
    """(name, function, time box in seconds), most important first; compile-heavy sections last."""
    import gpu_check_correct as correct
    import gpu_check_speed as speed

    return [("env", env_section, 60), ("correctness", correct.correctness_section, 60),
            ("golden", correct.golden_section, 30), ("sync", correct.sync_section, 30),
            ("encoders", correct.encoders_section, 60), ("inference_eager", speed.inference_eager_section, 60),
            ("training_eager", speed.training_eager_section, 90), ("vae", speed.vae_section, 45),
            ("inference_cudagraphs", speed.inference_cudagraphs_section, 150),
            ("end_to_end", speed.end_to_end_section, 45),
            ("training_compiled", speed.training_compiled_section, 180),
            ("vae_compiled", speed.vae_compiled_section, 120),
            ("inference_compiled", speed.inference_compiled_section, 120),
            ("inference_cudagraphs_fp16", speed.inference_cudagraphs_fp16_section, 120),
            ("inference_cudagraphs_separate", speed.inference_cudagraphs_separate_section, 150)]


def run_all(run: Run, only: set[str] | None) -> None:
    for name, fn, box in sections():
        if only and name not in only:
            continue
        rec = run.results.setdefault(name, {})
        budget = min(box, run.left() - 5)
        if budget < 10:
            rec["skipped"] = f"out of time ({run.left():.0f} s left of the run)"
            continue
        start = time.monotonic()
        print(f"[gpu_check] {name} (time box {budget:.0f} s, {run.left():.0f} s left)", flush=True)
        try:
            with time_box(budget):
                fn(run, rec)
        except Exception as err:  # noqa: BLE001 - record it and go on with the next section
            rec["error"] = f"{type(err).__name__}: {err}"[:2000]
            rec["traceback"] = traceback.format_exc()[-3000:]
            print(f"[gpu_check] {name} failed: {rec['error'][:300]}", flush=True)
        rec["seconds"] = round(time.monotonic() - start, 1)
        write_reports(run)


def write_reports(run: Run) -> None:
    run.out.mkdir(parents=True, exist_ok=True)
    (run.out / "gpu_check.json").write_text(json.dumps(run.results, indent=1, default=str))
    (run.out / "gpu_check.md").write_text(markdown(run.results))


# (title, [(column, key)]) per row table; fractions of a peak print as percentages
TABLES = {
    "inference": (f"Sampling, backbone only (s per image; aim ≤ {AIMS['backbone_s_per_image']} s at 1024², 32 steps)",
                  [("mode", "mode"), ("dtype", "dtype"), ("CFG", "cfg"), ("ctx c/u", "ctx_tokens"),
                   ("s / image", "s_per_image"), ("TFLOP/s", "tflops"), ("of matmul", "of_matmul"),
                   ("peak GiB", "peak_gib"), ("1st run s", "first_run_s"), ("graph breaks", "graph_breaks"),
                   ("finite", "finite")]),
    "vae": ("VAE (decode: 1 image at the inference size; encode: the 256² training batch)",
            [("op", "op"), ("variant", "variant"), ("ms", "ms"), ("peak GiB", "peak_gib"),
             ("1st run s", "first_run_s"), ("finite", "finite")]),
    "end_to_end": (f"End to end, prompt → image (aim ≤ {AIMS['end_to_end_s_per_image']} s)",
                   [("mode", "mode"), ("text s", "text_s"), ("backbone s", "backbone_s"), ("VAE s", "vae_s"),
                    ("total s", "total_s")]),
    "training": (f"Training step per GPU (aim ≥ {AIMS['train_samples_per_s']:.0f} samples/s at 256², TREAD 0.5, "
                 "online encoders)",
                 [("variant", "variant"), ("res", "res"), ("batch", "batch"), ("ms / step", "ms_per_step"),
                  ("samples/s", "samples_per_s"), ("MFU (measured matmul)", "mfu_measured"),
                  ("MFU (nominal peak)", "mfu_nominal"), ("peak GiB", "peak_gib")]),
}
PERCENT = {"of_matmul", "mfu_measured", "mfu_nominal"}


def cell(key: str, value: object) -> str:
    if value is None:
        return "–"
    if isinstance(value, float):
        return f"{value:.1%}" if key in PERCENT else f"{value:.4g}"
    return str(value)


def markdown(results: dict) -> str:
    """The JSON's checks and rows as Markdown tables, then every error and skipped section."""
    env = results.get("env", {})
    lines = [f"# gpu_check: {env.get('device', '?')}, torch {env.get('torch', '?')}, CUDA {env.get('cuda', '?')}",
             "", f"Measured {env.get('matmul_dtype', '?')} matmul: {env.get('matmul_tflops', '?')} TFLOP/s "
             f"(nominal {env.get('nominal_bf16_peak_tflops', '?')}); diffusers {env.get('diffusers', '?')}.", "",
             "## Checks", "", "| section | check | max abs | rel rms | rel max | tolerance | result |",
             "|---|---|---|---|---|---|---|"]
    for section, rec in results.items():
        for name, c in (rec.get("checks", {}) if isinstance(rec, dict) else {}).items():
            tol = (f"rms {c['tol_rel_rms']:g}, max {c['tol_rel_max']:g}" if "tol_rel_rms" in c
                   else f"max abs {c['tol_max_abs']:g}" if "tol_max_abs" in c else "")
            verdict = {True: "ok", False: "FAIL", None: "info"}[c.get("ok")]
            verdict += f" ({c['result']})" if "result" in c else ""
            lines.append(f"| {section} | {name} | {cell('', c.get('max_abs'))} | {cell('', c.get('rel_rms'))} | "
                         f"{cell('', c.get('rel_max'))} | {tol} | {verdict} |")
    rows = [r for rec in results.values() if isinstance(rec, dict) for r in rec.get("rows", [])]
    for table, (title, columns) in TABLES.items():
        lines += ["", f"## {title}", "", "| " + " | ".join(c for c, _ in columns) + " |",
                  "|" + "---|" * len(columns)]
        lines += ["| " + " | ".join(cell(k, r.get(k)) for _, k in columns) + " |" for r in rows if r["table"] == table]
    problems = [f"- {name}: {rec.get('error') or rec.get('skipped')}" for name, rec in results.items()
                if isinstance(rec, dict) and (rec.get("error") or rec.get("skipped"))]
    lines += ["", "## Errors and skipped sections", ""] + (problems or ["none"])
    seconds = {name: rec.get("seconds") for name, rec in results.items() if isinstance(rec, dict) and "seconds" in rec}
    return "\n".join(lines + ["", f"Section seconds: {seconds}", ""])


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, tiny models and sizes: checks the script itself")
    p.add_argument("--out", default=None, help="output folder (default: $OUT, else ./gpu_check_out)")
    p.add_argument("--budget", type=float, default=450.0, help="seconds for the whole run (default: 450)")
    p.add_argument("--only", default="", help="comma-separated section names to run (default: all)")
    return p.parse_args(argv)


def make_run(args: argparse.Namespace) -> Run:
    out = Path(args.out or os.environ.get("OUT") or "gpu_check_out")
    deadline = time.monotonic() + args.budget
    if args.smoke:
        return Run(device=torch.device("cpu"), smoke=True, preset="xut-tiny", res=64, steps=2, prompt_tokens=(12, 1),
                   train=((64, 4), (128, 2)), te_spec="random:tiny", vae_spec="random:tiny", backend="aot_eager",
                   deadline=deadline, out=out)
    if not torch.cuda.is_available():
        raise SystemExit("no CUDA device: run on the device machine, or use --smoke on a CPU")
    return Run(device=torch.device("cuda"), smoke=False, preset="xut-base", res=1024, steps=32,
               prompt_tokens=(96, 1), train=((256, 64), (512, 32)), te_spec="random:qwen3-0.6b",
               vae_spec="random:sdxl", backend="inductor", deadline=deadline, out=out)


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run = make_run(args)
    torch._dynamo.config.cache_size_limit = 64  # one graph per dtype / mode / context shape, all kept
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32 in every comparison
    torch.backends.cudnn.allow_tf32 = False
    run.results["run"] = {"smoke": run.smoke, "preset": run.preset, "res": run.res, "steps": run.steps,
                          "prompt_tokens": run.prompt_tokens, "train": run.train, "budget_s": args.budget,
                          "started": time.strftime("%Y-%m-%d %H:%M:%S")}
    run_all(run, {s for s in args.only.split(",") if s} or None)
    run.results["run"]["total_s"] = round(args.budget - run.left(), 1)
    write_reports(run)
    failed = [k for k, v in run.results.items() if isinstance(v, dict) and "error" in v]
    print(f"[gpu_check] done in {run.results['run']['total_s']} s; wrote {run.out}/gpu_check.json and .md; "
          f"sections with errors: {failed or 'none'}")
    print((run.out / "gpu_check.md").read_text())
    return 0


if __name__ == "__main__":
    sys.exit(main())
