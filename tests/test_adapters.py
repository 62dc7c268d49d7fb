"""LoRA / LoHa / LoKr adapters in ComfyUI's key format merged into a tiny XUT (hdm_core.adapters, CLI --lora)."""

from __future__ import annotations

import copy

import pytest
import torch
from PIL import Image

from hdm_core import PRESETS, XUT
from hdm_core.adapters import apply_adapters, load_adapter, save_adapter
from hdm_core.checkpoint import load_components
from hdm_core.generate import main as generate_main
from hdm_core.layout import LORA_TE_PREFIX
from hdm_core.pipeline import GenerationParams, generate
from hdm_core.text_encoder import TextEncoder
from hdm_core.weights import CheckpointError

LINEAR = "backbone.enc_blocks.0.0.attn.qkv.weight"  # [192, 64]
CONV = "in_patch.proj.weight"  # [64, 4, 2, 2]


@pytest.fixture(scope="module")
def model(tiny_parts) -> XUT:
    m = XUT(PRESETS["xut-tiny"]).eval()
    m.load_state_dict(tiny_parts["unet"])
    return m


def lora(shapes: dict[str, torch.Size], rank: int = 4, alpha: float = 2.0, seed: int = 0) -> dict[str, torch.Tensor]:
    g, sd = torch.Generator().manual_seed(seed), {}
    for key, shape in shapes.items():
        base = "diffusion_model." + key[:-len(".weight")]
        sd[f"{base}.lora_up.weight"] = torch.randn(shape[0], rank, *[1] * (len(shape) - 2), generator=g) * 0.1
        sd[f"{base}.lora_down.weight"] = torch.randn(rank, *shape[1:], generator=g) * 0.1
        sd[f"{base}.alpha"] = torch.tensor(alpha)
    return sd


def loha(shape: torch.Size, key: str, rank: int = 3, alpha: float = 1.5) -> dict[str, torch.Tensor]:
    g, base, cols = torch.Generator().manual_seed(1), "diffusion_model." + key[:-len(".weight")], shape[1:].numel()
    return {f"{base}.hada_w1_a": torch.randn(shape[0], rank, generator=g) * 0.3,
            f"{base}.hada_w1_b": torch.randn(rank, cols, generator=g) * 0.3,
            f"{base}.hada_w2_a": torch.randn(shape[0], rank, generator=g) * 0.3,
            f"{base}.hada_w2_b": torch.randn(rank, cols, generator=g) * 0.3,
            f"{base}.alpha": torch.tensor(alpha)}


def lokr(key: str, rank: int = 2, alpha: float = 4.0) -> dict[str, torch.Tensor]:
    """[192, 64] = kron([4, 8], [48, 8]); w2 factorised (w2_a @ w2_b), so the scale is alpha / rank."""
    g, base = torch.Generator().manual_seed(2), "diffusion_model." + key[:-len(".weight")]
    return {f"{base}.lokr_w1": torch.randn(4, 8, generator=g) * 0.3,
            f"{base}.lokr_w2_a": torch.randn(48, rank, generator=g) * 0.3,
            f"{base}.lokr_w2_b": torch.randn(rank, 8, generator=g) * 0.3,
            f"{base}.alpha": torch.tensor(alpha)}


def output(m: XUT) -> torch.Tensor:
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(1, 4, 16, 16, generator=g), torch.randn(1, 5, m.config.ctx_dim, generator=g)
    with torch.no_grad():
        return m(x, torch.tensor([0.5]), ctx)


def merged(model: XUT, adapters) -> XUT:
    return apply_adapters(copy.deepcopy(model), adapters)


def test_each_kind_changes_the_output_and_strength_zero_is_a_no_op(model):
    shapes = {k: model.state_dict()[k].shape for k in (LINEAR, CONV)}
    before = output(model)
    for adapter in (lora(shapes), loha(shapes[LINEAR], LINEAR), lokr(LINEAR)):
        assert (output(merged(model, [(adapter, 1.0)])) - before).abs().max() > 1e-3
        zero = merged(model, [(adapter, 0.0)])
        assert all(torch.equal(a, b) for a, b in zip(zero.state_dict().values(), model.state_dict().values()))


def test_merge_equals_hand_computed_update(model):
    w, wc = model.state_dict()[LINEAR], model.state_dict()[CONV]
    s = 0.7
    sd = lora({LINEAR: w.shape, CONV: wc.shape})
    got = merged(model, [(sd, s)]).state_dict()
    up, down = (sd[f"diffusion_model.{LINEAR[:-7]}.lora_{n}.weight"] for n in ("up", "down"))
    torch.testing.assert_close(got[LINEAR], w + s * (2.0 / 4) * (up @ down))
    up, down = (sd[f"diffusion_model.{CONV[:-7]}.lora_{n}.weight"] for n in ("up", "down"))
    torch.testing.assert_close(got[CONV], wc + s * (2.0 / 4) * (up.flatten(1) @ down.flatten(1)).reshape(wc.shape))

    h = loha(w.shape, LINEAR)
    a = [h[f"diffusion_model.{LINEAR[:-7]}.hada_{n}"] for n in ("w1_a", "w1_b", "w2_a", "w2_b")]
    torch.testing.assert_close(merged(model, [(h, s)]).state_dict()[LINEAR],
                               w + s * (1.5 / 3) * ((a[0] @ a[1]) * (a[2] @ a[3])))

    k = lokr(LINEAR)
    w1, w2a, w2b = (k[f"diffusion_model.{LINEAR[:-7]}.lokr_{n}"] for n in ("w1", "w2_a", "w2_b"))
    torch.testing.assert_close(merged(model, [(k, s)]).state_dict()[LINEAR],
                               w + s * (4.0 / 2) * torch.kron(w1, w2a @ w2b))


def test_two_adapters_add_and_bare_keys_work(model, tmp_path):
    w = model.state_dict()[LINEAR]
    a, b = lora({LINEAR: w.shape}, seed=3), lora({LINEAR: w.shape}, seed=4)
    path = save_adapter(tmp_path / "b.safetensors", {k[len("diffusion_model."):]: v for k, v in b.items()})
    both = merged(model, [(a, 0.5), (path, -1.5)]).state_dict()[LINEAR]
    da = merged(model, [(a, 0.5)]).state_dict()[LINEAR] - w
    db = merged(model, [(b, -1.5)]).state_dict()[LINEAR] - w
    torch.testing.assert_close(both, w + da + db)


def test_bad_adapters_are_refused_by_name(model, tmp_path):
    w = model.state_dict()[LINEAR]
    good = lora({LINEAR: w.shape})
    cases = [({"diffusion_model.no.such.layer.lora_up.weight": torch.zeros(1, 1), **good}, "no.such.layer"),
             ({**good, "diffusion_model.x.dora_scale": torch.zeros(1)}, "are DoRA"),
             ({**good, "diffusion_model.x.lora_gate": torch.zeros(1)}, "not LoRA/LoHa/LoKr"),
             ({k: v for k, v in good.items() if "down" not in k}, "lacks ['lora_down.weight']"),
             (lora({LINEAR: torch.Size([64, 64])}), "does not fit the weight [192, 64]")]
    for sd, message in cases:
        with pytest.raises(CheckpointError, match=message.replace("[", r"\[").replace(".", r"\.")):
            apply_adapters(copy.deepcopy(model), [(sd, 1.0)])
    pickle = tmp_path / "lora.pt"
    torch.save(good, pickle)
    with pytest.raises(CheckpointError, match="pickle"):
        load_adapter(pickle)
    # a refused adapter changes nothing, even when listed after a good one
    m = copy.deepcopy(model)
    with pytest.raises(CheckpointError):
        apply_adapters(m, [(good, 1.0), (cases[0][0], 1.0)])
    assert torch.equal(m.state_dict()[LINEAR], w)


def test_cli_lora_flag(tiny_checkpoint, encoder, tmp_path, capsys):
    from safetensors import safe_open

    with safe_open(str(tiny_checkpoint), "pt") as f:
        shape = f.get_slice("unet.model." + LINEAR).get_shape()
    path = save_adapter(tmp_path / "style.safetensors", lora({LINEAR: torch.Size(shape)}, alpha=8.0))
    te_path = save_adapter(tmp_path / "te.safetensors", te_lora(encoder))  # text-encoder keys only
    common = ["--checkpoint", str(tiny_checkpoint), "--prompt", "x", "--width", "32", "--height", "32", "--steps",
              "2", "--device", "cpu"]
    images = {}
    for name, extra in (("plain", []), ("zero", ["--lora", f"{path}:0"]),
                        ("lora", ["--lora", f"{path}:1.5", "--lora", str(path)]), ("te", ["--lora", str(te_path)])):
        out = tmp_path / name
        assert generate_main([*common, "--out", str(out), *extra]) == 0
        images[name] = Image.open(out / "hdm_0000000000_000.png").tobytes()
    assert images["zero"] == images["plain"] != images["lora"] and images["te"] not in (images["plain"], images["lora"])
    for name, message in (("missing.safetensors", "missing.safetensors: no such file"),
                          ("lora.pt", "lora.pt is a pickle file")):
        assert generate_main([*common, "--out", str(tmp_path / "bad"), "--lora", str(tmp_path / name)]) == 2
        assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------------
# Whole differences (diff / diff_b, LyCORIS norm w_norm / b_norm)
# ---------------------------------------------------------------------------------------------------

LAYERNORM = "shared_adaln_attn.0"  # LayerNorm(64) with a bias
RMSNORM = "backbone.enc_blocks.0.0.attn_pre_norm.norm"  # RMSNorm(64), no bias
BIASED = "shared_adaln_attn.1"  # Linear(64 → 256) with a bias


def test_diff_and_norm_kinds_add_the_difference(model):
    g, sd = torch.Generator().manual_seed(5), model.state_dict()
    t = {f"diffusion_model.{LAYERNORM}.w_norm": torch.randn(64, generator=g),
         f"diffusion_model.{LAYERNORM}.b_norm": torch.randn(64, generator=g),
         f"diffusion_model.{RMSNORM}.w_norm": torch.randn(64, generator=g),
         f"diffusion_model.{BIASED}.diff": torch.randn(256, 64, generator=g),
         f"diffusion_model.{BIASED}.diff_b": torch.randn(256, generator=g),
         f"diffusion_model.{BIASED}.alpha": torch.tensor(8.0)}  # alpha does not scale a whole difference
    s = -0.6
    got = merged(model, [(t, s)]).state_dict()
    for module, param, name in ((LAYERNORM, "weight", "w_norm"), (LAYERNORM, "bias", "b_norm"),
                                (RMSNORM, "weight", "w_norm"), (BIASED, "weight", "diff"), (BIASED, "bias", "diff_b")):
        key = f"{module}.{param}"
        torch.testing.assert_close(got[key], sd[key] + s * t[f"diffusion_model.{module}.{name}"])
    untouched = [k for k in sd if not k.startswith((LAYERNORM + ".", RMSNORM + ".", BIASED + "."))]
    assert all(torch.equal(got[k], sd[k]) for k in untouched)

    bad = [({f"diffusion_model.{RMSNORM}.b_norm": torch.zeros(64)}, f"{RMSNORM}.b_norm"),  # RMSNorm has no bias
           ({f"diffusion_model.{BIASED}.diff": torch.zeros(256, 64), f"diffusion_model.{BIASED}.w_norm":
             torch.zeros(256, 64)}, "several adapter kinds"),
           ({f"diffusion_model.{LAYERNORM}.w_norm": torch.zeros(32)}, "norm update of shape [32] does not fit")]
    for sd_bad, message in bad:
        with pytest.raises(CheckpointError, match=message.replace("[", r"\[")):
            merged(model, [(sd_bad, 1.0)])


# ---------------------------------------------------------------------------------------------------
# Text-encoder keys
# ---------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def encoder(tiny_parts) -> TextEncoder:
    return TextEncoder.from_state_dict({k: v.clone() for k, v in tiny_parts["te"].items()})


def te_lora(encoder: TextEncoder, seed: int = 7) -> dict[str, torch.Tensor]:
    """LoRA on two Qwen3 projections, under ComfyUI's CLIP keys for HDM's text encoder."""
    g, sd, weights = torch.Generator().manual_seed(seed), {}, encoder.model.state_dict()
    for module in ("layers.0.self_attn.q_proj", "layers.1.mlp.down_proj"):
        out_dim, in_dim = weights[module + ".weight"].shape
        sd[f"{LORA_TE_PREFIX}{module}.lora_up.weight"] = torch.randn(out_dim, 4, generator=g) * 0.3
        sd[f"{LORA_TE_PREFIX}{module}.lora_down.weight"] = torch.randn(4, in_dim, generator=g) * 0.3
    return sd


def test_text_encoder_keys_change_the_text_encoder(model, encoder):
    adapter = {**te_lora(encoder), **lora({LINEAR: model.state_dict()[LINEAR].shape})}
    before = encoder.encode("a red circle")[0]
    m, te = copy.deepcopy(model), copy.deepcopy(encoder)
    apply_adapters(m, [(adapter, 0.0)], text_encoder=te)
    assert torch.equal(te.encode("a red circle")[0], before)
    apply_adapters(m, [(adapter, 1.0)], text_encoder=te)
    assert (te.encode("a red circle")[0] - before).abs().max() > 1e-3
    assert not torch.equal(m.state_dict()[LINEAR], model.state_dict()[LINEAR])
    apply_adapters(copy.deepcopy(model), [(te_lora(encoder), 1.0)], text_encoder=te.model)  # a bare Qwen3Model too

    with pytest.raises(CheckpointError, match="keys are for the text encoder, .* but no text encoder was given"):
        apply_adapters(copy.deepcopy(model), [(adapter, 1.0)])
    other = {k.replace("qwen3_06b", "clip_l"): v for k, v in te_lora(encoder).items()}
    with pytest.raises(CheckpointError, match="match no weight of this XUT, e.g. .'text_encoders.clip_l"):
        apply_adapters(copy.deepcopy(model), [(other, 1.0)], text_encoder=te)
    wrong_layer = {k.replace("layers.1.", "layers.9."): v for k, v in te_lora(encoder).items()}
    with pytest.raises(CheckpointError, match="match no weight of this Qwen3 text encoder, e.g. .*layers.9"):
        apply_adapters(copy.deepcopy(model), [(wrong_layer, 1.0)], text_encoder=te)


# ---------------------------------------------------------------------------------------------------
# generate(..., loras=)
# ---------------------------------------------------------------------------------------------------

def test_pipeline_loras_apply_for_the_call_only(tiny_checkpoint, tmp_path):
    comps = load_components(tiny_checkpoint)
    adapter = {**te_lora(comps.text_encoder), **lora({LINEAR: comps.model.state_dict()[LINEAR].shape}, alpha=8.0)}
    path = save_adapter(tmp_path / "a.safetensors", adapter)
    before = {k: v.clone() for m in (comps.model, comps.text_encoder) for k, v in m.state_dict().items()}
    params = GenerationParams(prompt="a red circle", width=32, height=32, steps=2, seed=3)
    plain = generate(comps, params, decode=False)

    assert torch.equal(generate(comps, params, decode=False, loras=[(path, 0.0)]), plain)
    adapted = generate(comps, params, decode=False, loras=[(path, 1.0)])
    baked = copy.deepcopy(comps)
    apply_adapters(baked.model, [(adapter, 1.0)], text_encoder=baked.text_encoder)
    torch.testing.assert_close(adapted, generate(baked, params, decode=False), rtol=0, atol=1e-5)
    # several at once: the same adapter twice at 0.5 (the sum in float32 differs from 1.0 by rounding only)
    twice = generate(comps, params, decode=False, loras=[(path, 0.5), (adapter, 0.5)])
    torch.testing.assert_close(twice, adapted, rtol=1e-3, atol=1e-3 * adapted.abs().max().item())
    assert (adapted - plain).abs().max() > 1e-3
    after = {k: v for m in (comps.model, comps.text_encoder) for k, v in m.state_dict().items()}
    assert all(torch.equal(after[k], v) for k, v in before.items())

    for loras, message in (([(path, float("nan"))], "strength must be a finite number"),
                           ([path], "pairs, got a PosixPath"), ([(tmp_path / "no.pt", 1.0)], "pickle")):
        with pytest.raises(ValueError, match=message):
            generate(comps, params, decode=False, loras=loras)
    assert all(torch.equal(after[k], v) for k, v in before.items())
