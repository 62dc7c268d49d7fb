"""HDM's Qwen3 text encoder and tokenizer as ComfyUI CLIP classes (ComfyUI glue: imports ComfyUI at the top).

The encoder is ComfyUI's own ops-aware `Llama2_` (with Qwen3's q/k norms), so ComfyUI's memory management, dtype
casting and LoRA machinery apply to it. It returns the final-norm hidden states with no attention mask, and the
tokenizer feeds the raw prompt with no BOS/EOS, padding or truncation (SPEC §6, as HDM-ext does).
"""

from __future__ import annotations

import torch
from comfy import sd1_clip
from comfy.text_encoders import llama
from transformers import Qwen2Tokenizer

from ..hdm_core.layout import COMFY_TE_NAME as TE_NAME
from ..hdm_core.text_encoder import PAD_TOKEN_ID, TOKENIZER_DIR

NO_TOKEN_LIMIT = 99_999_999  # SDTokenizer wants a max_length; HDM never truncates a prompt
# Qwen3Config fields that ComfyUI's Llama config dataclass shares (head_dim is set apart, see HDMQwen3).
_LLAMA_FIELDS = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                 "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta")


class HDMQwen3(llama.BaseLlama, torch.nn.Module):
    """Qwen3 of any size. ComfyUI 0.8 has no Qwen3-0.6B config, but its `Qwen3_4BConfig` is the Qwen3
    architecture (q/k RMSNorm, no biases, SiLU): filled with the sizes read from the weights it *is* 0.6B."""

    def __init__(self, config_dict: dict, dtype, device, operations):
        super().__init__()
        config = llama.Qwen3_4BConfig(**{k: config_dict[k] for k in _LLAMA_FIELDS if k in config_dict})
        config.head_dim = config_dict.get("head_dim", 128)
        self.num_layers = config.num_hidden_layers
        self.model = llama.Llama2_(config, device=device, dtype=dtype, ops=operations)
        self.dtype = dtype


# ComfyUI constructs CLIP classes itself with fixed arguments (device, dtype, model_options), so the Qwen3 size,
# known only from the weights, is captured by making the classes in a closure per config.

def text_encoder_class(config: dict) -> type:
    """SD1ClipModel subclass for this Qwen3 size: final-norm hidden states, no attention mask (SPEC §6)."""

    class HDMQwen3Encoder(sd1_clip.SDClipModel):
        def __init__(self, device="cpu", dtype=None, model_options=None):
            super().__init__(device=device, layer="last", layer_idx=None, textmodel_json_config=dict(config),
                             dtype=dtype, special_tokens={"pad": PAD_TOKEN_ID}, layer_norm_hidden_state=False,
                             model_class=HDMQwen3, enable_attention_masks=False, return_attention_masks=False,
                             model_options=model_options or {})

    class HDMTextEncoder(sd1_clip.SD1ClipModel):
        def __init__(self, device="cpu", dtype=None, model_options=None):
            super().__init__(device=device, dtype=dtype, name=TE_NAME, clip_model=HDMQwen3Encoder,
                             model_options=model_options or {})

    return HDMTextEncoder


def tokenizer_class(config: dict) -> type:
    """Qwen3 tokenizer as HDM-ext feeds it: no BOS/EOS, no padding or truncation, "" → one pad token."""
    hidden = config["hidden_size"]

    class HDMQwen3Tokenizer(sd1_clip.SDTokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data=None):
            super().__init__(str(TOKENIZER_DIR), pad_with_end=False, embedding_directory=embedding_directory,
                             embedding_size=hidden, embedding_key=TE_NAME, tokenizer_class=Qwen2Tokenizer,
                             has_start_token=False, has_end_token=False, pad_to_max_length=False,
                             max_length=NO_TOKEN_LIMIT, min_length=1, pad_token=PAD_TOKEN_ID,
                             tokenizer_data=tokenizer_data or {})

    class HDMTokenizer(sd1_clip.SD1Tokenizer):
        def __init__(self, embedding_directory=None, tokenizer_data=None):
            super().__init__(embedding_directory=embedding_directory, tokenizer_data=tokenizer_data, name=TE_NAME,
                             tokenizer=HDMQwen3Tokenizer)

        def tokenize_official(self, text: str) -> dict:
            """The raw prompt as the official pipeline tokenizes it (no weight syntax, no escapes)."""
            ids = getattr(self, TE_NAME).tokenizer(text, add_special_tokens=False)["input_ids"]
            return {TE_NAME: [[(int(i), 1.0) for i in (ids or [PAD_TOKEN_ID])]]}

    return HDMTokenizer
