"""LoRA / LoHa / LoKr adapters in ComfyUI's key format merged into a tiny XUT (hdm_core.adapters, CLI --lora)."""

from __future__ import annotations

import copy

import pytest
import torch

from hdm_core import PRESETS, XUT
from hdm_core.adapters import apply_adapters, load_adapter, save_adapter
from hdm_core.generate import main as generate_main
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
             ({**good, "diffusion_model.x.dora_scale": torch.zeros(1)}, "not LoRA/LoHa/LoKr"),
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


def test_cli_lora_flag(tiny_checkpoint, tmp_path, capsys):
    from safetensors import safe_open

    with safe_open(str(tiny_checkpoint), "pt") as f:
        shape = f.get_slice("unet.model." + LINEAR).get_shape()
    path = save_adapter(tmp_path / "style.safetensors", lora({LINEAR: torch.Size(shape)}, alpha=8.0))
    common = ["--checkpoint", str(tiny_checkpoint), "--prompt", "x", "--width", "32", "--height", "32", "--steps",
              "2", "--device", "cpu"]
    images = {}
    for name, extra in (("plain", []), ("zero", ["--lora", f"{path}:0"]),
                        ("lora", ["--lora", f"{path}:1.5", "--lora", str(path)])):
        out = tmp_path / name
        assert generate_main([*common, "--out", str(out), *extra]) == 0
        images[name] = (out / "hdm_0000000000_000.png").read_bytes()
    assert images["zero"] == images["plain"] != images["lora"]
    assert generate_main([*common, "--out", str(tmp_path / "bad"), "--lora", str(tmp_path / "missing.pt")]) == 2
    assert "missing.pt: not a .safetensors file" in capsys.readouterr().err
