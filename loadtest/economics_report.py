"""`kvcdn loadtest economics`, the command: the measured inputs it reads (a bench's reuse curve, a live
run's report, a codecs report), every codec priced, and the tables, plots and JSON it prints; the
model itself is kvcdn.loadtest.economics."""

from __future__ import annotations

import csv
import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from kvcdn.errors import InvalidArgument
from kvcdn.loadtest.economics import (
    GB,
    PLACEMENTS,
    SWEEPS,
    Inputs,
    ReuseCurve,
    costs,
    paper_figures,
    sweep,
    verdict,
)
from kvcdn.loadtest.market import market
from kvcdn.spec.geometry import Geometry

__all__ = [
    "EconomicsRequest",
    "MeasuredCodec",
    "codecs_from_report",
    "curve_from_bench",
    "inputs_from_run",
    "run_economics",
    "write_sweep",
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
        **({"market": asdict(market(i))} if i.price_per_load_usd else {}),
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
    if i.price_per_load_usd:
        m = market(i)
        money = [
            ("agent", _money(-m.agent_cost_per_load * i.loads), _money(m.agent_saving_per_load * i.loads)),
            ("publisher", _money(m.publisher_revenue), _money(m.publisher_net)),
            ("network", _money(m.network_revenue), _money(m.network_revenue - m.network_cost)),
        ]
        title = f"selling the cache at ${m.price:g} a load, {i.loads:,.0f} loads"
        out.append(_table(title, ["party", "pays (-) / is paid", "better off than re-prefill / net"], money, markdown))
        out.append("\n".join(m.sentences(i)))
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
