"""The heap an edge frees goes back to the system (kvcdn.tuning)."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import textwrap

import pytest

from kvcdn import tuning


def test_a_trimmed_heap_gives_freed_blocks_back() -> None:
    # In a process of its own: the thresholds are process-wide. 200 blocks of 1 MiB in the heap (the
    # raised mmap threshold), every other one freed: the raised trim threshold keeps them mapped.
    script = textwrap.dedent(
        """
        import psutil
        from kvcdn.tuning import trim_heap, tune_malloc
        assert tune_malloc()
        rss = lambda: psutil.Process().memory_info().rss >> 20
        blocks = [bytearray(b"x" * (1 << 20)) for _ in range(200)]
        del blocks[::2]
        kept = rss()
        assert trim_heap()
        print(kept, rss())
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    kept, trimmed = map(int, out.stdout.split())
    assert kept - trimmed >= 80, (kept, trimmed)  # ~100 MiB freed, given back


def test_the_heap_is_trimmed_only_after_frees(monkeypatch: pytest.MonkeyPatch) -> None:
    trims: list[int] = []
    frees = [0]
    monkeypatch.setattr(tuning, "trim_heap", lambda: trims.append(frees[0]) or True)

    async def main() -> None:
        task = asyncio.create_task(tuning.trim_after_frees(lambda: frees[0], every_s=0.02))
        await asyncio.sleep(0.1)  # nothing freed: no trim
        assert trims == []
        frees[0] = 5
        await asyncio.sleep(0.1)  # one trim for the change, none while nothing more is freed
        task.cancel()
        assert trims == [5]

    asyncio.run(main())
