"""The `kvcdn` command line: dispatch, logging and exit codes.

Each component registers its own subcommands through an entry point of the group `kvcdn.commands`
(pyproject.toml): `kvcdn.origin.cli` (origin), `kvcdn.edge.cli` (edge), `kvcdn.client.cli` (publish,
purge, fetch, ask), `kvcdn.ops.cli` (up, stats, demo, provision) and `kvcdn.loadtest.cli` (loadtest
bench|run|network|economics). A registration adds its parsers and sets `run` on each, a function of
the parsed flags that builds the component's typed config and returns an exit status. Registrations
import only what parsing needs, so `kvcdn --help` (and an edge, which never runs a model) stays free
of torch.

Exit status: what `run` returns (0 ok, 1 the command's own failure, such as a diverged cache), 2 for a
kvcdn error (one line with its gRPC status name) or a file or socket the system refused (one line),
130 on Ctrl-C. Other exceptions are bugs: one line too, and the traceback with `--log-level DEBUG`.
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from importlib.metadata import entry_points

from kvcdn.errors import KVCDNError

__all__ = ["COMMANDS_GROUP", "build_parser", "main"]

log = logging.getLogger("kvcdn")

COMMANDS_GROUP = "kvcdn.commands"
"""Entry-point group of the components' command registrations (`register(subparsers) -> None`)."""


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="kvcdn", description="A prefill CDN for AI agents.")
    p.add_argument("--log-level", default="WARNING", help="DEBUG, INFO, WARNING (default) or ERROR")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")
    registrations = sorted(entry_points(group=COMMANDS_GROUP), key=lambda ep: ep.name)  # a stable order
    if not registrations:
        raise SystemExit("kvcdn: no commands are registered: install the package (pip install -e .)")
    for ep in registrations:
        ep.load()(sub)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    from kvcdn.tuning import tune_malloc

    tune_malloc()
    args = build_parser().parse_args(argv)
    level = args.log_level.upper()
    if getattr(args, "server", False) and level == "WARNING":
        level = "INFO"
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    try:
        code: int = args.run(args)
        return code
    except KVCDNError as exc:
        print(f"kvcdn {args.command}: {exc.code.name}: {exc}", file=sys.stderr)
        return 2
    except OSError as exc:
        where = f" ({exc.filename})" if exc.filename else ""
        print(f"kvcdn {args.command}: {exc.strerror or exc}{where}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        log.debug("kvcdn %s failed", args.command, exc_info=exc)
        print(
            f"kvcdn {args.command}: internal error: {type(exc).__name__}: {exc} "
            "(a bug: --log-level DEBUG shows where; please report it)",
            file=sys.stderr,
        )
        return 3
