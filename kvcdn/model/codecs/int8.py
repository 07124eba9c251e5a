"""int8 (SPEC.md section 8): symmetric 8-bit codes of rotated values, keys per channel, values per token."""

from __future__ import annotations

import torch

from kvcdn.model.codecs.container import LossyCodec, segment_kinds
from kvcdn.model.codecs.rotation import rotate, shaped
from kvcdn.spec.geometry import Geometry


def _encode_int8(x: torch.Tensor, keys: bool, factor: torch.Tensor | None) -> list[torch.Tensor]:
    """The arrays and codes of every layer's segment of one kind, `x` (`[layers, T, H, D]` float32),
    rotated first (keys then rounded by `shaped` with a `factor`)."""
    x = rotate(x)
    if keys:
        stored = (x.abs().amax(dim=1, keepdim=True) / 127).clamp_min(torch.finfo(torch.float32).tiny)  # [., 1, H, D]
        scale = stored
    else:  # [layers, T, H, 1]; bfloat16 covers float32's range, so no value's scale overflows
        stored = (
            (x.abs().amax(dim=-1, keepdim=True) / 127).to(torch.bfloat16).clamp_min(torch.finfo(torch.bfloat16).tiny)
        )
        scale = stored.float()
    if factor is not None:
        x = shaped(x, factor, lambda column, i: (column / scale[..., i]).round().clamp(-127, 127) * scale[..., i])
    return [stored, (x / scale).round().clamp(-127, 127).to(torch.int8)]


def _decode_int8(body: torch.Tensor, geometry: Geometry, n_tokens: int) -> torch.Tensor:
    """Every layer's keys at once, then every layer's values: codes times scales, rotated back,
    written in the cache's dtype."""
    h, d, n = geometry.kv_heads, geometry.head_dim, n_tokens
    layouts = ([(torch.float32, (1, h, d))], [(torch.bfloat16, (n, h, 1))])
    out, kinds = segment_kinds(body, "int8", geometry, n_tokens, 0, layouts)
    for segments, (scale,), codes in kinds:
        values = codes.view(torch.int8).reshape(segments.shape).float().mul_(scale.float())
        segments.copy_(rotate(values))  # float32, rounded once into the cache's dtype
    return out


def _flags(values: torch.Tensor, geometry: Geometry, first: bool) -> int:
    return 0


def _encode(
    x: torch.Tensor, keys: bool, sink: torch.dtype | None, factor: torch.Tensor | None, flags: int
) -> list[torch.Tensor]:
    return _encode_int8(x, keys, factor)


def _decode(body: torch.Tensor, geometry: Geometry, n_tokens: int, flags: int) -> torch.Tensor:
    return _decode_int8(body, geometry, n_tokens)


CODEC = LossyCodec("int8", _flags, _encode, _decode)
