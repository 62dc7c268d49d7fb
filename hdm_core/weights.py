"""Filling a module built on the meta device with a state dict, without a second copy of the weights."""

from __future__ import annotations

import torch


def assign_weights(module: torch.nn.Module, sd: dict[str, torch.Tensor], *, dtype: torch.dtype,
                   device: torch.device, what: str) -> torch.nn.Module:
    """Load `sd` (cast to dtype/device) into a meta-built `module` by assignment; any key mismatch is an error."""
    sd = {k: v.to(device=device, dtype=dtype) for k, v in sd.items()}
    result = module.load_state_dict(sd, strict=False, assign=True)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{what}: missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}")
    return module
