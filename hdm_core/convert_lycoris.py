"""Convert a LyCORIS network `.pt` (the official HDM trainer's adapter format) to an adapter .safetensors in ComfyUI's
keys: `python -m hdm_core.convert_lycoris IN.pt OUT.safetensors --allow-pickle [--base BASE | --preset xut-base]`.

The `.pt` is `torch.save(network.state_dict())` (LyCORIS's `save_weights` to a `.safetensors` name is read as it is,
with no pickle): keys `lycoris_<module path, '.' → '_'>.<tensor>`, e.g.
`lycoris_backbone_enc_blocks_0_0_attn_qkv.lokr_w1`, the path maybe led by `model_` / `unet_model_` / `unet_` (a
network built on a wrapper of the XUT) or, for a text-encoder network, `te_` / `text_encoder_` /
`te_text_models_0_`; a {"state_dict": ...} wrapper is unwrapped. Each underscored path is resolved against the
module paths of the XUT (built on the meta device from the config of --base, else --preset) and of the text
encoder (--base's, else Qwen3-0.6B); a key that resolves to no module, or to two, is an error. Tensor names are
kept (they are the ones ComfyUI reads), so the output is `diffusion_model.<XUT module>.<tensor>` /
`text_encoders.qwen3_06b.transformer.model.<module>.<tensor>`, checked against the model's shapes, with the
source recorded in the metadata (`hdm.converted_from`).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch

from .adapters import SUFFIXES, adapter_targets, plan_updates, save_adapter, unknown_keys_error, unsupported_kind
from .checkpoint import SafetensorsFile, load_weights_only
from .cli import ArgumentParser, check_input_file, check_output, file_record, run_tool
from .config import PRESETS, XUTConfig
from .layout import LORA_TE_PREFIX, LORA_UNET_PREFIX, find_text_encoder, text_encoder_part, xut_part
from .weights import CheckpointError
from .xut import XUT

LYCORIS_PREFIX = "lycoris_"
XUT_WRAPPERS = ("", "model_", "unet_model_", "unet_")
TE_WRAPPERS = ("te_", "text_encoder_", "te_text_models_0_")
SOURCE_KEY = "hdm.converted_from"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = ArgumentParser(prog="python -m hdm_core.convert_lycoris", description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("inp", metavar="IN", help="the LyCORIS network .pt (or .safetensors)")
    p.add_argument("out", metavar="OUT", help="the adapter to write (.safetensors)")
    p.add_argument("--allow-pickle", action="store_true",
                   help="required: a .pt is a pickle, which can run code when loaded; it is read with "
                        "torch.load(weights_only=True), but pass this only for a file you trust")
    src = p.add_mutually_exclusive_group()
    src.add_argument("--base", help="the checkpoint the adapter is for (.safetensors): its XUT config is used")
    src.add_argument("--preset", choices=sorted(PRESETS), default="xut-base",
                     help="the XUT config when no --base is given")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> int:
    """Convert and write, then print OUT; user errors are one line and exit code 2."""
    args = parse_args(argv)
    return run_tool(lambda: print(convert(args.inp, args.out, allow_pickle=args.allow_pickle, base=args.base,
                                          preset=args.preset)))


# ---------------------------------------------------------------------------------------------------
# Reading the .pt
# ---------------------------------------------------------------------------------------------------

PICKLE_MAGIC = (b"PK\x03\x04", b"\x80")  # torch's zip format, a plain pickle


def load_lycoris(path: str | os.PathLike, *, allow_pickle: bool = False) -> dict[str, torch.Tensor]:
    """The tensors of a LyCORIS network file: a .safetensors as it is, a .pt (any other name) read with
    torch.load(weights_only=True) and only when allowed."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"LyCORIS file not found: {path}")
    if path.suffix.lower() == ".safetensors":
        with path.open("rb") as f:
            magic = f.read(4)
        if magic.startswith(PICKLE_MAGIC):
            raise CheckpointError(f"{path.name} is a torch pickle named .safetensors: rename it .pt and pass "
                                  f"--allow-pickle (allow_pickle=True), only if you trust where it came from")
        f = SafetensorsFile(path)
        return _checked({k: f[k] for k in f}, path.name)
    if not allow_pickle:
        raise CheckpointError(f"{path.name} is a pickle file, which can run arbitrary code when loaded (even with "
                              f"torch's weights_only guard, a pickle is only as safe as its source): pass "
                              f"--allow-pickle (allow_pickle=True) if you trust where it came from")
    state = load_weights_only(path)
    while isinstance(state.get("state_dict"), Mapping):
        state = state["state_dict"]
    return _checked(state, path.name)


def _checked(state: Mapping, name: str) -> dict[str, torch.Tensor]:
    odd = [k for k, v in state.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if odd:
        raise CheckpointError(f"{name}: {len(odd)} entries are not named tensors, e.g. {odd[:3]}; expected "
                              f"a LyCORIS network state dict (lycoris_<module>.<tensor>: tensor)")
    if not state:
        raise CheckpointError(f"{name} holds no tensors; expected a LyCORIS network state dict")
    return dict(state)


# ---------------------------------------------------------------------------------------------------
# Resolving lycoris_<underscored path> against the model's module paths
# ---------------------------------------------------------------------------------------------------

def module_index(roots: Iterable[tuple[str, tuple[str, ...], torch.nn.Module]]) -> dict[str, set[str]]:
    """{wrapper + underscored module path: the adapter module keys it may mean} for (key prefix, wrappers, root)."""
    index: dict[str, set[str]] = {}
    for prefix, wrappers, root in roots:
        for path, _ in root.named_modules():
            for wrapper in wrappers if path else ():
                index.setdefault(wrapper + path.replace(".", "_"), set()).add(prefix + path)
    return index


def rename(sd: Mapping[str, torch.Tensor], index: Mapping[str, set[str]], name: str) -> dict[str, torch.Tensor]:
    """The LyCORIS tensors under adapter keys; `CheckpointError` naming keys of a kind HDM does not merge (by kind),
    or that map to no module or to two."""
    unsupported = [k for k in sd if unsupported_kind(k)]
    if unsupported:
        raise unknown_keys_error(unsupported, name)
    out, unmapped, ambiguous = {}, [], []
    for key, tensor in sd.items():
        module, _, tensor_name = key.partition(".")
        found = index.get(module[len(LYCORIS_PREFIX):], set()) if module.startswith(LYCORIS_PREFIX) else set()
        if len(found) != 1 or tensor_name not in SUFFIXES:
            (ambiguous if len(found) > 1 else unmapped).append(key)
            continue
        out[f"{next(iter(found))}.{tensor_name}"] = tensor
    if ambiguous:
        raise CheckpointError(f"{name}: {len(ambiguous)} keys name several modules once '.' became '_', e.g. "
                              f"{ambiguous[:3]}; this file cannot be converted unambiguously")
    if unmapped:
        raise CheckpointError(
            f"{name}: {len(unmapped)} of {len(sd)} keys map to no module of this XUT (or, under lycoris_te_*, of the "
            f"text encoder), e.g. "
            f"{unmapped[:3]}; expected {LYCORIS_PREFIX}<module path with '_' for '.'>.<one of {sorted(SUFFIXES)}> "
            f"(is it for another model or XUT size? pass the checkpoint it was trained on as --base)")
    return out


def xut_config(base: str | os.PathLike | None, preset: str) -> XUTConfig:
    """The config of --base's XUT (its metadata, else inferred from its weights), or the preset's."""
    if base is None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        return PRESETS[preset]
    f = SafetensorsFile(check_input_file(base, "--base", "pass the .safetensors checkpoint"))
    return xut_part(f, f.metadata, f.path.name)[1]


def te_config(base: str | os.PathLike | None) -> dict:
    """Qwen3Config overrides: those of --base's text encoder when it has one, else none (Qwen3-0.6B)."""
    if base is None:
        return {}
    f = SafetensorsFile(base)
    return text_encoder_part(f, f.path.name)[1] if find_text_encoder(f) is not None else {}


def _meta_models(config: XUTConfig, qwen3: dict | None) -> tuple[XUT, torch.nn.Module | None]:
    """The XUT (and, given its config, the Qwen3) on the meta device: module paths and shapes, no weights."""
    with torch.device("meta"):
        xut = XUT(config)
    if qwen3 is None:
        return xut, None
    from .text_encoder import build_qwen3

    return xut, build_qwen3(qwen3, device="meta")


def convert(inp: str | os.PathLike, out: str | os.PathLike, *, allow_pickle: bool = False,
            base: str | os.PathLike | None = None, preset: str = "xut-base") -> Path:
    """Convert a LyCORIS .pt to an adapter .safetensors (see the module docstring); returns OUT."""
    out = check_output(out, [inp, *([base] if base else [])])
    sd = load_lycoris(inp, allow_pickle=allow_pickle)
    config = xut_config(base, preset)
    with_te = any(k.startswith(tuple(LYCORIS_PREFIX + w for w in TE_WRAPPERS)) for k in sd)
    xut, te = _meta_models(config, te_config(base) if with_te else None)
    roots = [(LORA_UNET_PREFIX, XUT_WRAPPERS, xut)] + ([(LORA_TE_PREFIX, TE_WRAPPERS, te)] if te else [])
    name = Path(inp).name
    tensors = rename(sd, module_index(roots), name)
    try:
        plan_updates(adapter_targets(xut, te), [(tensors, 1.0, name)])  # every key fits a weight, every shape fits
    except CheckpointError as err:
        if base:
            raise
        raise CheckpointError(f"{err} (checked against --preset {preset}: is it for another XUT? pass the "
                              f"checkpoint it was trained on as --base)") from None
    source = {**file_record(inp), "format": "LyCORIS network state dict (.pt)",
              "xut": Path(base).name if base else preset}
    return save_adapter(out, tensors, {SOURCE_KEY: json.dumps(source)})


if __name__ == "__main__":
    sys.exit(main())
