"""int4 (SPEC.md section 8, KIVI-style): asymmetric 4-bit codes of rotated values, keys per channel
(per 128-token group where float16 holds their statistics), values per token; a document's first
token exact (SINK)."""

from __future__ import annotations

import math

import torch

from kvcdn.errors import InvalidArgument
from kvcdn.model.codecs.container import LossyCodec, segment_kinds, sink_layout
from kvcdn.model.codecs.rotation import rotate, rotation_block, shaped
from kvcdn.spec.codecs import GROUPED, INT4_KEY_GROUP, ROTATED, SINK, int4_key_groups
from kvcdn.spec.geometry import Geometry


def _fits_float16(x: torch.Tensor, head_dim: int) -> bool:
    """Whether every rotated value of `x` (keys or values), and so every minimum and range over them, is
    well inside float16's range (a rotation of b channels grows a value at most sqrt(b)-fold): int4
    then stores its key statistics per group in float16 (GROUPED), else one float32 pair per block;
    its values' statistics are always float16."""
    return bool(x.abs().amax() * math.sqrt(rotation_block(head_dim)) < 30000)


def _encode_int4(
    x: torch.Tensor, keys: bool, sink: torch.dtype | None, factor: torch.Tensor | None, grouped: bool
) -> list[torch.Tensor]:
    """The arrays and codes of every layer's segment of one kind, `x` (`[layers, T, H, D]` float32),
    rotated first (keys then rounded by `shaped` with a `factor`); with `sink` (the cache's dtype),
    the first token exact in that dtype (before the codes). Keys' minimum and step are per (head,
    channel) over the block's tokens, or `grouped` over each INT4_KEY_GROUP tokens in float16; values'
    per (token, head) over the head's channels in float16."""
    first = [x[:, :1].to(sink)] if sink is not None else []
    x = rotate(x)
    if keys and grouped:
        parts = [x[:, at : at + INT4_KEY_GROUP] for at in range(0, x.shape[1], INT4_KEY_GROUP)]
        low = torch.cat([part.amin(dim=1, keepdim=True) for part in parts], dim=1)  # [layers, groups, H, D]
        high = torch.cat([part.amax(dim=1, keepdim=True) for part in parts], dim=1)
    else:
        dim = 1 if keys else 3  # keys: over tokens per channel; values: over channels per token
        low, high = x.amin(dim=dim, keepdim=True), x.amax(dim=dim, keepdim=True)
    step = ((high - low) / 15).clamp_min(1e-8)
    half = grouped or not keys
    if half:
        low, step = low.half().float(), step.half().float().clamp_min(6e-5)
    stored = (low.half(), step.half()) if half else (low, step)
    if keys and grouped:
        low, step = _per_token(low, x.shape[1]), _per_token(step, x.shape[1])
    if factor is not None:
        x = shaped(
            x, factor, lambda c, i: ((c - low[..., i]) / step[..., i]).round().clamp(0, 15) * step[..., i] + low[..., i]
        )
    codes = ((x - low) / step).round().clamp(0, 15).to(torch.uint8).reshape(len(x), -1)
    return [*stored, *first, codes[:, 0::2] | (codes[:, 1::2] << 4)]


def _per_token(groups: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """Per-group key statistics (`[layers, groups, H, D]`) repeated for each of the n tokens."""
    return groups.repeat_interleave(INT4_KEY_GROUP, dim=1)[:, :n_tokens]


def _decode_int4(body: torch.Tensor, geometry: Geometry, n_tokens: int, flags: int) -> torch.Tensor:
    """Every layer's keys at once, then every layer's values: minimum plus code times step, rotated
    back (ROTATED), written in the cache's dtype; then the sink token (SINK)."""
    h, d, n = geometry.kv_heads, geometry.head_dim, n_tokens
    sink = sink_layout(geometry, flags)
    grouped = bool(flags & GROUPED)
    statistics = (torch.float16, (int4_key_groups(n), h, d)) if grouped else (torch.float32, (1, h, d))
    layouts = ([statistics] * 2 + sink, [(torch.float16, (n, h, 1))] * 2 + sink)
    out, kinds = segment_kinds(body, "int4", geometry, n_tokens, flags, layouts)
    for kind, (segments, arrays, packed) in enumerate(kinds):
        low, step = arrays[0].float(), arrays[1].float()
        values = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(segments.shape).float()
        if grouped and kind == 0:  # each group of tokens with its own statistics
            for group, at in enumerate(range(0, n, INT4_KEY_GROUP)):
                values[:, at : at + INT4_KEY_GROUP].mul_(step[:, group : group + 1]).add_(low[:, group : group + 1])
        else:
            values.mul_(step).add_(low)
        # float32, rounded once into the cache's dtype (blocks written before the rotation: not rotated)
        segments.copy_(rotate(values) if flags & ROTATED else values)
        if sink:
            segments[:, :1].copy_(arrays[-1])
    return out


def _flags(values: torch.Tensor, geometry: Geometry, first: bool) -> int:
    if not _fits_float16(values[1::2], geometry.head_dim):
        raise InvalidArgument("int4 stores values' statistics in float16, and these values outgrow it: use int8")
    grouped = GROUPED if _fits_float16(values[0::2], geometry.head_dim) else 0  # key statistics per group
    return ROTATED | grouped | (SINK if first else 0)


def _encode(
    x: torch.Tensor, keys: bool, sink: torch.dtype | None, factor: torch.Tensor | None, flags: int
) -> list[torch.Tensor]:
    return _encode_int4(x, keys, sink, factor, keys and bool(flags & GROUPED))


CODEC = LossyCodec("int4", _flags, _encode, _decode_int4)
