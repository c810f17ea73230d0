"""The identity of the network that computed a KV cache: a store is valid only for an equal one."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

# Keys that describe how a config was loaded rather than what the network computes.
_VOLATILE_CONFIG_KEYS = {
    "transformers_version", "_name_or_path", "name_or_path", "_attn_implementation",
    "_attn_implementation_internal", "_attn_implementation_autoset", "quantization_config",
    "dtype", "torch_dtype", "use_cache", "_commit_hash", "architectures", "output_attentions",
}


@dataclass
class Fingerprint:
    source: str
    weights_id: str
    config_sha256: str
    tokenizer_sha256: str
    dtype: str  # compute dtype, plus the weight format when it is not the dtype (e.g. bfloat16+int4)

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


def weights_id_for_dir(path: Path) -> str:
    # Hashing many GB of weights on every start is too slow; names + sizes identify a snapshot well
    # enough together with the config and tokenizer hashes.
    entries = sorted(
        (p.name, p.stat().st_size) for p in path.iterdir()
        if p.suffix in {".safetensors", ".bin", ".gguf", ".pt"}
    )
    return "files:" + hashlib.sha256(json.dumps(entries).encode()).hexdigest()
