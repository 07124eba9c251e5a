"""Running a started server in the foreground until SIGINT or SIGTERM (the CLI's servers)."""

from __future__ import annotations

import asyncio
import json
import signal
from pathlib import Path

from kvcdn.store.files import atomic_write
from kvcdn.wire.rpc import Server

__all__ = ["serve_until_stopped", "write_port_file"]


def write_port_file(path: str, server: Server) -> None:
    """Atomically write what the server bound, as JSON, so a parent process can wait for the file."""
    bound = {"address": server.address, "bulk_port": server.bulk_port, "metrics": server.metrics_url}
    atomic_write(Path(path), json.dumps(bound).encode())


async def serve_until_stopped(server: Server, port_file: str | None = None) -> None:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    if port_file:
        write_port_file(port_file, server)
    extras = [f"bulk port {server.bulk_port}"] if server.bulk_port else []
    extras += [f"metrics {server.metrics_url}"] if server.metrics_url else []
    print(f"serving on {server.address}" + (f" ({', '.join(extras)})" if extras else ""), flush=True)
    try:
        await stop.wait()
    finally:
        await server.stop(grace_s=2.0)
