"""The one module that touches transformers' cache API (5.x).

transformers renamed and removed its cache API between 4.x and 5.x (`from_legacy_cache`, `key_cache`
and `past_key_values=` are gone or deprecated); keeping every such call here means the next change is
a one-file change. Everything else in kvcdn sees a cache as `list[LayerKV]`: per layer `(keys,
values)`, each `[batch=1, kv_heads, tokens, head_dim]`.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass
from typing import Any

import torch
import transformers

from kvcdn.errors import InvalidArgument
from kvcdn.model.tensors import LayerKV, synchronize

__all__ = [
    "Generation",
    "build_cache",
    "check_layers",
    "greedy",
    "kv_shape",
    "prefill",
    "query_moments",
    "timed_prefill",
]


# transformers' own annotations are partial; kvcdn treats its objects as Any at this boundary.
DynamicCache: Any = transformers.DynamicCache
DynamicLayer: Any = transformers.cache_utils.DynamicLayer
DynamicSlidingWindowLayer: Any = transformers.cache_utils.DynamicSlidingWindowLayer
GenerationConfig: Any = transformers.GenerationConfig


def _ids_tensor(ids: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor([ids], dtype=torch.long, device=device)


def check_layers(model: Any, cache: Any) -> None:
    """Refuse, with a sentence naming the model type, cache layers kvcdn cannot rebuild exactly: it
    stores every layer's full keys and values, which recurrent, state-space, chunked or shared layers
    are not."""
    for i, layer in enumerate(cache.layers):
        if type(layer) not in (DynamicLayer, DynamicSlidingWindowLayer):
            raise InvalidArgument(
                f"{model.config.model_type} models are not supported: cache layer {i} is a {type(layer).__name__}, "
                "not full or sliding-window attention keys and values"
            )


def _empty_cache(model: Any, full: bool) -> Any:
    """A DynamicCache with the model's own layer types; `full`: sliding-window layers keep every
    token instead of their last window (what the origin stores), until the cache is rebuilt."""
    cache = DynamicCache(config=model.config)
    check_layers(model, cache)
    if full:
        for layer in cache.layers:
            if layer.is_sliding:
                layer.activate_past_recording()
    return cache


def build_cache(model: Any, layers: list[LayerKV], full: bool = False) -> Any:
    """A DynamicCache holding `layers` (every layer's full keys and values) as a prefill of the same
    tokens would have left it, without copying them.

    Full-attention layers take the tensors as they are (possibly non-contiguous views); the first
    `update()` concatenates onto them, exactly as in a cache filled by prefill. Sliding-window layers
    keep only their last `sliding_window - 1` tokens and count every token, as transformers' own
    sliding layers do after a prefill (`full`: they keep every token, for a prefill whose KV is
    stored). No layers: an empty cache, which generation fills as a prefill would.
    """
    cache = _empty_cache(model, full)
    if not layers:
        return cache
    if len(cache.layers) != len(layers):
        raise InvalidArgument(f"model has {len(cache.layers)} cache layers, the cache holds {len(layers)}")
    for layer, (keys, values) in zip(cache.layers, layers, strict=True):
        layer.lazy_initialization(keys, values)
        if layer.is_sliding:
            layer.cumulative_length = keys.shape[-2]
            if not full:
                n = keys.shape[-2]
                keep = min(max(layer.sliding_window - 1, 0), n)
                keys, values = keys[:, :, n - keep :], values[:, :, n - keep :]
        layer.keys, layer.values = keys, values
    return cache


def _layers_of(cache: Any) -> list[LayerKV]:
    return [(layer.keys, layer.values) for layer in cache.layers]


@torch.inference_mode()
def prefill(model: Any, ids: list[int], past: list[LayerKV] | None = None) -> list[LayerKV]:
    """Run the model over `ids` (continuing `past`, which covers the tokens before them) and return
    the per-layer KV of the whole sequence, sliding-window layers included (every token of them)."""
    device = model.device
    cache = build_cache(model, past or [], full=True)
    model(input_ids=_ids_tensor(ids, device), cache=cache, use_cache=True, logits_to_keep=1)
    return _layers_of(cache)


def timed_prefill(model: Any, ids: list[int], past: list[LayerKV] | None = None) -> tuple[list[LayerKV], float]:
    """`prefill`, and the seconds it took with the device synchronized before and after."""
    synchronize(model.device)
    t0 = time.perf_counter()
    layers = prefill(model, ids, past)
    synchronize(model.device)
    return layers, time.perf_counter() - t0


_MOMENTS = "kvcdn_query_moments"
"""The attention implementation `query_moments` switches a model to for one prefill: the model's
own (in `_inner`), with its own masks, summing each layer's queries into `_moments` on the way."""
_inner: list[str] = []
_moments: dict[int, tuple[torch.Tensor, int]] = {}


def _attend_summing_queries(module: Any, query: torch.Tensor, key: torch.Tensor, *args: Any, **kwargs: Any) -> Any:
    q = query[0].float().reshape(key.shape[1], -1, query.shape[-1])  # [kv_heads, group heads * tokens, head_dim]
    total, count = _moments.get(module.layer_idx, (0, 0))
    _moments[module.layer_idx] = (q.transpose(1, 2) @ q + total, q.shape[1] + count)
    eager = sys.modules[type(module).__module__].eager_attention_forward  # every modeling file has one
    attend = transformers.modeling_utils.ALL_ATTENTION_FUNCTIONS.get_interface(_inner[0], eager)
    return attend(module, query, key, *args, **kwargs)


transformers.AttentionInterface.register(_MOMENTS, _attend_summing_queries)


@torch.inference_mode()
def query_moments(model: Any, ids: list[int]) -> torch.Tensor:
    """The second moment of the queries that read each layer's KV heads, `[layers, kv_heads, head_dim,
    head_dim]` float32 on the CPU: E[q q^T] over a prefill of `ids` and each head's query heads.
    How much an error in each direction of a cached key moves attention scores (q . k); lossy
    codecs round keys so that their error falls where queries hardly look. Not thread-safe with
    itself: callers hold the model (as the origin does)."""
    implementation = model.config._attn_implementation
    mask = transformers.masking_utils.ALL_MASK_ATTENTION_FUNCTIONS.get(implementation)
    if mask is None:
        raise InvalidArgument(f"attention implementation {implementation!r} has no mask function to observe it with")
    transformers.masking_utils.AttentionMaskInterface.register(_MOMENTS, mask)
    _inner[:] = [implementation]
    _moments.clear()
    try:
        model.set_attn_implementation(_MOMENTS)
    except ValueError as e:
        raise InvalidArgument(f"{model.config.model_type} models cannot switch attention implementation: {e}") from None
    try:
        model(input_ids=_ids_tensor(ids, model.device), use_cache=False, logits_to_keep=1)
    finally:
        model.set_attn_implementation(implementation)
    layers = sorted(_moments)
    if layers != list(range(len(layers))) or not layers:
        raise InvalidArgument(
            f"{model.config.model_type} models do not route every layer's attention through AttentionInterface"
        )
    out = torch.stack([(_moments[i][0] / _moments[i][1]).cpu() for i in layers])
    _moments.clear()
    return out


def kv_shape(model: Any) -> tuple[int, int, int]:
    """(layers, kv_heads, head_dim) of the model's cache, read off a one-token prefill so that any
    architecture's config naming works."""
    layers = prefill(model, [0])
    shapes = {(k.shape[1], k.shape[3], v.shape[1], v.shape[3]) for k, v in layers}
    if len(shapes) != 1:
        raise InvalidArgument("models whose layers differ in KV shape are not supported yet")
    heads, dim, v_heads, v_dim = shapes.pop()
    if (heads, dim) != (v_heads, v_dim):
        raise InvalidArgument("models whose keys and values differ in shape are not supported yet")
    return len(layers), int(heads), int(dim)


@dataclass(frozen=True)
class Generation:
    """Greedy continuation: the new token ids and the logits that chose each."""

    tokens: list[int]
    logits: list[torch.Tensor]


@torch.inference_mode()
def greedy(model: Any, ids: list[int], max_new_tokens: int, cache: list[LayerKV] | None = None) -> Generation:
    """Greedy-decode up to `max_new_tokens` after `ids`.

    With `cache` (KV of a prefix of `ids`), only the uncached tail of `ids` is run through the model;
    the cache is copied into a fresh DynamicCache and the caller's tensors are not modified. `ids` is
    always the full sequence with an all-ones mask, as generate() requires.
    """
    device = model.device
    input_ids = _ids_tensor(ids, device)
    kwargs: dict[str, Any] = {}
    if cache is not None:
        kwargs["cache"] = build_cache(model, cache)
    config = GenerationConfig(
        max_new_tokens=max_new_tokens,
        do_sample=False,
        eos_token_id=model.generation_config.eos_token_id,
        pad_token_id=model.generation_config.pad_token_id or model.generation_config.eos_token_id,
        output_logits=True,
        return_dict_in_generate=True,
    )
    out = model.generate(
        input_ids=input_ids,
        attention_mask=torch.ones_like(input_ids),
        generation_config=config,
        **kwargs,
    )
    new = out.sequences[0, len(ids) :].tolist()
    return Generation(tokens=new, logits=[step[0].float().cpu() for step in out.logits])
