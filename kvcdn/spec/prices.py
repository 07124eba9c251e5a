"""Prices: what loading a document costs (`Manifest.price`, signed with the manifest), what one
request of a load is charged, and how a refusal says what would pay, in x402's terms.

A price is `per_load` once per load plus `per_token` for each token of the cache served, in the
smallest unit of `asset`, credited to `pay_to` (the publisher's account). A load of a document spread
over several edges is several requests (one per run of blocks, kvcdn.client): each edge charges the
tokens of the blocks it *begins* sending (a request resumed in the middle of a block does not pay for
that block again), and the edge that begins block 0 charges `per_load`. So a load's requests together
charge exactly `per_load + per_token * tokens`, however its streams are split or resumed.

A priced load without a valid grant is refused with the gRPC status the grant check gives
(kvcdn.spec.grants) and, in the trailing metadata `payment-required`, an x402 `PaymentRequired`
(the x402 SDK's own type, version 2) as base64 of its JSON, as x402's HTTP transport sends its
`PAYMENT-REQUIRED` header: the scheme is `deferred` (settled later from signed receipts, kvcdn.ops.ledger),
and `extra` names the grant issuers the edge trusts and the load's document, version and tokens.
"""

from __future__ import annotations

import base64
import re
from collections.abc import Iterable
from typing import TYPE_CHECKING

from kvcdn.errors import InvalidArgument
from kvcdn.v1 import kvcdn_pb2 as pb

if TYPE_CHECKING:  # x402 takes ~0.1 s to import: only a refusal needs it
    from x402.schemas import PaymentRequired

__all__ = [
    "PAYMENT_REQUIRED_KEY",
    "SCHEME",
    "charge",
    "check_price",
    "decode_payment_required",
    "encode_payment_required",
    "is_priced",
    "payment_required",
    "request_name",
]

PAYMENT_REQUIRED_KEY = "payment-required"
"""Trailing metadata key of a refusal's x402 PaymentRequired (base64 of its JSON)."""
SCHEME = "deferred"
"""x402 scheme of a kvcdn load: a grant now, settlement later from receipts."""
NETWORK = "kvcdn:ledger"
_ASSET = re.compile(r"[A-Za-z0-9._:-]{1,32}")
_MAX_PAY_TO = 200


def is_priced(price: pb.Price | None) -> bool:
    return price is not None and bool(price.per_load or price.per_token)


def check_price(price: pb.Price) -> None:
    """InvalidArgument unless `price` is one a manifest may carry."""
    if not is_priced(price):
        raise InvalidArgument("a price needs per_load or per_token above 0 (leave the price out for a free document)")
    if not _ASSET.fullmatch(price.asset):
        raise InvalidArgument("a price's asset is 1 to 32 letters, digits or ._:- (such as USDC)")
    if not price.pay_to or len(price.pay_to) > _MAX_PAY_TO or not price.pay_to.isprintable():
        raise InvalidArgument(f"a price's pay_to is the publisher's account: 1 to {_MAX_PAY_TO} printable characters")


def charge(price: pb.Price, tokens: int, first: bool) -> int:
    """What a request is charged that begins blocks holding `tokens` tokens (`first`: block 0 among them)."""
    return (price.per_load if first else 0) + price.per_token * tokens


def request_name(document: str, version: int, idempotency_key: str) -> str:
    """The `req` of a load request's proof (kvcdn.spec.grants.make_proof)."""
    return f"{document}@{version}#{idempotency_key}"


def payment_required(manifest: pb.Manifest, edge: str, issuers: Iterable[str], error: str) -> PaymentRequired:
    """What a load of `manifest` at `edge` would need, as x402 states it."""
    from x402.schemas import PaymentRequired, PaymentRequirements, ResourceInfo

    price = manifest.price
    total = charge(price, manifest.token_count, True)
    return PaymentRequired(
        error=error,
        resource=ResourceInfo(
            url=f"kvcdn://{edge}/{manifest.document}@{manifest.version}",
            description=f"the KV cache of {manifest.document} v{manifest.version} ({manifest.token_count} tokens)",
        ),
        accepts=[
            PaymentRequirements(
                scheme=SCHEME,
                network=NETWORK,
                asset=price.asset,
                amount=str(total),
                pay_to=price.pay_to,
                max_timeout_seconds=300,
                extra={
                    "perLoad": str(price.per_load),
                    "perToken": str(price.per_token),
                    "tokens": manifest.token_count,
                    "document": manifest.document,
                    "version": manifest.version,
                    "grantIssuers": sorted(issuers),
                    "grantFormat": "JWT (alg Ed25519, cnf.jkt) with a kvcdn-pop+jwt proof per request",
                },
            )
        ],
    )


def encode_payment_required(required: PaymentRequired) -> str:
    return base64.b64encode(required.model_dump_json(exclude_none=True).encode()).decode()


def decode_payment_required(value: str | bytes) -> PaymentRequired:
    from x402.schemas import PaymentRequired

    raw = base64.b64decode(value if isinstance(value, bytes) else value.encode())
    return PaymentRequired.model_validate_json(raw)
