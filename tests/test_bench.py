"""The benchmark's pieces on a tiny model: it measures real fetches and renders them (no timing
assertions: figures are printed, never asserted)."""

from __future__ import annotations

from rich.console import Console

from kvcdn.loadtest.bench import measure, render, text_of_length
from kvcdn.loadtest.rawtcp import raw_tcp_gbps
from kvcdn.model.prompt import document_ids
from tests.conftest import SAMPLES, Network


def test_raw_tcp_transfer_moves_the_bytes() -> None:
    assert raw_tcp_gbps(3 << 20, repeats=2) > 0


def test_text_of_length_hits_the_requested_token_count(network: Network) -> None:
    corpus = (SAMPLES / "gpl-3.0.txt").read_text()
    for n in (40, 300):
        assert len(document_ids(network.model.tokenizer, text_of_length(network.model, corpus, n))) == n


async def test_measure_fetches_every_length_exactly_and_renders_a_table(network: Network) -> None:
    model = network.model
    corpus = (SAMPLES / "gpl-3.0.txt").read_text()
    texts = [text_of_length(model, corpus, n) for n in (64, 200)]
    rows = await measure(model, network.origin_server.address, [network.edge_address], texts, 2, Console(quiet=True))
    assert [r.tokens for r in rows] == [64, 200]
    assert all(r.matched for r in rows)
    assert [r.cache_bytes for r in rows] == [n * model.geometry.token_bytes for n in (64, 200)]
    table = render(rows, "bench", markdown=True)
    assert isinstance(table, str) and table.count("\n| ") == 3 and "fetch/raw" in table
