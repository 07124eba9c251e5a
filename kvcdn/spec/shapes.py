"""The published shapes of popular models (their config.json's numbers that set compute and KV size),
so a benchmark can build a random-weight model of a real geometry (kvcdn.model.random) and the egress
simulator can price a real model's KV, without downloading either."""

from __future__ import annotations

from dataclasses import dataclass

from kvcdn.spec.geometry import Geometry

__all__ = ["SHAPES", "ModelShape"]


@dataclass(frozen=True)
class ModelShape:
    architecture: str
    """transformers architecture family: llama or qwen3."""
    hidden_size: int
    intermediate_size: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    rope_theta: float = 10000.0
    tie_word_embeddings: bool = False

    def kv_geometry(self, dtype: str) -> Geometry:
        return Geometry(self.layers, self.kv_heads, self.head_dim, dtype)


SHAPES: dict[str, ModelShape] = {
    "smollm2-135m": ModelShape("llama", 576, 1536, 30, 9, 3, 64, 49152, 100000.0, True),
    "qwen3-0.6b": ModelShape("qwen3", 1024, 3072, 28, 16, 8, 128, 151936, 1000000.0, True),
    "qwen3-4b": ModelShape("qwen3", 2560, 9728, 36, 32, 8, 128, 151936, 1000000.0, True),
    "llama3.1-8b": ModelShape("llama", 4096, 14336, 32, 32, 8, 128, 128256, 500000.0),
    "qwen3-32b": ModelShape("qwen3", 5120, 25600, 64, 64, 8, 128, 151936, 1000000.0),
}
