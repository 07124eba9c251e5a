"""The agent client: finds the longest cached prefix of a token sequence on the edges, streams it,
verifies every frame's BLAKE3 digest, writes frames straight into preallocated per-layer tensors and
hands back a transformers DynamicCache, so generation continues exactly as after a local prefill.

```python
from kvcdn.client import KVClient, generate_from_cache
from kvcdn.model.loading import load_model
from kvcdn.model.prompt import document_ids, question_ids

model = load_model("smollm2-135m")
doc = document_ids(model.tokenizer, text)
async with KVClient(["127.0.0.1:7080"]) as client:
    fetched = await client.fetch(model, doc)           # FetchedCache: .cache(), .cached_tokens, ...
answer = generate_from_cache(model, fetched, doc + question_ids(model.tokenizer, "Who?"), 24)
```
`BlockingKVClient` offers the same calls without asyncio.

The names below load on first use, so the command line can register the client's commands without
importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from kvcdn.wire.stub import CacheReader

if TYPE_CHECKING:
    from kvcdn.client.api import FetchedCache, KVClient, generate_from_cache
    from kvcdn.client.blocking import BlockingKVClient
    from kvcdn.client.config import ClientConfig

__all__ = [
    "BlockingKVClient",
    "CacheReader",
    "ClientConfig",
    "FetchedCache",
    "KVClient",
    "generate_from_cache",
]


_HOMES = {"BlockingKVClient": "blocking", "ClientConfig": "config"}


def __getattr__(name: str) -> Any:
    if name in __all__:
        return getattr(importlib.import_module(f"kvcdn.client.{_HOMES.get(name, 'api')}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
