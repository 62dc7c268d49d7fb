"""TREAD token routing (SPEC §3.10) as a select / restore pair.

A keep mask [B, N] marks the image tokens that run through the routed backbone; every row keeps the same
number of tokens. `restore_tokens(x, *select_tokens(x, keep))` returns x exactly.

The model routes with keep *indices* [B, K] (sorted per row): K is then a shape, not a value, so the forward
needs no host synchronisation and compiles as one graph. `keep_index` turns a mask into indices (this reads the
mask on the host); `random_keep_index` draws them directly.
"""

from __future__ import annotations

import math

import torch


def keep_count(num_tokens: int, rate: float) -> int:
    """Tokens kept per sample at routing rate `rate`: N − ⌊N·rate⌋."""
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"TREAD rate must be in [0, 1), got {rate}")
    return num_tokens - math.floor(num_tokens * rate)


def random_keep_index(batch: int, num_tokens: int, rate: float, *, generator: torch.Generator | None = None,
                      device: torch.device | str | None = None) -> torch.Tensor:
    """Uniformly random kept-token indices [B, K], sorted per row, K = `keep_count`, drawn from `generator`."""
    keep = keep_count(num_tokens, rate)
    gen_device = generator.device if generator is not None else device
    scores = torch.rand(batch, num_tokens, generator=generator, device=gen_device)
    return scores.argsort(dim=1)[:, :keep].sort(dim=1).values.to(device)


def random_keep_mask(batch: int, num_tokens: int, rate: float, *, generator: torch.Generator | None = None,
                     device: torch.device | str | None = None) -> torch.Tensor:
    """A uniformly random keep mask [B, N] with `keep_count` True entries per row, drawn from `generator`."""
    index = random_keep_index(batch, num_tokens, rate, generator=generator, device=device)
    return torch.zeros(batch, num_tokens, dtype=torch.bool, device=index.device).scatter_(1, index, True)


def keep_index(keep: torch.Tensor) -> torch.Tensor:
    """Indices [B, K] of the True entries of a keep mask [B, N], in order; reads the mask on the host."""
    counts = keep.sum(dim=1)
    if not bool((counts == counts[0]).all()):
        raise ValueError(f"every row of the TREAD keep mask must keep the same count, got {counts.tolist()}")
    return keep.nonzero()[:, 1].reshape(keep.shape[0], int(counts[0]))  # nonzero is row-major: sorted per row


def gather_tokens(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """The tokens of x [B, N, D] at `index` [B, K] → [B, K, D]."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def select_tokens(x: torch.Tensor, keep: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather the kept tokens of x [B, N, D] in their original order → (kept [B, K, D], indices [B, K])."""
    index = keep_index(keep)
    return gather_tokens(x, index), index


def restore_tokens(x: torch.Tensor, kept: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Write `kept` [B, K, D] back at `index` into a copy of the full sequence x [B, N, D]."""
    return x.scatter(1, index[..., None].expand(-1, -1, x.shape[-1]), kept)
