"""The one failover walk (kvcdn.wire.source.fail_over) and suspect list (Suspects) that an agent's
fetch and an edge's loads share: the next server resumes where one broke, and which error ends it;
and the servers' repeated warnings, bounded (kvcdn.wire.logs)."""

from __future__ import annotations

import logging
import time

import pytest

from kvcdn.errors import DeadlineExceeded, DigestMismatch, NotFound, Unavailable
from kvcdn.wire.logs import ThrottledWarning
from kvcdn.wire.receiver import Progress
from kvcdn.wire.source import Suspects, fail_over


async def test_the_walk_resumes_on_the_next_server_and_says_whom_it_asked() -> None:
    progress, asked, failed = Progress(), [], []

    async def attempt(address: str) -> None:
        asked.append((address, progress.block))
        if address == "a":
            raise Unavailable("a is down")
        if address == "b":
            progress.block = 1  # one block settled, then a frame that failed verification
            raise DigestMismatch("b sent a bad frame")
        progress.block = 2

    assert await fail_over(["a", "b", "c", "d"], attempt, progress, 2, failed.append) == ["a", "b", "c"]
    assert asked == [("a", 0), ("b", 0), ("c", 1)] and failed == ["a", "b"]  # c resumed at block 1


@pytest.mark.parametrize(
    ("errors", "raised"),
    [((Unavailable, DeadlineExceeded), Unavailable), ((Unavailable, DigestMismatch), DigestMismatch)],
)
async def test_when_no_server_completes_the_error_says_whether_one_lied(
    errors: tuple[type[Exception], ...], raised: type[Exception]
) -> None:
    failures = iter(errors)

    async def attempt(address: str) -> None:
        raise next(failures)(f"{address} failed")

    with pytest.raises(raised, match="a failed; b failed"):
        await fail_over(["a", "b"], attempt, Progress(), 1, lambda _: None)


async def test_an_error_no_other_server_would_mend_ends_the_walk() -> None:
    asked = []

    async def attempt(address: str) -> None:
        asked.append(address)
        raise NotFound("not stored at the origin")

    with pytest.raises(NotFound):
        await fail_over(["a", "b"], attempt, Progress(), 1, lambda _: None)
    assert asked == ["a"]


async def test_a_stream_that_completed_before_its_server_failed_asks_no_one() -> None:
    async def attempt(address: str) -> None:
        raise AssertionError("asked")

    assert await fail_over(["a"], attempt, Progress(block=3), 3, lambda _: None) == []


def test_suspects_go_last_until_their_time_is_up() -> None:
    suspects = Suspects(0.05)
    suspects.suspect("b")
    assert suspects.order(["a", "b", "c"]) == ["a", "c", "b"] and "b" in suspects and suspects.current() == ["b"]
    time.sleep(0.06)
    assert suspects.order(["a", "b", "c"]) == ["a", "b", "c"] and "b" not in suspects and suspects.current() == []


def test_a_repeated_warning_is_one_line_an_interval_with_its_count(caplog: pytest.LogCaptureFixture) -> None:
    warn = ThrottledWarning(logging.getLogger("kvcdn.test"), every_s=0.05)
    with caplog.at_level(logging.WARNING, logger="kvcdn.test"):
        for i in range(100):
            warn("refused %s", i)
        time.sleep(0.06)
        warn("refused %s", "again")
    lines = [r.getMessage() for r in caplog.records]
    assert lines == ["refused 0 (1 since the last report)", "refused again (100 since the last report)"]
    assert warn.count == 101
