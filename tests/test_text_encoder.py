"""Qwen3 text encoder: tokenizer goldens, state-dict layouts, per-prompt encoding, offline only."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from hdm_core.layout import CheckpointError, text_encoder_part
from hdm_core.text_encoder import (
    PAD_TOKEN_ID,
    QWEN3_06B,
    QWEN3_PRESETS,
    TextEncoder,
    build_qwen3,
    infer_qwen3_config,
    load_qwen3,
    load_tokenizer,
    tokenize,
)

TINY = QWEN3_PRESETS["tiny"]  # full 151936 vocab so real token ids work
PROMPTS = ["1girl, solo, masterpiece, newest", "a photo of a dog", ""]


@pytest.fixture(scope="module", autouse=True)
def offline():
    """No hub access: offline flags set and every socket connection refused."""
    def refuse(*args, **kwargs):
        raise OSError("network access attempted in an offline test")

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HF_HUB_OFFLINE", "1")
        mp.setenv("TRANSFORMERS_OFFLINE", "1")
        mp.setattr(socket.socket, "connect", refuse)
        yield


@pytest.fixture(scope="module")
def golden(reference_dir: Path) -> dict:
    return json.loads((reference_dir / "tokenizer_golden.json").read_text())


@pytest.fixture(scope="module")
def tokenizer():
    return load_tokenizer()


@pytest.fixture(scope="module")
def tiny_sd() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {k: v.clone() for k, v in build_qwen3(TINY).state_dict().items()}


@pytest.fixture(scope="module")
def tiny_encoder(tiny_sd, tokenizer) -> TextEncoder:
    return TextEncoder(load_qwen3(tiny_sd), tokenizer)


# ---- tokenizer -------------------------------------------------------------------------------------------


def test_tokenizer_matches_golden_single(golden, tokenizer):
    for prompt, ids in golden["single"].items():
        assert tokenize(tokenizer, prompt) == (ids or [PAD_TOKEN_ID]), prompt
    assert tokenize(tokenizer, "") == [151643]


def test_tokenizer_matches_golden_padded_batch(golden, tokenizer):
    case = golden["pipeline_batch_padding_longest"]
    out = tokenizer(case["prompts"], padding="longest", add_special_tokens=False)
    assert out["input_ids"] == case["input_ids"]
    assert out["attention_mask"] == case["attention_mask"]


def test_tokenizer_folder_must_exist(tmp_path):
    with pytest.raises(FileNotFoundError, match="vocab.json"):
        load_tokenizer(tmp_path)


# ---- config and state dicts ------------------------------------------------------------------------------


def test_qwen3_06b_skeleton_has_public_parameter_count():
    model = build_qwen3(device="meta")
    assert sum(p.numel() for p in model.parameters()) == 596_049_920
    assert infer_qwen3_config(model.state_dict()) == QWEN3_06B


def test_infer_config_reads_tiny_shapes(tiny_sd):
    assert infer_qwen3_config(tiny_sd) == {**QWEN3_06B, **TINY}


@pytest.mark.parametrize("layout", ["single_file", "causal_lm", "bare"])
def test_every_layout_loads_identically(layout, tiny_sd, tiny_encoder, tokenizer, tmp_path):
    if layout == "single_file":
        sd = {f"te.text_models.0.{k}": v for k, v in tiny_sd.items()}
        sd["unet.model.x.weight"] = torch.zeros(1)
    elif layout == "causal_lm":
        sd = {f"model.{k}": v for k, v in tiny_sd.items()}
        sd["lm_head.weight"] = tiny_sd["embed_tokens.weight"].clone()
    else:
        sd = dict(tiny_sd)
    save_file(sd, tmp_path / "te.safetensors")
    loaded = load_file(tmp_path / "te.safetensors")
    bare, config = text_encoder_part(loaded)
    assert bare.keys() == tiny_sd.keys() and config == infer_qwen3_config(tiny_sd)

    te = TextEncoder.from_state_dict(bare, config)
    te.tokenizer = tokenizer
    for got, want in zip(te.encode(PROMPTS), tiny_encoder.encode(PROMPTS)):
        torch.testing.assert_close(got, want, rtol=0, atol=1e-6)  # kernels may differ by ulps


def test_bad_state_dict_names_keys():
    with pytest.raises(CheckpointError, match=r"no text-encoder weights.*first keys: \['foo.weight', 'bar.bias'\]"):
        text_encoder_part({"foo.weight": torch.zeros(1), "bar.bias": torch.zeros(1)})
    incomplete = {k: v for k, v in build_qwen3(TINY, device="meta").state_dict().items() if "layers.1.mlp" not in k}
    with pytest.raises(CheckpointError, match="incomplete: 3 missing tensors.*layers.1.mlp.gate_proj"):
        text_encoder_part(incomplete)
    with pytest.raises(ValueError, match="unknown Qwen3 config keys"):
        build_qwen3({"hidden": 64}, device="meta")


def test_dtype_cast_keeps_rope_in_float32(tiny_sd):
    te = TextEncoder.from_state_dict(tiny_sd, dtype=torch.bfloat16)
    assert te.model.embed_tokens.weight.dtype == torch.bfloat16
    assert te.model.rotary_emb.inv_freq.dtype == torch.float32
    assert not any(p.requires_grad for p in te.model.parameters())


# ---- encoding --------------------------------------------------------------------------------------------


def test_encode_matches_plain_qwen3_forward(tiny_sd, tiny_encoder, tokenizer):
    model = build_qwen3(TINY)
    model.load_state_dict(tiny_sd)
    ids = torch.tensor([tokenize(tokenizer, PROMPTS[0])])
    with torch.no_grad():
        want = model(input_ids=ids).last_hidden_state
    (got,) = tiny_encoder.encode(PROMPTS[0])
    assert got.shape == (1, ids.shape[1], TINY["hidden_size"])
    torch.testing.assert_close(got, want)


def test_encode_alone_equals_slice_of_padded_batch(tiny_encoder, tokenizer):
    alone = tiny_encoder.encode(PROMPTS[:2])
    padded = tiny_encoder.encode_padded(PROMPTS[:2], max_length=16)
    assert padded.shape == (2, 16, TINY["hidden_size"])
    for i, enc in enumerate(alone):
        assert enc.shape[1] == len(tokenize(tokenizer, PROMPTS[i]))
        torch.testing.assert_close(padded[i, : enc.shape[1]], enc[0], rtol=1e-5, atol=1e-5)


def test_encode_padded_truncates(tiny_encoder):
    out = tiny_encoder.encode_padded(["word " * 50, "a"], max_length=8)
    assert out.shape == (2, 8, TINY["hidden_size"])
    assert torch.isfinite(out).all()


def test_empty_prompt_is_one_pad_token(tiny_encoder):
    (empty,) = tiny_encoder.encode("")
    assert empty.shape == (1, 1, TINY["hidden_size"])


def test_long_prompt_is_not_truncated(tiny_encoder, tokenizer):
    prompt = " ".join(f"tag{i}" for i in range(600))
    n = len(tokenize(tokenizer, prompt))
    assert n > 1000
    with pytest.warns(UserWarning, match=f"the prompt is {n} tokens"):  # announced, but not cut
        (enc,) = tiny_encoder.encode(prompt)
    assert enc.shape == (1, n, TINY["hidden_size"])
