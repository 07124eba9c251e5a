"""`kvcdn loadtest codecs`: every KV codec over the bundled documents, on a real model: size, speed
and what a lossy cache does to the model's answers.

Per codec and dtype, over each bundled document (its first `tokens` tokens) and its question:
ratio (raw bytes / encoded bytes, and against the same cache in bf16), encode and decode GB/s on one
core (raw bytes per second, best of 3), greedy agreement (leading tokens of a 24-token answer that
equal the answer from the exact cache) and the documents whose whole answer does, next-token top-1
agreement and mean KL divergence over the scored positions (the document's next `probe_tokens`
tokens, then the question, read after the cache), and the largest logit difference there. The
exact cache is this process's own prefill.

Top-1 agreement counts a position when the token the codec's cache ranks first is ranked first by
the exact cache too: in bf16 the logits are coarse enough that several tokens often tie for first
(4.5 % of SmolLM2's positions), and which of them `argmax` returns is an accident of their order.

A reference row, `1-ulp noise`, is no codec: the exact cache with one value in 50, chosen at random,
moved by one unit in the last place of its dtype. It is the floor for any cache that is not bit for
bit the prefill's: a model in bf16 reacts to that much already.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table

from kvcdn.client.agent import compare
from kvcdn.errors import InvalidArgument
from kvcdn.loadtest.bench_report import grid
from kvcdn.model import adapter
from kvcdn.model.codecs import decode, encode
from kvcdn.model.loading import LoadedModel
from kvcdn.model.prompt import document_ids, question_ids
from kvcdn.model.receiving import KVAssembler
from kvcdn.model.tensors import LayerKV, block_payload
from kvcdn.spec.codecs import CODECS
from kvcdn.spec.identity import block_spans

__all__ = ["CodecRow", "CodecsConfig", "encode_gbps", "measure_codecs", "run_codecs"]

_REPEATS = 3


@dataclass(frozen=True)
class CodecsConfig:
    dtypes: tuple[str, ...] = ("bfloat16", "float32")
    tokens: int = 1024
    """Tokens of each document (its first ones) the caches cover."""
    new_tokens: int = 24
    """Length of the greedy answers compared."""
    probe_tokens: int = 300
    """Tokens of each document's continuation scored for top-1 and KL (with the question's)."""
    markdown: bool = False
    json_path: Path | None = None
    """Also write the rows here (the input of `economics --codecs-report`)."""

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.new_tokens < 1 or self.probe_tokens < 0:
            raise InvalidArgument("--tokens and --new-tokens must be at least 1, --probe-tokens at least 0")


@dataclass(frozen=True)
class CodecRow:
    codec: str
    dtype: str
    exact: bool
    ratio: float
    """Raw bytes / encoded bytes over every block of every document."""
    ratio_vs_bf16: float
    """The same cache in bf16 / encoded bytes (what shipping bf16 raw would cost instead)."""
    encode_gbps: float
    decode_gbps: float
    """Raw bytes per second on one core."""
    greedy_agreement: float
    """Mean fraction of the answer's tokens, up to the first difference, equal to the exact cache's."""
    whole_answers: int
    """Documents whose whole greedy answer equals the exact cache's."""
    top1_agreement: float
    """Fraction of the scored positions where this cache's first-ranked token is a first-ranked one
    (ties included) of the exact cache."""
    kl: float
    """Mean KL(exact || this) of the next-token distributions over the scored positions."""
    max_logit_diff: float
    documents: int
    positions: int
    """Positions scored for top-1 and KL, over every document."""
    reference: bool = False
    """The `1-ulp noise` row: not a codec (economics skips it)."""


def _documents() -> list[tuple[str, str]]:
    root = resources.files("kvcdn.samples")
    questions: dict[str, str] = json.loads(root.joinpath("questions.json").read_text())
    return [(root.joinpath(name).read_text(), question) for name, question in sorted(questions.items())]


REFERENCE = "1-ulp noise"
_NUDGED_ONE_IN = 50


@torch.inference_mode()
def _next_token_logits(model: LoadedModel, layers: list[LayerKV], ids: list[int]) -> torch.Tensor:
    """Logits (float32, on the CPU) at each of `ids`, read after the cached `layers`."""
    cache = adapter.build_cache(model.model, layers)
    n = layers[0][0].shape[2]
    positions = torch.arange(n, n + len(ids), device=model.device).unsqueeze(0)
    out = model.model(input_ids=torch.tensor([ids], device=model.device), cache=cache, position_ids=positions)
    logits: torch.Tensor = out.logits[0].float().cpu()
    return logits


def _top1_agreeing(logits: torch.Tensor, exact: torch.Tensor) -> int:
    """Positions whose first-ranked token under `logits` is first-ranked (ties included) under `exact`."""
    picked = exact.gather(-1, logits.argmax(-1, keepdim=True)).squeeze(-1)
    return int((picked == exact.max(-1).values).sum())


def _nudged(layers: list[LayerKV], seed: int) -> list[LayerKV]:
    """`layers` with one value in `_NUDGED_ONE_IN` moved one unit in the last place, up or down."""
    g = torch.Generator().manual_seed(seed)

    def nudge(t: torch.Tensor) -> torch.Tensor:
        x = t.cpu()
        u = torch.rand(x.shape, generator=g)
        up = torch.nextafter(x, torch.full_like(x, float("inf")))
        down = torch.nextafter(x, torch.full_like(x, float("-inf")))
        picked = torch.where(u < 0.5 / _NUDGED_ONE_IN, up, torch.where(u < 1 / _NUDGED_ONE_IN, down, x))
        return picked.to(t.device)

    return [(nudge(k), nudge(v)) for k, v in layers]


def encode_gbps(model: LoadedModel, codec: str, layers: list[LayerKV], max_blocks: int = 8) -> float:
    """Raw cache bytes per second that `codec`'s encoder turns out on the model's device, as an origin
    there encodes a published document (lossy codecs with the model's key shaping), over the first
    `max_blocks` blocks of `layers` (a prefill), after one untimed block; 0 for raw."""
    if codec == "raw":
        return 0.0
    g = model.geometry
    spans = block_spans(layers[0][0].shape[2], g.block_tokens)[:max_blocks]
    payloads = [block_payload(g, layers, s, e) for s, e in spans]
    shaping = None if CODECS[codec].exact else model.key_shaping
    encode(codec, g, spans[0][1] - spans[0][0], payloads[0], True, shaping, model.device)  # warm-up
    t0 = time.perf_counter()
    for (s, e), payload in zip(spans, payloads, strict=True):
        encode(codec, g, e - s, payload, s == 0, shaping, model.device)  # bytes back on the host: synchronized
    return sum(len(p) for p in payloads) / (time.perf_counter() - t0) / 1e9


def measure_codecs(model: LoadedModel, config: CodecsConfig, console: Console) -> list[CodecRow]:
    """The rows of one dtype (the model's): one per codec, then the `1-ulp noise` reference."""
    g = model.geometry
    sums: dict[str, dict[str, float]] = {c: {} for c in (*CODECS, REFERENCE)}
    documents = _documents()
    threads = torch.get_num_threads()
    for number, (text, question) in enumerate(documents):
        ids = document_ids(model.tokenizer, text)
        doc = ids[: config.tokens]
        q = question_ids(model.tokenizer, question)
        probe = ids[len(doc) : len(doc) + config.probe_tokens] + q
        with console.status(f"{g.dtype}: prefill of {len(doc)} tokens ..."):
            exact = adapter.prefill(model.model, doc)
            exact_logits = _next_token_logits(model, exact, probe)
            exact_answer = adapter.greedy(model.model, doc + q, config.new_tokens, cache=exact)
            shaping = model.key_shaping
        spans = block_spans(len(doc), g.block_tokens)
        payloads = [block_payload(g, exact, s, e) for s, e in spans]
        raw_bytes = sum(len(p) for p in payloads)
        for codec in sums:
            with console.status(f"{g.dtype}: {codec} over {len(doc)} tokens ..."):
                if codec == REFERENCE:
                    layers, encoded_bytes, encode_s, decode_s = _nudged(exact, seed=number), raw_bytes, 0.0, 0.0
                else:
                    torch.set_num_threads(1)  # per core
                    encode_s = decode_s = float("inf")
                    try:
                        for _ in range(_REPEATS):  # best of: the first pass also warms allocators and caches
                            t0 = time.perf_counter()
                            encoded = [
                                encode(codec, g, e - s, p, first=s == 0, shaping=shaping, device=model.device)
                                for (s, e), p in zip(spans, payloads, strict=True)
                            ]
                            t1 = time.perf_counter()
                            decoded = [decode(codec, g, e - s, d) for (s, e), d in zip(spans, encoded, strict=True)]
                            encode_s, decode_s = min(encode_s, t1 - t0), min(decode_s, time.perf_counter() - t1)
                    finally:
                        torch.set_num_threads(threads)
                    encoded_bytes = sum(len(d) for d in encoded)
                    assembler = KVAssembler(g, len(doc), model.device)
                    for (s, e), raw in zip(spans, decoded, strict=True):
                        assembler.write(s, e - s, 0, raw.data)
                    layers = assembler.layers()
                logits = _next_token_logits(model, layers, probe)
                answer = adapter.greedy(model.model, doc + q, config.new_tokens, cache=layers)
            matched, diff = compare(answer, exact_answer)
            log_p, log_q = exact_logits.log_softmax(-1), logits.log_softmax(-1)
            kl = (log_p.exp() * (log_p - log_q)).sum(-1).clamp_min(0.0)
            row = {
                "raw": raw_bytes,
                "encoded": encoded_bytes,
                "encode_s": encode_s,
                "decode_s": decode_s,
                "greedy": matched / max(1, len(exact_answer.tokens)),
                "whole": float(matched == len(exact_answer.tokens)),
                "top1": _top1_agreeing(logits, exact_logits),
                "kl": float(kl.sum()),
                "positions": len(probe),
                "diff": max(diff, float((logits - exact_logits).abs().max())),
            }
            for k, v in row.items():
                sums[codec][k] = max(sums[codec].get(k, 0.0), v) if k == "diff" else sums[codec].get(k, 0.0) + v
    n = len(documents)
    bf16 = 2 / g.element_bytes
    return [
        CodecRow(
            codec=codec,
            dtype=g.dtype,
            exact=codec != REFERENCE and CODECS[codec].exact,
            ratio=s["raw"] / s["encoded"],
            ratio_vs_bf16=s["raw"] * bf16 / s["encoded"],
            encode_gbps=s["raw"] / s["encode_s"] / 1e9 if s["encode_s"] else 0.0,
            decode_gbps=s["raw"] / s["decode_s"] / 1e9 if s["decode_s"] else 0.0,
            greedy_agreement=s["greedy"] / n,
            whole_answers=int(s["whole"]),
            top1_agreement=s["top1"] / s["positions"],
            kl=s["kl"] / s["positions"],
            max_logit_diff=s["diff"],
            documents=n,
            positions=int(s["positions"]),
            reference=codec == REFERENCE,
        )
        for codec, s in sums.items()
    ]


def render(rows: list[CodecRow], title: str, markdown: bool) -> str | Table:
    head = [
        "codec",
        "dtype",
        "exact",
        "ratio",
        "ratio vs bf16",
        "encode GB/s/core",
        "decode GB/s/core",
        "greedy agreement",
        "whole answers",
        "top-1 agreement",
        "KL",
        "max |logit diff|",
    ]
    body = [
        [
            r.codec,
            r.dtype,
            "-" if r.reference else "yes" if r.exact else "no",
            f"{r.ratio:.2f}x",
            f"{r.ratio_vs_bf16:.2f}x",
            "-" if r.codec == "raw" or r.reference else f"{r.encode_gbps:.2f}",
            "-" if r.codec == "raw" or r.reference else f"{r.decode_gbps:.2f}",
            f"{r.greedy_agreement:.0%}",
            f"{r.whole_answers}/{r.documents}",
            f"{r.top1_agreement:.1%}",
            f"{r.kl:.2e}",
            f"{r.max_logit_diff:.3f}",
        ]
        for r in rows
    ]
    return grid(head, body, title, markdown)


def run_codecs(config: CodecsConfig, load: Any) -> int:
    """`kvcdn loadtest codecs`: `load(dtype)` returns the model in that dtype."""
    console = Console()
    if not console.is_terminal:
        console = Console(width=200)
    rows: list[CodecRow] = []
    name = ""
    for dtype in config.dtypes:
        model = load(dtype)
        name = model.name
        rows += measure_codecs(model, config, console)
    title = (
        f"kvcdn codecs: {name}, first {config.tokens} tokens of {rows[0].documents if rows else 0} documents, "
        f"{config.new_tokens}-token greedy answers, top-1 and KL over {rows[0].positions if rows else 0} positions "
        f"(each document's next {config.probe_tokens} tokens and its question)"
    )
    if config.json_path is not None:
        config.json_path.write_text(json.dumps({"model": name, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    out = render(rows, title, config.markdown)
    if isinstance(out, str):
        print(out)
    else:
        console.print(out)
    return 0 if all(r.greedy_agreement == 1.0 and r.kl == 0.0 for r in rows if r.exact) else 1
