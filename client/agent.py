"""What an agent does with a document: fetch its cache, ask a question, and (when asked to verify)
prefill locally and compare. Shared by `kvcdn ask`, `kvcdn demo` and the benchmark."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace

from kvcdn.client.api import KVClient, generate_from_cache
from kvcdn.client.policy import Policy
from kvcdn.model import adapter
from kvcdn.model.loading import LoadedModel
from kvcdn.model.prompt import document_ids, question_ids
from kvcdn.model.tensors import bit_identical
from kvcdn.spec.codecs import CODECS

__all__ = ["AskResult", "ask", "compare"]


@dataclass(frozen=True)
class AskResult:
    answer: str
    new_tokens: int
    """Tokens generated from the fetched cache."""
    doc_tokens: int
    cached_tokens: int
    """Tokens of the document served from the cache (the rest, if any, were prefilled locally)."""
    cache_bytes: int
    """Size of the cached prefix's KV as computed."""
    wire_bytes: int
    """Bytes streamed for it (fewer when it travelled encoded)."""
    fetch_s: float
    """Lookup + stream + verify + rebuild, seconds."""
    generate_s: float
    """Generation from the fetched cache, seconds."""
    kv_bit_identical: bool | None = None
    """With verify, (a): the fetched KV equals, bit for bit, this agent's own prefill of the document
    (same model, dtype and device type); None when nothing was fetched."""
    two_pass_matched_tokens: int | None = None
    """With verify, (b): leading tokens equal to this agent's own two-pass run (prefill the document,
    then continue); all of them whenever (a) holds."""
    matched_tokens: int | None = None
    """With verify, (c): leading tokens equal to a one-pass run over document and question (a statistic:
    in bf16/fp16 on a GPU two passes and one pass are different arithmetic)."""
    max_abs_logit_diff: float | None = None
    """With verify, (c): largest logit difference to the one-pass run over the steps whose inputs matched."""
    prefill_s: float | None = None
    """With verify: seconds of a local prefill of the document alone (what the cache replaces)."""
    decision: str = "fetch"
    """fetch (the cached prefix came from the edges) or prefill (the document was computed here)."""
    predicted_fetch_s: float | None = None
    """What the client predicted fetching would cost (None: not predictable yet)."""
    predicted_prefill_s: float | None = None
    """What the client predicted a local prefill would cost."""
    codec: str = "raw"
    """Encoding the cache travelled in (kvcdn.spec.codecs)."""
    exact: bool = True
    """Whether that encoding is exact; a lossy cache is reported by its agreement, never as exact."""

    @property
    def speedup(self) -> float | None:
        if self.prefill_s is None or self.fetch_s <= 0:
            return None
        return self.prefill_s / self.fetch_s

    def to_json(self) -> dict[str, object]:
        return {**asdict(self), "speedup": self.speedup}


def compare(cached: adapter.Generation, local: adapter.Generation) -> tuple[int, float]:
    """(matched leading tokens, max |logit diff| over every step whose inputs were identical)."""
    matched = 0
    for a, b in zip(cached.tokens, local.tokens, strict=False):
        if a != b:
            break
        matched += 1
    steps = min(matched + 1, len(cached.logits), len(local.logits))
    diff = max((float((cached.logits[i] - local.logits[i]).abs().max()) for i in range(steps)), default=0.0)
    return matched, diff


async def ask(
    client: KVClient,
    model: LoadedModel,
    text: str,
    question: str,
    max_new_tokens: int = 24,
    verify: bool = False,
    policy: Policy = "auto",
    codecs: Sequence[str] | None = None,
) -> AskResult:
    """Answer `question` about `text`, starting from its cache when fetching it is faster than
    prefilling (`policy`, see kvcdn.client.policy), in the first of `codecs` (default: the client's)
    that holds it; with `verify`, also prefill locally and compare."""
    doc = document_ids(model.tokenizer, text)
    ids = doc + question_ids(model.tokenizer, question)
    fetched = await client.prepare(model, doc, policy, codecs)
    decision = fetched.decision
    t0 = time.perf_counter()
    gen = generate_from_cache(model, fetched, ids, max_new_tokens)
    generate_s = time.perf_counter() - t0
    result = AskResult(
        answer=model.tokenizer.decode(gen.tokens, skip_special_tokens=True).strip(),
        new_tokens=len(gen.tokens),
        doc_tokens=len(doc),
        cached_tokens=fetched.cached_tokens,
        cache_bytes=fetched.cached_tokens * model.geometry.token_bytes,
        wire_bytes=fetched.n_bytes,
        fetch_s=fetched.fetch_s,
        generate_s=generate_s,
        decision=decision.action if decision else "fetch",
        predicted_fetch_s=decision.predicted_fetch_s if decision else None,
        predicted_prefill_s=decision.predicted_prefill_s if decision else None,
        codec=fetched.codec,
        exact=CODECS[fetched.codec].exact,
    )
    if not verify:
        return result
    own, prefill_s = adapter.timed_prefill(model.model, doc)
    client.estimates.observe_prefill(model.device_key, len(doc), prefill_s)
    identical = bit_identical(fetched.layers, own) if fetched.cached_tokens else None
    two_pass, _ = compare(gen, adapter.greedy(model.model, ids, max_new_tokens, cache=own))
    matched, diff = compare(gen, adapter.greedy(model.model, ids, max_new_tokens))
    return replace(
        result,
        kv_bit_identical=identical,
        two_pass_matched_tokens=two_pass,
        matched_tokens=matched,
        max_abs_logit_diff=diff,
        prefill_s=prefill_s,
    )
