"""The agent-facing commands (`publish`, `purge`, `fetch`, `ask`), registered with kvcdn.cli."""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from kvcdn.client.policy import POLICIES
from kvcdn.errors import InvalidArgument, KVCDNError
from kvcdn.flags import add_connection_flags, add_edges_flag, add_origin_flag
from kvcdn.model.options import ModelOptions
from kvcdn.spec.codecs import DEFAULT_ACCEPT, parse_codecs
from kvcdn.wire.auth import read_token
from kvcdn.wire.tls import TLSFiles

__all__ = ["register"]


def register(sub: Any) -> None:
    """Add the client's commands to the `kvcdn` subcommands (`sub`: argparse's subparsers)."""
    s = sub.add_parser("publish", help="compute and store the caches of documents; prints their keys")
    add_origin_flag(s)
    s.add_argument("--name", help="document name (default: the file name without extension)")
    s.add_argument(
        "--codecs",
        type=parse_codecs,
        default=(),
        help="encodings to offer besides raw, e.g. lossless,int8,int4 (default: the origin's --codecs)",
    )
    s.add_argument("--price-per-load", type=int, default=0, help="what a load costs, in the asset's smallest unit")
    s.add_argument("--price-per-token", type=int, default=0, help="and per token of the cache served")
    s.add_argument("--asset", default="USDC", help="what the price is in (USDC)")
    s.add_argument("--pay-to", help="the publisher's account the ledger credits (needed with a price)")
    add_connection_flags(s)
    s.add_argument("files", nargs="+", metavar="FILE")
    s.set_defaults(run=publish)

    s = sub.add_parser("purge", help="remove a document at the origin and, through its feed, at every edge")
    add_origin_flag(s)
    add_connection_flags(s, trust=False)
    s.add_argument("document", metavar="DOCUMENT[@VERSION]")
    s.set_defaults(run=purge)

    for name, run, help_text in (
        ("fetch", fetch, "stream and verify a document's cache; print size, time, GB/s"),
        ("ask", ask, "answer a question about a document from its cache"),
    ):
        s = sub.add_parser(name, help=help_text)
        add_edges_flag(s)
        add_connection_flags(s)
        if name == "fetch":
            which = s.add_mutually_exclusive_group(required=True)
            which.add_argument("--doc", metavar="FILE", help="the document's text (its cache is found by its tokens)")
            which.add_argument(
                "--document", metavar="NAME[@VERSION]", help="a published document by name: a priced one is paid for"
            )
            s.add_argument("--grant", type=Path, help="the grant (a JWT file) that pays for priced documents")
            s.add_argument("--agent-key", type=Path, help="the key the grant is bound to (kvcdn keys generate)")
        else:
            s.add_argument("--doc", required=True, metavar="FILE")
        s.add_argument("--json", action="store_true", help="print one JSON object")
        s.add_argument(
            "--codecs",
            type=parse_codecs,
            default=DEFAULT_ACCEPT,
            help=f"encodings accepted, preferred first ({','.join(DEFAULT_ACCEPT)}: exact only); "
            "name int8, fp8 or int4 to accept a lossy cache",
        )
        ModelOptions.add_flags(s)
        s.set_defaults(run=run)
        if name == "ask":
            s.add_argument("--question", required=True)
            s.add_argument("--max-new-tokens", type=int, default=24)
            s.add_argument("--verify", action="store_true", help="also prefill locally and compare")
            s.add_argument(
                "--policy",
                choices=POLICIES,
                default="auto",
                help="auto: fetch the cached prefix only when that is predicted faster than prefilling (default)",
            )


def _read_text(path: str | Path, what: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise InvalidArgument(f"cannot read {what} {path}: {exc.strerror}") from None
    except UnicodeDecodeError:
        raise InvalidArgument(f"{what} {path} is not UTF-8 text") from None


def publish(args: argparse.Namespace) -> int:
    from rich.console import Console
    from rich.table import Table

    from kvcdn.wire.stub import CacheReader

    files = [Path(f) for f in args.files]
    if args.name and len(files) != 1:
        raise InvalidArgument("--name applies to a single FILE")
    texts = [_read_text(f, "FILE") for f in files]  # every file readable before anything is published

    price = None
    if args.price_per_load or args.price_per_token:
        from kvcdn.spec.prices import check_price
        from kvcdn.v1 import kvcdn_pb2 as pb

        if not args.pay_to:
            raise InvalidArgument("a priced document names the account it pays (--pay-to)")
        price = pb.Price(
            per_load=args.price_per_load, per_token=args.price_per_token, asset=args.asset, pay_to=args.pay_to
        )
        check_price(price)

    async def run() -> list[Any]:
        async with CacheReader(args.origin, token=read_token(args.token_file), tls=TLSFiles.from_args(args)) as origin:
            return [
                await origin.publish(args.name or f.stem, text, args.codecs, price=price)
                for f, text in zip(files, texts, strict=True)
            ]

    results = asyncio.run(run())
    if args.trust:  # the origin signs what it publishes: check it is the publisher these agents trust
        from kvcdn.spec.provenance import TrustStore

        trust = TrustStore.from_files(args.trust)
        for r in results:
            trust.check_manifest(r.manifest, latest=True, sender=args.origin)
    table = Table("document", "version", "tokens", "blocks", "computed", "prefill s", "codecs", "first key")
    for r in results:
        m = r.manifest
        first = m.blocks[0].key.hex()[:16] if m.blocks else "-"
        table.add_row(
            m.document,
            str(m.version),
            str(m.token_count),
            str(len(m.blocks)),
            str(r.computed_blocks),
            f"{r.prefill_s:.2f}",
            ",".join(("raw", *m.codecs)),
            first,
        )
    console = Console()
    if not console.is_terminal:
        console = Console(width=160)  # logs and pipes: do not squeeze the table into 80 columns
    console.print(table)
    return 0


def purge(args: argparse.Namespace) -> int:
    from kvcdn.wire.stub import CacheReader

    document, _, version = args.document.partition("@")
    if version and not version.isdigit():
        raise InvalidArgument(f"{args.document!r} is not DOCUMENT[@VERSION]")

    async def run() -> Any:
        async with CacheReader(args.origin, token=read_token(args.token_file), tls=TLSFiles.from_args(args)) as origin:
            return await origin.purge(document, int(version or 0))

    resp = asyncio.run(run())
    versions = ", ".join(f"v{v}" for v in resp.versions)
    print(f"purged {document} {versions}: {resp.blocks_removed} blocks removed (invalidation event {resp.seq})")
    return 0


def fetch(args: argparse.Namespace) -> int:
    from kvcdn.client.api import KVClient
    from kvcdn.model.prompt import document_ids

    # Mistakes are reported before the model loads.
    text = _read_text(args.doc, "--doc") if args.doc else ""
    name, _, version = (args.document or "").partition("@")
    if version and not version.isdigit():
        raise InvalidArgument(f"--document {args.document!r}: the version after @ is a number")
    config = _client_config(args)
    model = ModelOptions.from_args(args).load()
    if args.document:

        async def by_name() -> Any:
            async with KVClient(config) as client:
                return await client.fetch_document(model, name, int(version or 0))

        try:
            fetched, manifest = asyncio.run(by_name())
        except KVCDNError as exc:
            raise _with_terms(exc) from None
        doc = list(manifest.token_ids)
    else:
        doc = document_ids(model.tokenizer, text)

        async def by_text() -> Any:
            async with KVClient(config) as client:
                return await client.fetch(model, doc)

        fetched = asyncio.run(by_text())
    if fetched.cached_tokens == 0:
        print(f"{args.doc or args.document}: not cached on the edges (publish it first)", file=sys.stderr)
        return 1
    result = {
        "doc_tokens": len(doc),
        "cached_tokens": fetched.cached_tokens,
        "bytes": fetched.n_bytes,
        "codec": fetched.codec,
        "fetch_s": round(fetched.fetch_s, 4),
        "gb_per_s": round(fetched.n_bytes / fetched.fetch_s / 1e9, 3),
        "verified_frames": "all (BLAKE3)",
        "edges": fetched.edges_used,
        "charged": _charged(fetched.receipts),
        "receipts": [f"{r.edge}#{r.seq}" for r in fetched.receipts],
    }
    if args.json:
        print(json.dumps(result))
    else:
        print(
            f"{fetched.cached_tokens}/{len(doc)} tokens, {fetched.n_bytes / 1e6:.1f} MB ({fetched.codec}) in "
            f"{fetched.fetch_s * 1e3:.0f} ms ({result['gb_per_s']} GB/s), every frame verified"
        )
    return 0


def _charged(receipts: list[Any]) -> dict[str, int]:
    """What receipts charged, by asset."""
    out: dict[str, int] = {}
    for r in receipts:
        out[r.asset] = out.get(r.asset, 0) + r.price
    return out


def _with_terms(exc: KVCDNError) -> KVCDNError:
    """`exc`, its message ending with what would pay, where the edge said (x402's PaymentRequired)."""
    from kvcdn.spec.prices import PAYMENT_REQUIRED_KEY, decode_payment_required

    terms = exc.trailers.get(PAYMENT_REQUIRED_KEY)
    if not terms:
        return exc
    required = decode_payment_required(terms)
    offers = "; or ".join(
        f"{int(a.amount):,} {a.asset} to {a.pay_to} ({a.scheme}: a grant from issuer "
        f"{' or '.join(a.extra.get('grantIssuers', [])) or '?'}, --grant and --agent-key)"
        for a in required.accepts
    )
    return type(exc)(f"{exc}. A load pays {offers}", trailers=exc.trailers)


def ask(args: argparse.Namespace) -> int:
    from kvcdn.client.agent import ask as ask_edges
    from kvcdn.client.api import KVClient

    text = _read_text(args.doc, "--doc")
    model = ModelOptions.from_args(args).load()

    async def run() -> Any:
        async with KVClient(_client_config(args)) as client:
            return await ask_edges(client, model, text, args.question, args.max_new_tokens, args.verify, args.policy)

    result = asyncio.run(run())
    if args.json:
        print(json.dumps(result.to_json()))
        return 0
    print(result.answer)
    if result.decision == "prefill":
        predicted = f"{result.predicted_prefill_s:.3f} s" if result.predicted_prefill_s is not None else "?"
        line = f"[prefilled locally ({result.doc_tokens} tokens, predicted {predicted}): faster than fetching"
    else:
        line = (
            f"[{result.cached_tokens}/{result.doc_tokens} tokens from cache, {result.cache_bytes / 1e6:.1f} MB "
            f"as {result.wire_bytes / 1e6:.1f} MB {result.codec} in {result.fetch_s:.3f} s"
        )
    if args.verify and not result.exact:
        line += (
            f"; verify: lossy {result.codec} cache, not exact by design: agrees with a local prefill on "
            f"{result.two_pass_matched_tokens}/{result.new_tokens} tokens (two-pass run), "
            f"{result.matched_tokens}/{result.new_tokens} (one-pass run)"
        )
    elif args.verify:
        identical = {True: "yes", False: "NO", None: "n/a"}[result.kv_bit_identical]
        line += (
            f"; verify: KV bit-identical to a local prefill {identical}, two-pass run "
            f"{result.two_pass_matched_tokens}/{result.new_tokens} tokens, one-pass run "
            f"{result.matched_tokens}/{result.new_tokens} (max |logit diff| {result.max_abs_logit_diff:.2e}), "
            f"local prefill {result.prefill_s:.2f} s ({result.speedup:.0f}x)"
        )
    print(line + "]", file=sys.stderr)
    return 0


def _client_config(args: argparse.Namespace) -> Any:
    from kvcdn.client.api import ClientConfig

    wallet = None
    if getattr(args, "grant", None) or getattr(args, "agent_key", None):
        from kvcdn.spec.grants import Wallet

        if not (args.grant and args.agent_key):
            raise InvalidArgument("--grant and --agent-key go together (the grant is bound to that key)")
        wallet = Wallet.from_files(args.grant, args.agent_key)
    return ClientConfig(
        tuple(args.edges),
        codecs=args.codecs,
        trust=args.trust,
        tls=TLSFiles.from_args(args),
        token=read_token(args.token_file),
        wallet=wallet,
    )
