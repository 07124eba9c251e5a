"""Random-weight models of real geometries, for benchmarks on machines that cannot download weights.

`load_model("random:qwen3-4b")` builds a seeded model with Qwen3-4B's published shape
(kvcdn.spec.shapes: layers, heads, widths, vocabulary), so prefill costs and KV sizes are the real
model's while nothing is downloaded.
Its tokenizer is a byte-level BPE trained on the bundled sample texts, the same in every process, so
an origin and a client that both build `random:NAME` compute the same fingerprint and block keys.
Its continuations are meaningless text, but exactness checks (same tokens from a fetched cache as
from a local prefill) hold as for any model.
"""

from __future__ import annotations

from importlib import resources
from typing import Any

import torch
import transformers
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from kvcdn.errors import InvalidArgument
from kvcdn.spec.shapes import SHAPES, ModelShape

__all__ = ["RANDOM_PREFIX", "bundled_tokenizer", "random_model"]

RANDOM_PREFIX = "random:"

# transformers' own annotations are partial; kvcdn treats its objects as Any at this boundary.
AutoModelForCausalLM: Any = transformers.AutoModelForCausalLM
PreTrainedTokenizerFast: Any = transformers.PreTrainedTokenizerFast


def bundled_tokenizer(vocab_size: int = 4096) -> Any:
    """A byte-level BPE tokenizer trained on the bundled sample texts (deterministic; about a second)."""
    root = resources.files("kvcdn.samples")
    texts = [root.joinpath(name).read_text(encoding="utf-8") for name in sorted(_sample_names())]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<eos>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def _sample_names() -> list[str]:
    return [p.name for p in resources.files("kvcdn.samples").iterdir() if p.name.endswith(".txt")]


def _config(g: ModelShape) -> Any:
    kw: dict[str, Any] = {
        "vocab_size": g.vocab_size,
        "hidden_size": g.hidden_size,
        "intermediate_size": g.intermediate_size,
        "num_hidden_layers": g.layers,
        "num_attention_heads": g.heads,
        "num_key_value_heads": g.kv_heads,
        "head_dim": g.head_dim,
        "max_position_embeddings": 40960,  # a 32,768-token document and a question
        "rope_theta": g.rope_theta,
        "tie_word_embeddings": g.tie_word_embeddings,
        "initializer_range": 0.02,
        "bos_token_id": 0,
        "eos_token_id": 0,
        "pad_token_id": 0,
    }
    cls = transformers.LlamaConfig if g.architecture == "llama" else transformers.Qwen3Config
    return cls(**kw)


def random_model(spec: str, dtype: torch.dtype, device: torch.device, seed: int = 0) -> tuple[Any, Any]:
    """(model, tokenizer) for `random:NAME`, weights drawn from `seed` directly on `device`."""
    name = spec.removeprefix(RANDOM_PREFIX)
    if name not in SHAPES:
        raise InvalidArgument(f"unknown geometry {name!r}: random models come in {', '.join(SHAPES)}")
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(_config(SHAPES[name]), dtype=dtype)
    model.generation_config.eos_token_id = None  # random weights: never stop early
    return model, bundled_tokenizer()
