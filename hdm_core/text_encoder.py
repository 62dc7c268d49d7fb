"""Qwen3-0.6B text encoder: local tokenizer, state-dict loading and prompt encoding (SPEC §6).

transformers is imported lazily and only ever reads the tokenizer files shipped next to this module;
no hub id appears anywhere, so nothing here can trigger a download.
"""

from __future__ import annotations

import re
import warnings
from pathlib import Path
from typing import TYPE_CHECKING

import torch

from .weights import build_with_weights

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase, Qwen3Model

TOKENIZER_DIR = Path(__file__).resolve().parent / "qwen3_tokenizer"
PAD_TOKEN_ID = 151643  # <|endoftext|>: right padding, and the single token an empty prompt becomes
TRAINED_TOKENS = 256  # the caption length HDM was trained with
LONG_PROMPT_TOKENS = 1024  # encode() warns above this

# Public Qwen/Qwen3-0.6B config, as Qwen3Config keyword arguments (596,049,920 parameters without lm_head).
QWEN3_06B = dict(
    vocab_size=151936,
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
    hidden_act="silu",
    max_position_embeddings=40960,
    rms_norm_eps=1e-6,
    rope_theta=1_000_000.0,
    tie_word_embeddings=True,
    attention_bias=False,
)

# Seeded random encoders for tests, demos and benchmarks: Qwen3Config overrides of QWEN3_06B.
QWEN3_PRESETS: dict[str, dict] = {
    "qwen3-0.6b": {},
    # Matches xut-tiny's ctx_dim 48. The vocabulary stays Qwen3's, so the real tokenizer works.
    "tiny": dict(hidden_size=48, intermediate_size=96, num_hidden_layers=2, num_attention_heads=2,
                 num_key_value_heads=1, head_dim=24),
}


# --------------------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------------------


def load_tokenizer(path: str | Path = TOKENIZER_DIR) -> PreTrainedTokenizerBase:
    """Load the Qwen3 BPE tokenizer from local files only (default: the copy shipped in this package)."""
    from transformers import Qwen2Tokenizer

    path = Path(path)
    missing = [f for f in ("vocab.json", "merges.txt", "tokenizer_config.json") if not (path / f).is_file()]
    if missing:
        raise FileNotFoundError(
            f"tokenizer folder {path} lacks {missing}; point load_tokenizer at a Qwen3 tokenizer folder"
        )
    tokenizer = Qwen2Tokenizer.from_pretrained(str(path), local_files_only=True)
    if tokenizer.pad_token_id != PAD_TOKEN_ID:
        raise ValueError(
            f"tokenizer in {path} pads with id {tokenizer.pad_token_id}, expected {PAD_TOKEN_ID} (<|endoftext|>); "
            "use the Qwen3 tokenizer files"
        )
    tokenizer.padding_side = "right"
    return tokenizer


def tokenize(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of one prompt as HDM-ext feeds them: no BOS/EOS/template/truncation; "" -> [PAD_TOKEN_ID]."""
    ids = tokenizer(prompt, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
    return list(ids) if ids else [PAD_TOKEN_ID]


# --------------------------------------------------------------------------------------------------------
# Model construction and state dicts
# --------------------------------------------------------------------------------------------------------


def _qwen3_config(config: dict | None):
    """Qwen3Config from QWEN3_06B overridden by `config`; unknown keys raise."""
    from transformers import Qwen3Config

    config = dict(config or {})
    unknown = sorted(set(config) - set(QWEN3_06B))
    if unknown:
        raise ValueError(f"unknown Qwen3 config keys {unknown}; allowed keys are {sorted(QWEN3_06B)}")
    return Qwen3Config(**{**QWEN3_06B, **config})


def _reset_rotary(model: Qwen3Model, device: torch.device | str) -> None:
    """Recompute the non-persistent RoPE buffers in float32 on `device` (they are not in any state dict)."""
    with torch.device(device):
        model.rotary_emb = type(model.rotary_emb)(config=model.config)


def build_qwen3(
    config: dict | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> Qwen3Model:
    """Build a Qwen3Model (default Qwen3-0.6B); random init, or a weightless skeleton with device="meta"."""
    from transformers import Qwen3Model

    cfg = _qwen3_config(config)
    with torch.device(device):
        model = Qwen3Model(cfg)
    model.to(dtype=dtype)
    if torch.device(device).type != "meta":
        _reset_rotary(model, device)  # .to(dtype) would otherwise leave inv_freq in half precision
    return model.eval()


def infer_qwen3_config(sd: dict[str, torch.Tensor]) -> dict:
    """Qwen3 config dict read from the tensor shapes of a bare Qwen3Model state dict."""
    needed = [
        "embed_tokens.weight",
        "layers.0.self_attn.q_proj.weight",
        "layers.0.self_attn.k_proj.weight",
        "layers.0.self_attn.q_norm.weight",
        "layers.0.mlp.gate_proj.weight",
    ]
    missing = [k for k in needed if k not in sd]
    if missing:
        raise ValueError(f"cannot infer the Qwen3 config: missing {missing}; pass bare Qwen3Model keys "
                         f"(hdm_core.layout.text_encoder_part)")
    vocab_size, hidden_size = sd["embed_tokens.weight"].shape
    head_dim = sd["layers.0.self_attn.q_norm.weight"].shape[0]
    layer_ids = {int(m.group(1)) for k in sd if (m := re.match(r"layers\.(\d+)\.", k))}
    return {
        **QWEN3_06B,
        "vocab_size": int(vocab_size),
        "hidden_size": int(hidden_size),
        "intermediate_size": int(sd["layers.0.mlp.gate_proj.weight"].shape[0]),
        "num_hidden_layers": max(layer_ids) + 1,
        "num_attention_heads": sd["layers.0.self_attn.q_proj.weight"].shape[0] // head_dim,
        "num_key_value_heads": sd["layers.0.self_attn.k_proj.weight"].shape[0] // head_dim,
        "head_dim": int(head_dim),
    }


def load_qwen3(
    sd: dict[str, torch.Tensor],
    config: dict | None = None,
    *,
    dtype: torch.dtype | None = None,
    device: torch.device | str | None = None,
) -> Qwen3Model:
    """Qwen3Model holding the weights of a bare Qwen3Model state dict, built on meta so nothing is allocated twice."""
    config = config or infer_qwen3_config(sd)
    ref = sd["embed_tokens.weight"]
    device = torch.device(device) if device is not None else ref.device
    model = build_with_weights(lambda: build_qwen3(config, dtype=dtype or ref.dtype, device="meta"), sd,
                               dtype=dtype or ref.dtype, device=device,
                               what=f"Qwen3 state dict does not match config {config} (is it a Qwen3 text encoder?)")
    _reset_rotary(model, device)
    return model.requires_grad_(False)


# --------------------------------------------------------------------------------------------------------
# Encoder
# --------------------------------------------------------------------------------------------------------


class TextEncoder(torch.nn.Module):
    """Frozen Qwen3 + tokenizer; returns final-norm hidden states as HDM's context tokens."""

    def __init__(self, model: Qwen3Model, tokenizer: PreTrainedTokenizerBase | None = None):
        super().__init__()
        self.model = model.eval().requires_grad_(False)
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer()

    @classmethod
    def from_state_dict(
        cls,
        sd: dict[str, torch.Tensor],
        config: dict | None = None,
        dtype: torch.dtype | None = None,
        device: torch.device | str | None = None,
    ) -> TextEncoder:
        """Build from bare Qwen3Model weights (`hdm_core.layout.text_encoder_part` finds them in any file)."""
        return cls(load_qwen3(sd, config, dtype=dtype, device=device))

    @property
    def hidden_size(self) -> int:
        """Width of the returned hidden states (1024 for Qwen3-0.6B)."""
        return self.model.config.hidden_size

    @property
    def device(self) -> torch.device:
        """Device of the Qwen3 weights."""
        return self.model.embed_tokens.weight.device

    @torch.no_grad()
    def encode(self, prompts: list[str] | str, max_tokens: int | None = None) -> list[torch.Tensor]:
        """Encode every prompt alone (no padding; truncated only to `max_tokens` when given) -> list of
        [1, L_i, hidden] (HDM-ext behaviour). A prompt longer than LONG_PROMPT_TOKENS gets a warning."""
        if isinstance(prompts, str):
            prompts = [prompts]
        out = []
        for prompt in prompts:
            tokens = tokenize(self.tokenizer, prompt)
            if max_tokens is None and len(tokens) > LONG_PROMPT_TOKENS:
                warnings.warn(f"the prompt is {len(tokens)} tokens; HDM was trained on up to {TRAINED_TOKENS}, and "
                              f"every sampling step attends over all of them (cost grows with their number, "
                              f"attention with its square): pass max_tokens={TRAINED_TOKENS} (CLI: "
                              f"--max-prompt-tokens) to truncate", stacklevel=3)
            ids = torch.tensor([tokens[:max_tokens]], device=self.device)  # (1, L)
            hidden = self.model(input_ids=ids, attention_mask=torch.ones_like(ids), use_cache=False)
            out.append(hidden.last_hidden_state)  # (1, L, hidden), after the final RMSNorm
        return out

    @torch.no_grad()
    def encode_padded(self, prompts: list[str] | str, max_length: int = 256) -> torch.Tensor:
        """Training batch: right-pad with PAD_TOKEN_ID to max_length, truncate, mask into Qwen3 -> [B, T, hidden]."""
        return self.padded_hidden(prompts, max_length)

    def padded_hidden(self, prompts: list[str] | str, max_length: int = 256) -> torch.Tensor:
        """`encode_padded` with autograd on (a trainer adapting the text encoder)."""
        if isinstance(prompts, str):
            prompts = [prompts]
        if max_length < 1:
            raise ValueError(f"max_length {max_length} must be >= 1; the official training value is 256")
        batch = self.tokenizer(
            prompts,
            add_special_tokens=False,
            padding="max_length",
            truncation=True,
            max_length=max_length,
            return_tensors="pt",
        ).to(self.device)
        hidden = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False)
        return hidden.last_hidden_state  # (B, max_length, hidden); pad positions kept, never zeroed
