"""Tiny seeded random causal LMs of several architectures, saved as local model directories so
tests load them exactly as users load theirs (`--model PATH`)."""

from __future__ import annotations

from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    Gemma2Config,
    Gemma3TextConfig,
    LlamaConfig,
    MistralConfig,
    Olmo2Config,
    Phi3Config,
    PretrainedConfig,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)

from kvcdn.model.random import bundled_tokenizer

ARCHITECTURES = (
    "llama",
    "llama-mha",
    "qwen2",
    "qwen3",
    "mistral",
    "mistral-window",
    "gemma2",
    "gemma3",
    "phi3",
    "olmo2",
)
"""`mistral-window`, `gemma2` and `gemma3` attend through sliding windows of WINDOW tokens, shorter than
the tests' documents (the Gemmas mix sliding and global layers); `llama-mha` has as many KV heads as
query heads (no grouped-query attention)."""

WINDOW = 24


def _tokenizer() -> PreTrainedTokenizerFast:
    tokenizer: PreTrainedTokenizerFast = bundled_tokenizer(vocab_size=384)
    return tokenizer


def _config(arch: str, vocab: int, head_dim: int = 16) -> PretrainedConfig:
    common = dict(
        vocab_size=vocab,
        hidden_size=4 * head_dim,
        intermediate_size=8 * head_dim,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=4096,
        initializer_range=0.2,
        eos_token_id=0,
        pad_token_id=0,
        bos_token_id=0,
    )
    if arch == "llama":
        return LlamaConfig(**common)
    if arch == "llama-mha":
        return LlamaConfig(**{**common, "num_key_value_heads": 4})
    if arch == "qwen2":
        return Qwen2Config(**common)
    if arch == "qwen3":
        return Qwen3Config(**common, head_dim=head_dim)
    if arch == "mistral":
        return MistralConfig(**common, sliding_window=None)
    if arch == "mistral-window":
        return MistralConfig(**common, sliding_window=WINDOW)
    if arch == "gemma2":
        return Gemma2Config(**common, head_dim=16, sliding_window=WINDOW, query_pre_attn_scalar=16)
    if arch == "gemma3":
        layer_types = ["sliding_attention", "full_attention", "sliding_attention"]
        return Gemma3TextConfig(**common, head_dim=16, sliding_window=WINDOW, layer_types=layer_types)
    if arch == "phi3":
        return Phi3Config(**common)
    if arch == "olmo2":
        return Olmo2Config(**common)
    raise ValueError(arch)


def make_tiny_model(arch: str, path: Path, seed: int = 0, head_dim: int = 16) -> Path:
    """Write a seeded random `arch` model and its tokenizer to `path` (4 query heads of `head_dim`;
    vLLM's CPU attention takes heads of 32 or more)."""
    tokenizer = _tokenizer()
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(_config(arch, len(tokenizer), head_dim))
    model.generation_config.eos_token_id = None  # random weights: never stop early
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return path
