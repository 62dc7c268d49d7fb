"""XUT (Cross-U-Transformer), the HDM backbone, with the official state-dict key names (SPEC §2–§3)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from .config import XUTConfig
from .layers import AttentionFn, Block, Modulation, TimestepEmbedding, adaln_mlp, key_padding_mask, sdpa_attention
from .rope import downsample_pos, make_axial_pos
from .tread import gather_tokens, keep_index, random_keep_index, restore_tokens

MOD_NAMES = ("attn", "xattn", "ffw")

# block_hook(index, name, run, args) -> the block's output stream, called in place of every block when given to
# XUT.forward. index: the block's position in execution order (0 … len(XUT.block_names) − 1); name: its state-dict
# path (XUT.block_names[index], e.g. "backbone.dec_blocks.1.0"); args: {"x": stream [B, S, D], "pos": [B, S, 2],
# "mods": adaLN triples, "memory": the last encoder output for a cross-attending block else None, "mask": key
# mask or None, "options": attention options or None}; run(args) runs the block on (possibly changed) args. A hook
# may change args, run the block or not, or change its output; `lambda i, name, run, args: run(args)` changes
# nothing. With TREAD on, backbone blocks see the routed stream (K + L tokens).
BlockHook = Callable[[int, str, Callable[[dict[str, Any]], torch.Tensor], dict[str, Any]], torch.Tensor]


class PatchIn(nn.Module):
    def __init__(self, channels: int, dim: int, patch: int, *, ops: Any, dtype: Any, device: Any) -> None:
        super().__init__()
        self.proj = ops.Conv2d(channels, dim, patch, stride=patch, dtype=dtype, device=device)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, N, D), N = h·w row-major


class PatchOut(nn.Module):
    def __init__(self, dim: int, channels: int, patch: int, *, ops: Any, dtype: Any, device: Any) -> None:
        super().__init__()
        self.patch, self.channels = patch, channels
        self.proj = ops.Linear(dim, patch * patch * channels, dtype=dtype, device=device)

    def forward(self, tokens: torch.Tensor, h: int, w: int) -> torch.Tensor:
        p, c = self.patch, self.channels
        y = self.proj(tokens).reshape(-1, h, w, p, p, c)           # features ordered (u, v, c), c fastest
        return y.permute(0, 5, 1, 3, 2, 4).reshape(-1, c, h * p, w * p)


class BlockStack(nn.Module):
    """The always-run blocks before and after the routed backbone (keys `*_tread_trns.blocks.i`)."""

    def __init__(self, n: int, cfg: XUTConfig, **kw: Any) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(Block(cfg.dim, cfg.dim_head, cfg.mlp_dim, **kw) for _ in range(n))


class Backbone(nn.Module):
    """Encoder groups, then decoder groups whose first block cross-attends to the last encoder output."""

    def __init__(self, cfg: XUTConfig, **kw: Any) -> None:
        super().__init__()
        dims = (cfg.dim, cfg.dim_head, cfg.mlp_dim)
        self.enc_blocks = nn.ModuleList(
            nn.ModuleList(Block(*dims, **kw) for _ in range(cfg.enc_blocks)) for _ in range(cfg.depth))
        self.dec_blocks = nn.ModuleList(
            nn.ModuleList(Block(*dims, cross=j == 0, **kw) for j in range(cfg.dec_blocks))
            for _ in range(cfg.depth))


@dataclass(frozen=True)
class _Pass:
    """What every block of one forward pass sees besides the stream (pos and mask change for the routed part)."""

    pos: torch.Tensor
    mods: dict[str, Modulation]
    mask: torch.Tensor | None
    hook: BlockHook | None
    options: dict[str, Any] | None


class XUT(nn.Module):
    """The HDM denoiser: predicts the flow velocity ε − x0 for a latent x at time t ∈ [0, 1]."""

    def __init__(self, config: XUTConfig, *, ops: Any = nn, attention: AttentionFn = sdpa_attention,
                 dtype: torch.dtype | None = None, device: torch.device | str | None = None) -> None:
        """ops: a namespace with Linear, Conv2d and LayerNorm (torch.nn, or ComfyUI's comfy.ops); attention: the
        attention operation every block calls (see layers.AttentionFn; default torch SDPA)."""
        super().__init__()
        self.config = cfg = config
        kw = dict(ops=ops, dtype=dtype, device=device)
        block_kw = dict(kw, attention=attention)
        self.in_patch = PatchIn(cfg.input_dim, cfg.dim, cfg.patch_size, **kw)
        self.time_emb = TimestepEmbedding(cfg.dim, **kw)
        if cfg.addon_info_embs_dim:
            self.addon_info_embs_proj = nn.Sequential(
                ops.Linear(cfg.addon_info_embs_dim, cfg.dim, dtype=dtype, device=device), nn.Mish(),
                ops.Linear(cfg.dim, cfg.dim, dtype=dtype, device=device))
        self.ctx_proj = ops.Linear(cfg.ctx_dim, cfg.dim, dtype=dtype, device=device)
        self.shared_adaln_attn = adaln_mlp(cfg.dim, **kw)
        self.shared_adaln_xattn = adaln_mlp(cfg.dim, **kw)
        self.shared_adaln_ffw = adaln_mlp(cfg.dim, **kw)
        self.prev_tread_trns = BlockStack(cfg.tread_config.prev_trns_depth, cfg, **block_kw)
        self.backbone = Backbone(cfg, **block_kw)
        self.post_tread_trns = BlockStack(cfg.tread_config.post_trns_depth, cfg, **block_kw)
        self.out_patch = PatchOut(cfg.dim, cfg.input_dim, cfg.patch_size, **kw)
        self.gradient_checkpointing = False
        # Registration order is execution order: prev, encoder groups, decoder groups, post.
        self.block_names = tuple(name for name, m in self.named_modules() if isinstance(m, Block))

    def init_for_training(self) -> None:
        """The official from-scratch init: zero last adaLN / aspect layers, near-zero output projection."""
        zeroed = [self.shared_adaln_attn[3], self.shared_adaln_xattn[3], self.shared_adaln_ffw[3]]
        if self.config.addon_info_embs_dim:
            zeroed.append(self.addon_info_embs_proj[2])
        with torch.no_grad():
            for layer in zeroed:
                layer.weight.zero_()
                layer.bias.zero_()
            nn.init.normal_(self.out_patch.proj.weight, std=1.0 / self.config.dim ** 2)
            self.out_patch.proj.bias.zero_()

    def _call(self, block: Block, *args: Any) -> torch.Tensor:
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    def _run(self, index: int, block: Block, seq: torch.Tensor, ps: _Pass,
             memory: torch.Tensor | None = None) -> torch.Tensor:
        """Block `index` on the stream, through the pass's block hook when there is one."""
        if ps.hook is None:
            return self._call(block, seq, ps.pos, ps.mods, memory, ps.mask, ps.options)

        def run(a: dict[str, Any]) -> torch.Tensor:
            return self._call(block, a["x"], a["pos"], a["mods"], a.get("memory"), a.get("mask"), a.get("options"))
        args = {"x": seq, "pos": ps.pos, "mods": ps.mods, "memory": memory, "mask": ps.mask, "options": ps.options}
        return ps.hook(index, self.block_names[index], run, args)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        ctx: torch.Tensor | None = None,
        pos_map: torch.Tensor | None = None,
        aspect: torch.Tensor | float | None = None,
        tread_keep: torch.Tensor | None = None,
        tread_rate: float | None = None,
        generator: torch.Generator | None = None,
        ctx_mask: torch.Tensor | None = None,
        block_hook: BlockHook | None = None,
        attn_options: dict[str, Any] | None = None,
    ) -> torch.Tensor:
        """Velocity for x [B, C, H, W] at t (B values in [0, 1]) given text states ctx [B, L, ctx_dim].

        pos_map: latent-resolution map [B or 1, H·W, 2] (None = the model's own patch grid).
        aspect: ln(W / H), shape [B] or [B, 1].
        tread_keep: the image tokens to route through the backbone, a boolean mask [B, N] or sorted indices
        [B, K] (indices need no host synchronisation, so they compile into one graph and CUDA-graph capture);
        tread_rate: route with random indices at this rate instead (0 or None = off), drawn from `generator`.
        ctx_mask: [B or 1, L], True on real text tokens; the others (padding, to batch contexts of different
        lengths) are hidden from every attention. None = all real, the unmasked path.
        block_hook: called in place of every block (see `BlockHook`); None = the blocks run as they are.
        attn_options: keyword arguments passed to every call of the attention operation (see layers.AttentionFn).
        """
        cfg, p = self.config, self.config.patch_size
        b, _, height, width = x.shape
        if height % p or width % p:
            raise ValueError(f"latent size {height}x{width} is not divisible by patch_size {p}; "
                             f"use image sides that are multiples of {8 * p} px")
        h, w = height // p, width // p
        n = h * w
        dtype = x.dtype

        tokens = self.in_patch(x)                                                     # (B, N, D)
        mods = self._modulations(t, aspect, b, dtype, x.device)
        if ctx is None:  # the official fallback: ctx_size all-zero text states
            ctx = x.new_zeros(b, cfg.ctx_size, cfg.ctx_dim)
        text = self.ctx_proj(ctx.to(dtype)).expand(b, -1, -1)                          # (B, L, D)
        seq = torch.cat((tokens, text), dim=1)                                        # (B, N + L, D)
        pos = self._positions(pos_map, b, height, width, text.shape[1], x.device)     # (B, N + L, 2)
        if ctx_mask is not None:
            if ctx_mask.shape[-1] != text.shape[1]:
                raise ValueError(f"ctx_mask covers {ctx_mask.shape[-1]} tokens but ctx has {text.shape[1]}")
            ctx_mask = ctx_mask.to(x.device).expand(b, -1)                            # (B, L)
        mask = None if ctx_mask is None else key_padding_mask(ctx_mask, n)            # (B, 1, 1, N + L)
        ps = _Pass(pos, mods, mask, block_hook, attn_options)

        prev = self.prev_tread_trns.blocks
        for i, block in enumerate(prev):
            seq = self._run(i, block, seq, ps)

        index = self._route(tread_keep, tread_rate, generator, b, n, x.device)
        if index is None:
            seq = self._backbone(seq, ps, len(prev))
        else:
            k = index.shape[1]
            routed = torch.cat((gather_tokens(seq[:, :n], index), seq[:, n:]), dim=1)   # (B, K + L, D)
            routed_pos = torch.cat((gather_tokens(pos[:, :n], index), pos[:, n:]), dim=1)
            routed_mask = None if ctx_mask is None else key_padding_mask(ctx_mask, k)
            routed = self._backbone(routed, replace(ps, pos=routed_pos, mask=routed_mask), len(prev))
            seq = torch.cat((restore_tokens(seq[:, :n], routed[:, :k], index), routed[:, k:]), dim=1)

        post = self.post_tread_trns.blocks
        for i, block in enumerate(post, len(self.block_names) - len(post)):
            seq = self._run(i, block, seq, ps)
        return self.out_patch(seq[:, :n], h, w)                                       # (B, C, H, W)

    def _positions(self, pos_map: torch.Tensor | None, b: int, height: int, width: int, text_tokens: int,
                   device: torch.device) -> torch.Tensor:
        """Patch-resolution positions of the image tokens, then (0, 0) for every text token → [B, N + L, 2]."""
        p = self.config.patch_size
        if pos_map is None:
            pos = make_axial_pos(height // p, width // p, device=device)[None]
        else:
            pos = downsample_pos(pos_map.to(device), height, width, p)
        pos = pos.expand(b, -1, 2)                                                    # (B, N, 2)
        return torch.cat((pos, pos.new_zeros(b, text_tokens, 2)), dim=1)

    def _modulations(self, t: torch.Tensor | float, aspect: torch.Tensor | float | None, b: int,
                     dtype: torch.dtype, device: torch.device) -> dict[str, Modulation]:
        """The shared adaLN triples of attention, cross-attention and MLP, from t and the aspect ratio."""
        cfg = self.config
        t = torch.as_tensor(t, device=device).reshape(-1).expand(b)
        cond = self.time_emb(t, dtype)                                                # (B, 1, D)
        if aspect is not None and cfg.addon_info_embs_dim:
            aspect = torch.as_tensor(aspect, device=device, dtype=dtype).reshape(-1, cfg.addon_info_embs_dim)
            cond = cond + self.addon_info_embs_proj(aspect.expand(b, -1))[:, None]
        mods = {}
        for name in MOD_NAMES:
            scale, shift, gate = getattr(self, f"shared_adaln_{name}")(cond).chunk(3, dim=-1)
            mods[name] = Modulation(1 + scale, shift, 1 + gate)
        return mods

    @staticmethod
    def _route(keep: torch.Tensor | None, rate: float | None, generator: torch.Generator | None, b: int, n: int,
               device: torch.device) -> torch.Tensor | None:
        """Kept-token indices [B, K] for TREAD, or None when routing is off."""
        if keep is None:
            return random_keep_index(b, n, rate, generator=generator, device=device) if rate else None
        if keep.dtype == torch.bool:
            if keep.shape != (b, n):
                raise ValueError(f"tread_keep must be [B, N] = [{b}, {n}], got {list(keep.shape)}")
            return keep_index(keep.to(device))  # reads the mask on the host: pass indices to avoid that
        if keep.dim() != 2 or keep.shape[0] != b or keep.shape[1] > n or keep.is_floating_point():
            raise ValueError(f"tread_keep must be a bool mask [{b}, {n}] or integer indices [{b}, K <= {n}], "
                             f"got {keep.dtype} {list(keep.shape)}")
        return keep.to(device)

    def _backbone(self, seq: torch.Tensor, ps: _Pass, first: int) -> torch.Tensor:
        """The encoder then decoder groups; `first` is the execution index of the first encoder block."""
        encoder = [block for group in self.backbone.enc_blocks for block in group]
        decoder = [block for group in self.backbone.dec_blocks for block in group]
        for i, block in enumerate(encoder, first):
            seq = self._run(i, block, seq, ps)
        memory = seq  # every decoder group cross-attends to the LAST encoder output (text tokens included)
        for i, block in enumerate(decoder, first + len(encoder)):
            seq = self._run(i, block, seq, ps, memory if block.has_cross else None)
        return seq
