"""Shared fixtures: tiny model directories (built once per session), loaded models, and in-process
origin + edge networks on 127.0.0.1 ephemeral ports that are always stopped."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from kvcdn.edge import Edge, EdgeConfig, start_edge
from kvcdn.edge.disk import DiskTier
from kvcdn.edge.tiers import MemoryTier
from kvcdn.errors import Unavailable
from kvcdn.model.loading import LoadedModel, load_model
from kvcdn.ops.postgres import LocalPostgres, postgres_binaries
from kvcdn.origin import Origin, OriginConfig, start_origin
from kvcdn.wire.rpc import Server
from tests.tinymodels import ARCHITECTURES, make_tiny_model

SAMPLES = Path(__file__).resolve().parent.parent / "kvcdn" / "samples"


@pytest.fixture(scope="session")
def tiny_dirs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {arch: make_tiny_model(arch, root / arch) for arch in ARCHITECTURES}


@pytest.fixture(scope="session")
def tiny_models(tiny_dirs: dict[str, Path]) -> dict[str, LoadedModel]:
    # Small blocks and frames so that short texts span several blocks and blocks several frames.
    return {
        arch: load_model(str(path), dtype="float32", device="cpu", block_tokens=32, frame_bytes=4096)
        for arch, path in tiny_dirs.items()
    }


def tiny_llama(tiny_dirs: dict[str, Path]) -> tuple[LoadedModel, list[str]]:
    """The tiny Llama as an agent loads it, and the flags that make origin processes load the same
    (they use the default block and frame sizes, which the agent learns from the network)."""
    args = ["--model", str(tiny_dirs["llama"]), "--dtype", "float32", "--device", "cpu"]
    return load_model(str(tiny_dirs["llama"]), dtype="float32", device="cpu"), args


@pytest.fixture(scope="session")
def llama(tiny_models: dict[str, LoadedModel]) -> LoadedModel:
    return tiny_models["llama"]


def memory_tier(edge: Edge) -> MemoryTier:
    """The edge's memory tier (its first)."""
    tier = edge.tiers[0]
    assert isinstance(tier, MemoryTier)
    return tier


def disk_tier(edge: Edge) -> DiskTier:
    """The edge's disk tier (it must have one)."""
    tiers = [t for t in edge.tiers if isinstance(t, DiskTier)]
    assert len(tiers) == 1, "the edge has no disk tier"
    return tiers[0]


@dataclass
class Network:
    model: LoadedModel
    origin: Origin
    origin_server: Server
    edge: Edge
    edge_server: Server

    @property
    def edge_address(self) -> str:
        return self.edge_server.address


async def start_network(
    model: LoadedModel,
    store: Path,
    metrics: bool = False,
    codecs: tuple[str, ...] = (),
    signing_key: Path | None = None,
    trust: tuple[Path, ...] = (),
    tokens: Path | None = None,
    edge_token: str = "",
    edge_tokens: Path | None = None,
    edge_options: dict[str, Any] | None = None,
    **origin_kwargs: int,
) -> Network:
    """An origin and one edge on loopback. Documents are offered raw only unless `codecs` names
    encodings (the tests of codecs do; the others check raw blocks by key). `signing_key`: the origin
    signs with it; `trust`: the edge requires those keys' signatures; `tokens`: the origin's tokens
    file, `edge_token` the edge's own, `edge_tokens` closes the edge's reads to that file's tokens;
    `edge_options`: more EdgeConfig fields."""
    origin, origin_server = await start_origin(
        OriginConfig(
            store_dir=store,
            listen="127.0.0.1:0",
            model=model.name,
            block_tokens=model.geometry.block_tokens,
            frame_bytes=model.geometry.frame_bytes,
            metrics_port=0 if metrics else -1,
            codecs=codecs,
            signing_key=signing_key,
            tokens=tokens,
            **origin_kwargs,
        ),
        model,
    )
    edge, edge_server = await start_edge(
        EdgeConfig(
            origin=origin_server.address,
            listen="127.0.0.1:0",
            metrics_port=0 if metrics else -1,
            trust=trust,
            token=edge_token,
            tokens=edge_tokens,
            **(edge_options or {}),
        )
    )
    return Network(model, origin, origin_server, edge, edge_server)


async def stop_network(net: Network) -> None:
    await net.edge_server.stop(0)
    await net.edge.close()
    await net.origin_server.stop(0)


@pytest.fixture
async def network(llama: LoadedModel, tmp_path: Path) -> AsyncIterator[Network]:
    net = await start_network(llama, tmp_path / "store", max_document_tokens=2000)
    try:
        yield net
    finally:
        await stop_network(net)


@pytest.fixture
def sample_text() -> Iterator[str]:
    yield (SAMPLES / "apache-2.0.txt").read_text()[:3000]


@pytest.fixture(scope="module")
def postgres() -> Iterator[LocalPostgres | None]:
    if postgres_binaries() is None:
        yield None
        return
    try:
        pg = LocalPostgres().start()
    except Unavailable:  # installed, but it cannot run here: the SQLite run still covers the schema
        yield None
        return
    try:
        yield pg
    finally:
        pg.stop()


@pytest.fixture(params=["sqlite", "postgresql"])
def ledger_url(request: pytest.FixtureRequest, tmp_path: Path, postgres: LocalPostgres | None) -> str:
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path / 'ledger.db'}"
    if postgres is None:
        pytest.skip("PostgreSQL is not installed (Debian's postgresql package): the SQLite run covers the schema")
    return postgres.create_database(f"ledger_{uuid.uuid4().hex[:12]}")
