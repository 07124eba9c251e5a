"""BlockingKVClient: KVClient's calls for code without an event loop."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from types import TracebackType
from typing import Any

from kvcdn.client.api import FetchedCache, KVClient
from kvcdn.client.config import ClientConfig
from kvcdn.client.policy import Policy
from kvcdn.model.loading import LoadedModel
from kvcdn.v1 import kvcdn_pb2 as pb

__all__ = ["BlockingKVClient"]


class BlockingKVClient:
    """KVClient for code without an event loop; owns a private loop."""

    def __init__(self, edges: Sequence[str] | ClientConfig) -> None:
        self._loop = asyncio.new_event_loop()
        self._client = self._run(self._make(edges))

    @staticmethod
    async def _make(edges: Sequence[str] | ClientConfig) -> KVClient:
        return KVClient(edges)

    def _run(self, coro: Any) -> Any:
        return self._loop.run_until_complete(coro)

    def info(self) -> pb.ServerInfo:
        info: pb.ServerInfo = self._run(self._client.info())
        return info

    def lookup(self, model: LoadedModel, ids: Sequence[int], codecs: Sequence[str] | None = None) -> list[pb.BlockInfo]:
        blocks: list[pb.BlockInfo] = self._run(self._client.lookup(model, ids, codecs))
        return blocks

    def fetch(self, model: LoadedModel, ids: Sequence[int], codecs: Sequence[str] | None = None) -> FetchedCache:
        fetched: FetchedCache = self._run(self._client.fetch(model, ids, codecs))
        return fetched

    def prepare(
        self, model: LoadedModel, ids: Sequence[int], policy: Policy = "auto", codecs: Sequence[str] | None = None
    ) -> FetchedCache:
        prepared: FetchedCache = self._run(self._client.prepare(model, ids, policy, codecs))
        return prepared

    def close(self) -> None:
        self._run(self._client.close())
        self._loop.close()

    def __enter__(self) -> BlockingKVClient:
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.close()
