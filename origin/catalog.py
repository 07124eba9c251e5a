"""The catalog several origin workers share, in PostgreSQL: versioned manifests, the invalidation
feed and the publish queue (kvcdn.origin.queue). Blocks stay files in the store folder, which the
workers share as a filesystem (an NFS or CephFS volume, a ReadWriteMany claim).

Each worker is a whole origin (`kvcdn origin --catalog URL --store SHARED`) with its own model on its
own device; the catalog's `kvcdn_meta` row pins the model fingerprint and geometry, so a worker with
another model refuses to start. The same methods as the one-process store (kvcdn.origin.store), so the
origin's code does not care which it has:

- manifests are rows (document, version, bytes) and `kvcdn_block_users` indexes which versions use
  each stored block, so a purge finds its orphans in one query;
- the feed is `kvcdn_events`, numbered without gaps (a seq is taken under the catalog lock), mirrored
  in memory by each worker and followed through LISTEN/NOTIFY;
- every change of manifests (a version's commit, a purge with its block deletions, a repair) happens
  under one advisory lock, the cross-worker form of the one-process origin's manifest lock.

A database that cannot be reached is UNAVAILABLE, naming the URL without its password."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from typing import Any

import psycopg
from psycopg_pool import ConnectionPool, PoolTimeout

from kvcdn.errors import FingerprintMismatch, NotFound, Unavailable
from kvcdn.origin.store import check_document_name, stored_keys
from kvcdn.v1 import kvcdn_pb2 as pb

__all__ = ["Catalog"]

log = logging.getLogger(__name__)

SCHEMA = """
CREATE TABLE IF NOT EXISTS kvcdn_meta (name text PRIMARY KEY, value bytea NOT NULL);
CREATE TABLE IF NOT EXISTS kvcdn_manifests (
  document text NOT NULL, version integer NOT NULL, body bytea NOT NULL, PRIMARY KEY (document, version));
CREATE TABLE IF NOT EXISTS kvcdn_block_users (
  key bytea NOT NULL, document text NOT NULL, version integer NOT NULL, PRIMARY KEY (key, document, version));
CREATE INDEX IF NOT EXISTS kvcdn_block_users_version ON kvcdn_block_users (document, version);
ALTER TABLE kvcdn_block_users ADD COLUMN IF NOT EXISTS priced boolean NOT NULL DEFAULT false;
CREATE TABLE IF NOT EXISTS kvcdn_events (seq bigint PRIMARY KEY, body bytea NOT NULL);
CREATE TABLE IF NOT EXISTS kvcdn_jobs (
  id bigserial PRIMARY KEY, job_key bytea NOT NULL, token_ids bytea NOT NULL, codecs text NOT NULL,
  state text NOT NULL DEFAULT 'queued', worker text, lease_until timestamptz, attempts integer NOT NULL DEFAULT 0,
  computed integer, prefill_s double precision, error_code text, error text,
  created timestamptz NOT NULL DEFAULT now(), finished timestamptz);
CREATE UNIQUE INDEX IF NOT EXISTS kvcdn_jobs_active ON kvcdn_jobs (job_key) WHERE state IN ('queued', 'running');
"""

_LOCK = 0x6B76636E
"""The advisory lock every manifest change holds ('kvcn')."""

CHANNELS = ("kvcdn_jobs", "kvcdn_done", "kvcdn_events")
"""NOTIFY channels: a job was queued, a job ended, an event was appended."""


@contextlib.contextmanager
def _reaching(where: str) -> Iterator[None]:
    """psycopg's connection errors (and the pool's time-outs) as UNAVAILABLE with a sentence."""
    try:
        yield
    except (psycopg.OperationalError, psycopg.InterfaceError, PoolTimeout) as exc:
        raise Unavailable(f"the origin's catalog database {where} is unreachable: {exc}") from None


class Catalog:
    """One worker's connections to the shared catalog; `manifests` and `events` are its two halves
    as the origin uses them, `lock` its cross-worker manifest lock."""

    def __init__(self, url: str, fingerprint: str, geometry: pb.Geometry, connect_s: float = 10.0) -> None:
        info = psycopg.conninfo.conninfo_to_dict(url)
        self.url = url
        self.where = f"{info.get('host', 'localhost')}:{info.get('port', 5432)}/{info.get('dbname', '')}"
        self.pool = ConnectionPool(
            url, min_size=1, max_size=8, kwargs={"autocommit": True}, open=False, timeout=connect_s, name="kvcdn"
        )
        try:
            self.pool.open(wait=True, timeout=connect_s)
        except Exception as exc:
            self.pool.close()
            raise Unavailable(f"cannot reach the origin's catalog database {self.where} ({exc}): is it up?") from None
        try:
            with _reaching(self.where):
                self._setup(fingerprint, geometry)
                self._lock_conn = psycopg.connect(url, autocommit=True, connect_timeout=int(connect_s))
            self.manifests = PgManifests(self)
            self.events = PgEvents(self)
        except BaseException:
            self.pool.close()
            raise
        self.lock = SharedLock(self)
        self._generations = dict.fromkeys(CHANNELS, 0)
        self._changed = asyncio.Condition()
        self._tasks: list[asyncio.Task[None]] = []

    def _setup(self, fingerprint: str, geometry: pb.Geometry) -> None:
        wanted = {"fingerprint": fingerprint.encode(), "geometry": geometry.SerializeToString(deterministic=True)}
        with self.pool.connection() as conn, conn.transaction():
            conn.execute("SELECT pg_advisory_xact_lock(%s)", (_LOCK + 1,))  # two first workers at once
            conn.execute(SCHEMA)
            for name, value in wanted.items():
                conn.execute("INSERT INTO kvcdn_meta VALUES (%s, %s) ON CONFLICT DO NOTHING", (name, value))
            have: dict[str, bytes] = dict(conn.execute("SELECT name, value FROM kvcdn_meta").fetchall())
        if bytes(have["fingerprint"]) != wanted["fingerprint"]:
            theirs = bytes(have["fingerprint"]).decode()[:16]
            raise FingerprintMismatch(
                f"the catalog {self.where} holds caches of model fingerprint {theirs}…, "
                f"this worker's model is {fingerprint[:16]}…: every worker of one catalog must load the same model "
                "(with the same --dtype, --block-tokens and --frame-bytes)"
            )
        if bytes(have["geometry"]) != wanted["geometry"]:
            raise FingerprintMismatch(
                f"the catalog {self.where} holds caches of another geometry (block or frame size, dtype) than "
                "this worker's: start it with the same --block-tokens, --frame-bytes and --dtype as the others"
            )

    def query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with _reaching(self.where), self.pool.connection() as conn:
            cur = conn.execute(sql, params)
            return cur.fetchall() if cur.description else []

    @contextlib.contextmanager
    def transaction(self) -> Iterator[psycopg.Connection[Any]]:
        with _reaching(self.where), self.pool.connection() as conn, conn.transaction():
            yield conn

    # --- LISTEN/NOTIFY ------------------------------------------------------------------------------

    def start(self, on_events: Callable[[list[pb.InvalidationEvent]], Awaitable[None]]) -> None:
        """Follow the catalog's notifications, and hand `on_events` the events other workers append
        (tasks on the running event loop, until `close`)."""
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._listen()), loop.create_task(self._follow_feed(on_events))]

    async def _follow_feed(self, on_new: Callable[[list[pb.InvalidationEvent]], Awaitable[None]]) -> None:
        while True:
            seen = self.generation("kvcdn_events")
            try:
                new = await asyncio.get_running_loop().run_in_executor(None, self.events.refresh)
            except Exception as exc:  # the database is down (or a row is not an event): look again later
                log.warning("cannot follow the catalog's invalidations: %s", exc)
                new = []
            if new:
                await on_new(new)
            await self.wait("kvcdn_events", seen, 1.0)

    async def _listen(self) -> None:
        while True:
            try:
                async with await psycopg.AsyncConnection.connect(self.url, autocommit=True) as conn:
                    for channel in CHANNELS:
                        await conn.execute(f"LISTEN {channel}")
                    await self._bump(*CHANNELS)  # whatever happened while nobody listened
                    # Closed before the connection is (aclosing): the generator holds the connection's
                    # lock, and closing the connection under it would wait for ever.
                    async with contextlib.aclosing(conn.notifies()) as notes:
                        async for note in notes:
                            await self._bump(note.channel)
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                log.warning("lost the catalog's notifications (%s); reconnecting in 1 s", exc)
                await self._bump(*CHANNELS)
                await asyncio.sleep(1.0)

    async def _bump(self, *channels: str) -> None:
        async with self._changed:
            for channel in channels:
                self._generations[channel] += 1
            self._changed.notify_all()

    def generation(self, channel: str) -> int:
        """A number that changes whenever `channel` is notified: read it before looking, then `wait`."""
        return self._generations[channel]

    async def wait(self, channel: str, seen: int, timeout_s: float) -> None:
        """Until `channel` was notified after `generation` gave `seen`, or `timeout_s` passed (a
        notification lost with a connection is made good by looking again)."""
        async with self._changed:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait_for(lambda: self._generations[channel] != seen), timeout_s)

    def notify(self, channel: str, payload: str = "") -> None:
        self.query("SELECT pg_notify(%s, %s)", (channel, payload))

    async def close(self) -> None:
        for task in self._tasks:
            task.cancel()
        if self._tasks:  # bounded: a stop never hangs on the database
            await asyncio.wait(self._tasks, timeout=5)
        self.close_connections()

    def close_connections(self) -> None:
        self._lock_conn.close()
        self.pool.close()


class SharedLock:
    """The origin's manifest lock across workers: the worker's own asyncio lock, then the catalog's
    advisory lock on a connection of its own (released when that connection ends, so a worker that
    dies holding it does not block the others)."""

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog
        self._local = asyncio.Lock()

    def _advisory(self, sql: str) -> None:
        catalog = self._catalog
        with _reaching(catalog.where):
            if catalog._lock_conn.closed:  # the database restarted: the lock went with the old session
                catalog._lock_conn = psycopg.connect(catalog.url, autocommit=True, connect_timeout=10)
            catalog._lock_conn.execute(sql, (_LOCK,))

    async def __aenter__(self) -> None:
        await self._local.acquire()
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._advisory, "SELECT pg_advisory_lock(%s)")
        except BaseException:
            self._local.release()
            raise

    async def __aexit__(self, *exc: object) -> None:
        try:
            await asyncio.get_running_loop().run_in_executor(None, self._advisory, "SELECT pg_advisory_unlock(%s)")
        finally:
            self._local.release()


class PgManifests:
    """Manifests by document and version, as kvcdn.origin.store.ManifestStore answers them. Rows are
    the database's to keep whole: nothing is ever quarantined here."""

    quarantined = 0

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog

    def users(self, key: bytes) -> list[tuple[str, int]]:
        rows = self._catalog.query(
            "SELECT document, version FROM kvcdn_block_users WHERE key = %s ORDER BY document, version", (key,)
        )
        return [(d, v) for d, v in rows]

    def priced(self, keys: Sequence[bytes]) -> set[bytes]:
        """Those of `keys` that only priced versions use (BlockInfo.priced)."""
        rows = self._catalog.query(
            "SELECT key FROM kvcdn_block_users WHERE key = ANY(%s) GROUP BY key HAVING bool_and(priced)", (list(keys),)
        )
        return {bytes(k) for (k,) in rows}

    def versions(self, document: str) -> list[int]:
        rows = self._catalog.query(
            "SELECT version FROM kvcdn_manifests WHERE document = %s ORDER BY version", (document,)
        )
        return [v for (v,) in rows]

    def next_version(self, document: str) -> int:
        versions = self.versions(document)
        return (versions[-1] if versions else 0) + 1

    def put(self, manifest: pb.Manifest) -> None:
        with self._catalog.transaction() as conn:
            conn.execute(
                "INSERT INTO kvcdn_manifests VALUES (%s, %s, %s) ON CONFLICT (document, version) "
                "DO UPDATE SET body = EXCLUDED.body",
                (manifest.document, manifest.version, manifest.SerializeToString()),
            )
            with conn.cursor() as cur:
                priced = manifest.HasField("price")
                cur.executemany(
                    "INSERT INTO kvcdn_block_users VALUES (%s, %s, %s, %s) ON CONFLICT DO NOTHING",
                    [(k, manifest.document, manifest.version, priced) for k in dict.fromkeys(stored_keys(manifest))],
                )

    def get(self, document: str, version: int = 0) -> pb.Manifest:
        check_document_name(document)
        versions = self.versions(document)
        if not versions:
            raise NotFound(f"document {document!r} has not been published")
        version = version or versions[-1]
        if version not in versions:
            raise NotFound(f"document {document!r} has no version {version} (latest is {versions[-1]})")
        rows = self._catalog.query(
            "SELECT body FROM kvcdn_manifests WHERE document = %s AND version = %s", (document, version)
        )
        if not rows:  # purged between the two queries
            raise NotFound(f"document {document!r} has no version {version}")
        return pb.Manifest.FromString(bytes(rows[0][0]))

    def delete(self, document: str, version: int) -> list[bytes]:
        manifest = self.get(document, version)
        keys = list(dict.fromkeys(stored_keys(manifest)))
        with self._catalog.transaction() as conn:
            conn.execute("DELETE FROM kvcdn_manifests WHERE document = %s AND version = %s", (document, version))
            conn.execute("DELETE FROM kvcdn_block_users WHERE document = %s AND version = %s", (document, version))
            used = {
                bytes(k)
                for (k,) in conn.execute(
                    "SELECT DISTINCT key FROM kvcdn_block_users WHERE key = ANY(%s)", (keys,)
                ).fetchall()
            }
        return [key for key in keys if key not in used]

    def forget_damaged(self, document: str) -> list[int]:
        return []


class PgEvents:
    """The invalidation feed, as kvcdn.origin.store.EventLog answers it: `events` mirrors the table in
    memory (seq n at index n-1), brought up to date by `refresh`."""

    damaged = 0

    def __init__(self, catalog: Catalog) -> None:
        self._catalog = catalog
        self.events: list[pb.InvalidationEvent] = []
        self._reading = threading.Lock()
        self.refresh()

    @property
    def last_seq(self) -> int:
        return self.events[-1].seq if self.events else 0

    def refresh(self) -> list[pb.InvalidationEvent]:
        """Read the events appended since the last look (by any worker); returns them."""
        with self._reading:  # one reader at a time, or two would append the same events
            rows = self._catalog.query("SELECT body FROM kvcdn_events WHERE seq > %s ORDER BY seq", (self.last_seq,))
            new = [pb.InvalidationEvent.FromString(bytes(body)) for (body,) in rows]
            self.events += new
        return new

    def append(self, document: str, version: int, keys: list[bytes], revocation: str = "") -> pb.InvalidationEvent:
        """Append an event (the caller holds the catalog lock, so the seq is free) and announce it."""
        (last,) = self._catalog.query("SELECT coalesce(max(seq), 0) FROM kvcdn_events")[0]
        event = pb.InvalidationEvent(seq=last + 1, document=document, version=version, keys=keys, revocation=revocation)
        self._catalog.query("INSERT INTO kvcdn_events VALUES (%s, %s)", (event.seq, event.SerializeToString()))
        self._catalog.notify("kvcdn_events")
        self.refresh()
        return event
