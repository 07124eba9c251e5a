"""Placement: balance, minimal movement, distinct replicas, weights and DNS membership."""

from __future__ import annotations

import hashlib
import socket
from collections import Counter
from pathlib import Path

import pytest

from kvcdn.client import ClientConfig, KVClient
from kvcdn.errors import InvalidArgument, Unavailable
from kvcdn.spec.placement import Membership, Placement, balance, parse_edges, resolve_edges
from kvcdn.v1 import kvcdn_pb2 as pb

KEYS = [hashlib.sha256(str(i).encode()).digest() for i in range(20_000)]
NODES = [f"edge-{i}.test:7080" for i in range(8)]


def test_load_is_balanced_across_nodes() -> None:
    ring = Placement(NODES)
    load = Counter(ring.owners(k)[0] for k in KEYS)
    mean = len(KEYS) / len(NODES)
    assert set(load) == set(NODES)
    assert max(load.values()) / mean < 1.2


def test_adding_a_node_moves_about_one_nth_of_keys_all_onto_it() -> None:
    ring = Placement(NODES)
    before = {k: ring.owners(k)[0] for k in KEYS}
    ring.add("edge-8.test:7080")
    moved = [k for k in KEYS if ring.owners(k)[0] != before[k]]
    assert all(ring.owners(k)[0] == "edge-8.test:7080" for k in moved)
    assert 0.5 / 9 < len(moved) / len(KEYS) < 1.5 / 9


def test_removing_a_node_moves_only_its_keys_to_their_next_replica() -> None:
    ring = Placement(NODES)
    before = {k: ring.owners(k) for k in KEYS}
    ring.remove(NODES[3])
    for k in KEYS:
        if before[k][0] != NODES[3]:
            assert ring.owners(k)[0] == before[k][0]
        else:
            assert ring.owners(k)[0] == before[k][1]
    share = sum(before[k][0] == NODES[3] for k in KEYS) / len(KEYS)
    assert 0.5 / 8 < share < 1.5 / 8


def test_owners_are_distinct_and_route_covers_every_node() -> None:
    ring = Placement(NODES, replicas=3)
    for k in KEYS[:200]:
        owners = ring.owners(k)
        assert len(owners) == len(set(owners)) == 3
        route = ring.route(k)
        assert route[:3] == owners and sorted(route) == sorted(NODES)
    assert Placement(NODES[:1], replicas=2).owners(KEYS[0]) == NODES[:1]


def test_weights_scale_a_nodes_share() -> None:
    ring = Placement({"a:1": 1, "b:1": 1, "c:1": 2})
    load = Counter(ring.owners(k)[0] for k in KEYS)
    assert 1.6 < load["c:1"] / load["a:1"] < 2.5


def test_edge_flags_parse_weights_and_reject_nonsense() -> None:
    assert parse_edges(["h:1", "h:2=3"]) == {"h:1": 1, "h:2": 3}
    for bad in (["h"], ["h:x"], ["h:1=0"], ["h:1=w"], []):
        with pytest.raises(InvalidArgument):
            parse_edges(bad)
    with pytest.raises(InvalidArgument):
        Placement([], replicas=2)
    with pytest.raises(InvalidArgument):
        Placement(NODES, replicas=0)


def test_a_dns_name_of_several_addresses_expands_to_one_edge_each_and_a_name_of_one_stays(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def fake(host: str, port: int, type: int = 0) -> list[tuple[object, ...]]:
        answers = {
            "edges.svc": [(socket.AF_INET6, "fd00::1"), (socket.AF_INET, "10.0.0.1"), (socket.AF_INET, "10.0.0.2")],
            "edge-0.edges.svc": [(socket.AF_INET, "10.0.0.1"), (socket.AF_INET, "10.0.0.1")],  # one, twice
        }
        if host not in answers:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        return [(family, type, 6, "", (ip, port)) for family, ip in answers[host]]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    resolved = resolve_edges({"edges.svc:7080": 2, "edge-0.edges.svc:7081": 1, "192.0.2.3:7082": 3})
    # a headless service: one edge per pod, IPv4 first; a pod's own name kept (TLS checks it)
    assert list(resolved.items()) == [
        ("10.0.0.1:7080", 2),
        ("10.0.0.2:7080", 2),
        ("[fd00::1]:7080", 2),
        ("edge-0.edges.svc:7081", 1),
        ("192.0.2.3:7082", 3),
    ]
    with pytest.raises(Unavailable, match=r"edge name 'nowhere\.svc' does not resolve"):
        resolve_edges({"nowhere.svc:7080": 1})
    assert resolve_edges({"nowhere.svc:7080": 1}, strict=False) == {"nowhere.svc:7080": 1}  # a peer not up yet


@pytest.mark.parametrize("n_blocks", [1, 3, 15, 64])
@pytest.mark.parametrize("per_run", [1, 2])
@pytest.mark.parametrize("spread", [True, False])
async def test_a_fetch_streams_every_block_once_from_an_owner_in_one_wave(
    n_blocks: int, per_run: int, spread: bool
) -> None:
    edges = tuple(f"127.0.0.{i}:7080" for i in range(1, 5))
    blocks = [pb.BlockInfo(key=KEYS[i], index=i, n_bytes=100) for i in range(n_blocks)]
    async with KVClient(ClientConfig(edges, streams_per_run=per_run, spread=spread)) as client:
        runs = client.runs(blocks)
        owners = {b.index: client.placement.owners(b.key) for b in blocks}
    assert sorted(b.index for run in runs for b in run.blocks) == list(range(n_blocks))  # each block once
    assert all(run.edge in owners[b.index] for run in runs for b in run.blocks)  # from one of its owners
    if not spread:
        assert all(run.edge == owners[b.index][0] for run in runs for b in run.blocks)  # its primary
    assert all([b.index for b in run.blocks] == sorted(b.index for b in run.blocks) for run in runs)
    used = {run.edge for run in runs}
    per_edge = Counter(run.edge for run in runs)
    assert all(per_edge[e] == min(per_run, sum(len(r.blocks) for r in runs if r.edge == e)) for e in used)
    assert len(runs) <= 4 * per_run  # one wave: at most 8 with 4 edges and 2 streams a run


def test_balance_gives_no_choice_more_than_it_must() -> None:
    ring = Placement([f"127.0.0.{i}:7080" for i in range(1, 5)], replicas=2)
    worst_spread = worst_primary = 0
    for doc in range(200):
        keys = [hashlib.sha256(f"{doc}/{i}".encode()).digest() for i in range(15)]
        choices = [ring.owners(k) for k in keys]
        picked = balance(choices, [100] * 15)
        assert all(p in c for p, c in zip(picked, choices, strict=True))
        worst_spread = max(worst_spread, max(Counter(picked).values()))
        worst_primary = max(worst_primary, max(Counter(c[0] for c in choices).values()))
    # 15 blocks on 4 edges: 4 is the least the busiest edge can get; the primaries alone give 9 or so
    assert worst_spread <= 5 < worst_primary
    # Greedy alone gives a both; the move off the busiest choice fixes it.
    assert balance([["a", "b"], ["a"]], [1, 1]) == ["b", "a"]
    assert balance([["a", "b"]] * 4, [3, 1, 1, 1]) in (["a", "b", "b", "b"], ["b", "a", "a", "a"])
    assert balance([], []) == []


def test_a_followed_edge_list_moves_only_the_keys_of_the_edge_that_joined_or_left(tmp_path: Path) -> None:
    listed = tmp_path / "edges"
    five = [f"127.0.0.{i}:7080" for i in range(1, 6)]
    listed.write_text("# the ring\n" + "\n".join(five[:4]) + "\n")
    membership = Membership([f"@{listed}"], replicas=2, refresh_s=60)
    assert membership.follows and not membership.due  # read at start; next read after refresh_s
    assert membership.placement.nodes == five[:4]
    assert not membership.refresh() and membership.changes == 0  # the same list: the same ring

    keys = [hashlib.sha256(str(i).encode()).digest() for i in range(4000)]
    before = {k: membership.placement.owners(k)[0] for k in keys}
    listed.write_text(", ".join(five) + "\n")  # one joins (commas work too)
    assert membership.refresh() and membership.changes == 1
    after = {k: membership.placement.owners(k)[0] for k in keys}
    moved = [k for k in keys if before[k] != after[k]]
    assert all(after[k] == five[4] for k in moved)  # only to the edge that joined
    assert 0.15 < len(moved) / len(keys) < 0.25  # about 1/5
    assert membership.previous is not None and all(membership.previous.owners(k)[0] == before[k] for k in keys)

    listed.write_text("\n".join(five[1:]) + "\n")  # one leaves
    assert membership.refresh()
    gone = {k: membership.placement.owners(k)[0] for k in keys}
    moved = [k for k in keys if gone[k] != after[k]]
    assert all(after[k] == five[0] for k in moved)  # only the keys of the edge that left
    assert 0.15 < len(moved) / len(keys) < 0.25


@pytest.mark.parametrize("damage", ["missing", "empty", "malformed", "binary"])
def test_an_edge_list_that_cannot_be_read_keeps_the_ring(
    tmp_path: Path, damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    listed = tmp_path / "edges"
    listed.write_text("127.0.0.1:7080\n127.0.0.2:7080\n")
    membership = Membership([f"@{listed}", "127.0.0.3:7080"])
    assert membership.placement.nodes == ["127.0.0.1:7080", "127.0.0.2:7080", "127.0.0.3:7080"]
    if damage == "missing":
        listed.unlink()
    elif damage == "binary":
        listed.write_bytes(b"\xff\xfe\x00garbage")
    else:
        listed.write_text("" if damage == "empty" else "127.0.0.1:7080\nhalf-written:\n")
    assert not membership.refresh()  # a file being rewritten must not empty the ring
    assert membership.placement.nodes == ["127.0.0.1:7080", "127.0.0.2:7080", "127.0.0.3:7080"]
    assert "keeping the ring of 3 edges" in caplog.text
    listed.write_text("127.0.0.1:7080\n")
    assert membership.refresh() and membership.placement.nodes == ["127.0.0.1:7080", "127.0.0.3:7080"]


def test_a_list_of_addresses_alone_is_never_read_again_and_a_missing_file_is_refused(tmp_path: Path) -> None:
    membership = Membership(["127.0.0.1:7080", "[::1]:7081"], refresh_s=0.001)
    assert not membership.follows and not membership.due
    assert Membership(["localhost:7080"]).follows  # a DNS name can change
    with pytest.raises(InvalidArgument, match=r"cannot read the edge list .*nowhere"):
        Membership([f"@{tmp_path / 'nowhere'}"])
    with pytest.raises(InvalidArgument, match="cannot read the edge list"):
        ClientConfig((f"@{tmp_path / 'nowhere'}",))
