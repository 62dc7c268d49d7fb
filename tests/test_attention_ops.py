"""The two injection points of XUT, on CPU with xut-tiny: the attention operation (`XUT(..., attention=...)`) and
the per-block hook (`XUT.forward(..., block_hook=...)`). Injecting a plain reference attention gives the default
(SDPA) result, the text-key mask included; an identity hook changes nothing, bit for bit; a hook sees every block
once, in execution order, and can replace one."""

from __future__ import annotations

import math

import pytest
import torch

from hdm_core import PRESETS, XUT
from hdm_core.layers import sdpa_attention

CFG = PRESETS["xut-tiny"]
B, SIDE, N, L = 2, 8, 16, 5  # batch, latent side, image tokens (patch 2), text tokens


def reference_attention(q, k, v, mask=None, **options):
    """Softmax attention written out: scores, masked keys to −inf, softmax, weighted sum; heads merged."""
    scores = q @ k.transpose(-2, -1) / math.sqrt(q.shape[-1])                  # (B, H, S_q, S_k)
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    return (scores.softmax(dim=-1) @ v).transpose(1, 2).flatten(2)            # (B, S_q, H·d)


def build(**kw) -> XUT:
    torch.manual_seed(0)
    m = XUT(CFG, **kw).eval()
    with torch.no_grad():  # non-degenerate adaLN / output layers, as trained weights are
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


@pytest.fixture(scope="module")
def models() -> tuple[XUT, XUT]:
    default, injected = build(), build(attention=reference_attention)
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), injected.state_dict().values()))
    return default, injected


def inputs(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(B, CFG.input_dim, SIDE, SIDE, generator=g), t=torch.rand(B, generator=g),
                ctx=torch.randn(B, L, CFG.ctx_dim, generator=g), aspect=torch.randn(B, generator=g))


def ragged_mask() -> torch.Tensor:
    mask = torch.ones(B, L, dtype=torch.bool)
    mask[1, 2:] = False  # the second prompt has 2 real tokens, then padding
    return mask


@torch.no_grad()
@pytest.mark.parametrize("case", ["plain", "ctx_mask", "tread"])
def test_injected_attention_equals_default(models, case):
    default, injected = models
    extra = {"ctx_mask": ragged_mask()} if case == "ctx_mask" else {}
    if case == "tread":
        extra = {"tread_keep": torch.stack([torch.arange(0, N, 2), torch.arange(1, N, 2)])}
    want, got = default(**inputs(), **extra), injected(**inputs(), **extra)
    torch.testing.assert_close(got, want, rtol=0, atol=1e-5)


@torch.no_grad()
def test_the_mask_reaches_the_injected_attention(models):
    """Padding hidden by ctx_mask does not change the result of the injected op: the padded prompt gives what the
    unpadded one gives alone (and garbage in the padded slots would show if the mask were dropped)."""
    _, injected = models
    args = inputs()
    args["ctx"][1, 2:] = 1e3  # padded slots: anything
    batched = injected(**args, ctx_mask=ragged_mask())
    alone = injected(args["x"][1:], args["t"][1:], args["ctx"][1:, :2], aspect=args["aspect"][1:])
    torch.testing.assert_close(batched[1:], alone, rtol=0, atol=1e-5)
    assert (injected(**args)[1:] - alone).abs().max() > 1e-2  # without the mask the padding matters


@torch.no_grad()
def test_attention_options_reach_every_call():
    seen = []

    def recording(q, k, v, mask=None, **options):
        seen.append(options)
        return sdpa_attention(q, k, v, mask)

    model = build(attention=recording)
    model(**inputs(), attn_options={"tag": 7})
    cross = sum(block.has_cross for _, block in blocks(model))
    assert seen == [{"tag": 7}] * (len(model.block_names) + cross)


def blocks(model: XUT):
    return [(name, model.get_submodule(name)) for name in model.block_names]


@torch.no_grad()
@pytest.mark.parametrize("tread", [False, True])
def test_identity_hook_is_bit_identical(models, tread):
    default, _ = models

    def routing() -> dict:  # a fresh generator per call: both runs route the same tokens
        return {"tread_rate": 0.5, "generator": torch.Generator().manual_seed(3)} if tread else {}
    want = default(**inputs(), **routing())
    calls = []

    def hook(index, name, run, args):
        calls.append((index, name, args["x"].shape[1], args["memory"] is not None))
        return run(args)
    assert torch.equal(default(**inputs(), **routing(), block_hook=hook), want)
    names = default.block_names
    assert [c[:2] for c in calls] == list(enumerate(names))
    assert names[0].startswith("prev_tread_trns.") and names[-1].startswith("post_tread_trns.")
    assert [c[3] for c in calls] == [default.get_submodule(n).has_cross for n in names]
    routed = [c[2] for c in calls if c[1].startswith("backbone.")]
    assert set(routed) == {(N // 2 if tread else N) + L}  # backbone blocks see the routed stream


@torch.no_grad()
def test_hook_can_replace_a_block(models):
    default, _ = models
    skip = default.block_names.index("backbone.enc_blocks.1.0")

    def hook(index, name, run, args):
        return args["x"] if index == skip else run(args)
    skipped = default(**inputs(), block_hook=hook)
    assert (skipped - default(**inputs())).abs().max() > 1e-3
    block = default.get_submodule(default.block_names[skip])
    block.forward = lambda x, *rest: x  # the same as running the model with that block made an identity
    try:
        assert torch.equal(default(**inputs()), skipped)
    finally:
        del block.forward
