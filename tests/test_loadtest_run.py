"""The live load test: its Zipf generator, a short bounded run against an in-process network of two
edges (errors, digests, tiers and egress read from the edges' metrics, the report files), and the
bridge that prices the run's traffic."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from kvcdn.cli import main
from kvcdn.edge import EdgeConfig, start_edge
from kvcdn.errors import InvalidArgument
from kvcdn.loadtest.run import LoadConfig, Zipf, publish_corpus, run_load, summarize, write_report
from kvcdn.model.loading import LoadedModel
from kvcdn.ops.launcher import Cluster
from tests.conftest import Network, start_network, stop_network


def small_run(net: Network, *more_edges: str, **settings: float) -> LoadConfig:
    """A short run's config on a tiny network: 2 documents of 40-60 tokens unless `settings` say otherwise."""
    defaults: dict[str, float] = {"agents": 2, "documents": 2, "min_tokens": 40, "max_tokens": 60}
    values = defaults | settings
    return LoadConfig(
        edges=(net.edge_address, *more_edges),
        origin=net.origin_server.address,
        agents=int(values.pop("agents")),
        documents=int(values.pop("documents")),
        min_tokens=int(values.pop("min_tokens")),
        max_tokens=int(values.pop("max_tokens")),
        max_fetches=int(values.pop("max_fetches", 0)),
        **values,
    )


def test_zipf_probabilities_follow_the_power_law_and_samples_follow_them() -> None:
    z = Zipf(10, 1.0, seed=7)
    assert sum(z.probabilities) == pytest.approx(1.0)
    assert z.probabilities[0] / z.probabilities[1] == pytest.approx(2.0)
    assert z.probabilities[0] / z.probabilities[9] == pytest.approx(10.0)
    draws = Counter(z.sample() for _ in range(40_000))
    for k in range(10):
        assert draws[k] / 40_000 == pytest.approx(z.probabilities[k], abs=0.01)
    a, b = Zipf(10, 1.0, seed=3), Zipf(10, 1.0, seed=3)
    assert [a.sample() for _ in range(100)] == [b.sample() for _ in range(100)]


def test_zipf_zero_is_uniform_and_bad_parameters_are_refused() -> None:
    assert Zipf(4, 0.0, seed=1).probabilities == [0.25] * 4
    assert {Zipf(1, 2.0, seed=1).sample() for _ in range(10)} == {0}
    with pytest.raises(InvalidArgument):
        Zipf(0, 1.0, seed=1)
    with pytest.raises(InvalidArgument):
        Zipf(3, -1.0, seed=1)


def test_load_config_refuses_unbounded_or_empty_runs() -> None:
    with pytest.raises(InvalidArgument, match="--duration"):
        LoadConfig(edges=("a:1",), origin="o:1", duration_s=0)
    with pytest.raises(InvalidArgument, match="--tokens"):
        LoadConfig(edges=("a:1",), origin="o:1", min_tokens=100, max_tokens=10)
    with pytest.raises(InvalidArgument, match="--agents"):
        LoadConfig(edges=("a:1",), origin="o:1", agents=0)


async def test_short_live_run_reports_clean_fetches_tiers_and_egress(
    llama: LoadedModel, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    net = await start_network(llama, tmp_path / "store", metrics=True)
    edge2, server2 = await start_edge(
        EdgeConfig(origin=net.origin_server.address, listen="127.0.0.1:0", metrics_port=0)
    )
    try:
        config = small_run(net, server2.address, agents=6, documents=4, max_tokens=150, duration_s=20, max_fetches=60)
        ids = await publish_corpus(llama, config)
        assert len({tuple(x) for x in ids}) == 4  # distinct documents
        assert all(40 <= len(x) <= 150 for x in ids)
        ticks: list[int] = []
        result = await run_load(llama, config, ids, lambda samples, t, n: ticks.append(len(samples)))
        report = summarize(result)
        assert report["fetches_ok"] == 60 and report["fetches_failed"] == 0  # bounded by max_fetches
        assert report["digest_failures"] == 0 and report["errors_by_code"] == {}
        assert report["tokens_fetched"] == sum(len(ids[d]) * n for d, n in report["fetches_by_document"].items())
        assert ticks and ticks[-1] == 60
        e = report["edges"]
        assert e["read_from_metrics"]
        token_bytes = llama.geometry.token_bytes
        # the payload bytes the edges sent are exactly the bytes the agents verified
        assert e["bytes_served"] == report["bytes_fetched"]
        # every block crossed from the origin at most once per edge, and the popular ones were hits
        corpus_bytes = sum(len(x) for x in ids) * token_bytes
        assert 0 < e["bytes_from_origin"] <= 2 * corpus_bytes
        assert e["memory_hit_ratio"] > 0.5
        assert e["disk_hit_ratio"] == 0  # these edges have no disk tier
        assert e["peer_ratio"] == 0  # these edges do not know the ring
        assert e["memory_hit_ratio"] + e["origin_ratio"] + e["coalesced_ratio"] == pytest.approx(1.0)
        # every block crossed from the origin at least once and at most once per edge (single-flight:
        # agents missing the same block together joined one load instead of each making one)
        n_blocks = sum(-(-len(x) // llama.geometry.block_tokens) for x in ids)
        assert n_blocks <= e["origin_fetches"] <= 2 * n_blocks
        assert report["first_frame_s"]["p50"] <= report["complete_s"]["p50"]

        paths = write_report(result, tmp_path / "report")
        saved = json.loads(paths["json"].read_text())
        assert saved["fetches_ok"] == 60 and saved["geometry"]["layers"] == llama.geometry.layers
        assert "| fetches ok / failed | 60 / 0 |" in paths["markdown"].read_text()
        assert paths["png"].read_bytes()[:4] == b"\x89PNG"

        # the bridge: the run's own bytes and hit ratio priced by the cost model
        assert main(["loadtest", "economics", "--from-run", str(paths["json"]), "--json"]) == 0
        priced = json.loads(capsys.readouterr().out)
        assert priced["inputs"]["agents"] == 60
        assert priced["inputs"]["geometry"]["layers"] == llama.geometry.layers
        assert priced["measured"]["edge_to_agent_gb"] == pytest.approx(e["bytes_served"] / 1e9)
        assert priced["inputs"]["hit_ratio"] == pytest.approx(1 - e["bytes_from_origin"] / e["bytes_served"])
    finally:
        await server2.stop(0)
        await edge2.close()
        await stop_network(net)


async def test_open_loop_run_stops_at_its_duration(llama: LoadedModel, tmp_path: Path) -> None:
    net = await start_network(llama, tmp_path / "store")
    try:
        config = small_run(net, duration_s=1.5, rate=40.0)
        ids = await publish_corpus(llama, config)
        result = await run_load(llama, config, ids)
        report = summarize(result)
        assert 1.5 <= result.wall_s < 10
        assert report["fetches_ok"] > 5 and report["fetches_failed"] == 0
        assert not report["edges"]["read_from_metrics"]  # this network exports no metrics: said, not invented
    finally:
        await stop_network(net)


def test_from_run_refuses_a_file_that_is_not_a_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    bad = tmp_path / "x.json"
    bad.write_text('{"hello": 1}')
    assert main(["loadtest", "economics", "--from-run", str(bad)]) == 2
    assert "not a `kvcdn loadtest run` report" in capsys.readouterr().err


def test_run_and_network_commands_against_real_processes(
    tiny_dirs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    model_args = ["--model", str(tiny_dirs["llama"]), "--dtype", "float32", "--device", "cpu"]
    with Cluster(store_dir=tmp_path / "store", edges=2, origin_args=model_args, start_timeout_s=120) as cluster:
        rc = main(
            [
                "loadtest",
                "run",
                "--edges",
                ",".join(cluster.edge_addresses),
                "--origin",
                cluster.origin_address,
                *("--agents", "4", "--documents", "3", "--tokens", "40:120", "--duration", "20"),
                *("--max-fetches", "30", "--report-dir", str(tmp_path / "report"), *model_args),
            ]
        )
    assert rc == 0
    report = json.loads((tmp_path / "report" / "report.json").read_text())
    assert report["fetches_ok"] == 30 and report["edges"]["read_from_metrics"]
    assert "| fetches ok / failed | 30 / 0 |" in capsys.readouterr().out

    rc = main(
        [
            *("loadtest", "network", "--agents", "20", "--herd-tokens", "100", "--documents", "4"),
            *("--zipf-agents", "4", "--duration", "2", "--mem-bytes", "200KiB", "--disk-bytes", "1MiB"),
            *("--pull-tokens", "300", "--pull-repeats", "2", "--markdown", *model_args),
        ]
    )
    out = capsys.readouterr().out
    assert rc == 0
    assert "| caches complete and verified | 20/20 |" in out
    assert "| origin block transfers (edges' metrics) | 1 |" in out  # 100 tokens: one block, pulled once
    assert "object 4x the tier" in out and "INCOMPLETE" not in out
    # part 4: two cold documents after the warm-up ones, along each path, every cache complete
    [grpc_row] = [line for line in out.splitlines() if line.startswith("| edge loads over gRPC")]
    assert len(grpc_row.split("|")[2].split(",")) == 2 and "| caches complete | yes |" in out
    assert "median gRPC / median bulk" in out and "edge CPU s a fetch" in out


async def test_failed_fetches_are_counted_by_code_and_the_run_goes_on(
    llama: LoadedModel, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kvcdn.client.api import KVClient
    from kvcdn.errors import Unavailable

    net = await start_network(llama, tmp_path / "store")
    try:
        config = small_run(net, agents=1, max_fetches=9)
        ids = await publish_corpus(llama, config)
        real = KVClient.fetch
        calls = 0

        async def flaky(self: KVClient, model: LoadedModel, doc: list[int]) -> object:
            nonlocal calls
            calls += 1
            if calls % 3 == 1:
                raise Unavailable("edge went away")
            if calls % 3 == 2:
                raise RuntimeError("a bug")
            return await real(self, model, doc)

        monkeypatch.setattr(KVClient, "fetch", flaky)
        report = summarize(await run_load(llama, config, ids))
        assert report["fetches_ok"] == 3 and report["fetches_failed"] == 6
        assert report["errors_by_code"] == {"UNAVAILABLE": 3, "RuntimeError": 3}
        assert report["digest_failures"] == 0
    finally:
        await stop_network(net)
