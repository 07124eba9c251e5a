"""Where a publish's prefill runs: the origin's publish queue.

A publish asks its queue to have a token sequence computed and stored (raw, and in the codecs it
offers), once however many publishes ask at the same time (single flight, keyed by the content
digest and the codecs), and gets back how many blocks that computed and the prefill's seconds.

- `LocalQueue`: one origin process; the work runs here.
- `SharedQueue`: several origin workers sharing a catalog (kvcdn.origin.catalog). The job is a row of
  `kvcdn_jobs` (a unique index on active jobs is the single flight across workers); every worker runs
  `serve`, which claims the oldest queued job (`FOR UPDATE SKIP LOCKED`) whenever its model is free, so a
  burst of publishes sent to any worker spreads over all of them. A claim is a lease renewed while the
  work runs: a worker that dies mid-job lets its lease lapse and another takes the job over (a job is
  tried by at most `MAX_ATTEMPTS` workers). The publish that queued the job waits for its row to end
  (NOTIFY, with a poll behind it) and answers with the job's outcome, an error in its own status.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

import grpc

from kvcdn.errors import KVCDNError, Unavailable, error_for
from kvcdn.spec.identity import pack_token_ids, unpack_token_ids
from kvcdn.store.singleflight import SingleFlight

if TYPE_CHECKING:
    from kvcdn.origin.catalog import Catalog

__all__ = ["MAX_ATTEMPTS", "LocalQueue", "SharedQueue", "Work"]

log = logging.getLogger(__name__)

Work = Callable[[list[int], tuple[str, ...]], Awaitable[tuple[int, float]]]
"""Compute and store the blocks of token ids in codecs: (blocks computed, prefill seconds)."""

MAX_ATTEMPTS = 3
"""Workers that may take one job before it fails (each that took it stopped mid-job)."""


def _job_key(digest: str, codecs: tuple[str, ...]) -> bytes:
    return f"{digest}|{','.join(codecs)}".encode()


class LocalQueue:
    """The work of one origin process, single-flight by content and codecs."""

    def __init__(self, work: Work) -> None:
        self._work = work
        self._flights: SingleFlight[bytes, asyncio.Future[tuple[int, float]]] = SingleFlight()

    @property
    def executions(self) -> int:
        return self._flights.executions

    async def run(self, digest: str, ids: list[int], codecs: tuple[str, ...]) -> tuple[int, float]:
        return await self._flights.do(_job_key(digest, codecs), lambda: self._work(ids, codecs))

    async def close(self) -> None:
        return None


class SharedQueue:
    """Jobs in the shared catalog, taken by whichever worker is free."""

    def __init__(self, catalog: Catalog, work: Work, worker: str = "", lease_s: float = 30.0) -> None:
        self.catalog = catalog
        self._work = work
        self.worker = worker or f"{socket.gethostname()}:{id(self):x}"
        self.lease_s = lease_s
        self.executions = 0
        """Jobs this worker ran."""
        self._serving: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._serving = asyncio.get_running_loop().create_task(self.serve())

    async def close(self) -> None:
        if self._serving is not None:
            self._serving.cancel()
            await asyncio.wait([self._serving], timeout=5)  # bounded: a stop never hangs on a job

    async def _query(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        return await asyncio.get_running_loop().run_in_executor(None, self.catalog.query, sql, params)

    # --- the publishing side ------------------------------------------------------------------------

    async def run(self, digest: str, ids: list[int], codecs: tuple[str, ...]) -> tuple[int, float]:
        job = await self._submit(_job_key(digest, codecs), ids, codecs)
        while True:
            seen = self.catalog.generation("kvcdn_done")
            rows = await self._query(
                "SELECT state, computed, prefill_s, error_code, error FROM kvcdn_jobs WHERE id = %s", (job,)
            )
            if not rows:
                raise Unavailable(f"publish job {job} vanished from the catalog before it ended")
            state, computed, prefill_s, code, error = rows[0]
            if state == "done":
                return int(computed), float(prefill_s)
            if state == "failed":
                status = grpc.StatusCode[code] if code in grpc.StatusCode.__members__ else grpc.StatusCode.INTERNAL
                raise error_for(status, error, "origin worker")
            await self.catalog.wait("kvcdn_done", seen, self.lease_s / 3)

    async def _submit(self, key: bytes, ids: list[int], codecs: tuple[str, ...]) -> int:
        """The id of the active job for `key`: a new one, or the one another publish queued."""
        while True:
            rows = await self._query(
                "INSERT INTO kvcdn_jobs (job_key, token_ids, codecs) VALUES (%s, %s, %s) "
                "ON CONFLICT (job_key) WHERE state IN ('queued', 'running') DO NOTHING RETURNING id",
                (key, pack_token_ids(ids), ",".join(codecs)),
            )
            if rows:
                await asyncio.get_running_loop().run_in_executor(None, self.catalog.notify, "kvcdn_jobs", "")
                return int(rows[0][0])
            rows = await self._query(
                "SELECT id FROM kvcdn_jobs WHERE job_key = %s AND state IN ('queued', 'running')", (key,)
            )
            if rows:  # else it ended between the two statements: queue it again (it will find its blocks)
                return int(rows[0][0])

    # --- the working side ---------------------------------------------------------------------------

    async def serve(self) -> None:
        """Take jobs while the origin runs, one at a time (the worker's model runs one prefill)."""
        while True:
            seen = self.catalog.generation("kvcdn_jobs")
            try:
                job = await self._claim()
            except Exception as exc:  # the database is down, or its tables are not what they should be
                log.warning("cannot take publish jobs: %s; trying again in 1 s", exc)
                await asyncio.sleep(1.0)
                continue
            if job is None:
                await self.catalog.wait("kvcdn_jobs", seen, self.lease_s / 3)  # also: leases lapse
                continue
            await self._run_job(*job)

    async def _claim(self) -> tuple[int, list[int], tuple[str, ...]] | None:
        lapsed = await self._query(
            "UPDATE kvcdn_jobs SET state = 'failed', error_code = 'UNAVAILABLE', finished = now(), "
            "error = 'the publish was taken by ' || attempts || ' origin workers and each stopped before it "
            "finished (see their logs); publish again' "
            "WHERE state = 'running' AND lease_until < now() AND attempts >= %s RETURNING id",
            (MAX_ATTEMPTS,),
        )
        if lapsed:
            await self._query("SELECT pg_notify('kvcdn_done', '')")
        rows = await self._query(
            "UPDATE kvcdn_jobs SET state = 'running', worker = %s, attempts = attempts + 1, "
            "lease_until = now() + make_interval(secs => %s) WHERE id = ("
            "SELECT id FROM kvcdn_jobs WHERE state = 'queued' OR (state = 'running' AND lease_until < now()) "
            "ORDER BY id LIMIT 1 FOR UPDATE SKIP LOCKED) RETURNING id, token_ids, codecs, attempts",
            (self.worker, self.lease_s),
        )
        if not rows:
            return None
        job, packed, codecs, attempts = rows[0]
        if attempts > 1:
            log.warning("took over publish job %d (attempt %d): its previous worker stopped mid-job", job, attempts)
        return int(job), unpack_token_ids(bytes(packed)), tuple(c for c in codecs.split(",") if c)

    async def _run_job(self, job: int, ids: list[int], codecs: tuple[str, ...]) -> None:
        renewing = asyncio.get_running_loop().create_task(self._renew(job))
        outcome: tuple[Any, ...]
        try:
            computed, prefill_s = await self._work(ids, codecs)
            outcome = ("done", computed, prefill_s, None, None)
        except KVCDNError as exc:
            outcome = ("failed", None, None, exc.code.name, str(exc))
        except Exception as exc:
            log.exception("publish job %d failed", job)
            outcome = ("failed", None, None, "INTERNAL", f"the origin worker failed: {exc!r}")
        finally:
            renewing.cancel()
        self.executions += 1
        try:
            await self._query(
                "UPDATE kvcdn_jobs SET state = %s, computed = %s, prefill_s = %s, error_code = %s, error = %s, "
                "finished = now() WHERE id = %s AND worker = %s",
                (*outcome, job, self.worker),
            )
            await self._query("SELECT pg_notify('kvcdn_done', %s)", (str(job),))
            await self._query(
                "DELETE FROM kvcdn_jobs WHERE state IN ('done', 'failed') AND finished < now() - interval '1 hour'"
            )
        except Exception as exc:  # the lease lapses and another worker takes the job over
            log.warning("could not record the end of publish job %d: %s", job, exc)

    async def _renew(self, job: int) -> None:
        while True:
            await asyncio.sleep(self.lease_s / 3)
            with contextlib.suppress(KVCDNError):
                await self._query(
                    "UPDATE kvcdn_jobs SET lease_until = now() + make_interval(secs => %s) "
                    "WHERE id = %s AND worker = %s",
                    (self.lease_s, job, self.worker),
                )
