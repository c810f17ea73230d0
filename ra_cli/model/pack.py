"""The lean decoder's pack: packed once from transformers' float32 model, then loaded without
transformers' model code.

Packing a model (engine/forward.py, `LeanDecoder.from_model`) needs transformers' model classes;
importing them costs ~1.2 s of every start on this class of CPU (configuration_llama alone pulls
torch.distributed through transformers' kernel hub; measured in docs/benchmarks.md). A pack
therefore carries what a run needs besides the weights — the model's config as transformers
wrote it out and its end-of-sequence ids — and a later start reads the config from the pack.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

from ra_cli.errors import RaError

LAYOUT_VERSION = 3  # bump when the packed layout changes: packs of other versions are rebuilt, then deleted


class PlainConfig:
    """A model config as attributes over a dict. A pack stores what transformers' config class
    gave (`to_dict()`, defaults included), so its hash and every attribute read equal the class's
    own; before packing, a converted GGUF's config.json is read this way for `supports()`."""

    def __init__(self, values: dict):
        self.__dict__["_values"] = dict(values)

    def __getattr__(self, name: str):
        try:
            return self.__dict__["_values"][name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value) -> None:
        raise AttributeError("a packed model's config is read-only")

    def to_dict(self) -> dict:
        return dict(self._values)

    def get_text_config(self, decoder: bool = False) -> "PlainConfig":
        return self  # the lean decoder runs text-only llama-family models


@dataclass
class LeanModel:
    """A model ra runs on its lean forward alone: the config and the packed decoder."""

    config: PlainConfig
    ra_lean: object  # engine.forward.LeanDecoder (generate._forward runs it)


def write_pack(location: str, pack: Path, weight_format, dtype, cache_dtype, about: dict[str, str]) -> None:
    """Pack the model at `location` (a transformers directory or cached hub id) into `pack`;
    `about` ({"source": model name, "weights": format}) is what `ra cache` shows of it."""
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, GenerationConfig

    from ra_cli.engine.forward import LeanDecoder

    model = AutoModelForCausalLM.from_pretrained(location, dtype=torch.float32)
    try:
        generation = GenerationConfig.from_pretrained(location)
    except OSError:
        generation = model.generation_config  # the config's defaults
    lean = LeanDecoder.from_model(model, weight_format, dtype, cache_dtype)
    metadata = {"config": json.dumps(model.config.to_dict(), default=str),
                "eos_token_id": json.dumps(generation.eos_token_id), "layout_version": str(LAYOUT_VERSION), **about}
    staging = pack.with_name(f"{pack.name}.tmp{os.getpid()}")
    save_file(lean.state(), str(staging), metadata=metadata)
    os.replace(staging, pack)
    _remove_other_layouts(pack.parent)


def _remove_other_layouts(folder: Path) -> None:
    """Delete packs of another layout version: this ra never reads them again (each is hundreds of
    MB to GB). Their headers alone are read; a file that cannot be read is left alone."""
    from safetensors import SafetensorError, safe_open

    for other in folder.glob("*.safetensors"):
        try:
            with safe_open(str(other), framework="pt") as packed:
                version = (packed.metadata() or {}).get("layout_version")
        except (SafetensorError, OSError):
            continue
        if version != str(LAYOUT_VERSION):
            other.unlink(missing_ok=True)


def read_pack(pack: Path, dtype, cache_dtype, device) -> tuple[LeanModel, object]:
    """The packed model and its end-of-sequence id(s)."""
    from safetensors import SafetensorError, safe_open

    from ra_cli.engine.forward import LeanDecoder

    try:
        with safe_open(str(pack), framework="pt") as packed:
            metadata = packed.metadata() or {}
            state = {name: packed.get_tensor(name) for name in packed.keys()}
        config = PlainConfig(json.loads(metadata["config"]))
        eos_token_id = json.loads(metadata["eos_token_id"])
        lean = LeanDecoder.from_state(config, state, dtype, cache_dtype)
    except (SafetensorError, OSError, KeyError, ValueError) as exc:
        raise RaError(f"the packed weights {pack} are damaged ({str(exc)[:120]}); delete that file and ra "
                      "packs them again")
    return LeanModel(config, lean.to(device)), eos_token_id
