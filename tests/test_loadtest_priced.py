"""`kvcdn loadtest priced` against real processes: several agents with grants of their own load
several publishers' priced documents through two edges, and the three accounts of those loads agree
exactly: the receipts the agents got, the ledger's postings (every transaction balanced, each
publisher credited its prices less the fee), and the bytes the edges counted going out; settled in
SQLite and in PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from kvcdn.cli import main
from kvcdn.loadtest.priced import PricedConfig, price_of, run_priced
from kvcdn.model.loading import LoadedModel
from kvcdn.model.options import ModelOptions


def test_a_priced_load_test_ends_with_ledger_receipts_and_edge_counters_equal(
    tiny_dirs: dict[str, Path], llama: LoadedModel, ledger_url: str
) -> None:
    options = ModelOptions(str(tiny_dirs["llama"]), "float32", "cpu")
    config = PricedConfig(edges=2, agents=3, publishers=2, documents=3, loads=9, tokens=120, ledger=ledger_url)
    run = run_priced(config, options, model=llama)
    assert run.problems == [] and run.flags == 0
    # What each load should cost, from the signed manifests' prices and the documents' lengths:
    expected = {}
    for _, doc in run.loads:
        price, tokens = price_of(doc, 2), run.manifests[doc].token_count
        expected[price.pay_to] = expected.get(price.pay_to, 0) + price.per_load + price.per_token * tokens
    assert sum(r.price for r in run.receipts) == run.charged == sum(expected.values())
    fees = run.balances[("network:fees", "USDC")]
    for payee, gross in expected.items():  # each publisher credited its prices less the 5% fee
        assert run.balances[(f"publisher:{payee}", "USDC")] == gross - sum(
            r.price * 500 // 10_000 for r in run.receipts if r.publisher == payee
        )
    assert sum(run.balances.values()) == 0 and fees > 0
    agents = {a for a, _ in run.loads}
    assert {a for a, _ in run.balances if a.startswith("agent:")} == {f"agent:{a}" for a in agents}
    receipted = sum(r.bytes for r in run.receipts)
    assert receipted == run.ledger_bytes == sum(c.charged_bytes for c in run.counters)
    assert receipted == sum(c.payload_bytes for c in run.counters)  # every byte served was paid for
    assert run.ledger_receipts == len(run.receipts) == sum(r.signed for r in run.reconciliation)


def test_the_priced_command_refuses_impossible_settings(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["loadtest", "priced", "--publishers", "3", "--documents", "2"]) == 2
    assert "every publisher needs a document" in capsys.readouterr().err
