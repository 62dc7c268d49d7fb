"""The fast paths, on CPU with xut-tiny: the XUT forward compiles as one graph (no graph break, hence no host
synchronisation: what CUDA-graph capture needs), TREAD by indices equals TREAD by mask, and CFG batched over
contexts of different lengths (`ctx_mask`) equals the two separate calls.

The fullgraph checks use the `aot_eager` backend: Dynamo finds graph breaks whatever the backend, and this one
needs no C++ compiler (about 3 s per graph here). HDM_TEST_INDUCTOR=1 adds the real Inductor compile
(20–80 s per graph on 2 CPU cores, depending on the compile cache).
"""

from __future__ import annotations

import os

import pytest
import torch

from hdm_core import PRESETS, XUT, Camera, canvas_position_map
from hdm_core.pipeline import make_denoiser, pad_contexts
from hdm_core.tread import keep_index, random_keep_index, random_keep_mask

CFG = PRESETS["xut-tiny"]
B, SIDE, N = 2, 8, 16  # batch, latent side, image tokens (patch 2)


@pytest.fixture(scope="module")
def model() -> XUT:
    torch.manual_seed(0)
    m = XUT(CFG).eval()
    with torch.no_grad():  # non-degenerate adaLN / output layers, as trained weights are
        for p in m.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return m


def inputs(seed: int = 0, ctx_len: int = 5) -> dict:
    g = torch.Generator().manual_seed(seed)
    return dict(x=torch.randn(B, CFG.input_dim, SIDE, SIDE, generator=g), t=torch.rand(B, generator=g),
                ctx=torch.randn(B, ctx_len, CFG.ctx_dim, generator=g), aspect=torch.randn(B, generator=g))


def routing() -> torch.Tensor:
    return random_keep_index(B, N, 0.5, generator=torch.Generator().manual_seed(1))


def ragged_mask() -> torch.Tensor:
    mask = torch.ones(B, 5, dtype=torch.bool)
    mask[1, 2:] = False
    return mask


CASES = {
    "plain": lambda: {},
    "camera": lambda: dict(pos_map=canvas_position_map(SIDE, SIDE, Camera(0.25, -0.5, 1.5))),
    "ctx_mask_and_tread": lambda: dict(ctx_mask=ragged_mask(), tread_keep=routing()),
}


# ---------------------------------------------------------------------------------------------------
# One graph
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("case", sorted(CASES))
def test_forward_compiles_as_one_graph(model, case):
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")  # raises on any graph break
    kw = {**inputs(), **CASES[case]()}
    with torch.no_grad():
        torch.testing.assert_close(compiled(**kw), model(**kw), rtol=1e-5, atol=1e-5)


def test_a_keep_mask_is_read_on_the_host(model):
    """The boolean-mask form of tread_keep needs its count on the host: it cannot be one graph (use indices)."""
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match="data-dependent|[Gg]raph break|Unsupported"), torch.no_grad():
        compiled(**inputs(), tread_keep=random_keep_mask(B, N, 0.5))


def test_training_step_compiles_as_one_graph_with_checkpointing(model):
    """Forward and backward of a routed, gradient-checkpointed training step, compiled whole."""
    torch._dynamo.reset()
    kw = {**inputs(), "tread_keep": routing()}
    grads = []
    for compile_ in (False, True):
        model.zero_grad(set_to_none=True)
        model.train()
        model.gradient_checkpointing = True
        try:
            run = torch.compile(model, fullgraph=True, backend="aot_eager") if compile_ else model
            run(**kw).square().mean().backward()
        finally:
            model.gradient_checkpointing = False
            model.eval()
        grads.append([p.grad.clone() for p in model.parameters()])
    for eager, compiled in zip(*grads):
        torch.testing.assert_close(compiled, eager, rtol=1e-4, atol=1e-6)
    model.zero_grad(set_to_none=True)


@pytest.mark.skipif(not os.environ.get("HDM_TEST_INDUCTOR"), reason="slow on CPU: set HDM_TEST_INDUCTOR=1")
def test_inductor_compile_matches_eager(model):
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True)
    kw = {**inputs(), **CASES["ctx_mask_and_tread"]()}
    with torch.no_grad():
        torch.testing.assert_close(compiled(**kw), model(**kw), rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# TREAD by indices
# ---------------------------------------------------------------------------------------------------

def test_tread_indices_equal_the_mask_they_come_from(model):
    mask = random_keep_mask(B, N, 0.5, generator=torch.Generator().manual_seed(1))
    index = routing()
    assert torch.equal(keep_index(mask), index) and torch.equal(index, index.sort(dim=1).values)
    kw = inputs()
    with torch.no_grad():
        assert torch.equal(model(**kw, tread_keep=index), model(**kw, tread_keep=mask))
        assert torch.equal(model(**kw, tread_keep=index),
                           model(**kw, tread_rate=0.5, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="integer indices"):
        model(**kw, tread_keep=torch.zeros(B, N + 1, dtype=torch.long))


# ---------------------------------------------------------------------------------------------------
# Contexts of different lengths in one batch
# ---------------------------------------------------------------------------------------------------

@pytest.mark.parametrize("tread", [False, True])
def test_masked_batch_equals_separate_calls(model, tread):
    """[a; b] with b's shorter context zero-padded and masked == a and b alone, routing or not."""
    kw, short = inputs(), inputs(seed=1, ctx_len=2)["ctx"]
    ctx, ctx_mask = pad_contexts([kw["ctx"][:1], short[1:]], 1)
    keep = routing() if tread else None
    with torch.no_grad():
        batched = model(kw["x"], kw["t"], ctx, aspect=kw["aspect"], ctx_mask=ctx_mask, tread_keep=keep)
        for i, c in enumerate((kw["ctx"][:1], short[1:])):
            alone = model(kw["x"][i:i + 1], kw["t"][i:i + 1], c, aspect=kw["aspect"][i:i + 1],
                          tread_keep=None if keep is None else keep[i:i + 1])
            torch.testing.assert_close(batched[i:i + 1], alone, rtol=0, atol=1e-5)


def test_padding_content_is_invisible(model):
    kw = {**inputs(), "ctx_mask": ragged_mask()}
    noisy = kw["ctx"].clone()
    noisy[1, 2:] = 1e3 * torch.randn(3, CFG.ctx_dim)
    with torch.no_grad():
        torch.testing.assert_close(model(**{**kw, "ctx": noisy}), model(**kw), rtol=0, atol=1e-5)
        assert torch.equal(model(**{**kw, "ctx_mask": torch.ones(B, 5, dtype=torch.bool)})[0], model(**kw)[0])


@pytest.mark.parametrize("pos_map", [None, "latent", "batched"])
@pytest.mark.parametrize("lengths", [(7, 3), (4, 4), (2, 9)])
def test_batched_cfg_denoiser_equals_separate(model, pos_map, lengths):
    g = torch.Generator().manual_seed(3)
    cond, uncond = (torch.randn(1, n, CFG.ctx_dim, generator=g) for n in lengths)
    pos = {None: None, "latent": canvas_position_map(SIDE, SIDE, Camera(0.2, 0.1, 1.3)),
           "batched": torch.randn(B, SIDE * SIDE, 2, generator=g)}[pos_map]
    x, sigma = torch.randn(B, CFG.input_dim, SIDE, SIDE, generator=g), torch.full((B,), 0.7)
    kw = dict(pos_map=pos, aspect=torch.randn(B, generator=g))
    batched = make_denoiser(model, cond, uncond, 3.0, batch_cfg=True, **kw)(x, sigma)
    separate = make_denoiser(model, cond, uncond, 3.0, batch_cfg=False, **kw)(x, sigma)
    torch.testing.assert_close(batched, separate, rtol=0, atol=1e-5)


def test_tread_guidance_keeps_separate_calls(model):
    """Per-branch TREAD rates draw their routing in order from one generator: batching would change the draws."""
    cond, uncond = torch.randn(1, 6, CFG.ctx_dim), torch.randn(1, 2, CFG.ctx_dim)
    x, sigma = torch.randn(1, CFG.input_dim, SIDE, SIDE), torch.full((1,), 0.5)
    out = [make_denoiser(model, cond, uncond, 3.0, pos_map=None, aspect=torch.zeros(1), gamma_uncond=0.5,
                         generator=torch.Generator().manual_seed(0), batch_cfg=batched)(x, sigma)
           for batched in (True, False)]
    assert torch.equal(*out)
