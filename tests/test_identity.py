"""Cache identity: chained block keys and model fingerprints, stable across processes."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

from kvcdn.model.loading import LoadedModel, load_model
from kvcdn.spec.identity import block_keys, block_spans, content_digest

FP = bytes(range(32))


def test_block_spans_cut_full_blocks_and_a_short_tail() -> None:
    assert block_spans(600, 256) == [(0, 256), (256, 512), (512, 600)]
    assert block_spans(512, 256) == [(0, 256), (256, 512)]
    assert block_spans(0, 256) == []


def test_block_keys_follow_the_spec_exactly() -> None:
    ids = list(range(300))
    k0 = hashlib.sha256(FP + b"".join(i.to_bytes(4, "little") for i in ids[:256])).digest()
    k1 = hashlib.sha256(k0 + b"".join(i.to_bytes(4, "little") for i in ids[256:])).digest()
    assert block_keys(FP, ids, 256) == [k0, k1]


def test_a_shared_prefix_shares_keys_and_a_change_alters_every_later_key() -> None:
    a = block_keys(FP, list(range(100)), 32)
    b = block_keys(FP, [*range(64), *range(1000, 1036)], 32)
    assert a[:2] == b[:2]
    assert a[2] != b[2] and a[3] != b[3]
    changed = block_keys(FP, [7, *range(1, 100)], 32)
    assert all(x != y for x, y in zip(a, changed, strict=True))


def test_keys_depend_on_the_fingerprint() -> None:
    assert block_keys(FP, [1, 2, 3]) != block_keys(bytes(32), [1, 2, 3])


def test_bad_inputs_are_rejected() -> None:
    with pytest.raises(ValueError, match="32 raw bytes"):
        block_keys(b"short", [1])
    with pytest.raises(ValueError, match="unsigned 32-bit"):
        block_keys(FP, [-1])
    with pytest.raises(ValueError, match="positive"):
        block_spans(10, 0)


def test_content_digest_is_sha256_of_le_u32_ids() -> None:
    assert content_digest([1, 2]) == hashlib.sha256(b"\x01\x00\x00\x00\x02\x00\x00\x00").hexdigest()


_CHILD = """
import json, sys
from kvcdn.spec.identity import block_keys
from kvcdn.model.loading import load_model
m = load_model(sys.argv[1], dtype="float32", device="cpu")
ids = list(range(5, 600))
print(json.dumps({"fp": m.fingerprint_hex, "keys": [k.hex() for k in block_keys(m.fingerprint, ids)]}))
"""


def test_two_processes_compute_the_same_fingerprint_and_keys(tiny_dirs: dict[str, Path], llama: LoadedModel) -> None:
    outputs = [
        json.loads(
            subprocess.run(
                [sys.executable, "-c", _CHILD, str(tiny_dirs["llama"])],
                capture_output=True,
                text=True,
                check=True,
                env={"PYTHONHASHSEED": str(seed), "PATH": "/usr/bin:/bin"},
            ).stdout.splitlines()[-1]
        )
        for seed in (1, 2)
    ]
    assert outputs[0] == outputs[1]
    assert outputs[0]["fp"] == llama.fingerprint_hex
    assert outputs[0]["keys"] == [k.hex() for k in block_keys(llama.fingerprint, list(range(5, 600)))]


def test_fingerprint_changes_with_dtype_and_weights(
    tiny_dirs: dict[str, Path], tiny_models: dict[str, LoadedModel]
) -> None:
    llama = tiny_models["llama"]
    half = load_model(str(tiny_dirs["llama"]), dtype="bfloat16", device="cpu")
    assert half.fingerprint != llama.fingerprint
    assert half.geometry.dtype == "bfloat16"
    assert len({m.fingerprint for m in tiny_models.values()}) == len(tiny_models)
