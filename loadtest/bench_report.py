"""What `kvcdn loadtest bench` prints: the rows as a table (Markdown or the terminal's), the crossover
length per codec, and where the CPU time went (kvcdn.loadtest.bench measures them)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from rich.table import Table

if TYPE_CHECKING:
    from kvcdn.loadtest.bench import BenchRow

__all__ = ["crossover", "figures_table", "grid", "render", "render_costs"]


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
    verifying receiver can spend) and sender, the receiving threads' busy share, the GPU's copies."""
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
        "H2D copy s",
        "H2D GB/s",
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
                f"{r.copy_s:.3f}" if r.copy_s else "-",
                f"{r.wire_bytes / r.copy_s / 1e9:.1f}" if r.copy_s else "-",
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
