"""GGUF -> transformers: dequantized once into float32 safetensors in the cache (~15 s for the
embedded model), so that later processes load in well under a second and every compute dtype
and weight format starts from the exact dequantized values."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
from pathlib import Path

from ra_cli.errors import RaError
from ra_cli.files import exclusive, file_sha256
from ra_cli.model.fingerprint import config_sha256, tokenizer_sha256
from ra_cli.paths import models_dir

CONVERSION_VERSION = 1


def gguf_digest(path: Path) -> str:
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


def converted_gguf(gguf: Path) -> tuple[Path, dict]:
    """The converted directory of a GGUF (converting it first if needed) and its record."""
    from ra_cli.ui import status

    digest = gguf_digest(gguf)
    converted = models_dir() / f"gguf-{digest[:24]}-v{CONVERSION_VERSION}"
    record = converted / "ra-fingerprint.json"
    if not record.is_file():
        with exclusive(converted, f"converting {gguf.name}", status):
            if not record.is_file():  # the other process may have finished it meanwhile
                _convert(gguf, converted, digest)
    return converted, json.loads(record.read_text())


def _convert(gguf: Path, target: Path, digest: str) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from ra_cli.ui import status

    status(f"converting {gguf.name} once (dequantizing GGUF; later starts are fast)…")
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
