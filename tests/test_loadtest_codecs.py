"""`kvcdn loadtest codecs` on a tiny model: real encodings, real model runs, figures that must hold
for exact codecs (no timing assertions)."""

from __future__ import annotations

import json
from pathlib import Path

from rich.console import Console

from kvcdn.loadtest.codecs import CodecsConfig, measure_codecs, render, run_codecs
from kvcdn.model.loading import LoadedModel


def test_exact_codecs_agree_fully_and_lossy_ones_are_measured(llama: LoadedModel) -> None:
    rows = measure_codecs(llama, CodecsConfig(tokens=80, new_tokens=6), Console(quiet=True))
    by = {r.codec: r for r in rows}
    assert set(by) == {"raw", "lossless", "fp8", "int4"} and all(r.documents == 3 for r in rows)
    for name in ("raw", "lossless"):  # bit-exact: the same answers, the same distributions
        r = by[name]
        assert r.exact and r.greedy_agreement == r.top1_agreement == 1.0 and r.kl == 0.0 and r.max_logit_diff == 0
    assert by["raw"].ratio == 1.0 and by["lossless"].ratio > 1.0
    assert by["fp8"].ratio > 3 and by["int4"].ratio > 5  # float32 caches, short blocks: scales weigh more
    for name in ("fp8", "int4"):
        r = by[name]
        assert not r.exact and 0 <= r.greedy_agreement <= 1 and 0 < r.top1_agreement <= 1 and r.kl >= 0
        assert r.encode_gbps > 0 and r.decode_gbps > 0
    table = render(rows, "codecs", markdown=True)
    assert isinstance(table, str) and table.count("\n| ") == 5


def test_run_codecs_writes_the_report_for_economics(llama: LoadedModel, tmp_path: Path) -> None:
    report = tmp_path / "codecs.json"
    config = CodecsConfig(dtypes=("float32",), tokens=40, new_tokens=3, markdown=True, json_path=report)
    assert run_codecs(config, lambda dtype: llama) == 0
    rows = json.loads(report.read_text())["rows"]
    assert [r["codec"] for r in rows] == ["raw", "lossless", "fp8", "int4"]
    assert all(r["ratio_vs_bf16"] > 0 for r in rows)
