"""fp8 (SPEC.md section 8): float8 e4m3 codes of rotated values, one 4-bit scale step per (token, head),
keys centred on a line over the block's tokens first; a document's first token exact (SINK)."""

from __future__ import annotations

import functools

import torch

from kvcdn.model.codecs.container import LossyCodec, copied, segment_kinds, segments, sink_layout
from kvcdn.model.codecs.rotation import rotate, shaped
from kvcdn.model.tensors import TORCH_DTYPES
from kvcdn.spec.codecs import ROTATED, SINK, TOKEN_SCALED
from kvcdn.spec.geometry import Geometry

_FP8_MAX = 448.0
_FP8_STEPS_PER_OCTAVE = 4
_FP8_STEPS = 16
"""fp8's 4-bit scale steps: a (token, head)'s scale is its head's base times 2^(-step/4), step 0 .. 15."""
_FP8_CANDIDATES = 4
"""Scale steps the fp8 encoder tries per (token, head): the smallest that fits, and the next ones up
to one octave larger (e4m3's relative rounding depends on where values fall within an octave)."""
_FP8_VALUES = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float().numpy()
"""The float32 value of each e4m3 code (a table lookup decodes faster than torch's conversion)."""


def _fp8_rounded(x: torch.Tensor) -> torch.Tensor:
    """`x` rounded to its nearest e4m3 value (saturating at +-448), as float32."""
    return fp8_values(x.clamp(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn).view(torch.uint8))


def fp8_values(codes: torch.Tensor) -> torch.Tensor:
    """The float32 value of each e4m3 code: a table lookup on the CPU (3x faster there than torch's
    conversion, and the same values), the conversion kernel elsewhere."""
    if codes.device.type == "cpu":
        return torch.from_numpy(_FP8_VALUES[codes.numpy()])
    return codes.view(torch.float8_e4m3fn).float()


@functools.cache
def _fp8_steps(device: torch.device) -> torch.Tensor:
    """2^(-c/4) for each 4-bit scale step c, float32 (computed in float64 and rounded once: the
    same table on every device)."""
    steps = [2.0 ** (-c / _FP8_STEPS_PER_OCTAVE) for c in range(_FP8_STEPS)]
    table: torch.Tensor = torch.tensor(steps, dtype=torch.float64).float().to(device)
    return table


def _key_trend(intercept: torch.Tensor, slope: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """The line fp8 centres keys on, at token i of a block: slope * i + intercept per (head,
    channel), in float32, one multiply then one add (the same on every device). `intercept` and
    `slope` are bfloat16 `[..., H, D]`; the result broadcasts to `[..., n_tokens, H, D]`."""
    tokens = torch.arange(n_tokens, dtype=torch.float32, device=slope.device).view(n_tokens, 1, 1)
    return slope.float() * tokens + intercept.float()


def _encode_fp8(
    x: torch.Tensor, keys: bool, sink: torch.dtype | None, factor: torch.Tensor | None, flags: int
) -> list[torch.Tensor]:
    """The arrays and codes of every layer's segment of one kind, `x` (`[layers, T, H, D]` float32),
    each array with the layers first. Keys are first centred on a line over the block's tokens per
    (head, channel): the least-squares fit (slope, then intercept, each rounded to bfloat16) over
    every token but a sink. Then rotated; per head a base scale (amax over the block / 448); per
    (token, head) a 4-bit step below it (scale = base * 2^(-step/4)): among the smallest that fits
    the token's values and the next ones up to an octave larger, the one whose codes err least; keys
    rounded by `shaped` with a `factor`. With `sink` (the cache's dtype): the first token, exact in
    that dtype."""
    tiny = torch.finfo(torch.float32).tiny
    n = x.shape[1]
    first = x[:, :1].to(sink) if sink is not None else None
    trend: list[torch.Tensor] = []
    if keys:
        fit = x[:, 1:] if sink is not None else x
        at = torch.arange(n - fit.shape[1], n, dtype=torch.float32, device=x.device).view(-1, 1, 1)
        slope = torch.zeros_like(x[:, :1])  # [layers, 1, H, D], as the decoder reads it
        if fit.shape[1] > 1:
            centred = at - at.mean()
            covariance = (fit - fit.mean(dim=1, keepdim=True)).mul_(centred).sum(dim=1, keepdim=True)
            slope = covariance / centred.square().sum()
        slope = slope.to(torch.bfloat16)
        intercept = (fit - slope.float() * at).mean(dim=1, keepdim=True) if fit.shape[1] else torch.zeros_like(slope)
        trend = [intercept.to(torch.bfloat16), slope]
        x = x - _key_trend(trend[0], slope, n)
    rotated = rotate(x)
    amax = rotated.abs().amax(dim=-1)  # [layers, T, H]
    base = (amax.amax(dim=1, keepdim=True) / _FP8_MAX).clamp_min(tiny)  # [layers, 1, H]
    fits = torch.floor(torch.log2(base * _FP8_MAX / amax.clamp_min(tiny)) * _FP8_STEPS_PER_OCTAVE).nan_to_num()
    table = _fp8_steps(x.device)
    candidates, errors = [], []
    for k in range(_FP8_CANDIDATES):
        step = (fits - k).clamp(0, _FP8_STEPS - 1)
        scale = (base * table[step.long()]).unsqueeze(-1)  # [layers, T, H, 1], as the decoder computes it
        codes = (rotated / scale.clamp_min(tiny)).clamp_(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
        errors.append(fp8_values(codes.view(torch.uint8)).mul_(scale).sub_(rotated).square_().sum(dim=-1))
        candidates.append(step)
    pick = torch.stack(errors).argmin(dim=0, keepdim=True)  # the first of equal errors: the smallest scale
    step = torch.stack(candidates).gather(0, pick)[0].to(torch.uint8)
    scale = (base * table[step.long()]).unsqueeze(-1).clamp_min(tiny)
    if factor is not None:
        rotated = shaped(rotated, factor, lambda column, _: _fp8_rounded(column / scale[..., 0]) * scale[..., 0])
    codes = (rotated / scale).clamp_(-_FP8_MAX, _FP8_MAX).to(torch.float8_e4m3fn)
    steps = step.reshape(len(step), -1)
    steps = torch.cat((steps, steps.new_zeros(len(steps), steps.shape[1] % 2)), dim=1)  # two per byte, first low
    return [base, steps[:, 0::2] | (steps[:, 1::2] << 4), *trend, *([first] if first is not None else []), codes]


def _decode_fp8(body: torch.Tensor, geometry: Geometry, n_tokens: int, flags: int) -> torch.Tensor:
    """Every layer's keys at once, then every layer's values: codes times their (token, head)'s
    scale, rotated back, plus the keys' line, written in the cache's dtype; then the sink token."""
    h, d, n = geometry.kv_heads, geometry.head_dim, n_tokens
    sink = sink_layout(geometry, flags)
    scales = [(torch.float32, (1, h, 1)), (torch.uint8, ((n * h + 1) // 2,))]
    line = [(torch.bfloat16, (1, h, d))] * 2
    out, kinds = segment_kinds(body, "fp8", geometry, n_tokens, flags, ([*scales, *line, *sink], [*scales, *sink]))
    table = _fp8_steps(body.device)
    for keys, (part, arrays, codes) in zip((True, False), kinds, strict=True):
        base, packed = arrays[0], arrays[1]
        step = torch.stack((packed & 0x0F, packed >> 4), dim=-1).reshape(len(packed), -1)[:, : n * h]
        scale = base * table[step.long()].view(-1, n, h, 1)
        values = rotate(fp8_values(codes).reshape(part.shape).mul_(scale))
        if keys:
            values.add_(_key_trend(arrays[2], arrays[3], n))
        part.copy_(values)  # float32, rounded once into the cache's dtype
        if sink:
            part[:, :1].copy_(arrays[-1])
    return out


def _decode_fp8_per_channel(body: torch.Tensor, geometry: Geometry, n_tokens: int, rotated: bool) -> torch.Tensor:
    """fp8 blocks written before TOKEN_SCALED: one float32 scale per (segment, head, channel); all
    segments at once, one code lookup, one multiply and (rotated) one matrix product."""
    h, d, s = geometry.kv_heads, geometry.head_dim, segments(geometry)
    rows = body.view(s, 4 * h * d + n_tokens * h * d)
    scales = copied(rows[:, : 4 * h * d]).view(torch.float32).view(s, 1, h, d)
    values = fp8_values(rows[:, 4 * h * d :]).reshape(s, n_tokens, h, d)
    out = torch.empty(s, n_tokens, h, d, dtype=TORCH_DTYPES[geometry.dtype], device=body.device)
    if not rotated:
        return torch.mul(values, scales, out=out)  # float32 product, rounded once into the cache's dtype
    return out.copy_(rotate(values.mul_(scales)))  # rounded once into the cache's dtype


def _flags(values: torch.Tensor, geometry: Geometry, first: bool) -> int:
    return ROTATED | TOKEN_SCALED | (SINK if first else 0)


def _decode(body: torch.Tensor, geometry: Geometry, n_tokens: int, flags: int) -> torch.Tensor:
    if flags & TOKEN_SCALED:
        return _decode_fp8(body, geometry, n_tokens, flags)
    return _decode_fp8_per_channel(body, geometry, n_tokens, rotated=bool(flags & ROTATED))


CODEC = LossyCodec("fp8", _flags, _encode_fp8, _decode)
