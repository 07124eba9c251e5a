"""`kvcdn loadtest economics`: when does shipping a KV cache beat recomputing it?

The model prices N agents that each read one document of T tokens, `loads_per_agent` times, in four
ways (every input is a flag and printed with the result):

- re-prefill: every load runs prefill, N*k*T tokens at the prefill price;
- provider-hosted: the cache lives next to the GPUs that serve the agents (how production prompt
  caching works): one prefill to publish, reuse compute per load, storage of one copy, no egress;
- edge: agents run the model themselves and stream the cache from a CDN edge at every load: edge ->
  agent egress per load, origin -> edge egress per edge miss (at least R transfers, one per owner),
  storage of the origin copy and R edge copies;
- client: each agent downloads the cache once through the edges and keeps it for its k loads: edge
  egress per agent instead of per load, plus storage of N client copies.

Reuse compute is prefill compute divided by the reuse ratio (prefill / reuse), which grows with the
length of the document; it is a curve through measured points, interpolated in log-log space. The
default points are the preprint's (Qwen3-4B: 8.6x at 255 tokens, 49.7x at 3,774); `--bench` takes the
points measured by `kvcdn loadtest bench --json`. `--codecs-report` takes the ratios and quality that
`kvcdn loadtest codecs --json` measured and prices every codec: which one, if any, makes shipping
cheaper than recomputing, and at what egress price. This module is the model; reading those reports
and printing the results is kvcdn.loadtest.economics_report.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from kvcdn.errors import InvalidArgument
from kvcdn.spec.geometry import Geometry
from kvcdn.spec.shapes import SHAPES

__all__ = [
    "PAPER",
    "PAPER_REUSE",
    "PLACEMENTS",
    "SWEEPS",
    "Costs",
    "Inputs",
    "PaperFigure",
    "ReuseCurve",
    "Verdict",
    "costs",
    "geometry_from",
    "paper_figures",
    "sweep",
    "verdict",
]

GB = 1e9
"""Egress and storage are priced per decimal gigabyte, as clouds bill them."""


def geometry_from(spec: str, dtype: str) -> Geometry:
    """A published model's geometry (kvcdn.spec.shapes) or the one a model directory's config.json describes."""
    if spec in SHAPES:
        return SHAPES[spec].kv_geometry(dtype)
    config_file = Path(spec) / "config.json"
    if not config_file.is_file():
        raise InvalidArgument(
            f"--geometry {spec!r} is neither one of {', '.join(SHAPES)} nor a model directory with a config.json"
        )
    config = json.loads(config_file.read_text())
    config = config.get("text_config", config)
    try:
        heads = int(config["num_attention_heads"])
        head_dim = int(config.get("head_dim") or config["hidden_size"] // heads)
        return Geometry(
            int(config["num_hidden_layers"]), int(config.get("num_key_value_heads", heads)), head_dim, dtype
        )
    except (KeyError, TypeError, ValueError) as exc:
        raise InvalidArgument(f"{config_file} does not describe a decoder's layers and heads ({exc})") from None


@dataclass(frozen=True)
class ReuseCurve:
    """Prefill compute over reuse compute, by document length: a log-log interpolation through
    measured (tokens, ratio) points, extended past the ends with the nearest segment's slope."""

    points: tuple[tuple[int, float], ...]
    source: str

    def __post_init__(self) -> None:
        if not self.points:
            raise InvalidArgument("a reuse curve needs at least one (tokens, ratio) point")
        if any(t <= 0 or r <= 1 for t, r in self.points):
            raise InvalidArgument("reuse points need tokens > 0 and a ratio > 1 (reuse cheaper than prefill)")
        object.__setattr__(self, "points", tuple(sorted(self.points)))

    def at(self, tokens: float) -> float:
        pts = self.points
        if len(pts) == 1:
            return pts[0][1]
        i = 1
        while i < len(pts) - 1 and tokens > pts[i][0]:
            i += 1
        (t0, r0), (t1, r1) = pts[i - 1], pts[i]
        slope = math.log(r1 / r0) / math.log(t1 / t0)
        ratio: float = r0 * math.pow(tokens / t0, slope)
        return max(1.0, ratio)


PAPER_REUSE = ReuseCurve(
    ((255, 8.6), (3774, 14.71 / 0.296)), "preprint, Qwen3-4B: 8.6x at 255, 14.71 s / 0.296 s at 3774"
)


@dataclass(frozen=True)
class Inputs:
    geometry: Geometry = field(default_factory=lambda: geometry_from("qwen3-4b", "float16"))
    tokens: int = 3774
    agents: float = 80e6
    loads_per_agent: float = 1.0
    prefill_usd_per_mtok: float = 5.0
    reuse: ReuseCurve = PAPER_REUSE
    origin_egress_usd_per_gb: float = 0.09
    """Origin -> edge (cache fill)."""
    edge_egress_usd_per_gb: float = 0.09
    """Edge -> agent."""
    compression: float = 1.0
    """Raw KV bytes over shipped bytes."""
    hit_ratio: float = 0.99
    """Loads an edge serves from its tiers without going to the origin."""
    replicas: int = 2
    storage_usd_per_gb_month: float = 0.023
    storage_months: float = 1.0
    price_per_load_usd: float = 0.0
    """What the publisher charges an agent per load (0: no market: only costs are compared)."""
    network_fee_bps: int = 0
    """The network's (the CDN's) share of each price, in basis points; it pays egress and storage."""

    def __post_init__(self) -> None:
        checks = {
            "price per load (>= 0)": self.price_per_load_usd >= 0,
            "network fee (0..10000 basis points)": 0 <= self.network_fee_bps <= 10_000,
            "tokens": self.tokens > 0,
            "agents": self.agents > 0,
            "loads per agent": self.loads_per_agent >= 1,
            "prefill price": self.prefill_usd_per_mtok > 0,
            "egress prices": min(self.origin_egress_usd_per_gb, self.edge_egress_usd_per_gb) >= 0,
            "compression (raw/shipped, at least 1)": self.compression >= 1,
            "hit ratio (0..1)": 0 <= self.hit_ratio <= 1,
            "replicas": self.replicas >= 1,
            "storage price and months": min(self.storage_usd_per_gb_month, self.storage_months) >= 0,
        }
        bad = [name for name, ok in checks.items() if not ok]
        if bad:
            raise InvalidArgument(f"out of range: {', '.join(bad)}")

    @property
    def raw_gb(self) -> float:
        return self.tokens * self.geometry.token_bytes / GB

    @property
    def shipped_gb(self) -> float:
        return self.raw_gb / self.compression

    @property
    def loads(self) -> float:
        return self.agents * self.loads_per_agent

    @property
    def reuse_ratio(self) -> float:
        return self.reuse.at(self.tokens)

    @property
    def prefill_usd(self) -> float:
        """One prefill of the document."""
        return self.tokens * self.prefill_usd_per_mtok / 1e6

    def describe(self) -> list[tuple[str, str, str]]:
        """(input, value, where it comes from / what it assumes) rows for the report."""
        g = self.geometry
        return [
            ("KV geometry", f"{g.layers} layers x {g.kv_heads} KV heads x {g.head_dim} x {g.dtype}", "--geometry"),
            ("KV bytes per token", f"{g.token_bytes:,}", "2 (K,V) x layers x heads x head_dim x dtype bytes"),
            ("document", f"{self.tokens:,} tokens = {self.raw_gb:.4f} GB raw", "--tokens"),
            ("agents x loads each", f"{self.agents:,.0f} x {self.loads_per_agent:g}", "--agents, --loads-per-agent"),
            ("prefill price", f"${self.prefill_usd_per_mtok:g} per M tokens", "--prefill-usd-per-mtok or GPU $/h"),
            ("reuse ratio (prefill/reuse)", f"{self.reuse_ratio:.1f}x at {self.tokens} tokens", self.reuse.source),
            ("egress origin -> edge", f"${self.origin_egress_usd_per_gb:g}/GB", "--origin-egress-usd-per-gb"),
            ("egress edge -> agent", f"${self.edge_egress_usd_per_gb:g}/GB", "--edge-egress-usd-per-gb"),
            ("compression", f"{self.compression:.4g}x -> {self.shipped_gb:.4f} GB shipped", "--compression"),
            ("edge hit ratio", f"{self.hit_ratio:.1%}", "--hit-ratio (misses go to the origin)"),
            ("replicas", str(self.replicas), "--replicas (edge copies; the cold fill is >= R transfers)"),
            (
                "storage",
                f"${self.storage_usd_per_gb_month:g}/GB-month x {self.storage_months:g} months",
                "--storage-usd-per-gb-month, --storage-months",
            ),
            *(
                [
                    (
                        "price per load",
                        f"${self.price_per_load_usd:g}, the network keeps {self.network_fee_bps / 100:g}%",
                        "--price-per-load, --network-fee-bps",
                    )
                ]
                if self.price_per_load_usd
                else []
            ),
        ]


@dataclass(frozen=True)
class Costs:
    """Dollars for all loads, by placement and component."""

    placement: str
    compute: float
    origin_egress: float
    edge_egress: float
    storage: float
    loads: float

    @property
    def total(self) -> float:
        return self.compute + self.origin_egress + self.edge_egress + self.storage

    @property
    def per_load(self) -> float:
        return self.total / self.loads


PLACEMENTS = ("re-prefill", "provider-hosted", "edge", "client")


def costs(i: Inputs) -> dict[str, Costs]:
    """Every placement's costs for the inputs (see the module docstring)."""
    reuse_compute = i.prefill_usd + i.loads * i.prefill_usd / i.reuse_ratio  # publish once, then reuse
    copy_usd = i.shipped_gb * i.storage_usd_per_gb_month * i.storage_months

    def fill(edge_requests: float) -> float:
        """Origin -> edge egress for this many requests reaching the edges."""
        return max(i.replicas, edge_requests * (1 - i.hit_ratio)) * i.shipped_gb * i.origin_egress_usd_per_gb

    return {
        "re-prefill": Costs("re-prefill", i.loads * i.prefill_usd, 0.0, 0.0, 0.0, i.loads),
        "provider-hosted": Costs("provider-hosted", reuse_compute, 0.0, 0.0, copy_usd, i.loads),
        "edge": Costs(
            "edge",
            reuse_compute,
            fill(i.loads),
            i.loads * i.shipped_gb * i.edge_egress_usd_per_gb,
            (1 + i.replicas) * copy_usd,
            i.loads,
        ),
        "client": Costs(
            "client",
            reuse_compute,
            fill(i.agents),
            i.agents * i.shipped_gb * i.edge_egress_usd_per_gb,
            (1 + i.replicas + i.agents) * copy_usd,
            i.loads,
        ),
    }


@dataclass(frozen=True)
class Verdict:
    best: str
    """The cheapest placement."""
    break_even_egress_usd_per_gb: float
    """Edge -> agent price at which streaming from an edge costs what re-prefill costs (<= 0: never)."""
    compression_needed: float
    """Compression at which the edge placement costs what re-prefill costs, at the given prices
    (inf: no compression is enough, because reuse compute alone costs more)."""
    egress_over_prefill: float
    """Egress of one load (edge -> agent) over the prefill it replaces."""
    break_even_loads: float
    """Reuses that pay back the publishing prefill (r / (r - 1))."""

    def sentences(self, i: Inputs) -> list[str]:
        out = [f"cheapest placement: {self.best}."]
        if self.break_even_egress_usd_per_gb > 0:
            out.append(
                f"streaming from an edge beats re-prefill below ${self.break_even_egress_usd_per_gb:.4f}/GB of "
                f"edge -> agent egress (given: ${i.edge_egress_usd_per_gb:g}/GB)."
            )
        else:
            out.append("streaming from an edge never beats re-prefill at these compute and origin prices.")
        if math.isinf(self.compression_needed):
            out.append("no compression makes shipping pay: reuse compute and the fill already cost more.")
        elif self.compression_needed <= i.compression:
            out.append(
                f"shipping pays already at {i.compression:g}x compression (needs {self.compression_needed:.2f}x)."
            )
        else:
            out.append(
                f"shipping pays at {self.compression_needed:.2f}x lossless compression or better "
                f"(KV is nearly incompressible: ~1.03x with a general-purpose codec)."
            )
        out.append(
            f"one load's egress is {self.egress_over_prefill:.2f}x the prefill it replaces; "
            f"the publishing prefill pays back after {self.break_even_loads:.2f} reuses."
        )
        return out


def verdict(i: Inputs) -> Verdict:
    c = costs(i)
    base = c["re-prefill"].total
    edge = c["edge"]
    rest = edge.compute + edge.origin_egress + edge.storage
    shipped_gb_all = i.loads * i.shipped_gb
    break_even = (base - rest) / shipped_gb_all
    # edge total = compute + B / compression, B = the byte-priced part at 1x compression
    byte_part = (edge.origin_egress + edge.edge_egress + edge.storage) * i.compression
    compression_needed = byte_part / (base - edge.compute) if base > edge.compute else math.inf
    return Verdict(
        best=min(c.values(), key=lambda x: x.total).placement,
        break_even_egress_usd_per_gb=break_even,
        compression_needed=compression_needed,
        egress_over_prefill=i.shipped_gb * i.edge_egress_usd_per_gb / i.prefill_usd,
        break_even_loads=i.reuse_ratio / (i.reuse_ratio - 1),
    )


# --- the preprint -----------------------------------------------------------------------------------

PAPER_ARTIFACT_GB = 0.54
PAPER = Inputs(
    geometry=geometry_from("qwen3-4b", "float16"),
    tokens=3774,
    agents=80e6,
    # $1.5M / (80M x 3,774 tokens) = $4.97 per M tokens: the round $5 the figures imply
    prefill_usd_per_mtok=5.0,
    reuse=PAPER_REUSE,
    # $0.049 per load = 2.6 x one prefill ($0.0189) for a 0.54 GB artifact: $0.09/GB
    origin_egress_usd_per_gb=0.09,
    edge_egress_usd_per_gb=0.09,
    # the paper ships a 0.54 GB artifact for 3,774 x 147,456 B = 0.5565 GB of fp16 KV: ~3% compression
    compression=3774 * 147456 / (PAPER_ARTIFACT_GB * GB),
)


@dataclass(frozen=True)
class PaperFigure:
    name: str
    paper: float
    ours: float
    unit: str

    @property
    def rel_diff(self) -> float:
        return abs(self.ours - self.paper) / abs(self.paper)


def paper_figures(i: Inputs = PAPER) -> list[PaperFigure]:
    """The preprint's headline figures beside the model's, from the same inputs."""
    c = costs(i)
    v = verdict(i)
    load_egress = i.shipped_gb * i.edge_egress_usd_per_gb
    reuse_only = c["provider-hosted"].compute - i.prefill_usd
    return [
        PaperFigure("KV per token (fp16)", 0.148, i.geometry.token_bytes / 1e6, "MB"),
        PaperFigure("artifact per load (sets compression)", PAPER_ARTIFACT_GB, i.shipped_gb, "GB"),
        PaperFigure("compute saving at 3,774 tokens", 49.7, c["re-prefill"].total / reuse_only, "x"),
        PaperFigure("compute saving at 255 tokens", 8.6, i.reuse.at(255), "x"),
        PaperFigure("re-prefill, 80M agents", 1.5e6, c["re-prefill"].total, "$"),
        PaperFigure("reuse compute, 80M agents", 0.03e6, reuse_only, "$"),
        PaperFigure("egress of one load", 0.049, load_egress, "$"),
        PaperFigure("egress of one load / its prefill", 2.6, v.egress_over_prefill, "x"),
    ]


# --- sweeps ----------------------------------------------------------------------------------------


SWEEPS: dict[str, tuple[str, Callable[[Inputs, float], Inputs], Sequence[float]]] = {
    "length": (
        "document length (tokens)",
        lambda i, x: replace(i, tokens=int(x)),
        [2**k for k in range(7, 16)],
    ),
    "agents": ("agents", lambda i, x: replace(i, agents=x), [10**k for k in range(0, 10)]),
    "egress-price": (
        "edge -> agent egress ($/GB)",
        lambda i, x: replace(i, edge_egress_usd_per_gb=x),
        [0.0, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.09, 0.12, 0.2],
    ),
    "compression": (
        "compression (raw/shipped)",
        lambda i, x: replace(i, compression=x),
        [1.0, 1.03, 1.25, 1.5, 2.0, 3.0, 4.0, 6.0, 8.0, 12.0, 16.0],
    ),
}


def sweep(base: Inputs, what: str) -> tuple[str, list[dict[str, float]]]:
    """Total cost of each placement as one input varies (rows of x and per-placement dollars)."""
    if what not in SWEEPS:
        raise InvalidArgument(f"--sweep takes one of {', '.join(SWEEPS)}")
    label, vary, xs = SWEEPS[what]
    rows = []
    for x in xs:
        c = costs(vary(base, x))
        rows.append({"x": float(x), **{name: c[name].total for name in PLACEMENTS}})
    return label, rows
