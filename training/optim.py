"""HDM's "muP with base_dim = 1" AdamW groups and its warmup + cosine schedule (TRAINING.md §2)."""

from __future__ import annotations

import math
from collections import defaultdict

import torch
from torch import nn

from .recipe import OptimSection


def fan_in(p: torch.Tensor) -> int:
    """numel for vectors, in_features for Linear weights, prod(shape[1:]) for conv kernels and RoPE freqs."""
    if p.dim() <= 1:
        return p.numel()
    return math.prod(p.shape[1:])


def mup_param_groups(model: nn.Module, lr: float, weight_decay: float, base_dim: int = 1) -> list[dict]:
    """One AdamW group per distinct fan_in with lr·base_dim/fan_in: the same maths as HDM's group per tensor,
    in 7 groups for XUT-base (cheap for fused AdamW). Decoupled weight decay applies to every tensor."""
    by_fan_in: dict[int, list[tuple[str, nn.Parameter]]] = defaultdict(list)
    for name, p in model.named_parameters():
        if p.requires_grad:
            by_fan_in[fan_in(p)].append((name, p))
    return [{"params": [p for _, p in named], "names": [n for n, _ in named], "fan_in": f,
             "lr": lr * base_dim / f, "weight_decay": weight_decay}
            for f, named in sorted(by_fan_in.items())]


class WarmupCosine:
    """LR factor f(step): linear 0 → 1 over `warmup` steps (f(0) = 0), then cosine to `floor` at `total`.

    Picklable, so LambdaLR stores it in its state dict. `total` is the number of optimizer steps.
    """

    def __init__(self, warmup: int, total: int, floor: float = 0.01) -> None:
        self.warmup, self.total, self.floor = warmup, total, floor

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return step / self.warmup
        end = self.total + 1  # the official schedule ends one step after the last one
        progress = min(1.0, (step - self.warmup) / max(1, end - self.warmup))
        return max(self.floor, self.floor + 0.5 * (1 - self.floor) * (1 + math.cos(math.pi * progress)))


def lr_schedule(optim: OptimSection, total: int) -> WarmupCosine:
    """The recipe's LR factor over `total` optimizer steps: the LR of step s is optim.lr · schedule(s)."""
    return WarmupCosine(optim.warmup_steps, total, optim.min_lr_ratio)


def build_optimizer(model: nn.Module, optim: OptimSection,
                    total: int) -> tuple[torch.optim.AdamW, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW over the muP groups (fused on CUDA) and its LambdaLR schedule over `total` optimizer steps."""
    groups = mup_param_groups(model, optim.lr, optim.weight_decay, optim.base_dim)
    on_cuda = all(p.is_cuda for g in groups for p in g["params"])
    opt = torch.optim.AdamW(groups, lr=optim.lr, betas=tuple(optim.betas), eps=optim.eps,
                            weight_decay=optim.weight_decay, fused=True if on_cuda else None)
    return opt, torch.optim.lr_scheduler.LambdaLR(opt, lr_schedule(optim, total))


@torch.no_grad()
def update_ema(ema: nn.Module, model: nn.Module, decay: float) -> None:
    """ema ← decay·ema + (1 − decay)·model, parameter by parameter."""
    ema_params = list(ema.parameters())
    torch._foreach_lerp_(ema_params, [p.detach().to(e.dtype) for p, e in zip(model.parameters(), ema_params)],
                         1 - decay)
