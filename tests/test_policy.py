"""Fetch or prefill: the client fetches a cache only when that is predicted faster than computing it."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Sequence
from typing import Any

import pytest

from kvcdn.client import KVClient
from kvcdn.client.policy import Estimates, decide, fetch_key
from kvcdn.errors import InvalidArgument
from kvcdn.model.prompt import document_ids
from tests.conftest import Network


def test_auto_picks_whichever_is_predicted_faster() -> None:
    common = {"tokens": 1000, "cached_tokens": 1000}
    slow_link = decide("auto", **common, cached_fetch_s=10.0, prefill_seconds=lambda n: n / 1e4)  # 10 s vs 0.1 s
    assert slow_link.action == "prefill" and slow_link.predicted_fetch_s == pytest.approx(10.0)
    assert slow_link.predicted_prefill_s == pytest.approx(0.1)
    fast_link = decide("auto", **common, cached_fetch_s=0.1, prefill_seconds=lambda n: n / 1e3)  # 0.1 s vs 1 s
    assert fast_link.action == "fetch"


def test_a_partly_cached_sequence_counts_the_prefill_of_its_rest() -> None:
    d = decide(
        "auto",
        tokens=1000,
        cached_tokens=500,
        cached_fetch_s=0.0005,
        prefill_seconds=lambda n: n / 1e3,
    )
    assert d.predicted_fetch_s == pytest.approx(0.0005 + 0.5) and d.predicted_prefill_s == pytest.approx(1.0)
    assert d.action == "fetch"


def test_forced_policies_and_missing_estimates() -> None:
    kw = {"tokens": 10, "cached_tokens": 10, "cached_fetch_s": 10.0**9}
    assert decide("fetch", **kw, prefill_seconds=lambda n: n / 1e9).action == "fetch"
    assert decide("prefill", **kw, prefill_seconds=lambda n: n / 1.0).action == "prefill"
    unknown = decide("auto", **kw, prefill_seconds=lambda n: None)
    assert unknown.action == "fetch" and unknown.predicted_prefill_s is None and unknown.predicted_fetch_s is None
    unknown_fetch = decide("auto", tokens=10, cached_tokens=10, cached_fetch_s=None, prefill_seconds=lambda n: 1e-9)
    assert unknown_fetch.action == "fetch" and unknown_fetch.predicted_fetch_s is None
    nothing = decide("fetch", tokens=10, cached_tokens=0, cached_fetch_s=0.0, prefill_seconds=lambda n: n / 1)
    assert nothing.action == "prefill"  # nothing is cached: there is nothing to fetch
    with pytest.raises(InvalidArgument, match="policy"):
        decide("sometimes", **kw, prefill_seconds=lambda n: n / 1.0)  # type: ignore[arg-type]


def test_estimates_move_toward_new_measurements_per_codec_and_device() -> None:
    e = Estimates(weight=0.5)
    raw, fp8 = fetch_key("", "cpu"), fetch_key("fp8", "cpu")
    assert raw == fetch_key("raw", "cpu") != fetch_key("raw", "cuda:0") and raw != fp8
    e.observe_fetch(raw, 100, 1.0)
    e.observe_fetch(raw, 300, 1.0)
    e.observe_fetch(fp8, 10, 1.0)  # a codec that decodes slowly does not drag the others' estimate
    assert e.fetch_bytes_per_s == {raw: 200, fp8: 10}
    assert e.fetch_fixed_s == {raw: 0.0, fp8: 0.0}  # none was said
    e.observe_prefill("m", 10, 0.0)  # a zero-time measurement is no measurement
    assert "m" not in e.prefill_s


def test_a_short_fetch_pays_the_fixed_part_that_a_rate_alone_would_hide() -> None:
    """Qwen3-4B's geometry (147 KB a token), a GPU-like fetch: 3,774 tokens in 0.081 s, 6 ms of it to
    the first frame and to a ready cache, and an illustrative 0.024 s prefill of 1,024 tokens. One rate
    over the whole fetch (6.9 GB/s) predicts a 1,024-token fetch at 0.022 s, under that prefill; the
    fixed part plus the streamed bytes predict 0.026 s."""
    e = Estimates()
    key = fetch_key("", "cuda:0")
    token_bytes = 147_456
    assert e.fetch_seconds(key, 10**9, 1e9) == pytest.approx(1.0)  # nothing measured: the assumed rate
    e.observe_fetch(key, 3774 * token_bytes, 0.081, fixed_s=0.006)
    assert e.fetch_fixed_s[key] == pytest.approx(0.006)
    assert e.fetch_bytes_per_s[key] == pytest.approx(3774 * token_bytes / 0.075)
    short = e.fetch_seconds(key, 1024 * token_bytes, 1e9)
    assert short == pytest.approx(0.006 + 0.075 * 1024 / 3774)
    one_rate = 1024 * token_bytes / (3774 * token_bytes / 0.081)
    prefill = {1024: 0.024, 3774: 0.082}
    d = decide("auto", tokens=1024, cached_tokens=1024, cached_fetch_s=short, prefill_seconds=prefill.get)
    assert one_rate < 0.024 < short and d.action == "prefill"
    long = e.fetch_seconds(key, 3774 * token_bytes, 1e9)
    d = decide("auto", tokens=3774, cached_tokens=3774, cached_fetch_s=long, prefill_seconds=prefill.get)
    assert d.action == "fetch"
    # a fetch that was mostly its fixed part moves the fixed part, not the rate (a few frames in a millisecond)
    e.observe_fetch(key, 10**6, 0.010, fixed_s=0.009)
    assert e.fetch_bytes_per_s[key] == pytest.approx(3774 * token_bytes / 0.075)
    assert e.fetch_fixed_s[key] == pytest.approx(0.7 * 0.006 + 0.3 * 0.009)
    e.observe_fetch(key, 10**6, 0.010, fixed_s=0.5)  # a fixed part longer than the fetch is the fetch
    assert e.fetch_fixed_s[key] == pytest.approx(0.7 * (0.7 * 0.006 + 0.3 * 0.009) + 0.3 * 0.010)


def test_prefill_time_is_read_off_the_measured_lengths_not_one_rate() -> None:
    e = Estimates()
    assert e.prefill_seconds("m", 100) is None
    e.observe_prefill("m", 1000, 2.0)
    assert e.prefill_seconds("m", 500) == pytest.approx(1.0)  # one measurement: in proportion
    # Qwen3-4B on an H200: 0.026 s for 1,024 tokens, 0.082 s for 3,774 (a fixed part, then per token)
    e.observe_prefill("gpu", 1024, 0.026)
    e.observe_prefill("gpu", 3774, 0.082)
    assert e.prefill_seconds("gpu", 2000) == pytest.approx(0.026 + 976 * 0.056 / 2750)  # between: the line
    assert e.prefill_seconds("gpu", 14383) == pytest.approx(0.026 + 13359 * 0.056 / 2750)  # beyond: extended
    assert e.prefill_seconds("gpu", 512) == pytest.approx(0.026 - 512 * 0.056 / 2750)  # below, along it
    e.observe_prefill("steep", 1000, 1.0)
    e.observe_prefill("steep", 2000, 3.0)
    assert e.prefill_seconds("steep", 100) == pytest.approx(0.1)  # the line falls below zero: the floor
    e.observe_prefill("noisy", 100, 1.0)
    e.observe_prefill("noisy", 200, 0.5)  # a longer prefill measured faster: never predicted to fall
    assert e.prefill_seconds("noisy", 400) == pytest.approx(0.5)
    # with these estimates a partly cached sequence pays for the prefill of its rest, not a share
    d = decide(
        "auto",
        tokens=3774,
        cached_tokens=2750,
        cached_fetch_s=0.01,
        prefill_seconds=lambda n: e.prefill_seconds("gpu", n),
    )
    assert d.predicted_fetch_s == pytest.approx(0.01 + 0.026)


async def test_calibration_times_two_lengths_after_an_untimed_prefill(network: Network, sample_text: str) -> None:
    model = network.model
    doc = document_ids(model.tokenizer, sample_text)
    async with KVClient([network.edge_address]) as client:
        timed = await client.calibrate(model, doc, lengths=(8, 64, 10**6))
        assert sorted(timed) == [8, 64, len(doc)]  # a length past the sequence is the whole sequence
        assert sorted(client.estimates.prefill_s[model.device_key]) == [8, 64, len(doc)]  # not the warm-up's 16


async def test_auto_prefills_when_the_edge_is_slow_and_fetches_when_it_is_fast(
    network: Network, sample_text: str
) -> None:
    model = network.model
    await network.origin.publish("doc", sample_text)
    doc = document_ids(model.tokenizer, sample_text)
    real = network.edge.stream

    async def slow(
        fp: str, keys: Sequence[bytes], start: int, from_peer: bool = False, **kw: Any
    ) -> AsyncIterator[bytes]:
        async for raw in real(fp, keys, start, from_peer, **kw):
            await asyncio.sleep(0.005)  # a congested edge: 5 ms a 4 KiB frame
            yield raw

    network.edge.stream = slow  # type: ignore[method-assign]
    async with KVClient([network.edge_address]) as client:
        measured = await client.prepare(model, doc, policy="fetch")  # the client learns the edge is slow
        assert measured.cached_tokens == len(doc)
        prepared = await client.prepare(model, doc)  # auto: this tiny model prefills in milliseconds
        assert prepared.decision is not None and prepared.decision.action == "prefill"
        assert prepared.cached_tokens == 0 and prepared.layers == []
        assert prepared.cache(model).get_seq_length() == 0  # an empty cache that generation fills
        d = prepared.decision
        assert d.predicted_prefill_s is not None and d.predicted_fetch_s is not None
        assert d.predicted_prefill_s < d.predicted_fetch_s

    network.edge.stream = real  # type: ignore[method-assign]
    async with KVClient([network.edge_address]) as client:
        fetched = await client.fetch(model, doc)  # a fast edge, measured
        fixed = client.estimates.fetch_fixed_s[fetch_key("", str(model.device))]
        assert fixed == pytest.approx(fetched.first_frame_s + fetched.land_s) and 0 < fixed < fetched.fetch_s
        client.estimates.observe_prefill(model.device_key, 10, 10.0)  # and a model that prefills 1 token/s
        prepared = await client.prepare(model, doc)
        assert prepared.decision is not None and prepared.decision.action == "fetch"
        assert prepared.cached_tokens == len(doc)
