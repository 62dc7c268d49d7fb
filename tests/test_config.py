"""Config presets, official arch JSON, state-dict layouts of the released family, config inference."""

from __future__ import annotations

import json

import pytest
import torch

from hdm_core import PRESETS, XUT, TreadConfig, XUTConfig, infer_config

EXPECTED_PARAMS = {"xut-base": 343_176_208, "xut-large": 555_628_816, "xut-small": 237_290_128}


def meta_model(cfg: XUTConfig) -> XUT:
    with torch.device("meta"):
        return XUT(cfg)


@pytest.mark.parametrize("preset, keys_file", [("xut-base", "xut_base_keys.json"),
                                                ("xut-large", "xut_large_keys.json"),
                                                ("xut-small", "xut_small_keys.json")])
def test_presets_have_official_keys_and_shapes(reference_dir, preset, keys_file):
    ref = json.loads((reference_dir / keys_file).read_text())
    model = meta_model(PRESETS[preset])
    ours = {k: list(v.shape) for k, v in model.state_dict().items()}
    assert ours == {e["key"]: e["shape"] for e in ref["keys"]}
    assert sum(p.numel() for p in model.parameters()) == ref["total_parameters"] == EXPECTED_PARAMS[preset]
    assert [n for n, _ in model.named_buffers()] == list(ref["buffers"])
    assert XUTConfig.from_dict(ref["config"]) == PRESETS[preset]


@pytest.mark.parametrize("preset", sorted(PRESETS))
def test_config_inferred_from_state_dict(preset):
    cfg = PRESETS[preset]
    assert infer_config(meta_model(cfg).state_dict(), ctx_size=cfg.ctx_size) == cfg


def test_inference_of_other_shapes_and_round_trip():
    cfg = XUTConfig(dim=48, ctx_dim=24, heads=3, dim_head=16, mlp_dim=64, depth=3, enc_blocks=2, dec_blocks=1,
                    input_dim=3, addon_info_embs_dim=0,
                    tread_config=TreadConfig(2, 1, 0.5))
    inferred = infer_config(XUT(cfg).state_dict(), ctx_size=cfg.ctx_size)
    assert inferred == cfg
    assert XUTConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


def test_heads_field_is_informational():
    assert XUTConfig.from_dict({**PRESETS["xut-base"].to_dict(), "heads": 99}).num_heads == 16


def test_from_dict_rejects_unknown_and_unsupported_fields():
    with pytest.raises(ValueError, match="unknown XUT config keys.*'colour'"):
        XUTConfig.from_dict({"colour": 1})
    with pytest.raises(ValueError, match="concat_ctx"):
        XUTConfig.from_dict({"concat_ctx": False})
    assert XUTConfig.from_dict({"concat_ctx": True, "shared_adaln": True}) == XUTConfig()
    with pytest.raises(ValueError, match="not a multiple of dim_head"):
        XUTConfig(dim=100, dim_head=64)


def test_infer_config_names_missing_keys():
    with pytest.raises(ValueError, match="not an XUT state dict"):
        infer_config({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(1)})
