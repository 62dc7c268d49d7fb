"""Bake adapters into a checkpoint:
`python -m hdm_core.merge BASE.safetensors OUT.safetensors --lora A.safetensors[:STRENGTH] --lora B.safetensors ...`

BASE is a released single file (or any file `hdm_core.layout` finds an XUT in). Adapter keys under
`diffusion_model.` change the XUT, keys under `text_encoders.qwen3_06b.transformer.model.` the text encoder (see
`hdm_core.adapters`). Every tensor no adapter touches is copied unchanged; a touched one is merged in float32 and
cast back to its dtype. The metadata is kept, and its `hdm.merged_adapters` list gains one record per adapter
(file, sha256, strength). Everything is read and checked before OUT is written, atomically; the whole file is
held in memory once while it is written.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from .adapters import merged_weight, plan_updates
from .checkpoint import SafetensorsFile, fingerprint
from .cli import ArgumentParser, check_adapter_files, check_input_file, check_output, file_record, lora_arg, run_tool
from .layout import LORA_TE_PREFIX, LORA_UNET_PREFIX, find_text_encoder, find_xut, xut_part
from .weights import atomic_write, check_finite

MERGED_KEY = "hdm.merged_adapters"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m hdm_core.merge", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("base", metavar="BASE", help="the checkpoint to merge into (.safetensors)")
    p.add_argument("out", metavar="OUT", help="the merged checkpoint to write (.safetensors; never BASE)")
    p.add_argument("--lora", action="append", required=True, type=lora_arg, metavar="FILE[:STRENGTH]",
                   help="a LoRA/LoHa/LoKr/diff/norm adapter .safetensors (ComfyUI keys) at STRENGTH (default 1.0); "
                        "repeat for several")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Merge and write, then print OUT; user errors are one line and exit code 2."""
    args = parse_args(argv)
    return run_tool(lambda: print(merge_checkpoint(args.base, args.out, args.lora)))


def adapter_keys(sd: Mapping[str, torch.Tensor], metadata: Mapping[str, str] | None = None,
                 name: str = "checkpoint") -> dict[str, str]:
    """{adapter target key: file key} for the XUT and (when the file has one) the text-encoder tensors of a
    checkpoint; `CheckpointError` when it holds no XUT."""
    xut_part(sd, metadata, name)  # raises for a file without an XUT, saying what it looks like
    parts = [(find_xut(sd), LORA_UNET_PREFIX)]
    te_prefix = find_text_encoder(sd)
    if te_prefix is not None:
        parts.append((te_prefix, LORA_TE_PREFIX))
    return {target + key[len(prefix):]: key for prefix, target in parts for key in sd if key.startswith(prefix)}


def merge_checkpoint(base: str | os.PathLike, out: str | os.PathLike,
                     loras: Sequence[tuple[str | os.PathLike, float]]) -> Path:
    """Write BASE with the (adapter file, strength) pairs baked in to OUT; nothing is written unless every input
    checks out (the base's weights finite, every merged weight finite and in range). Returns OUT."""
    base = check_input_file(base, "BASE", "merge reads .safetensors only: convert it first")
    check_adapter_files(path for path, _ in loras)
    out = check_output(out, [base, *(path for path, _ in loras)])

    f = SafetensorsFile(base)
    sd = {k: f[k] for k in f}
    check_finite(sd, what=f"BASE {base}")
    names = adapter_keys(sd, f.metadata, f.path.name)
    plan = plan_updates({target: sd[key] for target, key in names.items()}, loras, base=fingerprint(base))
    for target, patches in plan.items():
        sd[names[target]] = merged_weight(sd[names[target]], patches, target).contiguous()
    metadata = {**f.metadata, MERGED_KEY: json.dumps(_records(f.metadata, loras))}
    return atomic_write(out, lambda tmp: save_file(sd, str(tmp), metadata=metadata))


def _records(metadata: Mapping[str, str], loras: Sequence[tuple[str | os.PathLike, float]]) -> list:
    """The adapters merged before (a file merged twice keeps both lists) and now, in order."""
    try:
        before = json.loads(metadata.get(MERGED_KEY, "[]"))
    except json.JSONDecodeError:
        before = [{"unreadable record": metadata[MERGED_KEY]}]
    before = before if isinstance(before, list) else [before]
    return before + [{**file_record(path), "strength": strength} for path, strength in loras]


if __name__ == "__main__":
    sys.exit(main())
