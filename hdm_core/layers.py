"""XUT building blocks (SPEC §3). Every Linear/Conv/LayerNorm is built through `ops` (torch.nn by default,
ComfyUI's comfy.ops when loaded there) and attention through `attention` (`sdpa_attention` by default, ComfyUI's
optimized attention there); parameters outside such layers are cast to the input dtype at use."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from .rope import apply_rope, rope_angles

LN_PI = math.log(math.pi)  # official initial RoPE log-frequency (SPEC §3.8)

# attention(q, k, v, mask=None, **options) -> [B, S_q, H·d], for q [B, H, S_q, d] and k, v [B, H, S_k, d] (RoPE
# applied); mask: bool [B, 1, 1, S_k], True = attend (see `key_padding_mask`), or None; options: the per-call
# `attn_options` given to XUT.forward (empty unless a caller passes some), for backends that need them.
AttentionFn = Callable[..., torch.Tensor]


def sdpa_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None,
                   **options: Any) -> torch.Tensor:
    """The default attention: torch's scaled_dot_product_attention, heads merged → [B, S_q, H·d]; options unused."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2)


class Modulation(NamedTuple):
    """One shared-adaLN triple, pre-offset: (1 + scale), shift, (1 + gate), each [B, 1, D]."""

    scale1: torch.Tensor
    shift: torch.Tensor
    gate1: torch.Tensor


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6, *, dtype: Any = None, device: Any = None) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim, dtype=dtype, device=device))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, x.shape[-1:], self.weight.to(x), self.eps)  # also moves it: lowvram offload

    def _norm(self, x: torch.Tensor) -> torch.Tensor:
        """The normalisation without the gain: LyCORIS's norm adapter (train_norm) adds w_norm · _norm(x)."""
        return F.rms_norm(x, x.shape[-1:], None, self.eps)


class ModulatedNorm(nn.Module):
    """RMSNorm with a learned gain, then the shared adaLN: norm(x)·(1 + scale) + shift."""

    def __init__(self, dim: int, *, dtype: Any = None, device: Any = None) -> None:
        super().__init__()
        self.norm = RMSNorm(dim, dtype=dtype, device=device)  # key: <sub-layer>_pre_norm.norm.weight

    def forward(self, x: torch.Tensor, mod: Modulation) -> torch.Tensor:
        return torch.addcmul(mod.shift, self.norm(x), mod.scale1)


class RopeFreqs(nn.Module):
    """Learned RoPE log-frequencies [heads, dim_head // 4, 2] (key: `*.rope.freqs`)."""

    def __init__(self, heads: int, dim_head: int, *, dtype: Any = None, device: Any = None) -> None:
        super().__init__()
        self.freqs = nn.Parameter(torch.full((heads, dim_head // 4, 2), LN_PI, dtype=dtype, device=device))

    def cos_sin(self, pos: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        theta = rope_angles(pos, self.freqs)  # (B, H, S, 2F)
        return theta.cos().to(dtype), theta.sin().to(dtype)


class SelfAttention(nn.Module):
    def __init__(self, dim: int, dim_head: int, *, ops: Any = nn, attention: AttentionFn = sdpa_attention,
                 dtype: Any = None, device: Any = None) -> None:
        super().__init__()
        self.heads, self.attention = dim // dim_head, attention
        self.qkv = ops.Linear(dim, 3 * dim, bias=False, dtype=dtype, device=device)
        self.out = ops.Linear(dim, dim, dtype=dtype, device=device)
        self.rope = RopeFreqs(self.heads, dim_head, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mask: torch.Tensor | None = None,
                options: dict[str, Any] | None = None) -> torch.Tensor:
        q, k, v = self.qkv(x).unflatten(-1, (3, self.heads, -1)).permute(2, 0, 3, 1, 4)  # 3 × (B, H, S, d)
        cos, sin = self.rope.cos_sin(pos, q.dtype)
        y = self.attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, mask, **(options or {}))  # (B, S, D)
        return self.out(y)


class CrossAttention(nn.Module):
    """Attention from the stream to the last encoder output E (same token layout, so the same positions)."""

    def __init__(self, dim: int, dim_head: int, *, ops: Any = nn, attention: AttentionFn = sdpa_attention,
                 dtype: Any = None, device: Any = None) -> None:
        super().__init__()
        self.heads, self.attention = dim // dim_head, attention
        self.q = ops.Linear(dim, dim, bias=False, dtype=dtype, device=device)
        self.kv = ops.Linear(dim, 2 * dim, bias=False, dtype=dtype, device=device)
        self.out = ops.Linear(dim, dim, dtype=dtype, device=device)
        self.rope = RopeFreqs(self.heads, dim_head, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, pos: torch.Tensor,
                mask: torch.Tensor | None = None, options: dict[str, Any] | None = None) -> torch.Tensor:
        q = self.q(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)                       # (B, H, S, d)
        k, v = self.kv(memory).unflatten(-1, (2, self.heads, -1)).permute(2, 0, 3, 1, 4)  # 2 × (B, H, S, d)
        cos, sin = self.rope.cos_sin(pos, q.dtype)
        y = self.attention(apply_rope(q, cos, sin), apply_rope(k, cos, sin), v, mask, **(options or {}))  # (B, S, D)
        return self.out(y)


class SwiGLU(nn.Module):
    def __init__(self, dim: int, hidden: int, *, ops: Any = nn, dtype: Any = None, device: Any = None) -> None:
        super().__init__()
        self.w12 = ops.Linear(dim, 2 * hidden, dtype=dtype, device=device)  # [gated (SiLU) | linear]
        self.w3 = ops.Linear(hidden, dim, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gated, linear = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(gated) * linear)


class Block(nn.Module):
    """One transformer block. Each sub-layer replaces the stream by U = modnorm(S) and adds F(U)·(1 + gate)."""

    def __init__(self, dim: int, dim_head: int, mlp_dim: int, *, cross: bool = False, ops: Any = nn,
                 attention: AttentionFn = sdpa_attention, dtype: Any = None, device: Any = None) -> None:
        super().__init__()
        kw = dict(dtype=dtype, device=device)
        self.attn_pre_norm = ModulatedNorm(dim, **kw)
        self.attn = SelfAttention(dim, dim_head, ops=ops, attention=attention, **kw)
        if cross:
            self.xattn_pre_norm = ModulatedNorm(dim, **kw)
            self.xattn = CrossAttention(dim, dim_head, ops=ops, attention=attention, **kw)
        self.mlp_pre_norm = ModulatedNorm(dim, **kw)
        self.mlp = SwiGLU(dim, mlp_dim, ops=ops, **kw)

    @property
    def has_cross(self) -> bool:
        return hasattr(self, "xattn")

    def forward(self, x: torch.Tensor, pos: torch.Tensor, mods: dict[str, Modulation],
                memory: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                options: dict[str, Any] | None = None) -> torch.Tensor:
        """mask: which keys to attend to, [B, 1, 1, S] (see `key_padding_mask`), or None for all; options: keyword
        arguments for the attention operation (see `AttentionFn`)."""
        u = self.attn_pre_norm(x, mods["attn"])
        x = torch.addcmul(u, self.attn(u, pos, mask, options), mods["attn"].gate1)
        if self.has_cross:
            u = self.xattn_pre_norm(x, mods["xattn"])
            x = torch.addcmul(u, self.xattn(u, memory, pos, mask, options), mods["xattn"].gate1)
        u = self.mlp_pre_norm(x, mods["ffw"])
        return torch.addcmul(u, self.mlp(u), mods["ffw"].gate1)


def key_padding_mask(ctx_mask: torch.Tensor, image_tokens: int) -> torch.Tensor:
    """Attention mask [B, 1, 1, K + L] over a sequence of K image tokens then L text tokens: True (attend) on
    image tokens and real text tokens (ctx_mask [B, L] True), False on padded text tokens. Boolean, so SDPA
    applies it in the query's dtype (autocast included)."""
    image = ctx_mask.new_ones(ctx_mask.shape[0], image_tokens, dtype=torch.bool)
    return torch.cat((image, ctx_mask.bool()), dim=1)[:, None, None]


class TimestepEmbedding(nn.Module):
    """τ = 1000·t, [cos(τω), sin(τω)] with ω_k = 10000^(−k/(D/2)), then Linear + Mish (SPEC §3.3)."""

    def __init__(self, dim: int, *, ops: Any = nn, dtype: Any = None, device: Any = None) -> None:
        super().__init__()
        half = dim // 2
        freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32) / half)
        self.register_buffer("freqs", freqs[None].to(device=device, dtype=dtype or torch.float32))
        self.proj = nn.Sequential(ops.Linear(dim, dim, dtype=dtype, device=device), nn.Mish())

    def forward(self, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        # Sinusoids in (at least) float32 whatever the model dtype; the buffer is used as stored (SPEC §10).
        precise = torch.promote_types(dtype, torch.float32)
        tau = 1000 * t.to(precise).reshape(-1, 1)                             # (B, 1)
        angles = tau * self.freqs.to(t.device, precise)                               # (B, D/2)
        emb = torch.cat((angles.cos(), angles.sin()), dim=-1).to(dtype)       # cos first
        return self.proj(emb)[:, None]                                        # (B, 1, D)


def adaln_mlp(dim: int, *, ops: Any = nn, dtype: Any = None, device: Any = None) -> nn.Sequential:
    """Shared adaLN: LayerNorm → Linear(D, 4D) → Mish → Linear(4D, 3D) giving (scale, shift, gate)."""
    return nn.Sequential(
        ops.LayerNorm(dim, eps=1e-5, dtype=dtype, device=device),
        ops.Linear(dim, 4 * dim, dtype=dtype, device=device),
        nn.Mish(),
        ops.Linear(4 * dim, 3 * dim, dtype=dtype, device=device),
    )
