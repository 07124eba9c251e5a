"""kvcdn as a vLLM KV connector: vLLM loads the longest prefix of a prompt that kvcdn's edges hold,
verified, instead of prefilling it, and computes only the rest.

    vllm serve MODEL_DIR --dtype float32 --kv-transfer-config '{"kv_connector": "KVCDNConnector",
      "kv_connector_module_path": "kvcdn.integrations.vllm", "kv_role": "kv_consumer",
      "kv_load_failure_policy": "recompute", "kv_connector_extra_config": {"edges": ["EDGE:PORT"],
      "fingerprint": "<what `kvcdn health EDGE:PORT` prints>", "trust": ["publisher.pub"]}}'

Scheduler side (`get_num_new_matched_tokens`): one LookupPrefix at the edges for the prompt's
kvcdn block keys (its token ids under the model fingerprint, not vLLM's block hashes); the hit,
capped one token short of the prompt and rounded down to whole vLLM blocks, is what vLLM skips.
Worker side (`start_load_kv`): the client fetches those blocks (every frame's BLAKE3 checked; with
`trust`, every block info signed by a publisher key) and writes each layer's keys and values into
vLLM's paged cache through the attention backend's own writer (`do_kv_cache_update`), so the
layout (CPU, FlashAttention, ...) is the backend's business. The whole prefix lands before the
forward pass starts: kvcdn's wire order is block by block, every layer in each block, so no layer is
complete before the last block arrives (`wait_for_layer_load` has nothing to wait for).

Refused, so vLLM prefills instead (a wrong cache is never loaded): a model whose geometry (layers,
KV heads, head width, dtype) is not the one the edges serve, edges serving another fingerprint,
unsigned or wrongly signed answers under `trust`, a frame whose digest fails, a fetch that comes
back shorter than planned (an edge gone mid-load: its blocks are reported failed and vLLM, under
`kv_load_failure_policy: recompute`, computes them). Not supported: tensor or pipeline parallelism
(each worker would need its heads' or layers' slice), multimodal prompts and prompt embeddings
(matched as nothing), publishing from vLLM (`kv_role` kv_consumer only).
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from vllm.distributed.kv_transfer.kv_connector.v1.base import (
    KVConnectorBase_V1,
    KVConnectorMetadata,
    KVConnectorRole,
)
from vllm.logger import init_logger
from vllm.model_executor.models.utils import extract_layer_index

from kvcdn.client.blocking import BlockingKVClient
from kvcdn.client.config import ClientConfig
from kvcdn.errors import KVCDNError, Unavailable
from kvcdn.model.loading import LoadedModel
from kvcdn.spec.geometry import DTYPES, Geometry
from kvcdn.wire.tls import TLSFiles

if TYPE_CHECKING:
    from vllm.config import VllmConfig
    from vllm.forward_context import ForwardContext
    from vllm.v1.core.kv_cache_manager import KVCacheBlocks
    from vllm.v1.core.sched.output import SchedulerOutput
    from vllm.v1.kv_cache_interface import KVCacheConfig
    from vllm.v1.request import Request

__all__ = ["KVCDNConnector", "Load", "identity"]

log = init_logger(f"vllm.{__name__}")  # with vLLM's own lines, at its log level


@dataclass
class Load:
    """One request's tokens [start, end) to load into its vLLM blocks."""

    request_id: str
    token_ids: list[int]
    """The prompt's first `end` token ids (what the fetch looks up)."""
    start: int
    """Tokens vLLM already holds (its own prefix cache): loaded from here on."""
    end: int
    block_ids: list[int] = field(default_factory=list)


@dataclass
class KVCDNMetadata(KVConnectorMetadata):  # type: ignore[misc]
    loads: list[Load] = field(default_factory=list)


def identity(vllm_config: VllmConfig, extra: dict[str, Any]) -> LoadedModel:
    """The kvcdn identity of vLLM's model: the fingerprint the operator states (`kvcdn health EDGE`
    prints the one the edges serve; the client refuses edges serving any other) and the KV geometry vLLM's own
    config gives (the client refuses edges that describe another)."""
    model, parallel = vllm_config.model_config, vllm_config.parallel_config
    if parallel.tensor_parallel_size != 1 or parallel.pipeline_parallel_size != 1:
        raise ValueError("kvcdn's vLLM connector loads whole caches: run with tensor and pipeline parallel size 1")
    fingerprint = str(extra.get("fingerprint", ""))
    try:
        raw = bytes.fromhex(fingerprint)
    except ValueError:
        raw = b""
    if len(raw) != 32:
        raise ValueError(
            "kv_connector_extra_config needs 'fingerprint': the 64 hex digits of the kvcdn model fingerprint of "
            "this model and dtype (`kvcdn health EDGE:PORT` prints the one an edge serves)"
        )
    cache_dtype = vllm_config.cache_config.cache_dtype
    dtype = str(model.dtype).removeprefix("torch.") if cache_dtype == "auto" else str(cache_dtype)
    if dtype not in DTYPES:
        raise ValueError(f"kvcdn caches are {sorted(DTYPES)}; this vLLM keeps its KV cache as {dtype}")
    geometry = Geometry(
        layers=model.get_num_layers(parallel),
        kv_heads=model.get_num_kv_heads(parallel),
        head_dim=model.get_head_size(),
        dtype=dtype,
    )
    return LoadedModel(model.model, None, None, torch.device("cpu"), raw, geometry)


def client_config(extra: dict[str, Any]) -> ClientConfig:
    """The client the connector calls the edges with, from `kv_connector_extra_config`: edges (a
    list of HOST:PORT), trust (publisher key files), tls_ca / tls_cert / tls_key, token, timeout_s."""
    edges = extra.get("edges")
    if not edges or not isinstance(edges, list):
        raise ValueError("kv_connector_extra_config needs 'edges': a list of kvcdn edge addresses, HOST:PORT")
    files = {k: Path(extra[f"tls_{k}"]) if extra.get(f"tls_{k}") else None for k in ("cert", "key", "ca")}
    tls = TLSFiles(**files) if any(files.values()) else None
    return ClientConfig(
        tuple(str(e) for e in edges),
        trust=tuple(Path(p) for p in extra.get("trust", ())),
        tls=tls,
        token=str(extra.get("token", "")),
        # vLLM's scheduler waits for the lookup: an edge that stalls must cost it little (streams have
        # their own deadline, ClientConfig.stream_timeout_s).
        timeout_s=float(extra.get("timeout_s", 2.0)),
    )


class KVCDNConnector(KVConnectorBase_V1):  # type: ignore[misc]
    """See the module's docstring. One instance per role: the scheduler's looks up, the worker's loads."""

    def __init__(self, vllm_config: VllmConfig, role: KVConnectorRole, kv_cache_config: KVCacheConfig) -> None:
        super().__init__(vllm_config=vllm_config, role=role, kv_cache_config=kv_cache_config)
        transfer = vllm_config.kv_transfer_config
        extra = dict(transfer.kv_connector_extra_config or {})
        if transfer.kv_load_failure_policy != "recompute":
            log.warning("kv_load_failure_policy is not 'recompute': a failed kvcdn load fails its request")
        self._block_size: int = vllm_config.cache_config.block_size
        self._model = identity(vllm_config, extra)
        self._client = BlockingKVClient(client_config(extra))
        self._planned: dict[str, Load] = {}
        self._due: dict[str, Load] = {}
        self._caches: dict[str, torch.Tensor] = {}
        self._failed: set[int] = set()
        self._refusals: set[str] = set()

    def _refused(self, what: str, exc: Exception) -> None:
        """Log a reason for matching nothing, once per kind of error (a fleet of requests would repeat it)."""
        kind = type(exc).__name__
        if kind not in self._refusals:
            self._refusals.add(kind)
            log.warning("kvcdn %s: %s (vLLM prefills instead; said once)", what, exc)

    # --- scheduler side ---------------------------------------------------------------------------

    def get_num_new_matched_tokens(self, request: Request, num_computed_tokens: int) -> tuple[int, bool]:
        ids = list(request.prompt_token_ids or [])
        usable = len(ids) - 1  # vLLM computes at least the prompt's last token (its logits)
        if usable < self._block_size or request.mm_features or getattr(request, "prompt_embeds", None) is not None:
            return 0, False
        try:
            blocks = self._client.lookup(self._model, ids[:usable])
        except KVCDNError as exc:
            self._refused("lookup", exc)
            return 0, False
        end = min(sum(b.n_tokens for b in blocks), usable) // self._block_size * self._block_size
        if end <= num_computed_tokens:
            self._planned.pop(request.request_id, None)
            return 0, False
        self._planned[request.request_id] = Load(request.request_id, ids[:end], num_computed_tokens, end)
        return end - num_computed_tokens, False

    def update_state_after_alloc(self, request: Request, blocks: KVCacheBlocks, num_external_tokens: int) -> None:
        load = self._planned.pop(request.request_id, None)
        if load is not None and num_external_tokens > 0:
            self._due[request.request_id] = load

    def build_connector_meta(self, scheduler_output: SchedulerOutput) -> KVConnectorMetadata:
        meta = KVCDNMetadata()
        for new in scheduler_output.scheduled_new_reqs:
            if (load := self._due.pop(new.req_id, None)) is not None:
                load.block_ids = list(new.block_ids[0])
                meta.loads.append(load)
        cached = scheduler_output.scheduled_cached_reqs
        for i, req_id in enumerate(cached.req_ids):  # resumed after preemption: all its blocks are new
            if req_id in cached.resumed_req_ids and (load := self._due.pop(req_id, None)) is not None:
                new_block_ids = cached.new_block_ids[i]
                assert new_block_ids is not None
                load.block_ids = list(new_block_ids[0])
                meta.loads.append(load)
        return meta

    def request_finished(self, request: Request, block_ids: list[int]) -> tuple[bool, dict[str, Any] | None]:
        """Forget a request that ends before its load was scheduled (aborted, or refused blocks)."""
        self._planned.pop(request.request_id, None)
        self._due.pop(request.request_id, None)
        return False, None

    # --- worker side ------------------------------------------------------------------------------

    def register_kv_caches(self, kv_caches: dict[str, torch.Tensor]) -> None:
        self._caches = dict(kv_caches)
        device = next(iter(kv_caches.values())).device
        self._model = dataclasses.replace(self._model, device=device)

    def start_load_kv(self, forward_context: ForwardContext, **kwargs: Any) -> None:
        meta = self._get_connector_metadata()
        assert isinstance(meta, KVCDNMetadata)
        for load in meta.loads:
            try:
                self._load(load, forward_context)
            except Exception as exc:  # any failure: vLLM computes the blocks, never serves what did not land
                log.warning(
                    "kvcdn load of request %s failed (%s: %s); vLLM computes its tokens",
                    load.request_id,
                    type(exc).__name__,
                    exc,
                )
                first, last = load.start // self._block_size, -(-load.end // self._block_size)
                self._failed.update(load.block_ids[first:last])

    def _load(self, load: Load, forward_context: ForwardContext) -> None:
        t0 = time.perf_counter()
        fetched = self._client.fetch(self._model, load.token_ids)
        if fetched.cached_tokens < load.end:
            raise Unavailable(f"the edges hold {fetched.cached_tokens} of the {load.end} tokens planned")
        bs = self._block_size
        tokens = torch.arange(load.start, load.end)
        slots = (torch.tensor(load.block_ids)[tokens // bs] * bs + tokens % bs).to(self._model.device)
        for name, kv_cache in self._caches.items():
            layer = forward_context.no_compile_layers[name]
            keys, values = fetched.layers[extract_layer_index(name)]
            part = slice(load.start, load.end)  # [1, kv_heads, tokens, head_dim] -> [tokens, kv_heads, head_dim]
            key = keys[0, :, part].transpose(0, 1).contiguous()
            value = values[0, :, part].transpose(0, 1).contiguous()
            layer.impl.do_kv_cache_update(layer, key, value, kv_cache, slots)
        log.info(
            "kvcdn loaded tokens %d-%d of request %s in %.3f s (%s)",
            load.start,
            load.end,
            load.request_id,
            time.perf_counter() - t0,
            ", ".join(fetched.edges_used),
        )

    def wait_for_layer_load(self, layer_name: str) -> None:
        return  # start_load_kv wrote every layer before the forward pass began

    def save_kv_layer(self, layer_name: str, kv_layer: torch.Tensor, attn_metadata: Any, **kwargs: Any) -> None:
        return  # a consumer: publishing goes through `kvcdn publish` at the origin

    def wait_for_save(self) -> None:
        return

    def get_block_ids_with_load_errors(self) -> set[int]:
        failed, self._failed = self._failed, set()
        return failed

    def shutdown(self) -> None:
        self._client.close()
