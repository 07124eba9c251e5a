"""Fetch or prefill: an agent should fetch a cache only when that is faster than computing it.

The client keeps moving estimates (`Estimates`) of what its fetches take, per codec and device: a
fixed part (lookup to the first verified frame, last frame to a ready cache) and the bandwidth of the
rest (decoding bounds a fetch as much as the network: fp8 decodes at ~0.4 GB/s per CPU core where raw
bytes land at 2-3 GB/s); a short document's fetch is mostly its fixed part, so one rate measured on
long ones would predict it too fast. It also keeps the seconds a prefill of each model on its device
takes, by length: a prefill's time is not proportional to its length (on a GPU a short one is bound by kernel
launches: Qwen3-4B on an H200 took 0.026 s for 1,024 tokens and 0.082 s for 3,774, 3.7x the tokens in
3.2x the time), so it is read off the measured lengths, piecewise linear and extended along the
nearest segment. For a sequence whose first `cached_tokens` tokens are on the edges it predicts

    fetch   = fixed  +  cached bytes / bandwidth  +  prefill(tokens - cached_tokens)
    prefill = prefill(tokens)

(the tokens after the sequence, such as a question, cost the same either way). `decide` picks the
smaller under `policy="auto"`, or does what `fetch` / `prefill` says; without both estimates it
fetches. The client assumes a bandwidth for a codec and device until it has measured one there
(`ClientConfig.assumed_gbps`), and before its first auto decision for a model times two prefills of
the sequence's first 256 and 1,024 tokens after an untimed one (the first call pays for kernel
selection and allocations, which a serving agent has long paid for).
"""

from __future__ import annotations

import bisect
from collections.abc import Callable
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
    """Bytes (as sent) per second a fetch streams, decoded and rebuilt, past its fixed part, by `fetch_key`."""
    fetch_fixed_s: dict[str, float] = field(default_factory=dict)
    """Seconds of a fetch that do not grow with its bytes (lookup to the first verified frame, last
    frame to a ready cache), by `fetch_key`."""
    prefill_s: dict[str, dict[int, float]] = field(default_factory=dict)
    """Seconds of a local prefill, by model (fingerprint and device), then by length in tokens."""

    def _blend(self, old: float | None, new: float) -> float:
        return new if old is None else (1 - self.weight) * old + self.weight * new

    def observe_fetch(self, key: str, n_bytes: int, seconds: float, fixed_s: float = 0.0) -> None:
        """A fetch of `n_bytes` in `seconds`, `fixed_s` of them its fixed part. Its rate counts only
        when streaming was at least half of it: a fetch that was mostly its fixed part says little of
        the bandwidth (a few frames in a millisecond)."""
        if n_bytes <= 0 or seconds <= 0:
            return
        fixed_s = min(max(fixed_s, 0.0), seconds)
        self.fetch_fixed_s[key] = self._blend(self.fetch_fixed_s.get(key), fixed_s)
        if seconds - fixed_s >= seconds / 2:
            rate = n_bytes / (seconds - fixed_s)
            self.fetch_bytes_per_s[key] = self._blend(self.fetch_bytes_per_s.get(key), rate)

    def fetch_seconds(self, key: str, n_bytes: int, assumed_bytes_per_s: float) -> float:
        """The predicted seconds of a fetch of `n_bytes`: its fixed part (none before one is measured)
        plus the bytes at the measured bandwidth (`assumed_bytes_per_s` before one is measured)."""
        return self.fetch_fixed_s.get(key, 0.0) + n_bytes / self.fetch_bytes_per_s.get(key, assumed_bytes_per_s)

    def observe_prefill(self, model_key: str, n_tokens: int, seconds: float) -> None:
        if n_tokens > 0 and seconds > 0:
            points = self.prefill_s.setdefault(model_key, {})
            points[n_tokens] = self._blend(points.get(n_tokens), seconds)

    def prefill_seconds(self, model_key: str, n_tokens: int) -> float | None:
        """The predicted seconds of an n-token prefill (None: none measured): between two measured
        lengths on the line through them, beyond them along the nearest segment (never falling), from
        one measurement in proportion to the length."""
        points = sorted(self.prefill_s.get(model_key, {}).items())
        if not points:
            return None
        if len(points) == 1:
            (n0, s0), (n1, s1) = (0, 0.0), points[0]
        else:
            at = min(max(bisect.bisect_left([n for n, _ in points], n_tokens), 1), len(points) - 1)
            (n0, s0), (n1, s1) = points[at - 1], points[at]
        slope = max(0.0, (s1 - s0) / (n1 - n0))
        if n_tokens >= n1:  # from the longer end: a longer prefill is never predicted faster
            return s1 + slope * (n_tokens - n1)
        first_n, first_s = points[0]
        if n_tokens < first_n:  # shorter than any measured: no less than in proportion to the shortest
            return max(s0 + slope * (n_tokens - n0), first_s * n_tokens / first_n)
        return s0 + slope * (n_tokens - n0)


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
    cached_fetch_s: float | None,
    prefill_seconds: Callable[[int], float | None],
) -> Decision:
    """Fetch or prefill a sequence of `tokens` whose first `cached_tokens` the edges hold, given the
    predicted seconds of fetching those (`Estimates.fetch_seconds`; None: unknown) and of a prefill of
    a number of tokens (None: unknown)."""
    if policy not in POLICIES:
        raise InvalidArgument(f"policy {policy!r} is not one of {', '.join(POLICIES)}")
    prefill_s = prefill_seconds(tokens)
    rest_s = prefill_seconds(tokens - cached_tokens) if tokens > cached_tokens else 0.0
    fetch_s = None
    if cached_fetch_s is not None and prefill_s is not None and rest_s is not None:
        fetch_s = cached_fetch_s + rest_s
    if cached_tokens == 0:
        action: Literal["fetch", "prefill"] = "prefill"  # nothing to fetch
    elif policy == "auto":
        action = "prefill" if fetch_s is not None and prefill_s is not None and prefill_s < fetch_s else "fetch"
    else:
        action = policy
    return Decision(policy, action, fetch_s, prefill_s)
