"""The rotation every lossy codec quantizes in (an orthonormal block-diagonal Walsh-Hadamard matrix,
SPEC.md section 8) and the key shaping that rounds keys where the model's queries hardly look
(docs/architecture.md, codecs)."""

from __future__ import annotations

import functools
from collections.abc import Callable

import torch

from kvcdn.errors import InvalidArgument


def rotation_block(head_dim: int) -> int:
    """Channels fp8 rotates together: the largest power of two dividing head_dim, at most 64 (one
    matrix product of 64 per value: ~35 % more CPU decode time than unrotated, 17 to 23 ms per SmolLM2 block)."""
    return min(64, head_dim & -head_dim)


@functools.cache
def _hadamard(n: int, device: torch.device) -> torch.Tensor:
    """The n x n orthonormal Walsh-Hadamard matrix (Sylvester's; symmetric, its own inverse)."""
    h = torch.ones(1, 1, dtype=torch.float64)
    while h.shape[0] < n:
        h = torch.cat((torch.cat((h, h), 1), torch.cat((h, -h), 1)), 0)
    matrix: torch.Tensor = (h / n**0.5).float().to(device)
    return matrix


def rotate(x: torch.Tensor) -> torch.Tensor:
    """`x` (`[..., head_dim]`, float32) times the block-diagonal Hadamard matrix: the rotation, and its inverse."""
    d = x.shape[-1]
    b = rotation_block(d)
    if b == 1:
        return x
    return torch.matmul(x.reshape(*x.shape[:-1], d // b, b), _hadamard(b, x.device)).reshape(x.shape)


def key_shaping(moments: torch.Tensor) -> torch.Tensor:
    """From query second moments (`adapter.query_moments`, `[layers, kv_heads, D, D]`): the factors
    `encode` rounds keys with, float32 of the same shape. A key's error e moves the score q . k by
    q . e, so it costs e^T M e with M the queries' second moment; in the rotated space (where codes
    live) M' = R M R. Per head, U is the upper Cholesky factor of (M' + 1% of its mean diagonal)^-1:
    the inverse Hessian factor GPTQ carries rounding errors with (over a key's channels here)."""
    rotation = rotate(torch.eye(moments.shape[-1], dtype=torch.float32)).double()
    weighted = rotation @ moments.double() @ rotation
    diagonal = weighted.diagonal(dim1=-2, dim2=-1)
    if not bool(torch.isfinite(weighted).all()) or bool((diagonal < 0).any()):
        raise InvalidArgument("query moments must be finite second moments (non-negative diagonal)")
    damp = (0.01 * diagonal.mean(dim=-1) + 1e-12)[..., None, None] * torch.eye(weighted.shape[-1], dtype=torch.float64)
    inverse = torch.cholesky_inverse(torch.linalg.cholesky(weighted + damp))
    factor: torch.Tensor = torch.linalg.cholesky(inverse, upper=True).float()
    return factor


def shaped(x: torch.Tensor, factor: torch.Tensor, snap: Callable[[torch.Tensor, int], torch.Tensor]) -> torch.Tensor:
    """Rotated keys `x` (`[layers, T, H, D]` float32) moved onto a codec's grid channel by channel:
    `snap(column, i)` puts channel i (`[layers, T, H]`) on its grid, and the error it leaves is
    carried into the channels after it through `factor` (`key_shaping`'s, `[layers, H, D, D]`), so
    the error that remains falls where queries hardly look (GPTQ's rounding, with the queries' second
    moment as Hessian). Encoding the result takes the codes it was snapped to."""
    work = x.clone()
    factor = factor.unsqueeze(1)  # [layers, 1, H, D, D]: the same for every token
    for i in range(x.shape[-1]):
        column = work[..., i]
        snapped = snap(column, i)
        error = (column - snapped).div_(factor[..., i, i])
        work[..., i + 1 :].addcmul_(error.unsqueeze(-1), factor[..., i, i + 1 :], value=-1)
        work[..., i] = snapped
    return work
