"""Warnings an attacker can repeat at will (a refused credential, a refused or unacceptable
connection) are logged at a bounded rate: once per interval, with how many times it happened."""

from __future__ import annotations

import logging
import threading
import time

__all__ = ["ThrottledWarning"]


class ThrottledWarning:
    """One kind of repeated warning on `logger`: the first is logged, then at most one line every
    `every_s`, saying how many happened since the line before. `count` is the total."""

    def __init__(self, logger: logging.Logger, every_s: float) -> None:
        self._logger, self.every_s = logger, every_s
        self.count = 0
        self._unlogged = 0
        self._logged_at = -every_s
        self._lock = threading.Lock()

    def __call__(self, message: str, *args: object) -> None:
        with self._lock:
            self.count += 1
            self._unlogged += 1
            now = time.monotonic()
            if now - self._logged_at < self.every_s:
                return
            times, self._unlogged, self._logged_at = self._unlogged, 0, now
        self._logger.warning(f"{message} ({times} since the last report)", *args)
