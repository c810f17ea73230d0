"""The models ra can use offline: named ones (embedded, fetched), RA_MODEL, and causal language
models already in the local Hugging Face cache — each with its trained context length."""

from __future__ import annotations

import json
import os
from pathlib import Path

from ra_cli.model.resolve import NAMED, named_model_path


def hugging_face_cache() -> Path:
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = Path(os.environ["HF_HOME"]).expanduser() if os.environ.get("HF_HOME") else Path.home() / ".cache" / "huggingface"
    return home / "hub"


def _cached_hub_models() -> list[dict]:
    found = []
    for config in sorted(hugging_face_cache().glob("models--*--*/snapshots/*/config.json")):
        try:
            data = json.loads(config.read_text())
        except (OSError, ValueError):
            continue
        if not any(str(a).endswith("ForCausalLM") for a in data.get("architectures") or []):
            continue
        hub_id = config.parts[-4].removeprefix("models--").replace("--", "/", 1)
        text = data.get("text_config", data)
        found.append({"name": hub_id, "kind": "hugging face cache", "ready": True, "path": str(config.parent),
                      "trained_context": text.get("max_position_embeddings"), "how": f"--model {hub_id}"})
    return list({row["name"]: row for row in found}.values())


def available_models() -> list[dict]:
    rows = []
    for named in NAMED.values():
        path = named_model_path(named)
        rows.append({"name": named.name, "kind": "embedded" if not named.parts else "named (fetched)",
                     "title": named.title, "ready": path is not None, "path": str(path) if path else None,
                     "trained_context": named.trained_context,
                     "how": f"--model {named.name}" if path else named.how_to_get()})
    rows.extend(_cached_hub_models())
    chosen = os.environ.get("RA_MODEL")
    if chosen and chosen not in NAMED:
        rows.append({"name": chosen, "kind": "RA_MODEL", "ready": Path(chosen).expanduser().exists() or "/" in chosen,
                     "path": chosen, "trained_context": None, "how": "set in the environment"})
    return rows


HOW_TO_ADD = ("add a model: `ra models fetch NAME` for a named one, or pass --model with a .gguf file, a transformers "
              "directory, or a Hugging Face id already in your local cache (`huggingface-cli download ID` where "
              "there is network); ra never downloads weights at run time")
