"""The benchmark's pieces on a tiny model: it measures real fetches and renders them (no timing
assertions: figures are printed, never asserted)."""

from __future__ import annotations

import dataclasses
import json
import signal
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from rich.console import Console

from kvcdn.cli import main
from kvcdn.client.config import ClientConfig
from kvcdn.loadtest.baseline import RawTCP, blake3_gbps, cpu_seconds, raw_tcp_gbps, verified_bound
from kvcdn.loadtest.bench import BenchConfig, measure, text_of_length
from kvcdn.loadtest.bench_report import crossover, print_report, render, render_costs
from kvcdn.model.prompt import document_ids
from kvcdn.wire.tls import TLSFiles, make_test_ca
from tests.conftest import SAMPLES, Network


def _stream_of(n_bytes: int) -> bytes:
    """The bytes the raw sender's stream holds: byte i is i % 256."""
    return (bytes(range(256)) * (n_bytes // 256 + 1))[:n_bytes]


def test_raw_tcp_baseline_moves_every_byte_it_times() -> None:
    # Odd sizes exercise the last partial chunk; three connections at once receive parts of whole
    # MiB, the last one short. What landed is compared here, apart from the baseline's own check.
    with RawTCP() as tcp:
        for n_bytes, streams in (((3 << 20) + 12345, 1), ((3 << 20) + 777, 3)):
            assert tcp.seconds(n_bytes, streams) > 0 and tcp.receiver_cpu_s > 0
            assert bytes(tcp._sink) == _stream_of(n_bytes)
        tcp.close()  # a sender that is gone: the transfer fails, it is never timed as if it had run
        with pytest.raises(ConnectionError):
            tcp.seconds(1 << 20)


def test_raw_baseline_over_tls_moves_every_byte_and_needs_the_client_certificate(tmp_path: Path) -> None:
    pki = make_test_ca(tmp_path, ["127.0.0.1"])
    server = TLSFiles(pki["server"], pki["server_key"], pki["ca"])
    client = TLSFiles(pki["client"], pki["client_key"], pki["ca"])
    with RawTCP((server, client)) as tcp:
        assert tcp.seconds((2 << 20) + 777, streams=2) > 0
        assert bytes(tcp._sink) == _stream_of((2 << 20) + 777)
    with pytest.raises(ssl.SSLError):  # a real mutual-TLS transfer: no client certificate, no bytes
        raw_tcp_gbps(1 << 20, repeats=1, tls=(server, TLSFiles(ca=pki["ca"])))


def test_cpu_seconds_counts_what_another_process_ran() -> None:
    spin = "import time\nt = time.process_time()\nwhile time.process_time() - t < 0.3: pass\n"
    with subprocess.Popen([sys.executable, "-c", spin + "input()"], stdin=subprocess.PIPE) as proc:
        before = cpu_seconds([proc.pid])
        time.sleep(1.0)  # it spins 0.3 s of CPU, then waits for input
        spent = cpu_seconds([proc.pid]) - before
        proc.communicate(b"\n", timeout=10)
    assert 0.2 <= spent < 1.0


@pytest.mark.skipif(sys.platform != "linux", reason="elsewhere the bench reads psutil's 10 ms ticks")
def test_cpu_seconds_of_another_process_are_finer_than_the_ticks() -> None:
    """A 4 ms burst reads 4 ms, not the 0 or 10 ms of 10 ms ticks (an edge's share of a short fetch)."""
    burst = "t = time.process_time()\nwhile time.process_time() - t < 0.004: pass\n"
    child = f"import sys, time\nprint(flush=True)\ninput()\n{burst}print(flush=True)\ninput()\n"
    with subprocess.Popen([sys.executable, "-c", child], stdin=subprocess.PIPE, stdout=subprocess.PIPE) as proc:
        assert proc.stdin is not None and proc.stdout is not None
        proc.stdout.readline()  # started: its start-up is not counted
        before = cpu_seconds([proc.pid])
        proc.stdin.write(b"\n")
        proc.stdin.flush()
        proc.stdout.readline()  # burst done
        spent = cpu_seconds([proc.pid]) - before
        proc.communicate(b"\n", timeout=10)
    assert 0.004 <= spent < 0.008


def test_the_verified_bound_is_receive_then_hash_on_one_core() -> None:
    assert verified_bound(4.0, 4.0) == 2.0 and verified_bound(3.0, 6.0) == 2.0
    assert 0.01 < blake3_gbps(4 << 20, 1 << 20, repeats=2) < 1000


def test_text_of_length_hits_the_requested_token_count(network: Network) -> None:
    corpus = (SAMPLES / "gpl-3.0.txt").read_text()
    for n in (40, 300):
        assert len(document_ids(network.model.tokenizer, text_of_length(network.model, corpus, n))) == n
    short = corpus[:2000]  # a document longer than its corpus: the corpus over again
    n = 3 * len(network.model.tokenizer(short, add_special_tokens=False)["input_ids"])
    text = text_of_length(network.model, short, n)
    assert len(document_ids(network.model.tokenizer, text)) == n and text.count(short[:200]) == 3


async def test_measure_fetches_every_length_exactly_and_renders_a_table(network: Network) -> None:
    model = network.model
    corpus = (SAMPLES / "gpl-3.0.txt").read_text()
    texts = [text_of_length(model, corpus, n) for n in (64, 200)]
    config = ClientConfig((network.edge_address,))
    rows = await measure(model, network.origin_server.address, config, texts, 2, Console(quiet=True))
    assert [r.tokens for r in rows] == [64, 200]
    assert all(r.matched and r.two_pass_matched and r.kv_identical for r in rows)  # float32 on a CPU: all three
    assert [r.cache_bytes for r in rows] == [n * model.geometry.token_bytes for n in (64, 200)]
    table = render(rows, "bench", markdown=True)
    assert isinstance(table, str) and table.count("\n| ") == 3 and "fetch/bound" in table
    assert all(r.streams == 1 and r.bound_gbps < min(r.raw_gbps, r.hash_gbps) for r in rows)  # one edge
    # Where the time went: this process's CPU during each fetch and during the raw transfer after it,
    # the sender's in its own process; the edge runs in this process here (no edge processes given).
    assert all(r.client_cpu_s > 0 and r.raw_receiver_cpu_s > 0 and r.raw_sender_cpu_s >= 0 for r in rows)
    assert all(0 < r.receive_busy <= 1.5 and r.edges_cpu_s == 0 and r.copy_s == 0 for r in rows)
    fast, slow = ([dataclasses.replace(r, fetch_s=r.prefill_s * f, codec="raw") for r in rows] for f in (0.5, 2.0))
    assert crossover(fast) == "raw: fetch beats prefill at every measured length (64, 200 tokens)."
    assert crossover(slow) == "raw: prefill beats fetch at every measured length (64, 200 tokens)."
    assert crossover([slow[0], fast[1]]) == "raw: fetch beats prefill from 200 tokens on (of 64, 200)."
    assert crossover(fast[:1] + slow[1:]).startswith("raw: fetch beats prefill at 64 tokens but not at the longest")
    assert crossover([*fast, dataclasses.replace(slow[0], codec="int8")]).count(";") == 1  # one clause per codec
    costs = render_costs(rows, "costs", markdown=True)
    assert isinstance(costs, str) and costs.count("\n| ") == 3 and "client / that" in costs


async def test_measure_each_codec_fetches_the_same_document_in_every_codec(
    network: Network, capsys: pytest.CaptureFixture[str]
) -> None:
    model = network.model
    text = text_of_length(model, (SAMPLES / "gpl-3.0.txt").read_text(), 200)
    config = ClientConfig((network.edge_address,), codecs=("int8", "raw", "lossless"))
    rows = await measure(model, network.origin_server.address, config, [text], 1, Console(quiet=True), each_codec=True)
    assert [(r.tokens, r.codec) for r in rows] == [(200, "int8"), (200, "raw"), (200, "lossless")]
    int8, raw, lossless = rows
    assert raw.kv_identical and lossless.kv_identical and not int8.kv_identical  # lossy: close, not equal
    assert raw.wire_bytes == raw.cache_bytes > lossless.wire_bytes > int8.wire_bytes
    assert len({r.prefill_s for r in rows}) == 1  # one local prefill a document, shared by its rows
    assert int8.encode_gbps > 0 and lossless.encode_gbps > 0 and raw.encode_gbps == 0  # the origin's encoders
    logged = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in logged] == ["200 tokens int8", "200 tokens raw", "200 tokens lossless"]
    print_report(rows, BenchConfig((200,), markdown=True, codecs=config.codecs, each_codec=True), model, Console())
    printed = capsys.readouterr().out
    titles = [line for line in printed.splitlines() if line.startswith("kvcdn bench:")]
    assert [t.rsplit("; ", 1)[1] for t in titles] == ["int8", "raw", "lossless"]  # a table per codec
    assert printed.count("\n| 200 | ") == 3 + 3  # a row in each, and each in the costs table
    assert "| encode GB/s |" in printed and "| first frame s | landing s |" in printed


def test_bench_on_random_weights_of_a_real_shape_over_two_edges(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """What a GPU owner runs on a bare machine (`--geometry`, nothing downloaded), here on the CPU."""
    report = tmp_path / "bench.json"
    argv = ["loadtest", "bench", "--geometry", "smollm2-135m", "--edges", "2", "--lengths", "300", "--markdown"]
    assert main([*argv, "--repeats", "1", "--dtype", "float32", "--device", "cpu", "--json", str(report)]) == 0
    out = capsys.readouterr().out
    assert "random:smollm2-135m" in out and "2 warm edges" in out and "break-even GB/s" in out
    assert "Where the time went" in out and "edges CPU s/GB" in out
    [row] = json.loads(report.read_text())["rows"]
    assert row["edges_cpu_s"] >= 0 and row["client_cpu_s"] > 0  # the edge processes' CPU (in ticks), and ours
    assert row["tokens"] == 300 and row["matched"] and row["cache_bytes"] == 300 * 46080  # SmolLM2's fp32 KV
    assert row["streams"] == 2  # its 2 blocks, one from each edge (both own both: spread evens them out)
    # the default: offered and fetched lossless, so fewer bytes travelled than the cache holds
    assert row["codec"] == "lossless" and row["kv_identical"] and 0 < row["wire_bytes"] < row["cache_bytes"]


def test_bench_refuses_an_unknown_geometry(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["loadtest", "bench", "--geometry", "gpt-7"])
    assert "invalid choice" in capsys.readouterr().err


def test_a_bench_stopped_by_sigterm_reports_its_rows_and_stops_its_cluster(tmp_path: Path) -> None:
    """As `timeout` stops a bench in `make gpu-check`: the rows measured by then are printed and
    saved, the origin and edge processes are stopped with it, and the exit status says it stopped."""
    import psutil

    report = tmp_path / "bench.json"
    argv = ["loadtest", "bench", "--geometry", "smollm2-135m", "--codecs", "raw", "--lengths", "64,30000"]
    argv += ["--repeats", "1", "--dtype", "float32", "--device", "cpu", "--markdown", "--json", str(report)]
    with subprocess.Popen(
        [sys.executable, "-m", "kvcdn", *argv], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    ) as proc:
        watchdog = threading.Timer(240, proc.kill)  # a bench that never logs its first row fails, not hangs
        watchdog.start()
        try:
            assert proc.stderr is not None
            for line in proc.stderr:  # the first row is logged; the 30,000-token prefill takes minutes here
                if line.startswith("64 tokens raw: fetch"):
                    break
            children = psutil.Process(proc.pid).children(recursive=True)
            assert len(children) >= 2  # the origin and the edge
            proc.send_signal(signal.SIGTERM)
            out, _ = proc.communicate(timeout=120)
        finally:
            watchdog.cancel()
    assert proc.returncode == 1
    assert "\n| 64 | " in out and "| 30000 |" not in out and "Where the time went" in out
    assert "Stopped by SIGTERM after 1 row(s)" in out
    saved = json.loads(report.read_text())
    assert saved["stopped"] == "SIGTERM" and [r["tokens"] for r in saved["rows"]] == [64]
    assert not [c for c in children if c.is_running() and c.status() != psutil.STATUS_ZOMBIE]
