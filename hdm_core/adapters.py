"""LoRA, LoHa, LoKr and whole-difference adapters in ComfyUI's key format, merged into an XUT's weights (and, for
keys under the text-encoder prefix, into HDM's Qwen3 text encoder).

A tensor is named `<prefix><module path>.<tensor name>`: `diffusion_model.<XUT module>` (or the bare XUT module)
or `text_encoders.qwen3_06b.transformer.model.<Qwen3Model module>` (ComfyUI's generic CLIP key for HDM's text
encoder; the prefixes are `hdm_core.layout.LORA_UNET_PREFIX` / `LORA_TE_PREFIX`). The tensor names, and the
parameter `<module>.<param>` each kind changes:

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

Nothing is merged until every adapter has been read and checked: float tensors only, every factor complete and of
one rank, every update the shape of its weight (at strength 0 too), strengths within ±MAX_STRENGTH. Every merged
weight must be finite and within ±MAX_WEIGHT, and each is computed once: `apply_adapters` checks them all before it
changes any (`check_merged`), `adapters_applied` restores what it changed when one fails, and `hdm_core.merge`
writes nothing until all are merged. An adapter the trainer exported records the fingerprint of its base
(`BASE_FINGERPRINT_KEY`); given the fingerprint of the model's file, a mismatch is warned about.
"""

from __future__ import annotations

import math
import os
import warnings
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

import torch
from safetensors.torch import save_file

from .checkpoint import SafetensorsFile
from .cli import ADAPTER_FIX, refuse_pickle
from .layout import LORA_TE_PREFIX, LORA_UNET_PREFIX
from .weights import CheckpointError, atomic_write, check_finite

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
# Tensor names of kinds HDM does not merge, by what they are (LyCORIS / PEFT names).
UNSUPPORTED: dict[str, str] = {
    "dora_scale": "DoRA (dora_scale, LyCORIS weight decomposition)",
    "lora_mid.weight": "Tucker (lora_mid, LyCORIS use_tucker)",
    "hada_t1": "Tucker (hada_t1/hada_t2, LyCORIS use_tucker)",
    "hada_t2": "Tucker (hada_t1/hada_t2, LyCORIS use_tucker)",
    "lokr_t1": "Tucker (lokr_t1/lokr_t2, LyCORIS use_tucker)",
    "lokr_t2": "Tucker (lokr_t1/lokr_t2, LyCORIS use_tucker)",
    "oft_blocks": "OFT (oft_blocks)",
    "oft_diag": "OFT (oft_diag)",
    "lora_A.weight": "PEFT LoRA (lora_A/lora_B: rename them lora_down/lora_up)",
    "lora_B.weight": "PEFT LoRA (lora_A/lora_B: rename them lora_down/lora_up)",
}
MAX_STRENGTH = 100.0  # ComfyUI's LoraLoader allows -100 … 100
MAX_WEIGHT = float(torch.finfo(torch.float16).max)  # 65504: far beyond any trained weight, and fp16's limit
BASE_FINGERPRINT_KEY = "hdm.base_fingerprint"  # metadata of a trained adapter: hdm_core.checkpoint.fingerprint
BASE_FILE_KEY = "hdm.base"  # ... and its base file's name

Adapter = Mapping[str, torch.Tensor]
AdapterSource = str | os.PathLike | Adapter


class Patch(NamedTuple):
    """One adapter's update of one parameter."""

    strength: float
    kind: str
    parts: dict[str, torch.Tensor]
    alpha: float | None
    name: str = "adapter"


def read_adapter(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of an adapter file (safetensors only: a pickle can run code when loaded)."""
    refuse_pickle(path, ADAPTER_FIX)
    f = SafetensorsFile(path)
    return {k: f[k] for k in f}, f.metadata


def load_adapter(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """All tensors of an adapter file (safetensors only: a pickle can run code when loaded)."""
    return read_adapter(path)[0]


def save_adapter(path: str | os.PathLike, tensors: Mapping[str, torch.Tensor],
                 metadata: Mapping[str, str] | None = None) -> Path:
    """Write an adapter file (atomic); tensors are saved contiguous, on the CPU."""
    sd = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    # metadata=None, not {}: safetensors writes an unreadable header for no tensors with empty metadata
    return atomic_write(path, lambda tmp: save_file(sd, str(tmp), metadata=dict(metadata or {}) or None))


def adapter_targets(model: torch.nn.Module, text_encoder: torch.nn.Module | None = None) -> dict[str, torch.Tensor]:
    """The tensors an adapter may change, by adapter key (`LORA_UNET_PREFIX` / `LORA_TE_PREFIX` + state-dict key).
    text_encoder: a Qwen3Model, or an object whose `.model` is one (hdm_core's TextEncoder)."""
    model = getattr(model, "_orig_mod", model)  # a torch.compile'd model: its state-dict keys gain "_orig_mod."
    targets = {LORA_UNET_PREFIX + k: v for k, v in model.state_dict(keep_vars=True).items()}
    if text_encoder is not None:
        qwen3 = getattr(text_encoder, "model", text_encoder)
        targets |= {LORA_TE_PREFIX + k: v for k, v in qwen3.state_dict(keep_vars=True).items()}
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


def unsupported_kind(key: str) -> str | None:
    """What an adapter tensor of a kind HDM does not merge is ("Tucker (lora_mid, …)"), else None."""
    return next((kind for suffix, kind in UNSUPPORTED.items() if key.endswith("." + suffix)), None)


def _target(module: str, suffix: str) -> str:
    """The target key a tensor changes: a bare module path is an XUT one."""
    param = "bias" if SUFFIXES[suffix] in BIAS_KINDS else "weight"
    full = module if module.startswith((LORA_UNET_PREFIX, LORA_TE_PREFIX)) else LORA_UNET_PREFIX + module
    return f"{full}.{param}"


def parse_adapter(sd: Adapter, weights: Mapping[str, torch.Tensor], *, name: str = "adapter"
                  ) -> dict[str, tuple[str, dict[str, torch.Tensor], float | None]]:
    """Group the tensors of `sd` by the target (a key of `weights`, see `adapter_targets`) they change;
    `CheckpointError` names the keys that match no target or no adapter kind (by kind when it is a known one HDM
    does not merge), and incomplete or mixed adapters."""
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
        raise unknown_keys_error(unknown, name)
    if unmatched:
        raise _unmatched_error(unmatched, weights, name)
    return {target: _group(parts, target, name) for target, parts in groups.items()}


def unknown_keys_error(keys: list[str], name: str) -> CheckpointError:
    """The error for tensors of no kind HDM merges: named by kind (DoRA, Tucker, …) when known."""
    kinds = sorted({k for k in map(unsupported_kind, keys) if k})
    if kinds:
        return CheckpointError(f"{name}: {len(keys)} keys are {' and '.join(kinds)} tensors, e.g. {keys[:3]}, which "
                               f"HDM does not merge; retrain without that option (LoRA, LoHa, LoKr, diff and norm "
                               f"adapters are supported)")
    return CheckpointError(f"{name}: {len(keys)} keys are not LoRA/LoHa/LoKr/diff/norm tensors, e.g. {keys[:3]}; "
                           f"supported names end in {sorted(SUFFIXES)}")


def _unmatched_error(keys: list[str], weights: Mapping[str, torch.Tensor], name: str) -> CheckpointError:
    te = [k for k in keys if k.startswith(LORA_TE_PREFIX)]
    if te and not any(k.startswith(LORA_TE_PREFIX) for k in weights):
        return CheckpointError(f"{name}: {len(te)} keys are for the text encoder, e.g. {te[:2]}, but no text encoder "
                               f"was given: pass text_encoder= (the CLI and hdm_core.merge use the checkpoint's; "
                               f"this one has none), or remove the {LORA_TE_PREFIX}* keys")
    other = [k for k in keys if not k.startswith(LORA_TE_PREFIX)]
    if other:
        return CheckpointError(f"{name}: {len(other)} keys match no weight of this XUT, e.g. {other[:3]}; keys must "
                               f"be {LORA_UNET_PREFIX}<XUT module>.<tensor> or {LORA_TE_PREFIX}<Qwen3 module>."
                               f"<tensor> (is it an adapter for another model or another XUT size?)")
    return CheckpointError(f"{name}: {len(te)} keys match no weight of this Qwen3 text encoder, e.g. {te[:3]}; "
                           f"text-encoder keys must be {LORA_TE_PREFIX}<Qwen3Model module>.<tensor>, e.g. "
                           f"{LORA_TE_PREFIX}layers.0.self_attn.q_proj.lora_up.weight")


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

def _product(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str]) -> torch.Tensor:
    """a @ b (flattened to matrices); `CheckpointError` naming both factors when their ranks disagree."""
    if a.ndim < 2 or b.ndim < 2 or a.flatten(1).shape[1] != b.shape[0]:
        raise CheckpointError(f"the factors {names[0]} {list(a.shape)} and {names[1]} {list(b.shape)} disagree in "
                              f"rank ({a.shape[1] if a.ndim > 1 else '-'} vs {b.shape[0]}): the file is damaged or "
                              f"its factors come from different adapters")
    return a.flatten(1) @ b.flatten(1)


def delta(kind: str, parts: Mapping[str, torch.Tensor], alpha: float | None, shape: torch.Size,
          device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """alpha/rank · ΔW in `dtype` on `device`, reshaped to `shape`; `CheckpointError` when the factors do not fit
    each other or the weight. On the meta device it checks the shapes without computing anything."""
    p = {k: v.to(device, dtype) for k, v in parts.items()}
    rank = None
    if kind in WHOLE_KINDS:
        diff = p[KINDS[kind][0]]
    elif kind == "lora":
        rank, diff = p["lora_down.weight"].shape[0], _product(p["lora_up.weight"], p["lora_down.weight"],
                                                               ("lora_up.weight", "lora_down.weight"))
    elif kind == "loha":
        rank = p["hada_w1_b"].shape[0]
        w1 = _product(p["hada_w1_a"], p["hada_w1_b"], ("hada_w1_a", "hada_w1_b"))
        w2 = _product(p["hada_w2_a"], p["hada_w2_b"], ("hada_w2_a", "hada_w2_b"))
        if w1.shape != w2.shape:
            raise CheckpointError(f"the LoHa products w1 {list(w1.shape)} and w2 {list(w2.shape)} differ in shape")
        diff = w1 * w2
    else:
        w1, w2 = p.get("lokr_w1"), p.get("lokr_w2")
        if w1 is None:
            rank, w1 = p["lokr_w1_b"].shape[0], _product(p["lokr_w1_a"], p["lokr_w1_b"], ("lokr_w1_a", "lokr_w1_b"))
        if w2 is None:
            rank, w2 = p["lokr_w2_b"].shape[0], _product(p["lokr_w2_a"], p["lokr_w2_b"], ("lokr_w2_a", "lokr_w2_b"))
        if w1.ndim != 2 or w2.ndim not in (2, 4):
            raise CheckpointError(f"the LoKr factors have {w1.ndim} and {w2.ndim} dimensions; expected a matrix w1 "
                                  f"and a matrix or conv kernel w2")
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


def merged_weight(weight: torch.Tensor, patches: Iterable[Patch], target: str = "weight") -> torch.Tensor:
    """W + Σ strength · ΔW, summed in float32 (float64 for a float64 W) and cast back to W's dtype once;
    `CheckpointError` naming `target` and the adapters when the result is not finite or beyond ±MAX_WEIGHT."""
    patches = list(patches)
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    merged = weight.detach().to(dtype)
    for p in patches:
        merged = merged + p.strength * delta(p.kind, p.parts, p.alpha, weight.shape, weight.device, dtype)
    peak = merged.abs().max().item() if merged.numel() else 0.0
    if not peak <= MAX_WEIGHT:  # NaN fails too
        used = ", ".join(f"{p.name} at strength {p.strength:g}" for p in patches)
        reach = f"reach {peak:.3g}" if math.isfinite(peak) else "non-finite"
        raise CheckpointError(f"{target}: {used} make this weight {reach}, beyond ±{MAX_WEIGHT:g} (far beyond any "
                              f"trained weight; it would sample black or NaN images): lower the strength, or the "
                              f"adapter is damaged")
    return merged.to(weight.dtype)


# ---------------------------------------------------------------------------------------------------
# Merging: read and check every adapter first, then change weights
# ---------------------------------------------------------------------------------------------------

class Entry(NamedTuple):
    """One adapter to merge, read and checked."""

    tensors: dict[str, torch.Tensor]
    strength: float
    name: str
    metadata: dict[str, str]


def _entries(adapters: Iterable[tuple]) -> Iterator[Entry]:
    """Each (file or state dict, strength[, name]) item read and checked: a finite strength within ±MAX_STRENGTH,
    a non-empty dict of named float tensors (alpha may be an integer), all finite."""
    for item in adapters:
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise ValueError(f"adapters are (file or state dict, strength) pairs, got a {type(item).__name__}")
        source, strength = item[:2]
        is_file = isinstance(source, (str, os.PathLike))
        if not is_file and not isinstance(source, Mapping):
            raise ValueError(f"an adapter is a .safetensors path or a state dict, got a {type(source).__name__}")
        name = str(item[2]) if len(item) == 3 else Path(source).name if is_file else "adapter"
        if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not abs(strength) <= MAX_STRENGTH:
            raise ValueError(f"{name}: the strength must be a finite number in [-{MAX_STRENGTH:g}, {MAX_STRENGTH:g}], "
                             f"got {strength!r}")
        sd, metadata = read_adapter(source) if is_file else (dict(source), {})
        _check_tensors(sd, name)
        yield Entry(sd, float(strength), name, metadata)


def _check_tensors(sd: Mapping, name: str) -> None:
    if not sd:
        raise CheckpointError(f"{name} holds no tensors: it is not an adapter (an empty or truncated export?)")
    odd = [k for k, v in sd.items() if not isinstance(k, str) or not isinstance(v, torch.Tensor)]
    if odd:
        raise CheckpointError(f"{name}: {len(odd)} values are not tensors, e.g. {odd[0]!r} is a "
                              f"{type(sd[odd[0]]).__name__}; an adapter maps key names to tensors")
    ints = [k for k, v in sd.items() if not v.is_floating_point() and not k.endswith(".alpha")]
    if ints:
        raise CheckpointError(f"{name}: {len(ints)} tensors are stored as {sd[ints[0]].dtype}, e.g. {ints[:2]}; "
                              f"adapter factors must be float (fp32, fp16 or bf16): dequantise the file first")
    check_finite(sd, what=name)


def _check_base(entry: Entry, base: str | None) -> None:
    """Warn when `entry` records the fingerprint of its base and it is not `base`'s (when that is known)."""
    recorded = entry.metadata.get(BASE_FINGERPRINT_KEY)
    if base and recorded and recorded != base:
        warnings.warn(f"{entry.name} was trained on {entry.metadata.get(BASE_FILE_KEY, 'another file')} "
                      f"({recorded[:20]}…), not on this model ({base[:20]}…): its effect may differ from what it "
                      f"was trained for. If both hold the same weights (a copy re-saved), ignore this", stacklevel=3)


def plan_updates(targets: Mapping[str, torch.Tensor], adapters: Iterable[tuple], *, base: str | None = None
                 ) -> dict[str, list[Patch]]:
    """{target key: its patches} for the (file or state dict, strength[, name]) items, every adapter read and checked
    first: keys, completeness, shapes (at strength 0 too, which then changes nothing). The merged values are
    checked where they are computed (`merged_weight`; `check_merged` before an in-place write). `base`: the
    fingerprint of the model's file, when known (`hdm_core.checkpoint.fingerprint`): an adapter trained on another
    is warned about."""
    plan: dict[str, list[Patch]] = {}
    for entry in _entries(adapters):
        _check_base(entry, base)
        for target, (kind, parts, alpha) in parse_adapter(entry.tensors, targets, name=entry.name).items():
            try:
                delta(kind, parts, alpha, targets[target].shape, "meta")  # shapes only, nothing computed
            except CheckpointError as err:
                raise CheckpointError(f"{entry.name}: {target}: {err}") from None
            if entry.strength != 0:
                plan.setdefault(target, []).append(Patch(entry.strength, kind, parts, alpha, entry.name))
    return plan


def check_merged(targets: Mapping[str, torch.Tensor], plan: Mapping[str, list[Patch]]) -> None:
    """Every weight `plan` merges finite and within ±MAX_WEIGHT (`merged_weight`'s CheckpointError otherwise),
    computed and dropped: nothing changes. For an in-place merge that keeps no copy to restore."""
    with torch.no_grad():
        for target, patches in plan.items():
            merged_weight(targets[target], patches, target)


def _write(targets: Mapping[str, torch.Tensor], plan: Mapping[str, list[Patch]]) -> None:
    with torch.no_grad():
        for target, patches in plan.items():
            targets[target].copy_(merged_weight(targets[target], patches, target))


def apply_adapters(model: torch.nn.Module, adapters: Iterable[tuple], text_encoder: torch.nn.Module | None = None,
                   *, base: str | None = None) -> torch.nn.Module:
    """Merge each (file or state dict, strength) into the weights of `model` (keys under `LORA_UNET_PREFIX`, or
    bare) and `text_encoder` (keys under `LORA_TE_PREFIX`; a Qwen3Model or hdm_core's TextEncoder) in place.
    Every adapter, and every weight it merges, is checked before any weight changes (`plan_updates`, which also
    explains `base`, and `check_merged`); text-encoder keys without a text encoder are a `CheckpointError`.
    Returns `model`."""
    targets = adapter_targets(model, text_encoder)
    plan = plan_updates(targets, adapters, base=base)
    check_merged(targets, plan)
    _write(targets, plan)
    return model


@contextmanager
def adapters_applied(model: torch.nn.Module, adapters: Iterable[tuple], text_encoder: torch.nn.Module | None = None,
                     *, base: str | None = None) -> Iterator[None]:
    """`apply_adapters` for the `with` block only; afterwards the weights are restored bit for bit.

    The touched tensors are saved first, on the CPU as ComfyUI's ModelPatcher keeps its backups: one copy of
    what the adapters change, not of model + text encoder (a deepcopy), and exact, which subtracting ΔW again
    is not in fp16/bf16; a merged weight that fails its check (`merged_weight`) restores them too, before the error
    propagates. Not for models that another thread runs at the same time."""
    targets = adapter_targets(model, text_encoder)
    plan = plan_updates(targets, adapters, base=base)
    saved = {t: targets[t].detach().to("cpu", copy=True) for t in plan}
    try:
        _write(targets, plan)
        yield
    finally:
        with torch.no_grad():
            for target, original in saved.items():
                targets[target].copy_(original)
