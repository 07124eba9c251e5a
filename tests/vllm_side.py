"""The vLLM half of tests/test_vllm.py, run by the Python of vLLM's own environment (its
transformers range differs from kvcdn's): greedy generations of one prompt by vLLM alone, then by
vLLM with kvcdn's connector, printed as one JSON line.

    python tests/vllm_side.py '{"model": DIR, "prompt": [ids], "max_tokens": N, "runs": [{...}, ...]}'

Each run is {"name": ..., "connector": null | kv_connector_extra_config}; each is a fresh vLLM
engine (its prefix cache off, so every cached token it reports came from the connector) that
generates `repeats` times (default 1) after a warm-up; "seconds" is the fastest. A run's "kill": PID
SIGKILLs that process (an edge) when the connector's fetch lands its first frame (engine and worker
then run in this process).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from typing import Any


def kill_on_first_frame(pid: int) -> None:
    """SIGKILL process `pid` (an edge) when the connector's fetch lands its first frame."""
    from kvcdn.client import api

    killed: list[int] = []

    class KillOnFirstFrame(api.KVAssembler):  # type: ignore[misc]
        def regions(self, *args: Any) -> Any:
            if not killed:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            return super().regions(*args)

    api.KVAssembler = KillOnFirstFrame  # type: ignore[misc]


def generate(
    model: str, prompt: list[int], max_tokens: int, extra: dict[str, Any] | None, repeats: int = 1, kill: int = 0
) -> dict[str, Any]:
    from vllm import LLM, SamplingParams
    from vllm.config import KVTransferConfig
    from vllm.inputs import TokensPrompt

    transfer = None
    if extra is not None:
        transfer = KVTransferConfig(
            kv_connector="KVCDNConnector",
            kv_connector_module_path="kvcdn.integrations.vllm",
            kv_role="kv_consumer",
            kv_load_failure_policy="recompute",
            kv_connector_extra_config=extra,
        )
    if kill:
        kill_on_first_frame(kill)
    llm = LLM(
        model=model,
        distributed_executor_backend="uni" if kill else None,
        dtype="float32",
        max_model_len=4096,
        enforce_eager=True,
        enable_prefix_caching=False,
        max_num_seqs=2,
        kv_transfer_config=transfer,
        seed=0,
    )
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
    llm.generate([TokensPrompt(prompt_token_ids=prompt[:64])], params, use_tqdm=False)  # warm-up (no lookup)
    seconds = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        out = llm.generate([TokensPrompt(prompt_token_ids=prompt)], params, use_tqdm=False)[0]
        seconds.append(time.perf_counter() - t0)
    del llm
    return {
        "tokens": list(out.outputs[0].token_ids),
        "cached_tokens": out.num_cached_tokens or 0,
        "seconds": min(seconds),
    }


def main() -> None:
    job = json.loads(sys.argv[1])
    if any(run.get("kill") for run in job["runs"]):  # engines and workers here, before vLLM reads it
        os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    results = {
        run["name"]: generate(
            job["model"], job["prompt"], job["max_tokens"], run["connector"], job.get("repeats", 1), run.get("kill", 0)
        )
        for run in job["runs"]
    }
    print("RESULT " + json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
