"""Analytic FLOP counts of an XUT forward pass (multiply-adds count 2), for benchmarks and MFU."""

from __future__ import annotations

from .config import XUTConfig


def block_flops(cfg: XUTConfig, seq: int, cross: bool = False) -> int:
    """One transformer block on a sequence of `seq` tokens."""
    d, m = cfg.dim, cfg.mlp_dim
    attn = 2 * seq * d * 3 * d + 2 * seq * d * d + 4 * seq * seq * d      # qkv, out, QKᵀ and AV
    mlp = 2 * seq * d * 2 * m + 2 * seq * m * d                           # w12, w3
    xattn = (2 * seq * d * d * 4 + 4 * seq * seq * d) if cross else 0     # q, kv (2D), out; attention
    return attn + mlp + xattn


def xut_flops(cfg: XUTConfig, image_tokens: int, text_tokens: int, kept_tokens: int | None = None) -> int:
    """Forward FLOPs per sample; `kept_tokens` image tokens run through the routed backbone (TREAD)."""
    full = image_tokens + text_tokens
    routed = (image_tokens if kept_tokens is None else kept_tokens) + text_tokens
    tr = cfg.tread_config
    total = (tr.prev_trns_depth + tr.post_trns_depth) * block_flops(cfg, full)
    total += cfg.depth * cfg.enc_blocks * block_flops(cfg, routed)
    total += cfg.depth * (block_flops(cfg, routed, cross=True) + (cfg.dec_blocks - 1) * block_flops(cfg, routed))
    patch = cfg.input_dim * cfg.patch_size**2
    total += 2 * image_tokens * patch * cfg.dim * 2 + 2 * text_tokens * cfg.ctx_dim * cfg.dim
    return total
