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
    common = {"tokens": 1000, "cached_tokens": 1000, "cached_bytes": 10**9}
    slow_link = decide("auto", **common, fetch_bytes_per_s=1e8, prefill_seconds=lambda n: n / 1e4)  # 10 s vs 0.1 s
    assert slow_link.action == "prefill" and slow_link.predicted_fetch_s == pytest.approx(10.0)
    assert slow_link.predicted_prefill_s == pytest.approx(0.1)
    fast_link = decide("auto", **common, fetch_bytes_per_s=1e10, prefill_seconds=lambda n: n / 1e3)  # 0.1 s vs 1 s
    assert fast_link.action == "fetch"


def test_a_partly_cached_sequence_counts_the_prefill_of_its_rest() -> None:
    d = decide(
        "auto",
        tokens=1000,
        cached_tokens=500,
        cached_bytes=500,
        fetch_bytes_per_s=1e6,
        prefill_seconds=lambda n: n / 1e3,
    )
    assert d.predicted_fetch_s == pytest.approx(0.0005 + 0.5) and d.predicted_prefill_s == pytest.approx(1.0)
    assert d.action == "fetch"


def test_forced_policies_and_missing_estimates() -> None:
    kw = {"tokens": 10, "cached_tokens": 10, "cached_bytes": 10**9, "fetch_bytes_per_s": 1.0}
    assert decide("fetch", **kw, prefill_seconds=lambda n: n / 1e9).action == "fetch"
    assert decide("prefill", **kw, prefill_seconds=lambda n: n / 1.0).action == "prefill"
    unknown = decide("auto", **kw, prefill_seconds=lambda n: None)
    assert unknown.action == "fetch" and unknown.predicted_prefill_s is None and unknown.predicted_fetch_s is None
    nothing = decide(
        "fetch", tokens=10, cached_tokens=0, cached_bytes=0, fetch_bytes_per_s=1.0, prefill_seconds=lambda n: n / 1
    )
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
    e.observe_prefill("m", 10, 0.0)  # a zero-time measurement is no measurement
    assert "m" not in e.prefill_s


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
        cached_bytes=10**8,
        fetch_bytes_per_s=1e10,
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
        await client.fetch(model, doc)  # a fast edge, measured
        client.estimates.observe_prefill(model.device_key, 10, 10.0)  # and a model that prefills 1 token/s
        prepared = await client.prepare(model, doc)
        assert prepared.decision is not None and prepared.decision.action == "fetch"
        assert prepared.cached_tokens == len(doc)
