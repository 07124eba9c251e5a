"""What `kvcdn loadtest bench` prints: the rows as a table (Markdown or the terminal's), the crossover
length per codec, and where the CPU time went (kvcdn.loadtest.bench measures them)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

from kvcdn.spec.geometry import DEFAULT_FRAME_BYTES

if TYPE_CHECKING:
    from kvcdn.loadtest.bench import BenchConfig, BenchRow
    from kvcdn.model.loading import LoadedModel

__all__ = ["crossover", "figures_table", "grid", "print_report", "render", "render_costs", "title_of"]


def title_of(config: BenchConfig, model: LoadedModel) -> str:
    """What a bench measured, in the words its tables are titled with."""
    edges = f"{config.edges} warm edges" if config.edges > 1 else "warm edge"
    if config.edges > 1 and not config.spread:
        edges += ", blocks from their primary owners"
    if config.streams_per_run > 1:
        edges += f", {config.streams_per_run} streams an edge"
    if config.frame_bytes != DEFAULT_FRAME_BYTES:
        edges += f", {config.frame_bytes / (1 << 20):g} MiB frames"
    signed = "signed blocks checked by edges and agent" if config.signed else "unsigned"
    if config.tls:
        signed += ", mutual TLS on every port"
    return f"kvcdn bench: {model.name}, {model.geometry.dtype} on {model.device}, {edges}, {signed}, loopback"


def print_report(rows: list[BenchRow], config: BenchConfig, model: LoadedModel, console: Console) -> None:
    """The bench's tables on stdout: one per codec (a row per length), where the time went, and the
    crossover per codec."""
    title = title_of(config, model)
    codecs = list(dict.fromkeys(r.codec for r in rows)) or ["-"]
    transport = "TLS" if config.tls else "TCP"
    tables = [
        render(
            [r for r in rows if r.codec == c], f"{title}; {c}" if len(codecs) > 1 else title, config.markdown, transport
        )
        for c in codecs
    ]
    for out in (
        *tables,
        render_costs(rows, "Where the time went (CPU seconds per GB streamed, mean of the repeats)", config.markdown),
    ):
        if isinstance(out, str):
            print(out + "\n")
        else:
            console.print(out)
    print(f"Crossover: {crossover(rows)}" if rows else "Crossover: no row was measured.")


def render(rows: list[BenchRow], title: str, markdown: bool, transport: str = "TCP") -> str | Table:
    """The table; `transport` names what the raw baseline moved ("TCP", or "TLS" under --tls)."""
    head = [
        "tokens",
        "cache MB",
        "codec",
        "wire MB",
        "prefill s",
        "fetch s",
        "prefill/fetch",
        "prefill+1st s",
        "fetch+1st s",
        "TTFT speed-up",
        "fetch GB/s",
        "wire GB/s",
        "break-even GB/s",
        "streams",
        f"raw {transport} GB/s",
        "fetch/raw",
        "BLAKE3 GB/s",
        "bound GB/s",
        "fetch/bound",
        "KV = own prefill",
        "1st token = two-pass",
        "1st token = one-pass",
    ]
    body = [
        [
            str(r.tokens),
            f"{r.cache_bytes / 1e6:.1f}",
            r.codec,
            f"{r.wire_bytes / 1e6:.1f}",
            f"{r.prefill_s:.3f}",
            f"{r.fetch_s:.3f}",
            f"{r.fetch_speedup:.1f}x",
            f"{r.local_s:.3f}",
            f"{r.cached_s:.3f}",
            f"{r.ttft_speedup:.1f}x",
            f"{r.fetch_gbps:.2f}",
            f"{r.wire_gbps:.2f}",
            f"{r.breakeven_gbps:.2f}",
            str(r.streams),
            f"{r.raw_gbps:.2f}",
            f"{r.wire_gbps / r.raw_gbps:.0%}",
            f"{r.hash_gbps:.2f}",
            f"{r.bound_gbps:.2f}",
            f"{r.wire_gbps / r.bound_gbps:.0%}",
            "yes" if r.kv_identical else "no",
            "yes" if r.two_pass_matched else "NO",
            "yes" if r.matched else "no",
        ]
        for r in rows
    ]
    return grid(head, body, title, markdown)


def crossover(rows: list[BenchRow]) -> str:
    """From which of the measured lengths on fetching beat prefilling, per codec (a sentence)."""
    said = []
    for codec in dict.fromkeys(r.codec for r in rows):
        mine = sorted((r for r in rows if r.codec == codec), key=lambda r: r.tokens)
        wins = [r.fetch_s < r.prefill_s for r in mine]
        lengths = ", ".join(f"{r.tokens:,}" for r in mine)
        if all(wins):
            said.append(f"{codec}: fetch beats prefill at every measured length ({lengths} tokens)")
        elif not any(wins):
            said.append(f"{codec}: prefill beats fetch at every measured length ({lengths} tokens)")
        elif not wins[-1]:
            won = ", ".join(f"{r.tokens:,}" for r, w in zip(mine, wins, strict=True) if w)
            said.append(f"{codec}: fetch beats prefill at {won} tokens but not at the longest (of {lengths})")
        else:
            first = next(i for i in range(len(mine)) if all(wins[i:]))
            said.append(f"{codec}: fetch beats prefill from {mine[first].tokens:,} tokens on (of {lengths})")
    return "; ".join(said) + "."


def render_costs(rows: list[BenchRow], title: str, markdown: bool) -> str | Table:
    """Where the fetches' time went: CPU seconds per GB streamed of the client and the edges
    against the raw TCP baseline's receiver (plus one core's BLAKE3 of the same bytes, the least a
    verifying receiver can spend) and sender, the receiving threads' busy share, the fixed part of a
    fetch (to its first frame, from its last frame to the cache ready), the GPU's copies, and the
    origin's encoder on the model's device."""
    head = [
        "tokens",
        "codec",
        "streams",
        "client CPU s/GB",
        "raw receiver + BLAKE3 s/GB",
        "client / that",
        "edges CPU s/GB",
        "raw sender s/GB",
        "edges / raw sender",
        "receiving threads busy",
        "first frame s",
        "landing s",
        "H2D copy s",
        "H2D GB/s",
        "encode GB/s",
    ]
    body = []
    for r in rows:
        floor = r.per_gb(r.raw_receiver_cpu_s) + 1 / r.hash_gbps
        sender = r.per_gb(r.raw_sender_cpu_s)
        body.append(
            [
                str(r.tokens),
                r.codec,
                str(r.streams),
                f"{r.per_gb(r.client_cpu_s):.3f}",
                f"{floor:.3f}",
                f"{r.per_gb(r.client_cpu_s) / floor:.2f}x",
                f"{r.per_gb(r.edges_cpu_s):.3f}",
                f"{sender:.3f}",
                f"{r.per_gb(r.edges_cpu_s) / sender:.2f}x" if sender else "-",
                f"{r.receive_busy:.0%}",
                f"{r.first_frame_s:.4f}",
                f"{r.land_s:.4f}",
                f"{r.copy_s:.3f}" if r.copy_s else "-",
                f"{r.wire_bytes / r.copy_s / 1e9:.1f}" if r.copy_s else "-",
                f"{r.encode_gbps:.2f}" if r.encode_gbps else "-",
            ]
        )
    return grid(head, body, title, markdown)


def grid(head: list[str], body: list[list[str]], title: str, markdown: bool) -> str | Table:
    """A table of the benchmarks: Markdown text, or a rich Table for the terminal."""
    if markdown:
        lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
        lines += ["| " + " | ".join(b) + " |" for b in body]
        return f"{title}\n\n" + "\n".join(lines)
    table = Table(*head, title=title)
    for b in body:
        table.add_row(*b)
    return table


def figures_table(title: str, rows: list[tuple[str, str]], markdown: bool) -> str | Table:
    """A two-column table of named figures (`kvcdn loadtest network`'s parts)."""
    if markdown:
        return "\n".join([f"**{title}**", "", "| figure | value |", "|---|---:|", *(f"| {a} | {b} |" for a, b in rows)])
    table = Table("figure", "value", title=title)
    for a, b in rows:
        table.add_row(a, b)
    return table
