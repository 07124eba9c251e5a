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
cheaper than recomputing, and at what egress price.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from kvcdn.errors import InvalidArgument
from kvcdn.spec.geometry import Geometry
from kvcdn.spec.shapes import SHAPES

__all__ = [
    "PAPER",
    "PAPER_REUSE",
    "Costs",
    "Inputs",
    "MeasuredCodec",
    "PaperFigure",
    "ReuseCurve",
    "Verdict",
    "codecs_from_report",
    "costs",
    "geometry_from",
    "inputs_from_run",
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

    def __post_init__(self) -> None:
        checks = {
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


# --- bridges and sweeps -------------------------------------------------------------------------------


def curve_from_bench(path: Path) -> ReuseCurve:
    """The prefill/fetch ratios `kvcdn loadtest bench --json FILE` measured, per length."""
    try:
        rows = json.loads(path.read_text())["rows"]
        points = tuple((int(r["tokens"]), float(r["prefill_s"]) / float(r["fetch_s"])) for r in rows)
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as exc:
        raise InvalidArgument(f"--bench {path}: not a `kvcdn loadtest bench --json` report ({exc})") from None
    return ReuseCurve(points, f"measured by kvcdn loadtest bench ({path.name})")


def inputs_from_run(path: Path, base: Inputs, agents: float | None) -> tuple[Inputs, dict[str, Any]]:
    """Inputs priced from a live run's report (`kvcdn loadtest run --report-dir`): its model geometry,
    mean cached tokens and bytes per load, and the hit ratio measured on the edges. `agents` scales
    the run's per-load figures to that many loads (default: the run's own fetch count)."""
    try:
        report = json.loads(path.read_text())
        g = report["geometry"]
        geometry = Geometry(int(g["layers"]), int(g["kv_heads"]), int(g["head_dim"]), str(g["dtype"]))
        fetches = int(report["fetches_ok"])
        tokens = round(int(report["tokens_fetched"]) / fetches)
        served = float(report["edges"]["bytes_served"])
        from_origin = float(report["edges"]["bytes_from_origin"])
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError) as exc:
        raise InvalidArgument(f"--from-run {path}: not a `kvcdn loadtest run` report ({exc})") from None
    hit_ratio = max(0.0, 1 - from_origin / served) if served else 0.0
    inputs = replace(
        base,
        geometry=geometry,
        tokens=tokens,
        agents=agents or fetches,
        loads_per_agent=1.0,
        hit_ratio=hit_ratio,
        compression=1.0,
    )
    measured = {
        "fetches": fetches,
        "mean_cached_tokens": tokens,
        "edge_to_agent_gb": served / GB,
        "origin_to_edge_gb": from_origin / GB,
        "measured_hit_ratio": hit_ratio,
    }
    return inputs, measured


@dataclass(frozen=True)
class MeasuredCodec:
    """One codec as `kvcdn loadtest codecs --json` measured it in the priced dtype's width."""

    codec: str
    exact: bool
    ratio: float
    """Raw bytes of the priced dtype / shipped bytes."""
    top1_agreement: float
    greedy_agreement: float
    measured_dtype: str


def codecs_from_report(path: Path, dtype: str) -> tuple[MeasuredCodec, ...]:
    """The codecs a `kvcdn loadtest codecs --json FILE` report measured, for a cache of `dtype`: the rows
    of that dtype, or of bfloat16 for float16 (same width; the report measures bf16 and float32)."""
    wanted = "float32" if dtype == "float32" else "bfloat16"
    try:
        rows = json.loads(path.read_text())["rows"]
        found = tuple(
            MeasuredCodec(
                codec=str(r["codec"]),
                exact=bool(r["exact"]),
                ratio=float(r["ratio"]),
                top1_agreement=float(r["top1_agreement"]),
                greedy_agreement=float(r["greedy_agreement"]),
                measured_dtype=str(r["dtype"]),
            )
            for r in rows
            if r["dtype"] == wanted and not r.get("reference", False)  # the 1-ulp noise row is no codec
        )
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise InvalidArgument(f"--codecs-report {path}: not a `kvcdn loadtest codecs --json` report ({exc})") from None
    if not found:
        raise InvalidArgument(
            f"--codecs-report {path} has no {wanted} rows: run `kvcdn loadtest codecs --dtypes {wanted} --json FILE`"
        )
    if any(c.ratio <= 0 for c in found):
        raise InvalidArgument(f"--codecs-report {path}: a codec's ratio is not positive")
    return found


def codec_rows(i: Inputs, measured: Sequence[MeasuredCodec]) -> list[dict[str, Any]]:
    """Each measured codec priced: the inputs with its ratio as the compression."""
    out = []
    for m in measured:
        priced = replace(i, compression=m.ratio)
        c, v = costs(priced), verdict(priced)
        base, edge = c["re-prefill"].total, c["edge"].total
        out.append(
            {
                "codec": m.codec,
                "exact": m.exact,
                "ratio": m.ratio,
                "top1_agreement": m.top1_agreement,
                "greedy_agreement": m.greedy_agreement,
                "shipped_gb_per_load": priced.shipped_gb,
                "edge_total_usd": edge,
                "re_prefill_total_usd": base,
                "edge_vs_re_prefill": base / edge,
                "break_even_egress_usd_per_gb": v.break_even_egress_usd_per_gb,
                "shipping_pays": edge < base,
                "best_placement": v.best,
            }
        )
    return out


def codecs_verdict(rows: Sequence[dict[str, Any]], i: Inputs) -> str:
    """Which codec makes shipping cheaper than recomputing, exact ones first."""
    paying = [r for r in rows if r["shipping_pays"]]
    needed = verdict(replace(i, compression=1.0)).compression_needed
    if not paying:
        best = max(rows, key=lambda r: r["ratio"])
        return (
            f"no measured codec makes streaming from an edge cheaper than re-prefill at "
            f"${i.edge_egress_usd_per_gb:g}/GB: it needs {needed:.2f}x, the best measured is {best['codec']} at "
            f"{best['ratio']:.2f}x (below ${best['break_even_egress_usd_per_gb']:.4f}/GB of egress it pays)."
        )
    exact = [r for r in paying if r["exact"]]
    cheapest = min(paying, key=lambda r: r["edge_total_usd"])
    parts = [f"shipping beats re-prefill with {', '.join(r['codec'] for r in paying)} (needs {needed:.2f}x)."]
    if exact:
        e = min(exact, key=lambda r: r["edge_total_usd"])
        parts.append(f"cheapest exact codec: {e['codec']} ({e['edge_vs_re_prefill']:.2f}x cheaper than re-prefill).")
    else:
        parts.append("no exact codec pays at these prices: only lossy ones do.")
    if not cheapest["exact"]:
        parts.append(
            f"cheapest overall: {cheapest['codec']} ({cheapest['edge_vs_re_prefill']:.2f}x cheaper, top-1 agreement "
            f"{cheapest['top1_agreement']:.1%})."
        )
    return " ".join(parts)


def codecs_report(i: Inputs, measured: Sequence[MeasuredCodec], markdown: bool) -> list[Any]:
    rows = codec_rows(i, measured)
    table = _table(
        f"codecs measured ({measured[0].measured_dtype}), each priced as the edge placement",
        [
            "codec",
            "exact",
            "ratio",
            "top-1 / greedy agreement",
            "GB per load",
            "edge total",
            "vs re-prefill",
            "pays below $/GB",
            "beats re-prefill",
        ],
        [
            (
                r["codec"],
                "yes" if r["exact"] else "no",
                f"{r['ratio']:.2f}x",
                f"{r['top1_agreement']:.1%} / {r['greedy_agreement']:.0%}",
                f"{r['shipped_gb_per_load']:.4f}",
                _money(r["edge_total_usd"]),
                f"{r['edge_vs_re_prefill']:.2f}x",
                f"${r['break_even_egress_usd_per_gb']:.4f}" if r["break_even_egress_usd_per_gb"] > 0 else "never",
                "yes" if r["shipping_pays"] else "no",
            )
            for r in rows
        ],
        markdown,
    )
    return [table, codecs_verdict(rows, i)]


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


def write_sweep(base: Inputs, what: str, out_dir: Path) -> tuple[Path, Path]:
    """The sweep as CSV and as a PNG plot (log axes where the values span decades)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    label, rows = sweep(base, what)
    out_dir.mkdir(parents=True, exist_ok=True)
    csv_path = out_dir / f"economics-{what}.csv"
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=["x", *PLACEMENTS])
        writer.writeheader()
        writer.writerows(rows)
    fig, ax = plt.subplots(figsize=(8, 5))
    xs = [r["x"] for r in rows]
    for name in PLACEMENTS:
        ax.plot(xs, [r[name] for r in rows], marker="o", label=name)
    if what != "egress-price":
        ax.set_xscale("log")
    else:
        ax.axvline(verdict(base).break_even_egress_usd_per_gb, color="grey", linestyle="--", label="break-even")
    ax.set_yscale("log")
    ax.set_xlabel(label)
    ax.set_ylabel("total cost, all loads ($)")
    g = base.geometry
    ax.set_title(f"kvcdn economics: {g.layers}x{g.kv_heads}x{g.head_dim} {g.dtype}, {base.agents:,.0f} agents")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    png_path = out_dir / f"economics-{what}.png"
    fig.savefig(png_path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return csv_path, png_path


def to_json(i: Inputs) -> dict[str, Any]:
    c = costs(i)
    v = verdict(i)
    inputs = asdict(i)
    inputs["reuse"] = {"points": list(i.reuse.points), "source": i.reuse.source, "ratio": i.reuse_ratio}
    return {
        "inputs": inputs,
        "costs": {name: {**asdict(x), "total": x.total, "per_load": x.per_load} for name, x in c.items()},
        "verdict": asdict(v),
    }


# --- the command ----------------------------------------------------------------------------------------


def _money(x: float) -> str:
    if x == 0:
        return "-"
    if abs(x) >= 1e6:
        return f"${x / 1e6:,.3f}M"
    if abs(x) >= 1:
        return f"${x:,.2f}"
    return f"${x:.5f}"


def _table(title: str, head: Sequence[str], rows: Sequence[Sequence[str]], markdown: bool) -> Any:
    if markdown:
        lines = [f"**{title}**", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        lines += ["| " + " | ".join(r) + " |" for r in rows]
        return "\n".join(lines) + "\n"
    from rich.table import Table

    table = Table(*head, title=title)
    for r in rows:
        table.add_row(*r)
    return table


def report(i: Inputs, markdown: bool, measured: dict[str, Any] | None = None) -> list[Any]:
    """The inputs, the costs per placement, the verdict and, for the paper preset, the comparison."""
    out: list[Any] = [
        _table("inputs (every one a flag)", ["input", "value", "source / assumption"], i.describe(), markdown)
    ]
    if measured:
        seen = [(k.replace("_", " "), f"{v:,.4g}" if isinstance(v, float) else str(v)) for k, v in measured.items()]
        out.append(_table("measured in the live run", ["figure", "value"], seen, markdown))
    c = costs(i)
    base = c["re-prefill"].total
    rows = [
        (
            name,
            _money(x.compute),
            _money(x.origin_egress),
            _money(x.edge_egress),
            _money(x.storage),
            _money(x.total),
            _money(x.per_load),
            f"{base / x.total:.2f}x",
        )
        for name, x in c.items()
    ]
    head = [
        "placement",
        "compute",
        "egress origin->edge",
        "egress edge->agent",
        "storage",
        "total",
        "per load",
        "vs re-prefill",
    ]
    out.append(_table(f"cost of {i.loads:,.0f} loads", head, rows, markdown))
    out.append("\n".join(verdict(i).sentences(i)))
    return out


def _figure(x: float, unit: str) -> str:
    return _money(x) if unit == "$" else f"{x:,.4g} {unit}"


def paper_report(markdown: bool) -> tuple[list[Any], bool]:
    figures = paper_figures()
    rows = [
        (
            f.name,
            _figure(f.paper, f.unit),
            _figure(f.ours, f.unit),
            f"{f.rel_diff:.1%}",
            "yes" if f.rel_diff <= 0.02 else "NO",
        )
        for f in figures
    ]
    table = _table(
        "the preprint (arXiv 2606.13361) beside this model, same inputs",
        ["figure", "paper", "ours", "diff", "within 2%"],
        rows,
        markdown,
    )
    return [table], all(f.rel_diff <= 0.02 for f in figures)


@dataclass(frozen=True)
class EconomicsRequest:
    """What `kvcdn loadtest economics` was asked for."""

    inputs: Inputs
    paper: bool = False
    """Print the preprint's figures beside ours (with `inputs` = PAPER)."""
    from_run: Path | None = None
    """A `kvcdn loadtest run` report whose traffic to price."""
    agents: float | None = None
    """With `from_run`: agents to scale the run to (default: the run's)."""
    sweeps: tuple[str, ...] = ()
    """Names from SWEEPS: a CSV and a PNG each, in `out_dir`."""
    out_dir: Path = Path("kvcdn-economics")
    markdown: bool = False
    json: bool = False
    codecs: tuple[MeasuredCodec, ...] = ()
    """Codecs measured by `kvcdn loadtest codecs --json`, each priced with its ratio."""

    def __post_init__(self) -> None:
        unknown = [s for s in self.sweeps if s not in SWEEPS]
        if unknown:
            raise InvalidArgument(f"--sweep takes one of {', '.join(SWEEPS)}, not {', '.join(unknown)}")


def run_economics(request: EconomicsRequest) -> int:
    """`kvcdn loadtest economics`: the report (tables or JSON), the paper check, the sweeps."""
    from rich.console import Console

    console = Console(width=None if Console().is_terminal else 160)
    markdown = request.markdown

    def show(parts: Sequence[Any]) -> None:
        for part in parts:
            if isinstance(part, str):
                print(part) if markdown else console.print(part)
            else:
                console.print(part)

    inputs, measured = request.inputs, None
    if request.from_run is not None:
        inputs, measured = inputs_from_run(request.from_run, inputs, request.agents)
    if request.json:
        out = to_json(inputs)
        if measured:
            out["measured"] = measured
        if request.paper:
            out["paper"] = [{**asdict(f), "rel_diff": f.rel_diff} for f in paper_figures()]
        if request.codecs:
            out["codecs"] = codec_rows(inputs, request.codecs)
            out["codecs_verdict"] = codecs_verdict(out["codecs"], inputs)
        print(json.dumps(out, indent=2))
    else:
        show(report(inputs, markdown, measured))
        if request.codecs:
            show(codecs_report(inputs, request.codecs, markdown))
    ok = True
    if request.paper and not request.json:
        parts, ok = paper_report(markdown)
        show(parts)
    for what in request.sweeps:
        csv_path, png_path = write_sweep(inputs, what, request.out_dir)
        print(f"sweep {what}: {csv_path} {png_path}")
    return 0 if ok else 1
