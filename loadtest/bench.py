"""`kvcdn loadtest bench`: local prefill against fetching the cache from a warm edge, per document
length, and the fetch's throughput against a plain TCP transfer of the same bytes in the same run
(with `--tls`, a TLS transfer with the same certificates: what encryption alone allows on these cores).

Per length, two ratios:
- prefill / fetch: the prefill of the document alone (the work a cache replaces) against lookup +
  stream + verify + rebuild from a warm edge;
- time to first token: prefill of document + question and the first new token, against fetch +
  rebuild, then the question's tokens and the first new token (both paths end with the same model
  work over the question, which bounds this ratio on a CPU).
Both run this process's model; the edge and the TCP sender are separate processes on loopback.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from importlib import resources
from pathlib import Path

from rich.console import Console

from kvcdn.client.api import KVClient, ReceiveTimes
from kvcdn.client.config import ClientConfig
from kvcdn.errors import InvalidArgument
from kvcdn.loadtest.baseline import RawTCP, blake3_gbps, cpu_seconds, verified_bound
from kvcdn.loadtest.bench_report import print_report
from kvcdn.loadtest.codecs import encode_gbps
from kvcdn.model import adapter
from kvcdn.model.loading import LoadedModel
from kvcdn.model.options import ModelOptions
from kvcdn.model.prompt import document_ids, question_ids
from kvcdn.model.tensors import LayerKV, bit_identical
from kvcdn.ops.launcher import Cluster
from kvcdn.spec.codecs import DEFAULT_ACCEPT
from kvcdn.spec.geometry import DEFAULT_FRAME_BYTES, check_frame_bytes
from kvcdn.spec.placement import DEFAULT_REPLICAS
from kvcdn.wire.stub import CacheReader
from kvcdn.wire.tls import TLSFiles

__all__ = [
    "BenchRow",
    "BenchStopped",
    "measure",
    "run_bench",
    "sample_corpus",
    "text_of_length",
]


def sample_corpus() -> str:
    """The bundled license texts the benchmarks cut their documents from (about 16k SmolLM2 tokens)."""
    root = resources.files("kvcdn.samples")
    return "\n\n".join(root.joinpath(f).read_text() for f in ("gpl-3.0.txt", "gpl-2.0.txt", "mpl-2.0.txt"))


def text_of_length(model: LoadedModel, corpus: str, n_tokens: int) -> str:
    """A prefix of `corpus` whose document ids (kvcdn.model.prompt.document_ids) are about n_tokens long
    (`corpus` over again after its end, for documents longer than it)."""
    body = model.tokenizer(corpus, add_special_tokens=False)["input_ids"]
    take = n_tokens - (len(document_ids(model.tokenizer, "")))
    body *= -(-(take + 64) // len(body))
    text = ""
    for _ in range(6):  # decode/encode round trips can merge or split a token at the cut
        text = model.tokenizer.decode(body[: max(1, take)])
        diff = n_tokens - len(document_ids(model.tokenizer, text))
        if diff == 0:
            break
        take += diff
    return text


@dataclass(frozen=True)
class BenchRow:
    tokens: int
    cache_bytes: int
    """The cache's size as computed (raw)."""
    codec: str
    """Encoding it travelled in."""
    wire_bytes: int
    """Bytes streamed (encoded)."""
    prefill_s: float
    """Local prefill of the document alone (best of the repeats)."""
    fetch_s: float
    """Lookup + stream + verify + rebuild from a warm edge (best of the repeats)."""
    local_s: float
    """Local prefill of document + question and the first new token (best of the repeats)."""
    cached_s: float
    """Fetch + rebuild, then the question and the first new token (best of the repeats)."""
    streams: int
    """Streams the fetch ran at once."""
    raw_gbps: float
    """Raw TCP of the same bytes between two processes over as many streams, in the same run."""
    hash_gbps: float
    """One core's BLAKE3 over the same bytes in frames, in the same run."""
    kv_identical: bool
    """(a) The fetched KV equals this process's own prefill of the document, bit for bit."""
    two_pass_matched: bool
    """(b) The first new token equals the one after this process's own prefill, then the question."""
    matched: bool
    """(c) The first new token equals a one-pass run over document and question (a statistic in 16-bit
    on a GPU, where two passes and one pass are different arithmetic)."""
    client_cpu_s: float = 0.0
    """CPU seconds of this (the client's) process per fetch, every thread (the mean of the repeats:
    other processes' CPU time is read in clock ticks, too coarse for one fetch)."""
    edges_cpu_s: float = 0.0
    """CPU seconds of the edge processes per fetch, added up (the mean of the repeats)."""
    receive_busy: float = 0.0
    """The share of the fetches' time their receiving threads ran on a core (kvcdn.client.ReceiveTimes)."""
    copy_s: float = 0.0
    """Seconds the GPU spent copying a fetch's bytes from host staging (the mean; 0 on the CPU)."""
    first_frame_s: float = 0.0
    """Seconds from a fetch's start to its first verified frame: lookup, connections, the edges'
    first sends (the mean). With `land_s`, the part of a fetch that streaming faster does not shorten."""
    land_s: float = 0.0
    """Seconds from the last frame to a cache ready on the device (the last copies, the mean)."""
    encode_gbps: float = 0.0
    """Raw cache bytes per second the origin's encoder turns into this codec on the model's device
    (kvcdn.loadtest.codecs.encode_gbps: the document's first blocks; 0 for raw)."""
    raw_receiver_cpu_s: float = 0.0
    """CPU seconds of this process receiving the raw TCP baseline of the same bytes (the mean)."""
    raw_sender_cpu_s: float = 0.0
    """CPU seconds of the raw TCP sender process for that transfer (the mean)."""

    @property
    def fetch_speedup(self) -> float:
        return self.prefill_s / self.fetch_s

    @property
    def ttft_speedup(self) -> float:
        return self.local_s / self.cached_s

    @property
    def fetch_gbps(self) -> float:
        """Cache bytes delivered per second (what break-even compares with)."""
        return self.cache_bytes / self.fetch_s / 1e9

    @property
    def wire_gbps(self) -> float:
        """Bytes streamed per second (what the raw TCP baseline and the bound compare with)."""
        return self.wire_bytes / self.fetch_s / 1e9

    @property
    def breakeven_gbps(self) -> float:
        """The bandwidth below which this device recomputes the cache faster than it fetches it."""
        return self.cache_bytes / self.prefill_s / 1e9

    def per_gb(self, cpu_s: float) -> float:
        """CPU seconds per GB streamed."""
        return cpu_s / (self.wire_bytes / 1e9)

    @property
    def bound_gbps(self) -> float:
        """The verified-transfer bound: every stream's core receives and hashes its bytes."""
        return verified_bound(self.raw_gbps, self.hash_gbps * self.streams)


async def measure(
    model: LoadedModel,
    origin: str,
    client_config: ClientConfig,
    texts: list[str],
    repeats: int,
    console: Console,
    server_tls: TLSFiles | None = None,
    edge_pids: Sequence[int] = (),
    each_codec: bool = False,
    rows: list[BenchRow] | None = None,
) -> list[BenchRow]:
    """Publish each of `texts` at `origin` (offered in the codecs the client accepts) just before its
    rows, warm the edges, and measure it (see the module docstring), with the CPU time each side
    spent (`edge_pids`: the edge processes); `each_codec`: a row for each codec the client accepts,
    else one in the first the origin holds. Under TLS (`server_tls`, and the client's in
    `client_config`) the raw baseline is a TLS transfer too. Each row is appended to `rows` (returned)
    and logged on stderr as soon as it is measured: a bench stopped midway still has its first rows."""
    baseline_tls = (server_tls, client_config.tls) if server_tls is not None and client_config.tls else None
    question = question_ids(model.tokenizer, "What is this text about?")
    offered = [c for c in client_config.codecs if c != "raw"]
    rows = [] if rows is None else rows
    async with CacheReader(origin, tls=client_config.tls) as publisher, KVClient(client_config) as client:
        frame_bytes = (await client.info()).geometry.frame_bytes
        for text in texts:
            doc = document_ids(model.tokenizer, text)
            ids = doc + question
            with console.status(f"origin: publishing {len(doc)} tokens ..."):
                await publisher.publish(f"bench-{len(text)}", text, offered)
            with console.status(f"local prefill of {len(doc)} tokens ..."):
                # Best of `repeats`, as for the fetches: the first run on a GPU also pays for
                # kernel selection and allocations that a serving agent has long paid for.
                prefill_s = local_s = float("inf")
                for _ in range(repeats):
                    own, seconds = adapter.timed_prefill(model.model, doc)
                    prefill_s = min(prefill_s, seconds)
                    t0 = time.perf_counter()
                    local = adapter.greedy(model.model, ids, 1)
                    local_s = min(local_s, time.perf_counter() - t0)
                two_pass = adapter.greedy(model.model, ids, 1, cache=own)
            for codecs in [[c] for c in client_config.codecs] if each_codec else [None]:
                await client.fetch(model, doc, codecs)  # warm the edges
                with RawTCP(baseline_tls) as tcp:  # its sender waits idle while the client fetches
                    fetches = await _fetches(client, model, doc, ids, codecs, repeats, tcp, edge_pids, frame_bytes, own)
                matched = all(t == local.tokens for t in fetches.tokens)
                two_pass_matched = all(t == two_pass.tokens for t in fetches.tokens)
                row = BenchRow(
                    tokens=len(doc),
                    cache_bytes=len(doc) * model.geometry.token_bytes,
                    codec=fetches.codec,
                    wire_bytes=fetches.n_bytes,
                    prefill_s=prefill_s,
                    fetch_s=fetches.fetch_s,
                    local_s=local_s,
                    cached_s=fetches.cached_s,
                    streams=fetches.streams,
                    raw_gbps=fetches.n_bytes / fetches.raw_s / 1e9,
                    hash_gbps=fetches.hash_gbps,
                    kv_identical=fetches.identical,
                    two_pass_matched=two_pass_matched,
                    matched=matched,
                    receive_busy=fetches.receiving.busy,
                    encode_gbps=encode_gbps(model, fetches.codec, own),
                    **fetches.costs,
                )
                rows.append(row)
                print(
                    f"{row.tokens:,} tokens {row.codec}: fetch {row.fetch_s:.3f} s ({row.fetch_gbps:.2f} GB/s, "
                    f"{row.fetch_gbps / row.bound_gbps:.0%} of the bound), prefill {row.prefill_s:.3f} s",
                    file=sys.stderr,
                    flush=True,
                )
    return rows


@dataclass
class _Fetches:
    """One document fetched `repeats` times in one codec, each followed by its baselines."""

    codec: str
    n_bytes: int
    streams: int
    identical: bool
    """(a) The first fetch's KV equals the local prefill's, bit for bit (checked outside the timings)."""
    tokens: list[list[int]] = field(default_factory=list)
    """The first new token after each fetched cache."""
    fetch_s: float = float("inf")
    cached_s: float = float("inf")
    raw_s: float = float("inf")
    hash_gbps: float = 0.0
    receiving: ReceiveTimes = field(default_factory=ReceiveTimes)
    costs: dict[str, float] = field(
        default_factory=lambda: dict.fromkeys(
            (
                "client_cpu_s",
                "edges_cpu_s",
                "copy_s",
                "first_frame_s",
                "land_s",
                "raw_receiver_cpu_s",
                "raw_sender_cpu_s",
            ),
            0.0,
        )
    )


async def _fetches(
    client: KVClient,
    model: LoadedModel,
    doc: list[int],
    ids: list[int],
    codecs: list[str] | None,
    repeats: int,
    tcp: RawTCP,
    edge_pids: Sequence[int],
    frame_bytes: int,
    own: list[LayerKV],
) -> _Fetches:
    """Fetch `doc` `repeats` times (best times, mean costs), each fetch followed by a raw transfer and
    a hash pass over as many bytes, side by side: a shared machine's load drifts within a run, and a
    ratio of figures taken a minute apart would drift with it."""
    out: _Fetches | None = None
    for _ in range(repeats):
        t0 = time.perf_counter()
        client_cpu_s, edges_cpu_s = time.process_time(), cpu_seconds(edge_pids)
        fetched = await client.fetch(model, doc, codecs)
        client_cpu_s, edges_cpu_s = time.process_time() - client_cpu_s, cpu_seconds(edge_pids) - edges_cpu_s
        gen = adapter.greedy(model.model, ids, 1, cache=fetched.layers)
        if out is None:
            out = _Fetches(fetched.codec, fetched.n_bytes, fetched.streams, bit_identical(fetched.layers, own))
        out.cached_s = min(out.cached_s, time.perf_counter() - t0)
        out.fetch_s = min(out.fetch_s, fetched.fetch_s)
        out.tokens.append(gen.tokens)
        out.costs["client_cpu_s"] += client_cpu_s / repeats
        out.costs["edges_cpu_s"] += edges_cpu_s / repeats
        out.costs["copy_s"] += fetched.copy_s / repeats
        out.costs["first_frame_s"] += fetched.first_frame_s / repeats
        out.costs["land_s"] += fetched.land_s / repeats
        out.receiving.cpu_s += fetched.receiving.cpu_s
        out.receiving.wall_s += fetched.receiving.wall_s
        # An agent done with a cache drops it; the next fetch then reuses that memory, as the TCP
        # baseline reuses its buffer.
        del fetched, gen
        sender_cpu_s = cpu_seconds([tcp.sender_pid])
        took = tcp.seconds(out.n_bytes, out.streams)
        out.costs["raw_receiver_cpu_s"] += tcp.receiver_cpu_s / repeats
        out.costs["raw_sender_cpu_s"] += (cpu_seconds([tcp.sender_pid]) - sender_cpu_s) / repeats
        out.raw_s = min(out.raw_s, took)
        out.hash_gbps = max(out.hash_gbps, blake3_gbps(out.n_bytes, frame_bytes, repeats=1))
    assert out is not None  # repeats >= 1 (BenchConfig)
    return out


@dataclass(frozen=True)
class BenchConfig:
    """What `kvcdn loadtest bench` measures and how it reports."""

    lengths: tuple[int, ...] = (256, 1024, 3774, 8192)
    """Document lengths in tokens, one row each."""
    repeats: int = 3
    """Fetches per length (the best is reported)."""
    edges: int = 1
    """Edges on loopback (a document's blocks spread over them and stream in parallel)."""
    markdown: bool = False
    json_path: Path | None = None
    """Also write the rows here as JSON (the input of `economics --bench`)."""
    streams_per_run: int = 1
    """Connections a run of blocks is split over (kvcdn.client.config.ClientConfig.streams_per_run)."""
    codecs: tuple[str, ...] = DEFAULT_ACCEPT
    """Encodings the client accepts, preferred first (the documents are offered in these)."""
    spread: bool = True
    """Blocks from whichever of their owners evens out the edges' shares (ClientConfig.spread), or
    (False) each from its primary owner."""
    each_codec: bool = False
    """A row for every codec of `codecs`, the same documents fetched in each (one cluster, one model
    load); False: one row a length, in the first of `codecs` the origin holds."""
    signed: bool = True
    """The origin signs, edges and the agent check every block info (the product's default); False
    measures the same path without signatures, for the comparison."""

    tls: bool = False
    """Every port in mutual TLS (gRPC and the bulk stream), to measure what encryption costs."""
    frame_bytes: int = DEFAULT_FRAME_BYTES
    """The origin's frame payload size (`kvcdn origin --frame-bytes`): fewer, larger frames cost a
    receiver less Python work per byte."""

    def __post_init__(self) -> None:
        if not self.lengths or min(self.lengths) < 1:
            raise InvalidArgument("--lengths takes positive token counts, e.g. 256,1024,3774")
        check_frame_bytes(self.frame_bytes, "--frame-bytes")
        if self.repeats < 1 or self.edges < 1 or self.streams_per_run < 1:
            raise InvalidArgument("--repeats, --edges and --streams-per-run must be at least 1")


def run_bench(config: BenchConfig, model: LoadedModel, options: ModelOptions) -> int:
    """`kvcdn loadtest bench`: `model` (loaded from `options`) runs here; an origin loads the same.
    Stopped by SIGTERM (as `timeout` stops it) or Ctrl-C, it stops its cluster and still reports the
    rows it measured, saying so, and exits 1."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)  # logs and CI: do not squeeze the table into 80 columns
    # Each length a document of its own from its first token: the origin reuses the stored blocks of
    # a shared prefix (a second pass over the rest), which on a GPU is other arithmetic than the
    # one-pass prefill that (a) compares with.
    texts = [text_of_length(model, f"Document {i}.\n\n{sample_corpus()}", n) for i, n in enumerate(config.lengths)]
    rows: list[BenchRow] = []
    stopped = ""
    with _stopped_by_sigterm(), tempfile.TemporaryDirectory(prefix="kvcdn-bench-") as store:
        # Memory tiers that hold every length's cache at each of its owners, with room to spare (the
        # default 1 GiB does not hold a 32,768-token Qwen3-4B cache): a warm edge answers from memory.
        copies = DEFAULT_REPLICAS * (len(config.codecs) if config.each_codec else 1)
        held = copies * model.geometry.token_bytes * sum(config.lengths) * 5 // 4 // config.edges
        cluster = Cluster(
            store_dir=Path(store),
            edges=config.edges,
            origin_args=[*options.flags(), "--frame-bytes", str(config.frame_bytes)],
            edge_args=["--mem-bytes", str(max(1 << 30, held))],
            signed=config.signed,
            tls=config.tls,
        )
        try:
            with console.status(f"starting an origin and {config.edges} edge(s) ..."):
                cluster.start()  # (stopped part-way, it stops what it started)
            clients = ClientConfig(
                tuple(cluster.edge_addresses),
                streams_per_run=config.streams_per_run,
                spread=config.spread,
                codecs=config.codecs,
                trust=(cluster.trust_file,) if cluster.trust_file is not None else (),
                tls=cluster.client_tls,
            )
            edge_pids = [cluster.process(f"edge{i}").pid for i in range(config.edges)]
            asyncio.run(
                measure(
                    model,
                    cluster.origin_address,
                    clients,
                    texts,
                    config.repeats,
                    console,
                    cluster.server_tls,
                    edge_pids,
                    config.each_codec,
                    rows,
                )
            )
        except (BenchStopped, KeyboardInterrupt) as e:
            stopped = str(e) or "Ctrl-C"
        finally:
            cluster.stop()
    if config.json_path is not None:
        report = {"model": model.name, "dtype": model.geometry.dtype, "rows": [asdict(r) for r in rows]}
        config.json_path.write_text(json.dumps(report | ({"stopped": stopped} if stopped else {}), indent=2) + "\n")
    print_report(rows, config, model, console)
    if stopped:
        print(f"Stopped by {stopped} after {len(rows)} row(s): the tables hold the rows measured by then.")
        return 1
    # (b) must hold wherever (a) does; (a) and (c) are reported, not required (see BenchRow)
    return 0 if all(r.two_pass_matched or not r.kv_identical for r in rows) else 1


class BenchStopped(Exception):
    """A signal stopped the bench (its name is the message)."""


@contextmanager
def _stopped_by_sigterm() -> Iterator[None]:
    """SIGTERM raises BenchStopped in the main thread (once: a second one while the cluster stops is
    ignored, so no edge is left running)."""

    def stop(signum: int, frame: object) -> None:
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        raise BenchStopped(signal.Signals(signum).name)

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)
