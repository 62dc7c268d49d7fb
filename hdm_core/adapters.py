"""LoRA, LoHa and LoKr adapters in ComfyUI's key format, merged into an XUT's weights.

A file targets the weight `diffusion_model.<XUT key>` (or the bare XUT key) with tensors named after the weight
less its `.weight`: `<base>.lora_up.weight` / `.lora_down.weight` (LoRA), `<base>.hada_w1_a` / `_w1_b` / `_w2_a` /
`_w2_b` (LoHa), `<base>.lokr_w1` or `.lokr_w1_a` / `_w1_b`, and `.lokr_w2` or `.lokr_w2_a` / `_w2_b` (LoKr), each
with an optional `<base>.alpha`. The update is the one ComfyUI's LoraLoader applies, in float32:

    LoRA  ΔW = alpha / rank · up @ down                   rank = down.shape[0]
    LoHa  ΔW = alpha / rank · (w1_a @ w1_b) ⊙ (w2_a @ w2_b)  rank = w1_b.shape[0]
    LoKr  ΔW = alpha / rank · kron(w1, w2)                rank = the inner dim of the last factorised part
                                                          (scale 1 when neither part is factorised)

with scale 1 when there is no alpha, ΔW reshaped to the weight's shape (conv weights), and W ← W + strength · ΔW.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Mapping
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import PICKLE_SUFFIXES, SafetensorsFile
from .weights import CheckpointError, atomic_write, check_finite

PREFIX = "diffusion_model."
# The tensor names each kind reads (after "<base>."); "alpha" is shared.
KINDS: dict[str, tuple[str, ...]] = {
    "lora": ("lora_up.weight", "lora_down.weight"),
    "loha": ("hada_w1_a", "hada_w1_b", "hada_w2_a", "hada_w2_b"),
    "lokr": ("lokr_w1", "lokr_w1_a", "lokr_w1_b", "lokr_w2", "lokr_w2_a", "lokr_w2_b"),
}
SUFFIXES = {s: kind for kind, names in KINDS.items() for s in names} | {"alpha": None}

Adapter = Mapping[str, torch.Tensor]
AdapterSource = str | os.PathLike | Adapter


def load_adapter(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of an adapter file (safetensors only: a pickle can run code when loaded)."""
    path = Path(path)
    if path.suffix.lower() in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path.name} is a pickle file, which can run arbitrary code when loaded; adapters "
                              f"are read from .safetensors only: convert it first")
    f = SafetensorsFile(path)
    return {k: f[k] for k in f}


def save_adapter(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> Path:
    """Write an adapter file (atomic); tensors are saved contiguous, on the CPU."""
    sd = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    return atomic_write(path, lambda tmp: save_file(sd, str(tmp), metadata=dict(metadata or {})))


# ---------------------------------------------------------------------------------------------------
# Parsing: adapter tensors → {XUT weight key: (kind, {name: tensor}, alpha)}
# ---------------------------------------------------------------------------------------------------

def _split(key: str) -> tuple[str, str] | None:
    """("<base>", "<suffix>") for a known suffix, else None."""
    for suffix in SUFFIXES:
        if key.endswith("." + suffix):
            return key[:-len(suffix) - 1], suffix
    return None


def parse_adapter(sd: Adapter, weights: Mapping[str, torch.Tensor], *, name: str = "adapter"
                  ) -> dict[str, tuple[str, dict[str, torch.Tensor], float | None]]:
    """Group the tensors of `sd` by the XUT weight (a key of `weights`) they change; `CheckpointError` names the
    keys that match no weight or no adapter kind, and incomplete or mixed adapters."""
    groups: dict[str, dict[str, torch.Tensor]] = {}
    unknown, unmatched = [], []
    for key, tensor in sd.items():
        split = _split(key)
        if split is None:
            unknown.append(key)
            continue
        base, suffix = split
        target = (base[len(PREFIX):] if base.startswith(PREFIX) else base) + ".weight"
        if target not in weights:
            unmatched.append(key)
            continue
        groups.setdefault(target, {})[suffix] = tensor
    if unknown:
        raise CheckpointError(f"{name}: {len(unknown)} keys are not LoRA/LoHa/LoKr tensors, e.g. {unknown[:3]}; "
                              f"supported names end in {sorted(SUFFIXES)} (DoRA, Tucker and other kinds are not "
                              f"supported)")
    if unmatched:
        raise CheckpointError(f"{name}: {len(unmatched)} keys match no weight of this XUT, e.g. {unmatched[:3]}; "
                              f"keys must be diffusion_model.<XUT key less .weight>.<tensor> (is it an adapter for "
                              f"another model or another XUT size?)")
    parsed = {}
    for target, parts in groups.items():
        kinds = {SUFFIXES[s] for s in parts} - {None}
        if len(kinds) != 1:
            raise CheckpointError(f"{name}: the tensors for {target} are {sorted(parts)}: "
                                  f"{'no adapter factors' if not kinds else 'several adapter kinds at once'}")
        kind = kinds.pop()
        _check_complete(kind, parts, target, name)
        alpha = parts.pop("alpha", None)
        parsed[target] = (kind, parts, None if alpha is None else float(alpha.float().reshape(-1)[0]))
    return parsed


def _check_complete(kind: str, parts: Mapping[str, torch.Tensor], target: str, name: str) -> None:
    if kind == "lokr":
        needed = [("lokr_w1",) if "lokr_w1" in parts else ("lokr_w1_a", "lokr_w1_b"),
                  ("lokr_w2",) if "lokr_w2" in parts else ("lokr_w2_a", "lokr_w2_b")]
        needed = [n for group in needed for n in group]
    else:
        needed = list(KINDS[kind])
    missing = [n for n in needed if n not in parts]
    if missing:
        raise CheckpointError(f"{name}: the {kind} adapter for {target} lacks {missing} (it has {sorted(parts)})")


# ---------------------------------------------------------------------------------------------------
# The update ΔW (float32, scale included) — ComfyUI's comfy/weight_adapter math
# ---------------------------------------------------------------------------------------------------

def delta(kind: str, parts: Mapping[str, torch.Tensor], alpha: float | None, shape: torch.Size,
          device: torch.device | str = "cpu") -> torch.Tensor:
    """alpha/rank · ΔW in float32 on `device`, reshaped to `shape`; `CheckpointError` when the factors do not fit."""
    p = {k: v.to(device, torch.float32) for k, v in parts.items()}
    rank = None
    if kind == "lora":
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
    if diff.shape[0] != shape[0] or diff.numel() != shape.numel():
        raise CheckpointError(f"{kind} update of shape {list(diff.shape)} does not fit the weight {list(shape)}")
    scale = alpha / rank if alpha is not None and rank is not None else 1.0
    return scale * diff.reshape(shape)


def apply_adapters(model: torch.nn.Module, adapters: Iterable[tuple[AdapterSource, float]]) -> torch.nn.Module:
    """Merge each (file or state dict, strength) into `model`'s weights in place: W ← W + Σ strength · ΔW, summed
    in float32 and cast back to W's dtype once. Every adapter is read and checked before any weight changes."""
    weights = model.state_dict(keep_vars=True)
    updates: dict[str, list[tuple[float, str, dict, float | None]]] = {}
    for source, strength in adapters:
        is_file = isinstance(source, (str, os.PathLike))
        name = Path(source).name if is_file else "adapter"
        sd = load_adapter(source) if is_file else source
        check_finite(sd, what=name)
        for target, (kind, parts, alpha) in parse_adapter(sd, weights, name=name).items():
            if strength != 0:
                try:
                    delta(kind, parts, alpha, weights[target].shape, weights[target].device)  # check shapes now
                except CheckpointError as err:
                    raise CheckpointError(f"{name}: {target}: {err}") from None
                updates.setdefault(target, []).append((float(strength), kind, parts, alpha))
    with torch.no_grad():
        for target, patches in updates.items():
            w = weights[target]
            merged = w.float()
            for strength, kind, parts, alpha in patches:
                merged = merged + strength * delta(kind, parts, alpha, w.shape, w.device)
            w.copy_(merged.to(w.dtype))
    return model
