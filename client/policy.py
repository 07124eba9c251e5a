"""Fetch or prefill: an agent should fetch a cache only when that is faster than computing it.

The client keeps moving estimates (`Estimates`) of the bandwidth its fetches reach, per codec and
device (decoding bounds a fetch as much as the network: fp8 decodes at ~0.4 GB/s per CPU core where
raw bytes land at 2-3 GB/s), and of the prefill rate of each model on its device, and predicts for a
sequence whose first `cached_tokens` tokens are on the edges:

    fetch   = cached bytes / bandwidth  +  (tokens - cached_tokens) / prefill rate
    prefill = tokens / prefill rate

(the tokens after the sequence, such as a question, cost the same either way). `decide` picks the
smaller under `policy="auto"`, or does what `fetch` / `prefill` says; without both estimates it
fetches. The client assumes a bandwidth for a codec and device until it has measured one there
(`ClientConfig.assumed_gbps`) and measures a model's prefill rate on a short prefill before its first
auto decision.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from kvcdn.errors import InvalidArgument

__all__ = ["POLICIES", "Decision", "Estimates", "Policy", "decide", "fetch_key"]

Policy = Literal["auto", "fetch", "prefill"]
POLICIES: tuple[Policy, ...] = ("auto", "fetch", "prefill")


def fetch_key(codec: str, device: str) -> str:
    """What a fetch rate is kept by: the blocks' codec (empty: raw) and the device they land on."""
    return f"{codec or 'raw'} to {device}"


@dataclass
class Estimates:
    """Exponentially weighted moving estimates, updated after each measured fetch and prefill."""

    weight: float = 0.3
    """Weight of the newest measurement."""
    fetch_bytes_per_s: dict[str, float] = field(default_factory=dict)
    """Bytes (as sent) per second a fetch reaches, lookup, decode and rebuild included, by `fetch_key`."""
    prefill_tokens_per_s: dict[str, float] = field(default_factory=dict)
    """Tokens per second of a local prefill, by model (fingerprint and device)."""

    def _blend(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.weight) * old + self.weight * new

    def observe_fetch(self, key: str, n_bytes: int, seconds: float) -> None:
        if n_bytes > 0 and seconds > 0:
            self.fetch_bytes_per_s[key] = self._blend(self.fetch_bytes_per_s.get(key), n_bytes / seconds)

    def observe_prefill(self, model_key: str, n_tokens: int, seconds: float) -> None:
        if n_tokens > 0 and seconds > 0:
            rate = self._blend(self.prefill_tokens_per_s.get(model_key), n_tokens / seconds)
            self.prefill_tokens_per_s[model_key] = rate


@dataclass(frozen=True)
class Decision:
    """What a prepared cache came from, and the predictions behind it."""

    policy: Policy
    action: Literal["fetch", "prefill"]
    """fetch: the cached prefix was fetched (the rest is prefilled); prefill: nothing was fetched."""
    predicted_fetch_s: float | None
    """Fetching the cached prefix plus prefilling the rest, by the estimates (None: not predictable)."""
    predicted_prefill_s: float | None
    """Prefilling the whole sequence, by the estimates (None: no prefill rate measured)."""


def decide(
    policy: Policy,
    *,
    tokens: int,
    cached_tokens: int,
    cached_bytes: int,
    fetch_bytes_per_s: float | None,
    prefill_tokens_per_s: float | None,
) -> Decision:
    """Fetch or prefill a sequence of `tokens` whose first `cached_tokens` (`cached_bytes` of KV) the
    edges hold."""
    if policy not in POLICIES:
        raise InvalidArgument(f"policy {policy!r} is not one of {', '.join(POLICIES)}")
    prefill_s = tokens / prefill_tokens_per_s if prefill_tokens_per_s else None
    fetch_s = None
    if fetch_bytes_per_s and prefill_tokens_per_s:
        fetch_s = cached_bytes / fetch_bytes_per_s + (tokens - cached_tokens) / prefill_tokens_per_s
    if cached_tokens == 0:
        action: Literal["fetch", "prefill"] = "prefill"  # nothing to fetch
    elif policy == "auto":
        action = "prefill" if fetch_s is not None and prefill_s is not None and prefill_s < fetch_s else "fetch"
    else:
        action = policy
    return Decision(policy, action, fetch_s, prefill_s)
