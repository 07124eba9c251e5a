"""Write (or, with --check, verify) proto/kvcdn/v1/testdata/vectors.json: the test vectors of the wire
spec (SPEC.md) computed by kvcdn's own code, so another implementation can check its block keys,
encoded keys, frame digests, model fingerprint encoding and ring placement against them.

    python scripts/spec_vectors.py           # rewrite the file
    python scripts/spec_vectors.py --check   # exit 1 if the code and the file disagree
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path
from typing import Any

from kvcdn.spec.codecs import CODECS
from kvcdn.spec.identity import block_keys, digest, encoded_key, fingerprint_json, model_fingerprint
from kvcdn.spec.placement import Placement

PATH = Path(__file__).resolve().parent.parent / "proto" / "kvcdn" / "v1" / "testdata" / "vectors.json"


def vectors() -> dict[str, Any]:
    fingerprint = hashlib.sha256(b"kvcdn test fingerprint").digest()
    ids = [(i * 7919) % 49152 for i in range(600)]
    keys = block_keys(fingerprint, ids, 256)
    edges = {"10.0.0.1:7080": 1, "10.0.0.2:7080": 1, "10.0.0.3:7080": 2, "[fd00::4]:7080": 1}
    ring = Placement(edges, replicas=2)
    ring_keys = [*keys, *(hashlib.sha256(b"ring %d" % i).digest() for i in range(12))]
    fingerprint_inputs: dict[str, Any] = {
        "architecture": "LlamaForCausalLM",
        "config": {"hidden_size": 576, "num_attention_heads": 9, "rope_theta": 100000.0, "tie_word_embeddings": True},
        "weights_digest": "ab" * 32,
        "tokenizer_digest": "cd" * 32,
        "dtype": "bfloat16",
        "attn_implementation": "sdpa",
    }
    return {
        "about": "Test vectors of the kvcdn v1 wire spec (SPEC.md); regenerate with scripts/spec_vectors.py",
        "block_keys": {
            "fingerprint_hex": fingerprint.hex(),
            "block_tokens": 256,
            "ids": ids,
            "keys_hex": [k.hex() for k in keys],
        },
        "encoded_keys": [
            {"key_hex": keys[0].hex(), "codec": c, "encoded_hex": encoded_key(keys[0], c).hex()} for c in CODECS
        ],
        "frame_digest": {"payload_utf8": "kvcdn frame", "blake3_hex": digest(b"kvcdn frame").hex()},
        "model_fingerprint": {
            "inputs": fingerprint_inputs,
            "canonical_json": fingerprint_json(**fingerprint_inputs),
            "fingerprint_hex": model_fingerprint(**fingerprint_inputs).hex(),
        },
        "ring": {
            "edges": edges,
            "vnodes_per_weight": 160,
            "replicas": 2,
            "routes": [{"key_hex": k.hex(), "route": ring.route(k), "owners": ring.owners(k)} for k in ring_keys],
        },
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="verify the file instead of writing it")
    args = parser.parse_args()
    text = json.dumps(vectors(), indent=1) + "\n"
    if args.check:
        if not PATH.exists() or PATH.read_text() != text:
            print(f"{PATH} is out of date: run python scripts/spec_vectors.py", file=sys.stderr)
            return 1
        return 0
    PATH.write_text(text)
    print(f"wrote {PATH}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
