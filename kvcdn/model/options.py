"""The model flags every command that loads a model shares (`--model --dtype --device --models-dir`),
as one typed value. Cheap to import: torch loads only when `load()` runs."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from kvcdn.model.loading import LoadedModel

__all__ = ["DEFAULT_MODEL", "ModelOptions"]

DEFAULT_MODEL = "smollm2-135m"
"""The embedded default model's alias (SmolLM2-135M-Instruct)."""


@dataclass(frozen=True)
class ModelOptions:
    """Which model to load, and how."""

    model: str = DEFAULT_MODEL
    """The alias smollm2-135m, random:GEOMETRY, a local model directory, or a hub id."""
    dtype: str = "auto"
    """auto (bfloat16 on CUDA, float32 on the CPU), float32, float16 or bfloat16."""
    device: str = "auto"
    """auto, cpu or cuda."""
    models_dir: Path | None = None
    """Where the default model is provisioned (default ~/.cache/kvcdn/models)."""

    @staticmethod
    def add_flags(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--model", default=DEFAULT_MODEL, help="alias smollm2-135m (default), model directory, or hub id"
        )
        p.add_argument("--dtype", default="auto", choices=["auto", "float32", "float16", "bfloat16"])
        p.add_argument("--device", default="auto", help="auto, cpu or cuda")
        p.add_argument(
            "--models-dir",
            default=os.environ.get("KVCDN_MODELS_DIR"),
            help="where the default model is provisioned (env KVCDN_MODELS_DIR; default ~/.cache/kvcdn/models)",
        )

    @classmethod
    def from_args(cls, args: argparse.Namespace) -> ModelOptions:
        return cls(args.model, args.dtype, args.device, Path(args.models_dir) if args.models_dir else None)

    def flags(self) -> list[str]:
        """The same options as flags, for a process started with them (an origin)."""
        out = ["--model", self.model, "--dtype", self.dtype, "--device", self.device]
        return out + (["--models-dir", str(self.models_dir)] if self.models_dir else [])

    def load(self) -> LoadedModel:
        """Load the model, with a spinner on stderr (provisioning the default model on first use)."""
        from rich.console import Console

        from kvcdn.model.loading import load_model

        with Console(stderr=True).status("loading the model (provisioning it on first use) ..."):
            return load_model(self.model, dtype=self.dtype, device=self.device, models_dir=self.models_dir)
