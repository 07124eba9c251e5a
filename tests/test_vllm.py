"""A real vLLM (its CPU build, in its own environment: `make vllm-env`) serving tiny models with
kvcdn's connector (kvcdn.integrations.vllm): the same greedy tokens as vLLM's own prefill, with only
the uncached suffix computed; answers a publisher did not sign are refused (vLLM prefills)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
from pathlib import Path
from typing import Any

import pytest

from kvcdn.loadtest.bench import sample_corpus
from kvcdn.ops.launcher import Cluster
from kvcdn.spec.provenance import generate_key
from kvcdn.wire.stub import CacheReader
from tests.tinymodels import make_tiny_model

ROOT = Path(__file__).resolve().parent.parent
VLLM_PYTHON = Path(os.environ.get("KVCDN_VLLM_PYTHON", ROOT / ".venv-vllm" / "bin" / "python"))
QUESTION = " What does this license say about patents?"

pytestmark = [
    pytest.mark.vllm,
    pytest.mark.skipif(not VLLM_PYTHON.exists(), reason=f"no vLLM environment at {VLLM_PYTHON} (make vllm-env)"),
]


def vllm_side(model: Path, prompt: list[int], runs: list[dict[str, Any]], max_tokens: int = 12) -> dict[str, Any]:
    job = {"model": str(model), "prompt": prompt, "max_tokens": max_tokens, "runs": runs}
    env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1", "VLLM_LOGGING_LEVEL": "INFO", "PYTHONPATH": str(ROOT)}
    out = subprocess.run(
        [str(VLLM_PYTHON), str(ROOT / "tests" / "vllm_side.py"), json.dumps(job)],
        capture_output=True,
        text=True,
        timeout=600,
        env=env,
    )
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, f"vLLM failed ({out.returncode}):\n{out.stderr[-4000:]}"
    result: dict[str, Any] = json.loads(lines[-1].removeprefix("RESULT "))
    result["log"] = out.stdout + out.stderr
    return result


async def _publish(origin: str, text: str) -> tuple[str, list[int], list[int]]:
    """The origin's fingerprint, the document's token ids, and its blocks' token counts."""
    async with CacheReader(origin) as reader:
        await reader.publish("license", text)
        manifest = await reader.manifest("license", 0, token_ids=True)
        info = await reader.info()
    return info.fingerprint, list(manifest.token_ids), [b.n_tokens for b in manifest.blocks]


@pytest.mark.parametrize("arch", ["llama", "qwen3"])
def test_vllm_with_the_connector_continues_exactly(arch: str, tmp_path: Path) -> None:
    model = make_tiny_model(arch, tmp_path / arch, head_dim=64)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    text = sample_corpus()[:6000]
    origin_args = ["--model", str(model), "--dtype", "float32", "--device", "cpu"]
    with Cluster(store_dir=tmp_path / "store", edges=1, origin_args=origin_args, start_timeout_s=120) as cluster:
        fingerprint, ids, blocks = asyncio.run(_publish(cluster.origin_address, text))
        prompt = ids + tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
        assert cluster.trust_file is not None
        stranger, _ = generate_key(tmp_path / "stranger.key")
        connector = {"edges": cluster.edge_addresses, "fingerprint": fingerprint}
        result = vllm_side(
            model,
            prompt,
            [
                {"name": "prefill", "connector": None},
                {"name": "kvcdn", "connector": {**connector, "trust": [str(cluster.trust_file)]}},
                {"name": "unsigned", "connector": {**connector, "trust": [str(stranger)]}},
            ],
        )
    whole_blocks = sum(n for n in blocks if n == blocks[0])  # a prompt's keys match the document's whole blocks
    assert whole_blocks >= 256
    assert result["prefill"]["cached_tokens"] == 0
    # vLLM computed only the suffix: the document's whole blocks came from kvcdn (in vLLM blocks).
    assert result["kvcdn"]["cached_tokens"] == whole_blocks, result["log"][-3000:]
    assert result["kvcdn"]["tokens"] == result["prefill"]["tokens"]
    # Answers signed by another publisher are refused: nothing loaded, vLLM prefilled, same tokens.
    assert result["unsigned"]["cached_tokens"] == 0
    assert result["unsigned"]["tokens"] == result["prefill"]["tokens"]


def test_an_edge_killed_mid_load_leaves_vllm_to_prefill(tmp_path: Path) -> None:
    # Heads of 128 and ~3,800 tokens: a 23 MB cache, more than loopback's socket buffers hold, so the
    # edge killed at the fetch's first frame has not sent the rest.
    model = make_tiny_model("llama", tmp_path / "llama", head_dim=128)
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model)
    text = tokenizer.decode(tokenizer(sample_corpus(), add_special_tokens=False)["input_ids"][:3800])
    origin_args = ["--model", str(model), "--dtype", "float32", "--device", "cpu"]
    with Cluster(store_dir=tmp_path / "store", edges=1, origin_args=origin_args, start_timeout_s=120) as cluster:
        fingerprint, ids, _ = asyncio.run(_publish(cluster.origin_address, text))
        prompt = ids + tokenizer(QUESTION, add_special_tokens=False)["input_ids"]
        assert len(prompt) < 4096  # vllm_side's max_model_len
        edge = cluster.process("edge0")
        connector = {"edges": cluster.edge_addresses, "fingerprint": fingerprint, "timeout_s": 3.0}
        result = vllm_side(
            model,
            prompt,
            [{"name": "prefill", "connector": None}, {"name": "killed", "connector": connector, "kill": edge.pid}],
        )
        assert "vLLM computes its tokens" in result["log"], result["log"][-5000:]
        assert edge.wait(10) == -signal.SIGKILL
    assert result["killed"]["tokens"] == result["prefill"]["tokens"]  # the request succeeded, prefilled
