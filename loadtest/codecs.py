"""`kvcdn loadtest codecs`: every KV codec over the bundled documents, on a real model: size, speed
and what a lossy cache does to the model's answers.

Per codec and dtype, over each bundled document (its first `tokens` tokens) and its question:
ratio (raw bytes / encoded bytes, and against the same cache in bf16), encode and decode GB/s on one
core (raw bytes per second, best of 3), greedy agreement (leading tokens of a 24-token answer that equal the
answer from the exact cache), next-token top-1 agreement and mean KL divergence over the question's
positions, and the largest logit difference there. The exact cache is this process's own prefill.
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
from kvcdn.loadtest.bench import grid
from kvcdn.model import adapter
from kvcdn.model.codecs import decode, encode
from kvcdn.model.loading import LoadedModel
from kvcdn.model.prompt import document_ids, question_ids
from kvcdn.model.tensors import KVAssembler, LayerKV, block_payload
from kvcdn.spec.codecs import CODECS
from kvcdn.spec.identity import block_spans

__all__ = ["CodecRow", "CodecsConfig", "measure_codecs", "run_codecs"]

_REPEATS = 3


@dataclass(frozen=True)
class CodecsConfig:
    dtypes: tuple[str, ...] = ("bfloat16", "float32")
    tokens: int = 1024
    """Tokens of each document (its first ones) the caches cover."""
    new_tokens: int = 24
    """Length of the greedy answers compared."""
    markdown: bool = False
    json_path: Path | None = None
    """Also write the rows here (the input of `economics --codecs-report`)."""

    def __post_init__(self) -> None:
        if self.tokens < 1 or self.new_tokens < 1:
            raise InvalidArgument("--tokens and --new-tokens must be at least 1")


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
    top1_agreement: float
    """Fraction of the question's positions whose next-token argmax equals the exact cache's."""
    kl: float
    """Mean KL(exact || this) of the next-token distributions over the question's positions."""
    max_logit_diff: float
    documents: int


def _documents() -> list[tuple[str, str]]:
    root = resources.files("kvcdn.samples")
    questions: dict[str, str] = json.loads(root.joinpath("questions.json").read_text())
    return [(root.joinpath(name).read_text(), question) for name, question in sorted(questions.items())]


@torch.inference_mode()
def _question_logits(model: LoadedModel, layers: list[LayerKV], question: list[int]) -> torch.Tensor:
    cache = adapter.build_cache(model.model, layers)
    n = layers[0][0].shape[2]
    ids = torch.tensor([question], device=model.device)
    positions = torch.arange(n, n + len(question), device=model.device).unsqueeze(0)
    out = model.model(input_ids=ids, cache=cache, position_ids=positions, use_cache=True)
    logits: torch.Tensor = out.logits[0].float().cpu()
    return logits


def measure_codecs(model: LoadedModel, config: CodecsConfig, console: Console) -> list[CodecRow]:
    """The rows of one dtype (the model's)."""
    g = model.geometry
    sums: dict[str, dict[str, float]] = {c: {} for c in CODECS}
    documents = _documents()
    threads = torch.get_num_threads()
    for text, question in documents:
        doc = document_ids(model.tokenizer, text)[: config.tokens]
        q = question_ids(model.tokenizer, question)
        with console.status(f"{g.dtype}: prefill of {len(doc)} tokens ..."):
            exact = adapter.prefill(model.model, doc)
            exact_logits = _question_logits(model, exact, q)
            exact_answer = adapter.greedy(model.model, doc + q, config.new_tokens, cache=exact)
        spans = block_spans(len(doc), g.block_tokens)
        payloads = [block_payload(g, exact, s, e) for s, e in spans]
        for codec in CODECS:
            with console.status(f"{g.dtype}: {codec} over {len(doc)} tokens ..."):
                torch.set_num_threads(1)  # per core
                encode_s = decode_s = float("inf")
                try:
                    for _ in range(_REPEATS):  # best of: the first pass also warms allocators and caches
                        t0 = time.perf_counter()
                        encoded = [encode(codec, g, e - s, p) for (s, e), p in zip(spans, payloads, strict=True)]
                        t1 = time.perf_counter()
                        decoded = [decode(codec, g, e - s, d) for (s, e), d in zip(spans, encoded, strict=True)]
                        encode_s, decode_s = min(encode_s, t1 - t0), min(decode_s, time.perf_counter() - t1)
                finally:
                    torch.set_num_threads(threads)
                assembler = KVAssembler(g, len(doc), model.device)
                for (s, e), raw in zip(spans, decoded, strict=True):
                    assembler.write(s, e - s, 0, raw.data)
                layers = assembler.layers()
                logits = _question_logits(model, layers, q)
                answer = adapter.greedy(model.model, doc + q, config.new_tokens, cache=layers)
            matched, diff = compare(answer, exact_answer)
            log_p, log_q = exact_logits.log_softmax(-1), logits.log_softmax(-1)
            kl = float((log_p.exp() * (log_p - log_q)).sum(-1).mean())
            raw_bytes = sum(len(p) for p in payloads)
            row = {
                "raw": raw_bytes,
                "encoded": sum(len(d) for d in encoded),
                "encode_s": encode_s,
                "decode_s": decode_s,
                "greedy": matched / max(1, len(exact_answer.tokens)),
                "top1": float((logits.argmax(-1) == exact_logits.argmax(-1)).float().mean()),
                "kl": max(0.0, kl),
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
            exact=CODECS[codec].exact,
            ratio=s["raw"] / s["encoded"],
            ratio_vs_bf16=s["raw"] * bf16 / s["encoded"],
            encode_gbps=s["raw"] / s["encode_s"] / 1e9,
            decode_gbps=s["raw"] / s["decode_s"] / 1e9,
            greedy_agreement=s["greedy"] / n,
            top1_agreement=s["top1"] / n,
            kl=s["kl"] / n,
            max_logit_diff=s["diff"],
            documents=n,
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
        "top-1 agreement",
        "KL",
        "max |logit diff|",
    ]
    body = [
        [
            r.codec,
            r.dtype,
            "yes" if r.exact else "no",
            f"{r.ratio:.2f}x",
            f"{r.ratio_vs_bf16:.2f}x",
            "-" if r.codec == "raw" else f"{r.encode_gbps:.2f}",
            "-" if r.codec == "raw" else f"{r.decode_gbps:.2f}",
            f"{r.greedy_agreement:.0%}",
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
        f"{config.new_tokens}-token greedy answers"
    )
    if config.json_path is not None:
        config.json_path.write_text(json.dumps({"model": name, "rows": [asdict(r) for r in rows]}, indent=2) + "\n")
    out = render(rows, title, config.markdown)
    if isinstance(out, str):
        print(out)
    else:
        console.print(out)
    return 0 if all(r.greedy_agreement == 1.0 and r.kl == 0.0 for r in rows if r.exact) else 1
