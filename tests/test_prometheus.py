"""A real Prometheus (Debian's `prometheus` package) scrapes an origin and two edges: every target is
up, and what it stores reconciles with the traffic: payload bytes the edges served, less what they
served each other, equal the bytes the clients received, and the origin's equal what the edges
loaded from it. Skipped, saying so, where no
`prometheus` binary is installed (`make prometheus-check` installs it on Debian and runs this)."""

from __future__ import annotations

import asyncio
import json
import shutil
import urllib.parse
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from kvcdn.client import KVClient
from kvcdn.model.loading import LoadedModel
from kvcdn.model.prompt import document_ids
from kvcdn.ops.launcher import free_ports
from tests.conftest import SAMPLES, start_network, stop_network
from tests.test_peers import peered_edges

PROMETHEUS = shutil.which("prometheus")
pytestmark = pytest.mark.skipif(PROMETHEUS is None, reason="no prometheus binary (Debian: apt install prometheus)")


async def _get(url: str) -> Any:
    def get() -> Any:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return json.loads(resp.read())

    return await asyncio.to_thread(get)


async def _query(base: str, promql: str) -> float | None:
    body = await _get(f"{base}/api/v1/query?" + urllib.parse.urlencode({"query": promql}))
    result = body["data"]["result"]
    return float(result[0]["value"][1]) if result else None


async def _until(check: Any, timeout_s: float = 40.0) -> Any:
    """Poll `check()` until it returns something truthy (scrapes land every second); `check` may
    leave what it last saw in `check.seen` for the failure message."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    while True:
        try:
            if value := await check():
                return value
        except OSError:
            pass  # Prometheus still starting
        if asyncio.get_running_loop().time() > deadline:
            raise AssertionError(f"Prometheus did not get there in {timeout_s:.0f} s: {getattr(check, 'seen', '')}")
        await asyncio.sleep(0.5)


async def test_prometheus_scrapes_every_server_and_bytes_reconcile(llama: LoadedModel, tmp_path: Path) -> None:
    assert PROMETHEUS is not None
    net = await start_network(llama, tmp_path / "store", metrics=True)
    proc = None
    try:
        # A generous peer timeout: a peer given up on under load would have served bytes nobody kept.
        async with peered_edges(net.origin_server.address, n=2, peer_timeout_s=30.0, metrics=True) as (
            edges,
            _ring,
            servers,
        ):
            origin_target = net.origin_server.metrics_url.split("/")[2]
            edge_targets = [s.metrics_url.split("/")[2] for s in servers.values()]
            config = tmp_path / "prometheus.yml"
            config.write_text(
                "global: {scrape_interval: 1s, evaluation_interval: 1s}\n"
                "scrape_configs:\n"
                f"  - job_name: origin\n    static_configs: [{{targets: {json.dumps([origin_target])}}}]\n"
                f"  - job_name: edges\n    static_configs: [{{targets: {json.dumps(edge_targets)}}}]\n"
            )
            (port,) = free_ports("127.0.0.1", 1)
            base = f"http://127.0.0.1:{port}"
            proc = await asyncio.create_subprocess_exec(
                PROMETHEUS,
                f"--config.file={config}",
                f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                f"--web.listen-address=127.0.0.1:{port}",
                "--log.level=warn",
                stdout=asyncio.subprocess.DEVNULL,
                stderr=asyncio.subprocess.DEVNULL,
            )

            async def all_up() -> bool:
                return await _query(base, "sum(up)") == 3

            await _until(all_up)

            text = (SAMPLES / "mpl-2.0.txt").read_text()[:3000]
            await net.origin.publish("mpl", text)
            ids = document_ids(llama.tokenizer, text)
            received = 0
            for known in (list(edges), list(edges)[:1], list(edges)):
                async with KVClient(known) as client:
                    received += (await client.fetch(llama, ids)).n_bytes

            async def edges_served() -> bool:
                # what edges served, less what they served each other (owners to non-owners)
                to_agents = await _query(
                    base,
                    'sum(kvcdn_payload_bytes_served_total{job="edges"})'
                    ' - sum(kvcdn_edge_loaded_bytes_total{job="edges",source="peer"})',
                )
                edges_served.seen = f"edges served {to_agents} to agents, agents received {received}"  # type: ignore[attr-defined]
                return to_agents == received

            await _until(edges_served)

            async def origin_reconciles() -> bool:  # the origin is scraped at its own moments: wait for it too
                from_origin = await _query(base, 'sum(kvcdn_edge_loaded_bytes_total{job="edges",source="origin"})')
                origin_served = await _query(base, 'sum(kvcdn_payload_bytes_served_total{job="origin"})')
                origin_reconciles.seen = f"edges loaded {from_origin} from the origin, it served {origin_served}"  # type: ignore[attr-defined]
                return from_origin == origin_served and from_origin is not None and from_origin > 0

            await _until(origin_reconciles)
            assert await _query(base, 'count(grpc_server_handled_total{job="edges",grpc_code="OK"})')
            assert await _query(base, 'sum(process_resident_memory_bytes{job="edges"})')
            targets = await _get(f"{base}/api/v1/targets")
            assert {t["health"] for t in targets["data"]["activeTargets"]} == {"up"}
    finally:
        if proc is not None and proc.returncode is None:
            proc.terminate()
            await proc.wait()
        await stop_network(net)
