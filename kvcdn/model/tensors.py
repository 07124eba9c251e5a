"""KV tensors <-> block payloads (kvcdn.spec.geometry has the layout): the origin cuts blocks out of a
prefill (`block_payload`); receivers write streamed frames into tensors with kvcdn.model.receiving."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from kvcdn.spec.geometry import Geometry

__all__ = ["TORCH_DTYPES", "LayerKV", "bit_identical", "block_payload", "synchronize", "u8"]

TORCH_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
"""The torch dtype of each kvcdn.spec.geometry.DTYPES name."""

_CudaStream: Any = torch.cuda.Stream  # partly annotated in torch
_CudaEvent: Any = torch.cuda.Event

LayerKV = tuple[torch.Tensor, torch.Tensor]
"""One layer's (keys, values), each `[batch=1, kv_heads, tokens, head_dim]`."""


def bit_identical(layers: list[LayerKV], reference: list[LayerKV]) -> bool:
    """Whether `layers` equal the first tokens of `reference` (as many as they hold), bit for bit."""
    if len(layers) != len(reference):
        return False
    n = layers[0][0].shape[2] if layers else 0
    return all(
        torch.equal(k, rk[:, :, :n]) and torch.equal(v, rv[:, :, :n])
        for (k, v), (rk, rv) in zip(layers, reference, strict=True)
    )


def synchronize(device: torch.device) -> None:
    """Wait until the work queued on `device` has run: CUDA kernels and non-blocking copies return
    before they finish, so every timing that involves a GPU ends here."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def u8(t: torch.Tensor) -> np.ndarray:
    """A flat uint8 numpy view of a contiguous CPU tensor (works for bfloat16, which numpy lacks)."""
    return t.reshape(-1).view(torch.uint8).numpy()


def block_payload(geometry: Geometry, layers: list[LayerKV], start: int, end: int) -> bytes:
    """The payload of the block holding tokens [start, end) of a prefilled cache."""
    n = end - start
    seg = geometry.segment_bytes(n)
    out = np.empty(geometry.block_bytes(n), dtype=np.uint8)
    pos = 0
    for keys, values in layers:
        for tensor in (keys, values):
            rows = tensor[0, :, start:end, :].transpose(0, 1).contiguous().cpu()
            out[pos : pos + seg] = u8(rows)
            pos += seg
    return out.tobytes()
