"""Several origin workers sharing one catalog (a real PostgreSQL server, started here from Debian's
binaries) and one block folder: a burst of publishes sent to one worker is computed by both; the same
text published on both at once is computed once and versioned once; a purge on one reaches the
other's caches and Watch streams; a job whose worker stopped is taken over (or fails after
MAX_ATTEMPTS); a worker with another model, an unreachable database and bad settings are refused; the
catalog answers exactly as the one-process store does; an agent fetches through an edge of one worker
what another computed, bit for bit."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest
import torch

from kvcdn.client import CacheReader, KVClient
from kvcdn.edge import EdgeConfig, start_edge
from kvcdn.errors import FingerprintMismatch, InvalidArgument, NotFound, Unavailable
from kvcdn.loadtest.publish import PublishBenchConfig, measure
from kvcdn.model import adapter
from kvcdn.model.loading import LoadedModel
from kvcdn.model.options import ModelOptions
from kvcdn.model.prompt import document_ids
from kvcdn.ops.launcher import Cluster
from kvcdn.ops.postgres import LocalPostgres, postgres_binaries
from kvcdn.origin import Origin, OriginConfig, start_origin
from kvcdn.origin.catalog import Catalog
from kvcdn.origin.queue import MAX_ATTEMPTS, SharedQueue, _job_key
from kvcdn.origin.store import EventLog, ManifestStore
from kvcdn.spec.identity import content_digest
from kvcdn.v1 import kvcdn_pb2 as pb
from kvcdn.wire.rpc import Server
from tests.conftest import SAMPLES

TEXT = (SAMPLES / "gpl-3.0.txt").read_text()


@pytest.fixture(scope="module")
def postgres() -> Iterator[LocalPostgres]:
    if postgres_binaries() is None:
        pytest.skip("PostgreSQL is not installed (Debian's postgresql package): the shared catalog needs a real server")
    try:
        pg = LocalPostgres().start()
    except Unavailable as exc:  # installed, but it cannot run here
        pytest.skip(f"PostgreSQL cannot run here: {exc}")
    try:
        yield pg
    finally:
        pg.stop()


@pytest.fixture
def catalog_url(postgres: LocalPostgres) -> str:
    return postgres.create_database(f"kvcdn_{uuid.uuid4().hex[:12]}")


def _config(model: LoadedModel, store: Path, url: str, worker: str, **kwargs: object) -> OriginConfig:
    return OriginConfig(
        store_dir=store,
        listen="127.0.0.1:0",
        model=model.name,
        block_tokens=model.geometry.block_tokens,
        frame_bytes=model.geometry.frame_bytes,
        codecs=(),
        catalog=url,
        worker=worker,
        **kwargs,  # type: ignore[arg-type]
    )


@pytest.fixture
async def workers(llama: LoadedModel, tmp_path: Path, catalog_url: str) -> AsyncIterator[list[tuple[Origin, Server]]]:
    """Two origin workers on one catalog and one store folder."""
    started = [await start_origin(_config(llama, tmp_path / "shared", catalog_url, f"w{i}"), llama) for i in range(2)]
    try:
        yield started
    finally:
        for _, server in started:
            await server.stop(0)


def _documents(n: int) -> list[tuple[str, str]]:
    """n texts with no block in common (each starts differently)."""
    return [(f"doc{i}", f"Document {i} of the burst. " + TEXT[i * 1500 : i * 1500 + 1400]) for i in range(n)]


async def test_a_burst_sent_to_one_worker_is_computed_by_both(workers: list[tuple[Origin, Server]]) -> None:
    (a, a_server), (b, b_server) = workers
    docs = _documents(6)
    results = await asyncio.gather(*(a.publish(name, text) for name, text in docs))
    assert [r.manifest.version for r in results] == [1] * 6
    assert all(r.computed_blocks == len(r.manifest.blocks) for r in results)
    assert a.queue.executions + b.queue.executions == 6
    assert b.queue.executions >= 1 and b.prefill_runs >= 1, "the idle worker took none of the burst"
    # Either worker answers the same manifests and streams the same frames, whoever computed them.
    async with CacheReader(a_server.address) as at_a, CacheReader(b_server.address) as at_b:
        for result in results:
            assert (await at_b.manifest(result.manifest.document)).content_digest == result.manifest.content_digest
            keys = [block.key for block in result.manifest.blocks]
            from_a = b"".join([raw async for raw in at_a.stream(a.fingerprint, keys)])
            assert b"".join([raw async for raw in at_b.stream(b.fingerprint, keys)]) == from_a


async def test_the_same_text_on_both_workers_is_computed_once_and_versioned_once(
    workers: list[tuple[Origin, Server]],
) -> None:
    (a, _), (b, _) = workers
    first, second = await asyncio.gather(a.publish("doc", TEXT[:3000]), b.publish("doc", TEXT[:3000]))
    assert first.manifest.version == second.manifest.version == 1
    assert a.prefill_runs + b.prefill_runs == 1
    assert first.computed_blocks == second.computed_blocks == len(first.manifest.blocks)  # one job, shared
    changed = await b.publish("doc", TEXT[:2500] + " A new ending.")
    assert changed.manifest.version == 2 and 0 < changed.computed_blocks < len(changed.manifest.blocks)
    assert (await a.manifest("doc", 0)).version == 2
    again = await a.publish("doc", TEXT[:2500] + " A new ending.")
    assert again.manifest.version == 2 and again.computed_blocks == 0


async def test_a_purge_on_one_worker_reaches_the_other(workers: list[tuple[Origin, Server]]) -> None:
    (a, _), (b, _) = workers
    manifest = (await a.publish("doc", TEXT[:3000])).manifest
    keys = [block.key for block in manifest.blocks]
    assert len(b.lookup(b.fingerprint, keys)) == len(keys)  # B remembers the blocks' infos now
    watching = b.watch(0)
    versions, removed, seq = await a.purge("doc", 0)
    assert (versions, removed, seq) == ([1], len(keys), 1)
    event = await asyncio.wait_for(anext(watching), 10)
    assert (event.seq, event.document, list(event.keys)) == (1, "doc", sorted(keys))
    assert b.lookup(b.fingerprint, keys) == []
    assert not any(a.blocks.path(k).exists() for k in keys)
    with pytest.raises(NotFound):
        await b.manifest("doc", 0)
    assert b.info().invalidation_seq == 1
    # Published again on B (its cached infos are gone too): computed afresh, a new version.
    again = await b.publish("doc", TEXT[:3000])
    assert again.manifest.version == 1 and again.computed_blocks == len(keys)


@pytest.mark.parametrize("attempts", [1, MAX_ATTEMPTS])
async def test_a_job_whose_worker_stopped_is_taken_over(
    llama: LoadedModel, tmp_path: Path, catalog_url: str, attempts: int
) -> None:
    origin, server = await start_origin(_config(llama, tmp_path / "shared", catalog_url, "w1"), llama)
    try:
        assert isinstance(origin.queue, SharedQueue)
        catalog = origin.queue.catalog
        await asyncio.sleep(0.5)  # the worker has looked for jobs and waits for news of one
        # A job taken by a worker that died, its lease lapsed a second ago; a publish of the same text
        # waits for it. Then news of a job reaches the worker.
        ids = document_ids(llama.tokenizer, TEXT[:3000])
        catalog.query(
            "INSERT INTO kvcdn_jobs (job_key, token_ids, codecs, state, worker, lease_until, attempts) "
            "VALUES (%s, %s, '', 'running', 'gone', now() - interval '1 second', %s)",
            (_job_key(content_digest(ids), ()), torch.tensor(ids, dtype=torch.int32).numpy().tobytes(), attempts),
        )
        publishing = asyncio.ensure_future(origin.publish("doc", TEXT[:3000]))
        await asyncio.sleep(0.5)
        catalog.notify("kvcdn_jobs")
        if attempts < MAX_ATTEMPTS:
            result = await asyncio.wait_for(publishing, 30)
            assert result.manifest.version == 1 and origin.queue.executions == 1
            assert catalog.query("SELECT state, worker, attempts FROM kvcdn_jobs") == [("done", "w1", attempts + 1)]
        else:
            with pytest.raises(Unavailable, match=f"taken by {MAX_ATTEMPTS} origin workers"):
                await asyncio.wait_for(publishing, 30)
            assert origin.queue.executions == 0
    finally:
        await server.stop(0)


async def test_an_agent_fetches_through_one_worker_what_another_computed(
    workers: list[tuple[Origin, Server]], llama: LoadedModel
) -> None:
    (a, _), (_, b_server) = workers
    await a.publish("doc", TEXT[:3000])
    edge, edge_server = await start_edge(EdgeConfig(origin=b_server.address, listen="127.0.0.1:0", metrics_port=-1))
    try:
        doc = document_ids(llama.tokenizer, TEXT[:3000])
        async with KVClient([edge_server.address]) as client:
            fetched = await client.fetch(llama, doc)
        assert fetched.cached_tokens == len(doc)
        for (k, v), (rk, rv) in zip(fetched.layers, adapter.prefill(llama.model, doc), strict=True):
            assert torch.equal(k, rk) and torch.equal(v, rv)
    finally:
        await edge_server.stop(0)
        await edge.close()


async def test_a_worker_with_another_model_is_refused(
    workers: list[tuple[Origin, Server]], tiny_models: dict[str, LoadedModel], tmp_path: Path, catalog_url: str
) -> None:
    other = tiny_models["qwen3"] if "qwen3" in tiny_models else tiny_models[sorted(tiny_models)[-1]]
    with pytest.raises(FingerprintMismatch, match="every worker of one catalog must load the same model"):
        Origin(_config(other, tmp_path / "shared", catalog_url, "w9"), other)


def test_bad_catalog_settings_are_refused(llama: LoadedModel, tmp_path: Path, postgres: LocalPostgres) -> None:
    with pytest.raises(InvalidArgument, match="PostgreSQL URL"):
        _config(llama, tmp_path, "mysql://somewhere/db", "w")
    with pytest.raises(InvalidArgument, match="cannot budget a store that several workers share"):
        _config(llama, tmp_path, postgres.url(), "w", store_bytes=1 << 30)
    dead = f"postgresql://kvcdn@127.0.0.1:{postgres.port + 1}/x"  # nothing listens there
    with pytest.raises(Unavailable, match=r"cannot reach the origin's catalog database 127\.0\.0\.1"):
        Origin(_config(llama, tmp_path, dead, "w", catalog_connect_s=2), llama)


def _manifest(document: str, version: int, keys: list[bytes]) -> pb.Manifest:
    blocks = [pb.BlockInfo(key=k, index=i, n_tokens=32, n_bytes=10) for i, k in enumerate(keys)]
    return pb.Manifest(document=document, version=version, blocks=blocks, content_digest=f"{document}{version}")


@pytest.mark.parametrize("kind", ["files", "postgres"])
def test_the_catalog_answers_as_the_one_process_store(
    kind: str, llama: LoadedModel, tmp_path: Path, catalog_url: str
) -> None:
    catalog = None
    if kind == "postgres":
        catalog = Catalog(catalog_url, llama.fingerprint_hex, llama.geometry.to_proto())
        manifests, events = catalog.manifests, catalog.events
    else:
        manifests, events = ManifestStore(tmp_path), EventLog(tmp_path)  # type: ignore[assignment]
    try:
        shared, own1, own2 = b"s" * 32, b"1" * 32, b"2" * 32
        with pytest.raises(NotFound, match="'doc' has not been published"):
            manifests.get("doc")
        assert manifests.next_version("doc") == 1
        manifests.put(_manifest("doc", 1, [shared, own1]))
        manifests.put(_manifest("doc", 2, [shared, own2]))
        manifests.put(_manifest("other", 1, [shared]))
        assert manifests.versions("doc") == [1, 2] and manifests.next_version("doc") == 3
        assert manifests.get("doc").version == 2 and manifests.get("doc", 1).content_digest == "doc1"
        with pytest.raises(NotFound, match="'doc' has no version 7 \\(latest is 2\\)"):
            manifests.get("doc", 7)
        assert manifests.users(shared) == [("doc", 1), ("doc", 2), ("other", 1)]
        assert manifests.delete("doc", 1) == [own1]
        assert manifests.delete("doc", 2) == [own2]
        assert manifests.delete("other", 1) == [shared]
        assert manifests.users(shared) == [] and manifests.versions("doc") == []
        assert events.last_seq == 0
        first = events.append("doc", 0, [own1, own2])
        second = events.append("other", 1, [shared])
        assert (first.seq, second.seq, events.last_seq) == (1, 2, 2)
        assert [e.seq for e in events.events[1:]] == [2] and list(events.events[0].keys) == [own1, own2]
    finally:
        if catalog is not None:
            catalog.close_connections()
    if catalog is not None:  # a second worker's view: the same feed, read from the table
        again = Catalog(catalog_url, llama.fingerprint_hex, llama.geometry.to_proto())
        try:
            assert [e.document for e in again.events.events] == ["doc", "other"]
        finally:
            again.close_connections()


def test_the_publish_benchmark_spreads_a_burst_over_worker_processes(
    postgres: LocalPostgres, tiny_dirs: dict[str, Path]
) -> None:
    options = ModelOptions(str(tiny_dirs["llama"]), "float32", "cpu")
    config = PublishBenchConfig(workers=(1, 2), documents=4, tokens=200)
    one, two = (measure(config, options, n, postgres) for n in config.workers)
    assert one.jobs == {"origin": 4} and one.tokens == two.tokens > 4 * 100
    assert sum(two.jobs.values()) == 4 and set(two.jobs) == {"origin", "origin1"}, two.jobs
    with pytest.raises(InvalidArgument, match="--workers"):
        PublishBenchConfig(workers=(0,))
    with pytest.raises(InvalidArgument, match="share a catalog"):  # two processes on one folder's own files
        Cluster(tiny_dirs["llama"] / "never-made", edges=0, origin_workers=2).start()
