"""Adapter fine-tuning: the [finetune] recipe section's LoRA / LoHa / LoKr, built by LyCORIS on a frozen XUT (and,
optionally, the frozen text encoder), checkpointed on their own and exported in ComfyUI's LoRA key format.

Why LyCORIS (`lycoris-lora`) rather than peft: it is what the official HDM trainer uses, so the official `.pt`
adapters are LyCORIS state dicts (`hdm_core.convert_lycoris` only renames them) and its options are the official
config's (LoKr `factor`, `full_matrix`, `train_norm`); its tensor names (`lora_up` / `lora_down`, `hada_*`,
`lokr_*`, `w_norm`) are the ones ComfyUI's LoRA loader reads, so the export is a renaming; and it needs only torch,
einops and toml. It wraps modules by patching their `forward`, so TREAD, gradient checkpointing, autocast and DDP
(over `AdaptedXUT`, which registers the adapters) work unchanged.

Modules are chosen by group (`finetune.modules`); each group is a set of XUT module paths:

    attention     self- and cross-attention projections (qkv, out, q, kv)
    mlp           SwiGLU w12, w3
    adaln         the three shared adaLN MLPs
    embed         patch in/out, timestep and aspect embeddings, ctx_proj
    text_encoder  Qwen3's attention and MLP projections (exported under ComfyUI's CLIP keys)

`train_norm` adds LyCORIS norm adapters (`w_norm` / `b_norm`) to every RMSNorm and adaLN LayerNorm of the XUT.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from hdm_core.adapters import BASE_FILE_KEY, BASE_FINGERPRINT_KEY
from hdm_core.checkpoint import fingerprint
from hdm_core.layout import LORA_TE_PREFIX, LORA_UNET_PREFIX

METHODS = ("full", "lora", "loha", "lokr")
UNET_GROUPS: dict[str, tuple[str, ...]] = {
    "attention": ("*.attn.qkv", "*.attn.out", "*.xattn.q", "*.xattn.kv", "*.xattn.out"),
    "mlp": ("*.mlp.w12", "*.mlp.w3"),
    "adaln": ("shared_adaln_*.1", "shared_adaln_*.3"),
    # addon_info_embs_proj.0 is Linear(1 → dim): nothing for an adapter to factorise
    "embed": ("in_patch.proj", "out_patch.proj", "time_emb.proj.0", "addon_info_embs_proj.2", "ctx_proj"),
}
UNET_NORMS = ("*_pre_norm.norm", "shared_adaln_*.0")
TEXT_ENCODER_MODULES = ("layers.*.self_attn.*_proj", "layers.*.mlp.*_proj")
GROUPS = (*UNET_GROUPS, "text_encoder")
# LyCORIS's bypass mode adds the adapter's output, x ↦ W·x + up·(down·x), instead of rebuilding W + ΔW and running
# a second full-size matmul each step: the same function, 1.6× faster for LoRA and 1.17× for LoKr on the CPU
# benchmark (BENCHMARKS.md). LoHa's Hadamard product has no such shortcut.
BYPASS = ("lora", "lokr")


@dataclass
class FinetuneSection:
    """[finetune]: train every weight ("full", also pretraining) or a LyCORIS adapter on frozen weights."""

    method: str = "full"                 # full, lora, loha or lokr
    dim: int = 16                        # rank (LoRA, LoHa; LoKr's factorised part unless full_matrix)
    alpha: float = 16.0                  # the update is scaled by alpha / dim
    factor: int = -1                     # LoKr: size of the small Kronecker factor; -1 = as balanced as possible
    full_matrix: bool = False            # LoKr: both Kronecker factors full (no rank; alpha is unused)
    train_norm: bool = False             # also adapt the XUT's norm gains (w_norm / b_norm)
    dropout: float = 0.0                 # dropout on the adapter's input
    rank_dropout: float = 0.0
    module_dropout: float = 0.0
    modules: list = field(default_factory=lambda: ["attention", "mlp", "adaln"])

    def __post_init__(self) -> None:
        if self.method not in METHODS:
            raise ValueError(f"finetune.method {self.method!r} must be one of {METHODS}")
        unknown = sorted(set(self.modules) - set(GROUPS))
        if unknown or not self.modules:
            raise ValueError(f"finetune.modules {self.modules} must be a non-empty list of {list(GROUPS)}")
        if self.dim < 1 or not self.alpha > 0 or self.factor == 0 or self.factor < -1:
            raise ValueError(f"finetune: dim {self.dim} must be >= 1, alpha {self.alpha} > 0, factor "
                             f"{self.factor} -1 (balanced) or >= 1")
        for name in ("dropout", "rank_dropout", "module_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ValueError(f"finetune.{name} {getattr(self, name)} must be in [0, 1)")

    @property
    def adapter(self) -> bool:
        return self.method != "full"

    def adapter_settings_set(self) -> list[str]:
        """The adapter settings that differ from their defaults (they mean nothing with method = "full")."""
        default = FinetuneSection()
        return [f"finetune.{f.name}" for f in dataclasses.fields(self)
                if f.name != "method" and getattr(self, f.name) != getattr(default, f.name)]

    @property
    def adapts_text_encoder(self) -> bool:
        return self.adapter and "text_encoder" in self.modules

    def settings(self) -> dict[str, Any]:
        """What the export's metadata records (ComfyUI shows `ss_*` keys; `hdm.adapter` is ours)."""
        keep = ("method", "dim", "alpha", "factor", "full_matrix", "train_norm", "modules")
        return {k: getattr(self, k) for k in keep}


def check_rank(ft: FinetuneSection, roots: list[nn.Module]) -> None:
    """A LoRA / LoHa rank above the smaller side of every layer it could adapt is refused before anything is
    allocated: such factors are larger than the weights they change (finetune.dim 100000 asked for 165 GB)."""
    if ft.method not in ("lora", "loha"):
        return  # LyCORIS falls back to a full matrix for a LoKr rank that large
    widest = max((min(m.weight.shape[0], m.weight[0].numel()) for root in roots for m in root.modules()
                  if isinstance(m, (nn.Linear, nn.Conv2d))), default=0)
    if ft.dim > widest:
        raise ValueError(f"finetune.dim {ft.dim} is more than the smaller side of every layer it would adapt (at "
                         f"most {widest}): a {ft.method} of that rank is larger than the weights it changes; use a "
                         f"rank such as 8 to 128")


def _build_network(root: nn.Module, patterns: tuple[str, ...], ft: FinetuneSection) -> Any:
    """A LyCORIS network over the modules of `root` whose paths match `patterns`, applied (forwards patched)."""
    from lycoris import LycorisNetwork
    from lycoris.logging import logger as lycoris_logger

    # The preset is class-level state in LyCORIS: set all of it right before building.
    LycorisNetwork.apply_preset({"enable_conv": True, "target_module": [], "target_name": list(patterns),
                                 "use_fnmatch": True, "module_algo_map": {}, "name_algo_map": {},
                                 "exclude_name": [], "lora_prefix": "lycoris"})
    level = lycoris_logger.level
    lycoris_logger.setLevel(logging.WARNING)  # one INFO line per setting otherwise
    try:
        net = LycorisNetwork(root, multiplier=1.0, lora_dim=ft.dim, conv_lora_dim=ft.dim, alpha=ft.alpha,
                             conv_alpha=ft.alpha, dropout=ft.dropout, rank_dropout=ft.rank_dropout,
                             module_dropout=ft.module_dropout, network_module=ft.method, train_norm=ft.train_norm,
                             factor=ft.factor, full_matrix=ft.full_matrix, warn_on_unmatched=False,
                             bypass_mode=ft.method in BYPASS)
    finally:
        lycoris_logger.setLevel(level)
    net.loras = [m for m in net.loras if not getattr(m, "not_supported", False)]
    if not net.loras:
        raise ValueError(f"finetune.modules {ft.modules} matched no module of {type(root).__name__}")
    net.apply_to()
    return net


class Adapters(nn.Module):
    """The trained part of an adapter run: LyCORIS networks over the XUT (`unet`) and the text encoder (`te`).
    Its state dict is what a checkpoint holds; `export_tensors` renames it to ComfyUI's LoRA keys."""

    def __init__(self, ft: FinetuneSection, model: nn.Module, text_encoder: nn.Module | None) -> None:
        super().__init__()
        patterns = tuple(p for g in ft.modules if g in UNET_GROUPS for p in UNET_GROUPS[g])
        patterns += UNET_NORMS if ft.train_norm else ()
        self.paths: dict[str, str] = {}  # LyCORIS module name → ComfyUI key prefix
        self.unet = _build_network(model, patterns, ft) if patterns else None
        self._name(self.unet, model, LORA_UNET_PREFIX)
        self.te = _build_network(text_encoder, TEXT_ENCODER_MODULES, ft) if ft.adapts_text_encoder else None
        self._name(self.te, text_encoder, LORA_TE_PREFIX)
        self.factors_used = self._factors_used(ft)

    def _factors_used(self, ft: FinetuneSection) -> dict[str, list[int]]:
        """{ComfyUI key prefix: [rows, cols] of the small Kronecker factor} of the LoKr modules where LyCORIS could
        not use finetune.factor (a size it does not divide) and chose another; empty otherwise."""
        if ft.method != "lokr" or ft.factor < 1:
            return {}
        out = {}
        for net in (self.unet, self.te):
            for lo in net.loras if net is not None else ():
                sd = lo.state_dict()
                if "lokr_w1" in sd:
                    shape = list(sd["lokr_w1"].shape)
                elif "lokr_w1_a" in sd:
                    shape = [sd["lokr_w1_a"].shape[0], sd["lokr_w1_b"].shape[1]]
                else:
                    continue  # a norm adapter
                if shape != [ft.factor, ft.factor]:
                    out[self.paths[lo.lora_name]] = shape
        return out

    def _name(self, net: Any, root: nn.Module | None, prefix: str) -> None:
        if net is None:
            return
        where = {id(m): path for path, m in root.named_modules()}
        self.paths.update({lo.lora_name: prefix + where[id(lo.org_module[0])] for lo in net.loras})

    def export_tensors(self) -> dict[str, torch.Tensor]:
        """{ComfyUI key: tensor}: `diffusion_model.<XUT module>.<tensor>` and, for the text encoder,
        `text_encoders.qwen3_06b.transformer.model.<Qwen3 module>.<tensor>`."""
        out = {}
        for net in (self.unet, self.te):
            for lo in net.loras if net is not None else ():
                for name, tensor in lo.state_dict().items():
                    out[f"{self.paths[lo.lora_name]}.{name}"] = tensor.detach()
        return out


class AdaptedXUT(nn.Module):
    """The XUT with its adapters registered, so DDP and the optimizer see the adapter parameters; calls the XUT."""

    def __init__(self, model: nn.Module, adapters: Adapters) -> None:
        super().__init__()
        self.model, self.adapters = model, adapters

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        return self.model(*args, **kwargs)


def attach(ft: FinetuneSection, model: nn.Module, text_encoder: Any) -> Adapters:
    """Freeze the XUT (and text encoder) and patch the adapters in; the seeded init makes ranks agree."""
    model.requires_grad_(False)
    te_model = text_encoder.model if ft.adapts_text_encoder else None
    if te_model is not None:
        te_model.requires_grad_(False)
    check_rank(ft, [model] + ([te_model] if te_model is not None else []))
    adapters = Adapters(ft, model, te_model)
    return adapters.to(next(model.parameters()).device)


def export_metadata(ft: FinetuneSection, adapters: Adapters, base: BaseIdentity, step: int,
                    recipe: dict) -> dict[str, str]:
    """Safetensors metadata of an exported adapter: our settings (with the LoKr factors LyCORIS changed), the base
    file and its fingerprint (`hdm_core.adapters` warns when the adapter is applied to another), and the
    kohya-style `ss_*` keys that ComfyUI and LoRA managers display."""
    args = {"algo": ft.method, "factor": ft.factor, "full_matrix": ft.full_matrix, "train_norm": ft.train_norm}
    settings = ft.settings() | ({"factors_used": adapters.factors_used} if adapters.factors_used else {})
    return {"hdm.adapter": json.dumps(settings), BASE_FILE_KEY: base.name, BASE_FINGERPRINT_KEY: base.fingerprint,
            "hdm.train_step": str(step), "hdm.recipe": json.dumps(recipe), "ss_network_module": "lycoris.kohya",
            "ss_network_dim": str(ft.dim), "ss_network_alpha": str(ft.alpha), "ss_network_args": json.dumps(args),
            "ss_base_model_version": "hdm", "ss_sd_model_name": base.name}


@dataclass(frozen=True)
class BaseIdentity:
    """The base model of a run: its file (model.init_from) and `hdm_core.checkpoint.fingerprint`; what a checkpoint
    and an adapter export record, and what a resumed adapter run must find again."""

    path: str
    fingerprint: str

    @property
    def name(self) -> str:
        return Path(self.path).name

    @classmethod
    def of(cls, path: str | Path) -> BaseIdentity:
        return cls(str(path), fingerprint(path))

    def check_resume(self, recorded: dict | None, checkpoint: str | Path) -> None:
        """ValueError when a checkpoint recorded another base than this one (an older checkpoint records none)."""
        if recorded and recorded.get("fingerprint") not in (None, self.fingerprint):
            raise ValueError(
                f"cannot resume {checkpoint}: its adapter was trained on {recorded.get('path')} "
                f"({recorded['fingerprint']}), but model.init_from {self.path} is now another file "
                f"({self.fingerprint}); an adapter trained on two bases fits neither. Put the original base back at "
                f"{self.path}, or start a new run (another name or run.out_dir) on this one")


def check_recipe(ft: FinetuneSection, init_from: str, ema_decay: float, compile_: bool, cache: str) -> None:
    """An adapter run needs base weights and no EMA; a text-encoder adapter needs the text encoder online; a full run
    sets no adapter settings (they would be ignored)."""
    if not ft.adapter:
        ignored = ft.adapter_settings_set()
        if ignored:
            raise ValueError(f"{', '.join(ignored)} set, but finetune.method is 'full' (every weight is trained, no "
                             f"adapter): set finetune.method to lora, loha or lokr, or remove {ignored[0]}")
        return
    if not init_from:
        raise ValueError(f"finetune.method={ft.method!r} trains an adapter on frozen weights: set model.init_from "
                         f"to the base model (the released .safetensors or a stage's export)")
    if ema_decay > 0:
        raise ValueError(f"train.ema_decay {ema_decay}: EMA is for full training; adapter runs save the adapter "
                         f"itself (set train.ema_decay=0)")
    if ft.adapts_text_encoder and cache:
        raise ValueError(f"finetune.modules has text_encoder, but data.cache {cache!r} holds fixed text "
                         f"embeddings; leave data.cache empty to train the text encoder's adapter")
    if ft.adapts_text_encoder and compile_:
        raise ValueError("model.compile with a text-encoder adapter is not supported; set model.compile=false")
