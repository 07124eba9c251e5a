"""The egress simulator's cost model: the preprint's figures, monotonicity, break-even points, inputs
from a model directory and from a bench report, sweeps and the command's errors."""

from __future__ import annotations

import csv
import json
import math
from dataclasses import asdict, replace
from pathlib import Path

import pytest

from kvcdn.cli import main
from kvcdn.errors import InvalidArgument
from kvcdn.loadtest.economics import PAPER, Inputs, ReuseCurve, costs, geometry_from, paper_figures, sweep, verdict
from kvcdn.loadtest.economics_report import curve_from_bench, write_sweep
from kvcdn.loadtest.market import market
from kvcdn.model.loading import LoadedModel


def test_paper_preset_reproduces_every_published_figure_within_two_percent() -> None:
    figures = {f.name: f for f in paper_figures()}
    assert len(figures) == 8
    for f in figures.values():
        assert f.rel_diff <= 0.02, f
    # and the ones computed rather than given really come out of the model
    assert figures["re-prefill, 80M agents"].ours == pytest.approx(80e6 * 3774 * 5e-6)
    assert figures["egress of one load / its prefill"].ours == pytest.approx(0.54 * 0.09 / (3774 * 5e-6))


def test_paper_command_prints_both_columns_and_exits_zero(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["loadtest", "economics", "--paper", "--markdown"]) == 0
    out = capsys.readouterr().out
    assert "| re-prefill, 80M agents | $1.500M | $1.510M | 0.6% | yes |" in out
    assert "NO" not in out
    assert "cheapest placement: provider-hosted." in out


def test_costs_grow_with_what_they_are_priced_by() -> None:
    base = PAPER
    for field, values in (("agents", [1e3, 1e6, 1e9]), ("tokens", [256, 4096, 32768])):
        totals = [{k: c.total for k, c in costs(replace(base, **{field: v})).items()} for v in values]
        for name in totals[0]:
            assert totals[0][name] < totals[1][name] < totals[2][name], (field, name)
    edge = [costs(replace(base, edge_egress_usd_per_gb=p))["edge"].total for p in (0.0, 0.01, 0.1)]
    assert edge[0] < edge[1] < edge[2]
    squeezed = [costs(replace(base, compression=c))["edge"].total for c in (1.0, 2.0, 8.0)]
    assert squeezed[0] > squeezed[1] > squeezed[2]
    # reuse never costs more than re-prefill once more than a couple of loads share the publish
    many = costs(base)
    assert many["provider-hosted"].total < many["re-prefill"].total


def test_break_even_egress_price_and_compression_are_where_the_costs_cross() -> None:
    v = verdict(PAPER)
    at = replace(PAPER, edge_egress_usd_per_gb=v.break_even_egress_usd_per_gb)
    c = costs(at)
    assert c["edge"].total == pytest.approx(c["re-prefill"].total, rel=1e-9)
    below = costs(replace(at, edge_egress_usd_per_gb=v.break_even_egress_usd_per_gb * 0.9))
    assert below["edge"].total < below["re-prefill"].total
    needed = replace(PAPER, compression=v.compression_needed)
    c = costs(needed)
    assert c["edge"].total == pytest.approx(c["re-prefill"].total, rel=1e-9)
    # Qwen3-4B at the paper's prices: shipping loses, as the paper says, and hosting wins
    assert 0.02 < v.break_even_egress_usd_per_gb < 0.09
    assert v.best == "provider-hosted"
    assert v.break_even_loads == pytest.approx(49.7 / 48.7, rel=1e-3)


def test_client_placement_wins_over_edge_when_agents_reread_the_document() -> None:
    once = costs(replace(PAPER, loads_per_agent=1))
    often = costs(replace(PAPER, loads_per_agent=50))
    assert once["edge"].total < once["client"].total  # client copies cost storage for nothing
    assert often["client"].total < often["edge"].total  # one download serves 50 loads


def test_no_compression_helps_when_reuse_compute_alone_costs_more() -> None:
    # a 2-token document, reuse barely cheaper: publishing + reuse of 1 load costs more than 1 prefill
    tiny = replace(PAPER, agents=1, tokens=2, reuse=ReuseCurve(((2, 1.01),), "test"))
    assert math.isinf(verdict(tiny).compression_needed)


def test_reuse_curve_passes_through_its_points_and_grows_between_them() -> None:
    curve = ReuseCurve(((3774, 49.7), (255, 8.6)), "test")
    assert curve.at(255) == pytest.approx(8.6)
    assert curve.at(3774) == pytest.approx(49.7)
    assert 8.6 < curve.at(1000) < 49.7
    assert curve.at(8000) > 49.7
    assert ReuseCurve(((100, 5.0),), "flat").at(10_000) == 5.0
    with pytest.raises(InvalidArgument):
        ReuseCurve(((100, 0.5),), "reuse dearer than prefill")


def test_geometry_of_a_model_directory_matches_the_loaded_model(llama: LoadedModel, tiny_dirs: dict[str, Path]) -> None:
    g = geometry_from(str(tiny_dirs["llama"]), "float32")
    assert g.token_bytes == llama.geometry.token_bytes
    assert geometry_from("qwen3-4b", "float16").token_bytes == 147_456
    with pytest.raises(InvalidArgument, match="neither one of"):
        geometry_from("/nonexistent", "float16")


def test_bad_inputs_are_refused_with_the_flag_to_fix() -> None:
    with pytest.raises(InvalidArgument, match="hit ratio"):
        Inputs(hit_ratio=1.5)
    with pytest.raises(InvalidArgument, match="compression"):
        Inputs(compression=0.5)


def test_command_errors_exit_2_with_a_sentence(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["loadtest", "economics", "--gpu-usd-per-hour", "2.5"]) == 2
    assert "--prefill-tokens-per-s" in capsys.readouterr().err
    assert main(["loadtest", "economics", "--hit-ratio", "2"]) == 2
    assert "hit ratio" in capsys.readouterr().err


def test_gpu_hour_pricing_and_json_output(capsys: pytest.CaptureFixture[str]) -> None:
    # $3.6/h at 10,000 tokens/s = $0.1 per M tokens
    args = ["loadtest", "economics", "--gpu-usd-per-hour", "3.6", "--prefill-tokens-per-s", "10000", "--json"]
    assert main([*args, "--agents", "2k"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["inputs"]["prefill_usd_per_mtok"] == pytest.approx(0.1)
    assert out["inputs"]["agents"] == 2000
    assert out["costs"]["re-prefill"]["total"] == pytest.approx(2000 * 3774 * 0.1e-6)


def test_bench_report_feeds_the_reuse_curve(tmp_path: Path) -> None:
    report = tmp_path / "bench.json"
    rows = [{"tokens": 256, "prefill_s": 0.3, "fetch_s": 0.01}, {"tokens": 4096, "prefill_s": 8.0, "fetch_s": 0.1}]
    report.write_text(json.dumps({"rows": rows}))
    curve = curve_from_bench(report)
    assert curve.at(256) == pytest.approx(30.0)
    assert curve.at(4096) == pytest.approx(80.0)
    report.write_text("{}")
    with pytest.raises(InvalidArgument, match="loadtest bench --json"):
        curve_from_bench(report)


def test_sweeps_write_a_csv_and_a_png(tmp_path: Path) -> None:
    label, rows = sweep(PAPER, "egress-price")
    assert "egress" in label
    edge = [r["edge"] for r in rows]
    assert edge == sorted(edge)
    csv_path, png_path = write_sweep(PAPER, "compression", tmp_path)
    with csv_path.open() as f:
        table = list(csv.DictReader(f))
    assert len(table) == len(sweep(PAPER, "compression")[1])
    assert set(table[0]) == {"x", "re-prefill", "provider-hosted", "edge", "client"}
    assert png_path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(InvalidArgument, match="--sweep takes"):
        sweep(PAPER, "colour")


def _codecs_report(path: Path, ratios: dict[str, float], dtype: str = "bfloat16") -> None:
    from kvcdn.loadtest.codecs import REFERENCE, CodecRow  # the report's own row type: the format cannot drift

    rows = [
        CodecRow(
            name,
            dtype,
            name in ("raw", "lossless"),
            r,
            r,
            1.0,
            1.0,
            *((1.0, 3) if r < 2 else (0.6, 1)),
            0.99,
            0.0,
            0.0,
            3,
            963,
        )
        for name, r in ratios.items()
    ]
    rows.append(CodecRow(REFERENCE, dtype, False, 1.0, 1.0, 0.0, 0.0, 1.0, 3, 0.99, 0.0, 0.0, 3, 963, reference=True))
    path.write_text(json.dumps({"model": "m", "rows": [asdict(r) for r in rows]}))


def test_a_codecs_report_prices_every_codec_and_names_the_one_that_pays(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    report = tmp_path / "codecs.json"
    _codecs_report(report, {"raw": 1.0, "lossless": 1.45, "fp8": 1.97, "int4": 3.66})
    assert main(["loadtest", "economics", "--paper", "--codecs-report", str(report), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    rows = {r["codec"]: r for r in out["codecs"]}
    assert list(rows) == ["raw", "lossless", "fp8", "int4"]  # the 1-ulp noise reference is not priced
    needed = verdict(replace(PAPER, compression=1.0)).compression_needed
    for r in rows.values():  # a codec pays exactly when its ratio reaches the compression needed
        assert r["shipping_pays"] == (r["ratio"] >= needed)
    assert rows["raw"]["edge_total_usd"] == pytest.approx(costs(replace(PAPER, compression=1.0))["edge"].total)
    prices = [r["break_even_egress_usd_per_gb"] for r in rows.values()]
    assert prices == sorted(prices) and prices[-1] > 0.09 > prices[0]
    assert "int4" in out["codecs_verdict"] and "no exact codec pays" in out["codecs_verdict"]

    assert main(["loadtest", "economics", "--codecs-report", str(report), "--markdown"]) == 0
    text = capsys.readouterr().out
    assert "codecs measured (bfloat16)" in text and "| int4 | no | 3.66x |" in text


def test_a_bad_codecs_report_is_a_sentence(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    report = tmp_path / "codecs.json"
    report.write_text("{}")
    assert main(["loadtest", "economics", "--codecs-report", str(report)]) == 2
    assert "not a `kvcdn loadtest codecs --json` report" in capsys.readouterr().err
    _codecs_report(report, {"raw": 1.0}, dtype="bfloat16")
    assert main(["loadtest", "economics", "--codecs-report", str(report), "--dtype", "float32"]) == 2
    assert "--dtypes float32" in capsys.readouterr().err


def test_selling_per_load_splits_the_money_and_every_party_adds_up(capsys: pytest.CaptureFixture[str]) -> None:
    i = replace(PAPER, agents=1000, price_per_load_usd=0.005, network_fee_bps=500)
    m = market(i)
    reuse = i.prefill_usd / i.reuse_ratio
    assert m.agent_saving_per_load == pytest.approx(i.prefill_usd - 0.005 - reuse)
    assert m.publisher_revenue + m.network_revenue == pytest.approx(1000 * 0.005)  # the price, split
    assert m.network_revenue == pytest.approx(1000 * 0.005 * 0.05)
    assert m.publisher_net == pytest.approx(m.publisher_revenue - i.prefill_usd)
    assert m.payback_loads * 0.005 * 0.95 == pytest.approx(i.prefill_usd)
    edge = costs(i)["edge"]
    assert m.network_cost == pytest.approx(edge.origin_egress + edge.edge_egress + edge.storage)
    assert m.network_floor_price * 0.05 * 1000 == pytest.approx(m.network_cost)  # the fee then covers the costs
    # Above the max price an agent is better off prefilling, and is told so.
    dear = replace(i, price_per_load_usd=m.max_price * 1.01)
    assert market(dear).agent_saving_per_load < 0
    assert any("no agent should buy" in s for s in market(dear).sentences(dear))
    assert market(replace(i, network_fee_bps=0)).network_floor_price == math.inf
    with pytest.raises(InvalidArgument, match="network fee"):
        Inputs(price_per_load_usd=0.01, network_fee_bps=20_000)
    assert main(["loadtest", "economics", "--agents", "1000", "--price-per-load", "0.005", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["market"]["price"] == 0.005 and out["market"]["network_revenue"] == pytest.approx(0.25)
    assert main(["loadtest", "economics", "--agents", "1000", "--price-per-load", "0.005", "--markdown"]) == 0
    text = capsys.readouterr().out
    assert "selling the cache at $0.005 a load" in text and "the publisher earns" in text
