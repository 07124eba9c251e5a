"""`kvcdn demo`: the main job end to end on the embedded default model. Starts an origin and an edge
as processes, publishes the bundled sample documents, and has an agent fetch each cache, answer a
question and verify the answer against its own local prefill."""

from __future__ import annotations

import asyncio
import json
import tempfile
from importlib import resources
from pathlib import Path

from rich.console import Console
from rich.table import Table

from kvcdn.client import ClientConfig, KVClient
from kvcdn.client.agent import AskResult, ask
from kvcdn.model.loading import LoadedModel
from kvcdn.model.options import ModelOptions
from kvcdn.model.prompt import document_ids
from kvcdn.ops.launcher import Cluster
from kvcdn.wire.auth import read_token
from kvcdn.wire.stub import CacheReader

__all__ = ["run_demo", "sample_documents"]


def sample_documents() -> list[tuple[str, str, str]]:
    """(name, text, question) of each bundled sample that has a demo question."""
    root = resources.files("kvcdn.samples")
    questions: dict[str, str] = json.loads(root.joinpath("questions.json").read_text())
    return [(Path(f).stem, root.joinpath(f).read_text(encoding="utf-8"), q) for f, q in questions.items()]


async def _run(
    console: Console, model: LoadedModel, cluster: Cluster, max_new_tokens: int
) -> list[tuple[str, AskResult, float]]:
    """(name, the agent's verified answer after a cold-edge fetch, a second agent's warm fetch s)."""
    docs = sample_documents()
    async with CacheReader(cluster.origin_address, token=read_token(cluster.publisher_token_file)) as origin:
        for name, text, _ in docs:
            with console.status(f"origin: prefilling and storing {name} ..."):
                r = await origin.publish(name, text)
            console.print(
                f"published {name} v{r.manifest.version}: {r.manifest.token_count} tokens, "
                f"{len(r.manifest.blocks)} blocks, prefill {r.prefill_s:.1f} s"
            )
    results = []
    trust = (cluster.trust_file,) if cluster.trust_file is not None else ()
    async with KVClient(ClientConfig(tuple(cluster.edge_addresses), trust=trust)) as client:
        for name, text, question in docs:
            with console.status(f"agent: fetching {name} from the edge, answering, verifying ..."):
                result = await ask(client, model, text, question, max_new_tokens, verify=True)
                warm = await client.fetch(model, document_ids(model.tokenizer, text))
                results.append((name, result, warm.fetch_s))
    return results


def run_demo(model: LoadedModel, options: ModelOptions, max_new_tokens: int = 24) -> int:
    """`kvcdn demo`: `model` is the agent's, loaded from `options`, which the origin loads too."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=150)  # logs and CI: do not squeeze the table into 80 columns
    with tempfile.TemporaryDirectory(prefix="kvcdn-demo-") as store:
        cluster = Cluster(store_dir=Path(store), edges=1, origin_args=options.flags(), auth=True)
        with console.status("starting an origin and an edge on loopback ..."):
            cluster.start()
        try:
            console.print(
                f"origin {cluster.origin_address}, edge {cluster.edge_addresses[0]}; every block signed by the "
                f"publisher key {cluster.trust_file} and checked by the edge and the agent"
            )
            results = asyncio.run(_run(console, model, cluster, max_new_tokens))
        finally:
            cluster.stop()
    table = Table(title=f"kvcdn demo: {model.name} ({model.geometry.dtype}, {model.device})")
    columns = (
        "document",
        "tokens",
        "cache MB",
        "sent MB",
        "fetch s (cold edge)",
        "fetch s (warm edge)",
        "local prefill s",
        "speed-up (warm)",
        "matched",
    )
    for col in columns:
        table.add_column(col, justify="left" if col == "document" else "right")
    table.add_column("answer", no_wrap=True, overflow="ellipsis", max_width=48)
    ok = True
    for name, r, warm_s in results:
        ok = ok and r.matched_tokens == r.new_tokens
        assert r.prefill_s is not None
        table.add_row(
            name,
            str(r.doc_tokens),
            f"{r.cache_bytes / 1e6:.1f}",
            f"{r.wire_bytes / 1e6:.1f} {r.codec}",
            f"{r.fetch_s:.3f}",
            f"{warm_s:.3f}",
            f"{r.prefill_s:.2f}",
            f"{r.prefill_s / warm_s:.0f}x",
            f"{r.matched_tokens}/{r.new_tokens}",
            " ".join(r.answer.split()),
        )
    console.print(table)
    console.print(
        "speed-up = local prefill s / warm-edge fetch s (lookup + stream + verify + rebuild); "
        "matched = greedy tokens equal to those after the agent's own prefill"
    )
    console.print("every cache token-exact" if ok else "[red]a cache diverged from local prefill[/red]")
    return 0 if ok else 1
