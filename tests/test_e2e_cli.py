"""End to end through the real CLI on the embedded SmolLM2: `up`, `publish`, `fetch`, `ask --verify`."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator

import pytest

from tests.conftest import SAMPLES

pytestmark = pytest.mark.e2e

KVCDN = [sys.executable, "-m", "kvcdn"]


def _run(*args: str, timeout_s: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*KVCDN, *args], capture_output=True, text=True, timeout=timeout_s)


@pytest.fixture(scope="module")
def cluster() -> Iterator[tuple[str, str, str]]:
    proc = subprocess.Popen(
        [*KVCDN, "up", "--edges", "1"], stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    )
    origin = edges = edge_metrics = ""
    exported: dict[str, str] = {}
    deadline = time.monotonic() + 300
    try:
        assert proc.stdout is not None
        while time.monotonic() < deadline and "KVCDN_TOKEN_FILE" not in exported:
            line = proc.stdout.readline()
            if not line:
                break
            if line.startswith("origin"):
                origin = line.split()[1]
            if line.startswith("edge0"):
                edge_metrics = line.split("metrics")[1].split()[0]
            if line.startswith("export "):
                name, _, value = line.removeprefix("export ").split("#")[0].strip().partition("=")
                exported[name] = value
        edges = exported.get("KVCDN_EDGES", "")
        assert origin and edges, "kvcdn up did not print its addresses"
        assert edge_metrics.startswith("http://127.0.0.1:")
        # Not signed in: the control plane refuses; then every command uses what `kvcdn up` printed.
        refused = _run("publish", "--origin", origin, str(SAMPLES / "apache-2.0.txt"))
        assert refused.returncode != 0 and "UNAUTHENTICATED" in refused.stderr
        os.environ.update({k: exported[k] for k in ("KVCDN_TRUST", "KVCDN_TOKEN_FILE")})
        yield origin, edges, edge_metrics
    finally:
        for name in ("KVCDN_TRUST", "KVCDN_TOKEN_FILE"):
            os.environ.pop(name, None)
        proc.send_signal(signal.SIGINT)
        try:
            assert proc.wait(timeout=30) == 0
            for address in (origin, *edges.split(",")):  # every child process is gone with it
                if address:
                    host, _, port = address.rpartition(":")
                    with pytest.raises(ConnectionRefusedError):
                        socket.create_connection((host, int(port)), timeout=5).close()
        finally:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            assert proc.stdout is not None
            proc.stdout.close()


def test_publish_then_ask_verify_is_token_exact(cluster: tuple[str, str, str]) -> None:
    origin, edges, edge_metrics = cluster
    doc = str(SAMPLES / "apache-2.0.txt")
    published = _run("publish", "--origin", origin, doc)
    assert published.returncode == 0, published.stderr
    assert "apache-2.0" in published.stdout

    fetched = _run("fetch", "--edges", edges, "--doc", doc, "--json")
    assert fetched.returncode == 0, fetched.stderr
    stats = json.loads(fetched.stdout)
    assert stats["cached_tokens"] == stats["doc_tokens"] > 2000
    # offered and fetched lossless by default: fewer bytes than SmolLM2's float32 KV (46,080 per token)
    assert stats["codec"] == "lossless" and 0.7 < stats["bytes"] / (stats["cached_tokens"] * 46080) < 0.95

    asked = _run(
        "ask",
        "--edges",
        edges,
        "--doc",
        doc,
        "--question",
        "What is this license called?",
        "--verify",
        "--json",
    )
    assert asked.returncode == 0, asked.stderr
    result = json.loads(asked.stdout)
    for field in (
        "answer",
        "new_tokens",
        "matched_tokens",
        "max_abs_logit_diff",
        "cached_tokens",
        "fetch_s",
        "prefill_s",
    ):
        assert field in result
    assert result["new_tokens"] > 0
    assert result["matched_tokens"] == result["new_tokens"]
    assert result["max_abs_logit_diff"] <= 1e-3
    assert result["cached_tokens"] == stats["doc_tokens"]
    # exactness, defined: (a) the KV is this agent's own prefill bit for bit, so (b) its two-pass run
    # continues identically; (c) the one-pass run agrees too in float32 on a CPU
    assert result["kv_bit_identical"] is True and result["two_pass_matched_tokens"] == result["new_tokens"]
    assert result["codec"] == "lossless" and result["exact"] and result["wire_bytes"] < result["cache_bytes"]
    # fetch or prefill: on this CPU fetching is far faster, and the client says what it predicted
    assert result["decision"] == "fetch" and result["predicted_fetch_s"] < result["predicted_prefill_s"]

    # A lossy encoding only for an agent that asks for it, and then reported as such, never as exact.
    assert _run("publish", "--origin", origin, "--codecs", "lossless,fp8", doc).returncode == 0
    question = ["--question", "Who?", "--verify", "--json"]
    lossy = _run("ask", "--edges", edges, "--doc", doc, "--codecs", "fp8,raw", *question)
    assert lossy.returncode == 0, lossy.stderr
    answer = json.loads(lossy.stdout)
    assert answer["codec"] == "fp8" and not answer["exact"] and answer["kv_bit_identical"] is False
    assert 2 * answer["wire_bytes"] < answer["cache_bytes"]  # fp8 of float32: about a quarter

    # The edge pulled each block from the origin once per encoding (lossless, fp8), whatever the
    # agents asked for since.
    with urllib.request.urlopen(edge_metrics, timeout=5) as resp:
        metrics = resp.read().decode()
    blocks = -(-stats["doc_tokens"] // 256)
    assert f'kvcdn_edge_block_loads_total{{source="origin"}} {float(2 * blocks)}' in metrics
    table = _run("stats", "--edges", edges)
    assert table.returncode == 0, table.stderr
    assert edges.split(",")[0] in table.stdout and "hit ratio" in table.stdout

    purged = _run("purge", "--origin", origin, "apache-2.0")  # both versions, every encoding
    assert purged.returncode == 0 and "blocks removed" in purged.stdout, purged.stderr
    for _ in range(50):  # the edge applies the invalidation feed within moments
        gone = _run("fetch", "--edges", edges, "--doc", doc)
        if gone.returncode == 1:
            break
    assert gone.returncode == 1 and "not cached" in gone.stderr


def test_cli_reports_bad_input_with_status_and_exit_code(cluster: tuple[str, str, str]) -> None:
    _, edges, _ = cluster
    missing = _run("ask", "--edges", edges, "--doc", "/nonexistent.txt", "--question", "?")
    assert missing.returncode == 2 and "INVALID_ARGUMENT" in missing.stderr
    unreachable = _run("publish", "--origin", "127.0.0.1:1", str(SAMPLES / "apache-2.0.txt"))
    assert unreachable.returncode == 2 and "UNAVAILABLE" in unreachable.stderr
