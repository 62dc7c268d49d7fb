"""LoRA, LoHa, LoKr and whole-difference adapters in ComfyUI's key format, merged into an XUT's weights (and, for
keys under the text-encoder prefix, into HDM's Qwen3 text encoder).

A tensor is named `<prefix><module path>.<tensor name>`: `diffusion_model.<XUT module>` (or the bare XUT module)
or `text_encoders.qwen3_06b.transformer.model.<Qwen3Model module>` (ComfyUI's generic CLIP key for HDM's text
encoder). The tensor names, and the parameter `<module>.<param>` each kind changes:

    lora    lora_up.weight, lora_down.weight           → weight   ΔW = alpha / rank · up @ down
    loha    hada_w1_a, hada_w1_b, hada_w2_a, hada_w2_b  → weight   ΔW = alpha / rank · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)
    lokr    lokr_w1 or lokr_w1_a + _w1_b,              → weight   ΔW = alpha / rank · kron(w1, w2)
            lokr_w2 or lokr_w2_a + _w2_b
    diff    diff     (LyCORIS "full")                  → weight   ΔW given whole
    norm    w_norm   (LyCORIS train_norm)              → weight   ΔW given whole
    diff_b  diff_b   (LyCORIS "full")                  → bias     Δb given whole
    norm_b  b_norm   (LyCORIS train_norm)              → bias     Δb given whole

each factorised kind with an optional `<module>.alpha`. rank is down.shape[0] (LoRA), w1_b.shape[0] (LoHa), the
inner dim of the last factorised LoKr part; the scale is 1 without alpha, for whole kinds, and for a LoKr with
neither part factorised. This is the math of ComfyUI's LoraLoader (comfy/lora.py, comfy/weight_adapter), in
float32 (float64 for float64 weights): W ← W + Σ strength · ΔW, ΔW reshaped to W's shape (conv weights), cast
back to W's dtype once.
"""

from __future__ import annotations

import argparse
import hashlib
import math
import os
import sys
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file

from .checkpoint import PICKLE_SUFFIXES, SafetensorsFile
from .weights import CheckpointError, atomic_write, check_finite, check_writable

UNET_PREFIX = "diffusion_model."
TEXT_ENCODER_PREFIX = "text_encoders.qwen3_06b.transformer.model."
# The tensor names each kind reads (after "<module>."); "alpha" is shared by the factorised kinds.
KINDS: dict[str, tuple[str, ...]] = {
    "lora": ("lora_up.weight", "lora_down.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
    "diff": ("diff",),
    "norm": ("w_norm",),
    "diff_b": ("diff_b",),
    "norm_b": ("b_norm",),
}
WHOLE_KINDS = ("diff", "norm", "diff_b", "norm_b")  # the difference itself: no factors, no rank, alpha unused
BIAS_KINDS = ("diff_b", "norm_b")  # change <module>.bias; every other kind changes <module>.weight
SUFFIXES = {s: kind for kind, names in KINDS.items() for s in names} | {"alpha": None}

Adapter = Mapping[str, torch.Tensor]
AdapterSource = str | os.PathLike | Adapter


class Patch(NamedTuple):
    """One adapter's update of one parameter."""

    strength: float
    kind: str
    parts: dict[str, torch.Tensor]
    alpha: float | None


def load_adapter(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of an adapter file (safetensors only: a pickle can run code when loaded)."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path.name} is a pickle file, which can run arbitrary code when loaded; adapters "
                              f"are read from .safetensors only: convert it first (a LyCORIS .pt: python -m "
                              f"hdm_core.convert_lycoris)")
    f = SafetensorsFile(path)
    return {k: f[k] for k in f}


def save_adapter(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> Path:
    """Write an adapter file (atomic); tensors are saved contiguous, on the CPU."""
    sd = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(sd, str(tmp), metadata=dict(metadata or {})))


def adapter_targets(model: torch.nn.Module, text_encoder: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The tensors an adapter may change, by adapter key (`UNET_PREFIX` / `TEXT_ENCODER_PREFIX` + state-dict key).
    text_encoder: a Qwen3Model, or an object whose `.model` is one (hdm_core's TextEncoder)."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model: its state-dict keys gain "_orig_mod."
    targets = {UNET_PREFIX + k: v for k, v in model.state_dict(keep_vars=True).items()}
    if text_encoder is not None:
        qwen3 = getattr(text_encoder, "model", text_encoder)
        targets |= {TEXT_ENCODER_PREFIX + k: v for k, v in qwen3.state_dict(keep_vars=True).items()}
    return targets


# ---------------------------------------------------------------------------------------------------
# Parsing: adapter tensors → {target key: (kind, {name: tensor}, alpha)}
# ---------------------------------------------------------------------------------------------------

def _split(key: str) -> tuple[str, str] | None:
    """("<module>", "<suffix>") for a known suffix, else None."""
    for suffix in SUFFIXES:
        if key.endswith("." + suffix):
            return key[:-len(suffix) - 1], suffix
    return None


def _target(module: str, suffix: str) -> str:
    """The target key a tensor changes: a bare module path is an XUT one."""
    param = "bias" if SUFFIXES[suffix] in BIAS_KINDS else "weight"
    full = module if module.startswith((UNET_PREFIX, TEXT_ENCODER_PREFIX)) else UNET_PREFIX + module
    return f"{full}.{param}"


def parse_adapter(sd: Adapter, weights: Mapping[str, torch.Tensor], *, name: str = "adapter"
                  ) -> dict[str, tuple[str, dict[str, torch.Tensor], float | None]]:
    """Group the tensors of `sd` by the target (a key of `weights`, see `adapter_targets`) they change;
    `CheckpointError` names the keys that match no target or no adapter kind, and incomplete or mixed adapters."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown, unmatched = [], []
    for key, tensor in sd.items():
        split = _split(key)
        if split is None:
            unknown.append(key)
            continue
        target = _target(*split)
        if target not in weights:
            unmatched.append(key)
            continue
        groups.setdefault(target, {})[split[1]] = tensor
    if unknown:
        raise CheckpointError(f"{name}: {len(unknown)} keys are not LoRA/LoHa/LoKr/diff/norm tensors, e.g. "
                              f"{unknown[:3]}; supported names end in {sorted(SUFFIXES)} (DoRA, Tucker and other "
                              f"kinds are not supported)")
    if unmatched:
        raise _unmatched_error(unmatched, weights, name)
    return {target: _group(parts, target, name) for target, parts in groups.items()}


def _unmatched_error(keys: list[str], weights: Mapping[str, torch.Tensor], name: str) -> CheckpointError:
    te = [k for k in keys if k.startswith(TEXT_ENCODER_PREFIX)]
    if te and not any(k.startswith(TEXT_ENCODER_PREFIX) for k in weights):
        return CheckpointError(f"{name}: {len(te)} keys are for the text encoder, e.g. {te[:2]}, but no text encoder "
                               f"was given: pass text_encoder= (the CLI and hdm_core.merge use the checkpoint's; "
                               f"this one has none), or remove the {TEXT_ENCODER_PREFIX}* keys")
    other = [k for k in keys if not k.startswith(TEXT_ENCODER_PREFIX)]
    if other:
        return CheckpointError(f"{name}: {len(other)} keys match no weight of this XUT, e.g. {other[:3]}; keys must "
                               f"be {UNET_PREFIX}<XUT module>.<tensor> or {TEXT_ENCODER_PREFIX}<Qwen3 module>."
                               f"<tensor> (is it an adapter for another model or another XUT size?)")
    return CheckpointError(f"{name}: {len(te)} keys match no weight of this Qwen3 text encoder, e.g. {te[:3]}; "
                           f"text-encoder keys must be {TEXT_ENCODER_PREFIX}<Qwen3Model module>.<tensor>, e.g. "
                           f"{TEXT_ENCODER_PREFIX}layers.0.self_attn.q_proj.lora_up.weight")


def _group(parts: dict[str, torch.Tensor], target: str, name: str) -> tuple[str, dict, float | None]:
    kinds = {SUFFIXES[s] for s in parts} - {None}
    if len(kinds) != 1:
        raise CheckpointError(f"{name}: the tensors for {target} are {sorted(parts)}: "
                              f"{'no adapter factors' if not kinds else 'several adapter kinds at once'}")
    kind = kinds.pop()
    if kind == "lokr":
        needed = [("lokr_w1",) if "lokr_w1" in parts else ("lokr_w1_a", "lokr_w1_b"),
                  ("lokr_w2",) if "lokr_w2" in parts else ("lokr_w2_a", "lokr_w2_b")]
        needed = [n for group in needed for n in group]
    else:
        needed = list(KINDS[kind])
    missing = [n for n in needed if n not in parts]
    if missing:
        raise CheckpointError(f"{name}: the {kind} adapter for {target} lacks {missing} (it has {sorted(parts)})")
    alpha = parts.pop("alpha", None)
    return kind, parts, None if alpha is None else float(alpha.float().reshape(-1)[0])


# ---------------------------------------------------------------------------------------------------
# The update ΔW (float32, scale included) — ComfyUI's comfy/weight_adapter math
# ---------------------------------------------------------------------------------------------------

def delta(kind: str, parts: Mapping[str, torch.Tensor], alpha: float | None, shape: torch.Size,
          device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """alpha/rank · ΔW in `dtype` on `device`, reshaped to `shape`; `CheckpointError` when the factors do not fit.
    On the meta device it checks the shapes without computing anything."""
    p = {k: v.to(device, dtype) for k, v in parts.items()}
    rank = None
    if kind in WHOLE_KINDS:
        diff = p[KINDS[kind][0]]
    elif kind == "lora":
        up, down = p["lora_up.weight"], p["lora_down.weight"]
        rank, diff = down.shape[0], up.flatten(1) @ down.flatten(1)
    elif kind == "loha":
        rank = p["hada_w1_b"].shape[0]
        diff = (p["hada_w1_a"] @ p["hada_w1_b"]) * (p["hada_w2_a"] @ p["hada_w2_b"])
    else:
        w1, w2 = p.get("lokr_w1"), p.get("lokr_w2")
        if w1 is None:
            rank, w1 = p["lokr_w1_b"].shape[0], p["lokr_w1_a"] @ p["lokr_w1_b"]
        if w2 is None:
            rank, w2 = p["lokr_w2_b"].shape[0], p["lokr_w2_a"] @ p["lokr_w2_b"]
        if w2.ndim == 4:
            w1 = w1[:, :, None, None]
        diff = torch.kron(w1, w2)
    # ComfyUI merges a whole difference only when its shape is the weight's; factors may need a reshape (conv)
    exact = kind in WHOLE_KINDS
    fits = diff.shape == shape if exact else diff.shape[:1] == shape[:1] and diff.numel() == shape.numel()
    if not fits:
        raise CheckpointError(f"{kind} update of shape {list(diff.shape)} does not fit the weight {list(shape)}")
    scale = alpha / rank if alpha is not None and rank is not None else 1.0
    return scale * diff.reshape(shape)


def merged_weight(weight: torch.Tensor, patches: Iterable[Patch]) -> torch.Tensor:
    """W + Σ strength · ΔW, summed in float32 (float64 for a float64 W) and cast back to W's dtype once."""
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    merged = weight.detach().to(dtype)
    for p in patches:
        merged = merged + p.strength * delta(p.kind, p.parts, p.alpha, weight.shape, weight.device, dtype)
    return merged.to(weight.dtype)


# ---------------------------------------------------------------------------------------------------
# Merging: read and check every adapter first, then change weights
# ---------------------------------------------------------------------------------------------------

def _entries(adapters: Iterable[tuple[AdapterSource, float]]) -> Iterator[tuple[Adapter, float, str]]:
    """(state dict, strength, name) of each (file or state dict, strength) pair; ValueError for anything else."""
    for item in adapters:
        if not isinstance(item, (tuple, list)) or len(item) != 2:
            raise ValueError(f"adapters are (file or state dict, strength) pairs, got a {type(item).__name__}")
        source, strength = item
        is_file = isinstance(source, (str, os.PathLike))
        if not is_file and not isinstance(source, Mapping):
            raise ValueError(f"an adapter is a .safetensors path or a state dict, got a {type(source).__name__}")
        name = Path(source).name if is_file else "adapter"
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not math.isfinite(strength):
            raise ValueError(f"{name}: the strength must be a finite number, got {strength!r}")
        sd = load_adapter(source) if is_file else source
        check_finite(sd, what=name)
        yield sd, float(strength), name


def plan_updates(targets: Mapping[str, torch.Tensor], adapters: Iterable[tuple[AdapterSource, float]]
                 ) -> dict[str, list[Patch]]:
    """{target key: its patches} for the (file or state dict, strength) pairs, every adapter read and checked
    (keys, completeness, shapes) first; an adapter at strength 0 is checked but changes nothing."""
    plan: dict[str, list[Patch]] = {}
    for sd, strength, name in _entries(adapters):
        for target, (kind, parts, alpha) in parse_adapter(sd, targets, name=name).items():
            if strength == 0:
                continue
            try:
                delta(kind, parts, alpha, targets[target].shape, "meta")  # shapes only, nothing computed
            except CheckpointError as err:
                raise CheckpointError(f"{name}: {target}: {err}") from None
            plan.setdefault(target, []).append(Patch(strength, kind, parts, alpha))
    return plan


def _write(targets: Mapping[str, torch.Tensor], plan: Mapping[str, list[Patch]]) -> None:
    with torch.no_grad():
        for target, patches in plan.items():
            targets[target].copy_(merged_weight(targets[target], patches))


def apply_adapters(model: torch.nn.Module, adapters: Iterable[tuple[AdapterSource, float]],
                   text_encoder: torch.nn.Module | None = None) -> torch.nn.Module:
    """Merge each (file or state dict, strength) into the weights of `model` (keys under `UNET_PREFIX`, or bare)
    and `text_encoder` (keys under `TEXT_ENCODER_PREFIX`; a Qwen3Model or hdm_core's TextEncoder) in place.
    Every adapter is read and checked before any weight changes; text-encoder keys without a text encoder are a
    `CheckpointError`. Returns `model`."""
    targets = adapter_targets(model, text_encoder)
    _write(targets, plan_updates(targets, adapters))
    return model


@contextmanager
def adapters_applied(model: torch.nn.Module, adapters: Iterable[tuple[AdapterSource, float]],
                     text_encoder: torch.nn.Module | None = None) -> Iterator[None]:
    """`apply_adapters` for the `with` block only; afterwards the weights are restored bit for bit.

    The touched tensors are saved first, on the CPU as ComfyUI's ModelPatcher keeps its backups: one copy of
    what the adapters change, not of model + text encoder (a deepcopy), and exact, which subtracting ΔW again
    is not in fp16/bf16. Not for models that another thread runs at the same time."""
    targets = adapter_targets(model, text_encoder)
    plan = plan_updates(targets, adapters)
    saved = {t: targets[t].detach().to("cpu", copy=True) for t in plan}
    try:
        _write(targets, plan)
        yield
    finally:
        with torch.no_grad():
            for target, original in saved.items():
                targets[target].copy_(original)


# ---------------------------------------------------------------------------------------------------
# Command-line helpers (hdm_core.generate, hdm_core.merge)
# ---------------------------------------------------------------------------------------------------

def lora_arg(text: str) -> tuple[str, float]:
    """Parse --lora FILE:STRENGTH into (FILE, STRENGTH); a FILE alone (or C:\\x.safetensors) gets strength 1.0."""
    path, sep, strength = text.rpartition(":")
    if sep:
        try:
            value = float(strength)
        except ValueError:
            return text, 1.0
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"{text!r}: the strength must be a finite number")
        return path, value
    return text, 1.0


def check_adapter_files(paths: Iterable[str | os.PathLike], flag: str = "--lora") -> None:
    """ValueError naming the first path that is not an adapter .safetensors file here."""
    for path in paths:
        if Path(path).suffix.lower() in PICKLE_SUFFIXES:
            raise ValueError(f"{flag} {path}: a pickle file, which can run code when loaded; adapters are read from "
                             f".safetensors only (convert a LyCORIS .pt with python -m hdm_core.convert_lycoris)")
        if not Path(path).is_file():
            raise ValueError(f"{flag} {path}: not a .safetensors file here (no such file)")


def check_output(out: str | os.PathLike, inputs: Iterable[str | os.PathLike], flag: str = "OUT") -> Path:
    """`out` as a Path, once it is known to be a new .safetensors path in a writable folder that is none of
    `inputs`; ValueError / OSError naming the value otherwise."""
    out = Path(out)
    if out.suffix.lower() != ".safetensors":
        raise ValueError(f"{flag} {out}: the output is written as .safetensors; name it *.safetensors")
    for path in inputs:
        same = os.path.samefile(out, path) if out.exists() and Path(path).exists() else \
            out.resolve() == Path(path).resolve()
        if same:
            raise ValueError(f"{flag} {out} is the input {path}: inputs are never overwritten; choose another {flag}")
    check_writable(out.parent, f"choose another {flag}", what="the output folder ")
    return out


def file_record(path: str | os.PathLike) -> dict[str, str]:
    """{"file": name, "sha256": digest}: what a merged or converted file's metadata records of a source."""
    digest = hashlib.sha256()  # read in blocks (hashlib.file_digest is Python 3.11+; HDM supports 3.10)
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"file": Path(path).name, "sha256": digest.hexdigest()}


def run_file_tool(write: Callable[[], Path]) -> int:
    """A command that writes one file (merge, convert): print its path and exit 0, or print a user error (a
    ValueError, CheckpointError included, or an OSError) as one line and exit 2."""
    try:
        path = write()
    except (ValueError, OSError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(path)
    return 0
