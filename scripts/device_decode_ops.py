"""The torch ops a lossy fetch dispatches while its blocks land where they are decoded with torch ops
(kvcdn.model.receiving.DecodingAssembler's device path, run here on the CPU): on a GPU each is a
kernel launch or a view made under the GIL that the receiving threads share. A Qwen3-4B-shaped cache
(36 layers, 8 KV heads of 128, bf16) in 15 blocks, 16 tokens each (the count does not depend on the
block's length), the last one short. Prints, per codec, the ops dispatched by the blocks' `block_done`
calls. Against the code before the batches (commit 514e5c7), side by side:
    git worktree add /tmp/old 514e5c7
    PYTHONPATH=/tmp/old .venv/bin/python scripts/device_decode_ops.py
    .venv/bin/python scripts/device_decode_ops.py
"""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from kvcdn.model.codecs import encode
from kvcdn.model.receiving import DecodingAssembler, KVAssembler
from kvcdn.spec.geometry import Geometry
from kvcdn.v1 import kvcdn_pb2 as pb

try:
    from kvcdn.model.staging import StagingPool
except ImportError:  # before StagingPool had a module of its own
    from kvcdn.model.receiving import StagingPool  # type: ignore[attr-defined,no-redef]


class _Count(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.ops = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        self.ops += 1
        return func(*args, **(kwargs or {}))


def main() -> None:
    g = Geometry(layers=36, kv_heads=8, head_dim=128, dtype="bfloat16", block_tokens=16)
    n_tokens = 14 * 16 + 12
    lengths = [min(16, n_tokens - s) for s in range(0, n_tokens, 16)]
    for codec in ("int8", "fp8", "int4"):
        torch.manual_seed(0)
        blocks = []
        for i, n in enumerate(lengths):
            values = torch.randn(2 * g.layers, n, g.kv_heads, g.head_dim).to(torch.bfloat16)
            blocks.append(encode(codec, g, n, values.view(torch.uint8).numpy().tobytes(), first=i == 0))
        infos = [
            pb.BlockInfo(index=i, n_tokens=n, n_bytes=len(b), codec=codec)
            for i, (n, b) in enumerate(zip(lengths, blocks, strict=True))
        ]
        staged = KVAssembler(g, n_tokens, torch.device("cpu"), StagingPool(pin=False), host_staging=False)
        target = DecodingAssembler(staged, infos, on_device=True)
        for info, data in zip(infos, blocks, strict=True):
            target.write(info.index * g.block_tokens, info.n_tokens, 0, memoryview(data))
        with _Count() as count:
            for info in infos:
                target.block_done(info.index * g.block_tokens, info.n_tokens)
        target.layers()
        print(f"{codec}: {len(blocks)} blocks, {count.ops} torch ops in their block_done calls")


if __name__ == "__main__":
    main()
