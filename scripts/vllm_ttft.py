"""Time to first token of vLLM's CPU build on SmolLM2 with and without kvcdn's connector, for one
prompt of a published document and a question (`make vllm-env` first):

    .venv/bin/python scripts/vllm_ttft.py [--tokens 3774] [--repeats 3]

Starts an origin and an edge on loopback, publishes the document, then runs vLLM (a fresh engine per
setting, its own prefix cache off) and prints a markdown table: best of `--repeats` after a warm-up.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

from kvcdn.loadtest.bench import sample_corpus, text_of_length
from kvcdn.model.loading import default_models_dir, load_model
from kvcdn.model.options import DEFAULT_MODEL
from kvcdn.model.prompt import document_ids
from kvcdn.ops.launcher import Cluster
from kvcdn.wire.stub import CacheReader

ROOT = Path(__file__).resolve().parent.parent
QUESTION = "\n\nQuestion: what does this license say about patents?\nAnswer:"


async def publish(origin: str, text: str) -> tuple[str, list[int]]:
    async with CacheReader(origin) as reader:
        await reader.publish("ttft", text)
        manifest = await reader.manifest("ttft", 0, token_ids=True)
        return (await reader.info()).fingerprint, list(manifest.token_ids)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--tokens", type=int, default=3774)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--vllm-python", default=str(ROOT / ".venv-vllm" / "bin" / "python"))
    args = p.parse_args()
    model = load_model(DEFAULT_MODEL, dtype="float32", device="cpu")
    text = text_of_length(model, "TTFT document.\n\n" + sample_corpus(), args.tokens)
    question = model.tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
    with tempfile.TemporaryDirectory() as tmp:
        origin_args = ["--model", DEFAULT_MODEL, "--dtype", "float32", "--device", "cpu"]
        with Cluster(store_dir=Path(tmp) / "store", edges=1, origin_args=origin_args, start_timeout_s=300) as cluster:
            fingerprint, ids = asyncio.run(publish(cluster.origin_address, text))
            assert ids == document_ids(model.tokenizer, text)
            connector = {
                "edges": cluster.edge_addresses,
                "fingerprint": fingerprint,
                "trust": [str(cluster.trust_file)],
            }
            job = {
                "model": str(default_models_dir() / DEFAULT_MODEL),
                "prompt": ids + question,
                "max_tokens": 1,
                "repeats": args.repeats,
                "runs": [
                    {"name": "vLLM prefill", "connector": None},
                    {"name": "kvcdn connector", "connector": connector},
                ],
            }
            env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "2", "PYTHONPATH": str(ROOT)}
            out = subprocess.run(
                [args.vllm_python, str(ROOT / "tests" / "vllm_side.py"), json.dumps(job)],
                capture_output=True,
                text=True,
                env=env,
                check=False,
            )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    if out.returncode or not lines:
        print(out.stderr[-4000:], file=sys.stderr)
        return 1
    results = json.loads(lines[-1].removeprefix("RESULT "))
    loads = [float(m) for m in re.findall(r"kvcdn loaded tokens \S+ of request \S+ in ([0-9.]+) s", out.stdout)]
    tokens = len(job["prompt"])
    print(f"SmolLM2-135M float32, vLLM CPU ({os.cpu_count()} cores), prompt {tokens} tokens, best of {args.repeats}\n")
    print("| setting | TTFT s | prompt tokens computed by vLLM | first token |")
    print("|---|---:|---:|---:|")
    for name, r in results.items():
        computed = tokens - r["cached_tokens"]
        print(f"| {name} | {r['seconds']:.3f} | {computed:,} | {r['tokens'][0]} |")
    if loads:
        print(f"\nthe connector's loads (fetch, writes into vLLM's cache): fastest {min(loads):.3f} s of {len(loads)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
