"""Checkpoint loading and saving: round trips, split files, dtype, and every kind of bad input."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from hdm_core import XUT
from hdm_core.checkpoint import (
    CONFIG_METADATA_KEY,
    CheckpointError,
    build_xut,
    load_components,
    load_xut,
    save_single_file,
    save_xut,
)
from hdm_core.layout import find_xut, split_checkpoint
from hdm_core.text_encoder import TextEncoder


def outputs_equal(a, b) -> bool:
    torch.manual_seed(1)
    x, ctx = torch.randn(1, a.config.input_dim, 8, 8), torch.randn(1, 3, a.config.ctx_dim)
    with torch.no_grad():
        return torch.allclose(a(x, 0.4, ctx), b(x, 0.4, ctx), rtol=1e-5, atol=1e-4)  # kernels may reorder sums


def test_single_file_round_trip(tiny_checkpoint, tiny_parts):
    comps = load_components(tiny_checkpoint)
    assert comps.config == tiny_parts["config"]
    assert all(torch.equal(v, tiny_parts["unet"][k]) for k, v in comps.model.state_dict().items())
    reference_te = TextEncoder.from_state_dict(tiny_parts["te"])
    assert torch.allclose(comps.text_encoder.encode("a red circle")[0], reference_te.encode("a red circle")[0],
                          atol=1e-5)
    assert comps.vae is not None and comps.vae.downscale_factor == 8
    assert not list(tiny_checkpoint.parent.glob("*.tmp"))


def test_model_is_built_without_copying_weights(tiny_parts):
    model = build_xut(tiny_parts["unet"])
    assert model.in_patch.proj.weight.data_ptr() == tiny_parts["unet"]["in_patch.proj.weight"].data_ptr()


def test_dtype_kept_or_cast(tiny_parts, tmp_path):
    path = tmp_path / "half.safetensors"
    save_single_file(path, tiny_parts["unet"], tiny_parts["config"], dtype=torch.float16)
    assert load_xut(path).in_patch.proj.weight.dtype == torch.float16
    assert load_xut(path, dtype=torch.bfloat16).in_patch.proj.weight.dtype == torch.bfloat16
    assert load_xut(path, dtype=torch.float32).ctx_proj.weight.dtype == torch.float32


def test_split_files_equal_single_file(tiny_checkpoint, tiny_parts, tmp_path):
    single = load_components(tiny_checkpoint)
    save_xut(tmp_path / "dm.safetensors", single.model)
    save_file({"model." + k: v for k, v in tiny_parts["te"].items()}, str(tmp_path / "qwen3.safetensors"))
    save_file(dict(tiny_parts["vae"]), str(tmp_path / "vae.safetensors"))
    split = load_components(diffusion_model=tmp_path / "dm.safetensors", text_encoder=tmp_path / "qwen3.safetensors",
                            vae=tmp_path / "vae.safetensors")
    assert outputs_equal(single.model, split.model)
    assert torch.allclose(single.text_encoder.encode("x")[0], split.text_encoder.encode("x")[0], atol=1e-5)
    images = torch.rand(1, 3, 16, 16) * 2 - 1
    assert torch.allclose(single.vae.encode(images, sample=False), split.vae.encode(images, sample=False))


def test_config_inferred_without_metadata(tiny_parts, tmp_path):
    path = tmp_path / "bare.safetensors"
    save_file({"unet.model." + k: v for k, v in tiny_parts["unet"].items()}, str(path))
    assert load_xut(path).config.replace(ctx_size=tiny_parts["config"].ctx_size) == tiny_parts["config"]


def test_missing_file():
    with pytest.raises(FileNotFoundError, match="checkpoint not found"):
        load_components("/nonexistent/hdm.safetensors")


def test_truncated_and_garbage_files(tiny_checkpoint, tmp_path):
    data = tiny_checkpoint.read_bytes()
    for name, blob in [("truncated.safetensors", data[: len(data) // 2]), ("garbage.safetensors", b"\x00" * 1000),
                       ("header_only.safetensors", data[:50])]:
        (tmp_path / name).write_bytes(blob)
        with pytest.raises(CheckpointError, match="truncated or corrupt"):
            load_components(tmp_path / name)


@pytest.mark.parametrize("key, family", [
    ("model.diffusion_model.input_blocks.0.0.weight", "Stable Diffusion"),
    ("conditioner.embedders.1.model.ln_final.weight", "SDXL"),
    ("double_blocks.0.img_attn.qkv.weight", "Flux"),
    ("model.diffusion_model.joint_blocks.0.x_block.attn.qkv.weight", "SD3"),
    ("decoder.up_blocks.0.resnets.0.norm1.weight", "VAE only"),
])
def test_other_architectures_are_named(tmp_path, key, family):
    path = tmp_path / "other.safetensors"
    save_file({key: torch.zeros(2)}, str(path))
    with pytest.raises(CheckpointError, match=f"not an HDM/XUT checkpoint.*{family}"):
        load_components(path)


def test_shape_mismatch_and_missing_keys_are_listed(tiny_parts, tmp_path):
    bad = dict(tiny_parts["unet"])
    bad["ctx_proj.weight"] = torch.zeros(64, 99)
    path = tmp_path / "mismatch.safetensors"
    save_single_file(path, bad, tiny_parts["config"])
    with pytest.raises(CheckpointError, match=r"1 mismatched shapes \['ctx_proj.weight: file \[64, 99\]"):
        load_xut(path)
    partial = {k: v for k, v in tiny_parts["unet"].items() if not k.startswith("post_tread_trns.blocks.1.")}
    save_single_file(path, partial, tiny_parts["config"])
    with pytest.raises(CheckpointError, match="missing keys.*post_tread_trns.blocks.1"):
        load_xut(path)


def test_metadata_config_of_other_variant(tiny_parts, tmp_path):
    path = tmp_path / "wrong_meta.safetensors"
    save_file({"unet.model." + k: v for k, v in tiny_parts["unet"].items()}, str(path),
              metadata={CONFIG_METADATA_KEY: json.dumps(tiny_parts["config"].replace(mlp_dim=256).to_dict())})
    with pytest.raises(CheckpointError, match="mismatched shapes"):
        load_xut(path)


def test_pickle_needs_explicit_permission(tiny_parts, tmp_path):
    path = tmp_path / "old.ckpt"
    torch.save({"state_dict": {"unet.model." + k: v for k, v in tiny_parts["unet"].items()}}, path)
    with pytest.raises(CheckpointError, match="pickle file.*allow_pickle=True"):
        load_xut(path)
    assert load_xut(path, allow_pickle=True).config.dim == tiny_parts["config"].dim


def test_checkpoint_without_text_encoder(tiny_parts, tmp_path):
    path = tmp_path / "dm_only.safetensors"
    save_single_file(path, tiny_parts["unet"], tiny_parts["config"])
    comps = load_components(path)
    assert comps.text_encoder is None and comps.vae is None


def test_vae_normalisation_read_from_the_file(tiny_parts, tmp_path):
    path = tmp_path / "own_stats.safetensors"
    mean, std = torch.tensor([0.1, 0.2, 0.3, 0.4]), torch.tensor([2.0, 3.0, 4.0, 5.0])
    save_single_file(path, tiny_parts["unet"], tiny_parts["config"], vae_sd=tiny_parts["vae"], vae_mean=mean,
                     vae_std=std)
    vae = load_components(path).vae
    assert torch.equal(vae.mean.flatten(), mean) and torch.equal(vae.std.flatten(), std)


# ---------------------------------------------------------------------------------------------------
# The layout reader (hdm_core.layout), shared with the ComfyUI loaders
# ---------------------------------------------------------------------------------------------------

def test_split_checkpoint_returns_every_part(tiny_checkpoint, tiny_parts):
    parts = split_checkpoint(load_file(tiny_checkpoint), {CONFIG_METADATA_KEY: json.dumps(
        tiny_parts["config"].to_dict())})
    assert parts.xut_config == tiny_parts["config"] and not parts.pixel_space
    assert all(torch.equal(parts.xut[k], v) for k, v in tiny_parts["unet"].items()) and parts.xut.keys() == \
        tiny_parts["unet"].keys()
    assert parts.text_encoder.keys() == tiny_parts["te"].keys()
    assert parts.text_encoder_config["hidden_size"] == tiny_parts["config"].ctx_dim
    assert parts.vae.keys() == tiny_parts["vae"].keys()
    assert parts.vae_mean.numel() == parts.vae_std.numel() == 4


def test_split_checkpoint_reads_comfyui_saved_prefixes(tiny_parts):
    """A file saved by ComfyUI's own CheckpointSave for another model family uses these prefixes."""
    sd = {f"model.diffusion_model.{k}": v for k, v in tiny_parts["unet"].items()}
    sd.update({f"text_encoders.qwen3_06b.transformer.model.{k}": v for k, v in tiny_parts["te"].items()})
    sd["text_encoders.qwen3_06b.transformer.lm_head.weight"] = tiny_parts["te"]["embed_tokens.weight"]
    parts = split_checkpoint(sd)
    assert find_xut(sd) == "model.diffusion_model." and parts.xut.keys() == tiny_parts["unet"].keys()
    assert parts.text_encoder.keys() == tiny_parts["te"].keys()  # lm_head dropped
    assert parts.vae is None and not parts.pixel_space


def test_pixel_space_is_marked_or_implied(tiny_parts):
    pixel_config = tiny_parts["config"].replace(input_dim=3)
    with torch.device("meta"):
        sd = {f"unet.model.{k}": v for k, v in XUT(pixel_config).state_dict().items()}
    assert split_checkpoint(sd).pixel_space  # 3 input channels and no VAE
    assert split_checkpoint({**sd, "vae.pixel_space_vae": torch.tensor(1.0)}).pixel_space
    four = {f"unet.model.{k}": v for k, v in tiny_parts["unet"].items()}
    assert not split_checkpoint(four).pixel_space
