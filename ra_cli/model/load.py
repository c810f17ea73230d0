"""Load a model for ra's engine: device, compute dtype and weight format chosen per device.

On a CPU the default is bf16 activations with int4/int8 decode weights and bf16 prefill weights
through the lean forward (engine/forward.py) for llama-family models — float32 weights stream
4x the bytes per token and transformers' module stack adds more overhead than the weights cost
(measured: docs/benchmarks.md). `--dtype float32` keeps transformers' own float32 path: the
exactness reference. On a GPU the default is bf16 (or fp16) through transformers.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import dataclass

from ra_cli.choices import ComputeDtype, WeightFormat
from ra_cli.engine.device_memory import device_index, set_cap
from ra_cli.errors import RaError
from ra_cli.model.convert import converted_gguf
from ra_cli.model.fingerprint import Fingerprint, config_sha256, tokenizer_sha256, weights_id_for_dir
from ra_cli.model.pack import LAYOUT_VERSION, PlainConfig, read_pack, write_pack
from ra_cli.model.resolve import ModelSpec, resolve_model



@dataclass
class LoadedModel:
    model: object  # model/pack.py's LeanModel when the lean forward runs it, else transformers' PreTrainedModel
    tokenizer: object
    spec: ModelSpec
    fingerprint: Fingerprint
    device: object  # torch.device
    dtype: object  # torch.dtype of activations and KV
    load_seconds: float
    weights: WeightFormat = WeightFormat.dense
    trained_context: int | None = None  # tokens the model was trained on, from its config
    eos_token_id: object = None  # the generation config's end-of-sequence id or ids

    @property
    def cache_dtype(self):
        """dtype of the static set a retrieval layer holds. On a CPU it is float32 copies of the
        (bf16) KV values — exact, and the CPU's small-attention kernels run several times faster in
        float32 (measured). Full-attention layers hold `dtype` itself: at long contexts reading
        half the bytes wins."""
        import torch

        return torch.float32 if self.device.type == "cpu" else self.dtype


def pick_device(requested: str = "auto"):
    import torch

    if requested == "auto":
        return torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    try:
        device = torch.device(requested)
    except RuntimeError:
        raise RaError(f"unknown device '{requested}'; use auto, cpu, cuda or cuda:N")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RaError("--device cuda was asked for but no CUDA GPU is available; use --device cpu")
    return device


def plan(dtype: ComputeDtype | str, weights: WeightFormat | str, device, lean_ok: bool):
    """(torch dtype, weight format) for the request on this device and model."""
    import torch

    dtype, weights = ComputeDtype(dtype), WeightFormat(weights)
    if device.type == "cuda":
        if weights in (WeightFormat.int4, WeightFormat.int8):
            raise RaError(f"--weights {weights.value} uses CPU kernels; on a GPU use --load-in-4bit or --load-in-8bit")
        if dtype is ComputeDtype.auto:
            return (torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16), WeightFormat.dense
        return getattr(torch, dtype.value), WeightFormat.dense
    if weights in (WeightFormat.int4, WeightFormat.int8):
        if not lean_ok:
            raise RaError(f"--weights {weights.value} needs a llama-family model (Llama, Qwen2, Mistral); "
                          "use --weights dense")
        if dtype not in (ComputeDtype.auto, ComputeDtype.bfloat16):
            raise RaError(f"--weights {weights.value} computes in bfloat16; use --dtype bfloat16 (or auto)")
        return torch.bfloat16, weights
    if dtype is ComputeDtype.auto:
        return (torch.bfloat16, WeightFormat.int4) if lean_ok and weights is WeightFormat.auto else (torch.float32, WeightFormat.dense)
    if dtype is ComputeDtype.bfloat16 and weights is WeightFormat.auto and lean_ok:
        return torch.bfloat16, WeightFormat.int4
    return getattr(torch, dtype.value), WeightFormat.dense


def pick_dtype(requested: ComputeDtype | str, device):
    """The compute dtype a request means for a model without the lean path."""
    return plan(requested, WeightFormat.dense, device, lean_ok=False)[0]


def dtype_name(dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _quiet_transformers() -> None:
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def load_model(name: str | None = None, device: str = "auto", dtype: ComputeDtype | str = "auto",
               weights: WeightFormat | str = "auto", quantize: str | None = None) -> LoadedModel:
    """`quantize`: None, "4bit" or "8bit" (bitsandbytes, GPU)."""
    import torch

    from ra_cli.engine.attention import install
    from ra_cli.engine.forward import supports

    spec = resolve_model(name)
    torch_device = pick_device(device)
    _quiet_transformers()
    started = time.perf_counter()
    source = _open_source(spec)
    lean_ok = quantize is None and supports(source.config)
    torch_dtype, weight_format = plan(dtype, weights, torch_device, lean_ok)
    if weight_format is not WeightFormat.dense:
        model, eos_token_id = _lean_model(source, weight_format, torch_dtype, torch_device)
    else:
        model = _transformers_model(spec, source.location, torch.float32 if quantize else torch_dtype, torch_device,
                                    quantize)
        model.eval()
        install(model)
        eos_token_id = model.generation_config.eos_token_id
    label = dtype_name(torch_dtype) + ("" if weight_format is WeightFormat.dense else f"+{weight_format.value}")
    label += f"-{quantize}" if quantize else ""
    fingerprint = Fingerprint(source=source.name, weights_id=source.weights_id, config_sha256=config_sha256(model.config),
                              tokenizer_sha256=tokenizer_sha256(source.tokenizer), dtype=label)
    return LoadedModel(model, source.tokenizer, spec, fingerprint, torch_device, torch_dtype,
                       time.perf_counter() - started, weight_format, trained_context(model.config), eos_token_id)


@dataclass
class _Source:
    name: str
    location: str  # what transformers loads from: a directory, or a hub id in the local cache
    weights_id: str
    config: object  # transformers' config, or the plain one of a converted GGUF's config.json
    config_id: str  # what names the config in a pack's file name
    tokenizer: object


def _open_source(spec: ModelSpec) -> _Source:
    """Config, tokenizer and identity of a model, its weights not loaded yet."""
    if spec.kind == "gguf":
        converted, record = converted_gguf(spec.path)  # dequantized once to float32: exact for every format
        # Files ra wrote itself: read without transformers' config classes (see model/pack.py).
        config = PlainConfig(json.loads((converted / "config.json").read_text()))
        return _Source(spec.path.name, str(converted), record["weights_id"], config, record["config_sha256"],
                       _saved_tokenizer(converted))
    from transformers import AutoConfig, AutoTokenizer

    location = str(spec.path) if spec.kind == "dir" else spec.hub_id
    try:
        config = AutoConfig.from_pretrained(location, local_files_only=spec.kind == "hub")
        tokenizer = AutoTokenizer.from_pretrained(location, local_files_only=spec.kind == "hub")
    except OSError as exc:
        if spec.kind == "hub":
            raise RaError(
                f"model '{spec.hub_id}' is not in the local Hugging Face cache; download it where there is network "
                f"(`huggingface-cli download {spec.hub_id}`) or pass a local directory / .gguf file"
            )
        raise RaError(f"cannot load model from {location}: {str(exc).splitlines()[0][:200]}")
    except ValueError as exc:
        raise RaError(f"cannot load model from {location}: {str(exc).splitlines()[0][:200]}")
    weights_id = (weights_id_for_dir(spec.path) if spec.kind == "dir"
                  else "hub:" + spec.hub_id + ":" + str(getattr(config, "_commit_hash", "") or ""))
    return _Source(spec.name, location, weights_id, config, config_sha256(config), tokenizer)


def _saved_tokenizer(directory):
    """The tokenizer class a directory's tokenizer_config.json names, loaded as AutoTokenizer
    would; without AutoTokenizer's look at the model config, which imports the model's code."""
    import transformers

    try:
        name = json.loads((directory / "tokenizer_config.json").read_text()).get("tokenizer_class")
    except (OSError, ValueError, AttributeError):
        name = None  # AutoTokenizer finds the class, or says what is missing
    if name == "TokenizersBackend":
        name = "PreTrainedTokenizerFast"  # the same class, under the name transformers exports
    return getattr(transformers, name or "AutoTokenizer", transformers.AutoTokenizer).from_pretrained(directory)


def _lean_model(source: _Source, weight_format: WeightFormat, dtype, device):
    """The lean decoder and the end-of-sequence id(s), from the model's cached pack (packed now
    and cached the first time)."""
    import torch

    from ra_cli.files import exclusive
    from ra_cli.paths import models_dir
    from ra_cli.ui import status

    cache_dtype = torch.float32 if device.type == "cpu" else dtype
    key = json.dumps([source.weights_id, source.config_id, weight_format.value, dtype_name(dtype), LAYOUT_VERSION])
    pack = models_dir() / "packed" / (hashlib.sha256(key.encode()).hexdigest()[:24] + ".safetensors")
    if not pack.is_file():
        with exclusive(pack, f"packing the weights of {source.name}", status):
            if not pack.is_file():
                status(f"packing the weights of {source.name} for this CPU once ({weight_format.value}; later "
                       "starts load them in a moment)…")
                write_pack(source.location, pack, weight_format, dtype, cache_dtype,
                           {"source": source.name, "weights": f"{dtype_name(dtype)}+{weight_format.value}"})
    return read_pack(pack, dtype, cache_dtype, device)


def _transformers_model(spec: ModelSpec, location: str, dtype, device, quantize: str | None):
    import torch
    from transformers import AutoModelForCausalLM

    kwargs = {"dtype": dtype, "local_files_only": spec.kind == "hub"}
    if quantize:
        kwargs.update(_bitsandbytes_kwargs(quantize, device))
    try:
        model = AutoModelForCausalLM.from_pretrained(location, **kwargs)
    except (OSError, ValueError) as exc:
        raise RaError(f"cannot load model from {location}: {str(exc).splitlines()[0][:200]}")
    if not quantize:
        model.to(device=device, dtype=dtype)
    return model


def trained_context(config) -> int | None:
    text = config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config
    value = getattr(text, "max_position_embeddings", None)
    return int(value) if value else None


def _bitsandbytes_kwargs(quantize: str, device) -> dict:
    import torch

    if device.type != "cuda":
        raise RaError(f"--load-in-{quantize} needs a CUDA GPU (bitsandbytes); on a CPU ra uses int4/int8 weights "
                      "by default (--weights)")
    try:
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise RaError(f"--load-in-{quantize} needs bitsandbytes: {exc}")
    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    config = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_compute_dtype=compute, bnb_4bit_quant_type="nf4")
              if quantize == "4bit" else BitsAndBytesConfig(load_in_8bit=True))
    return {"quantization_config": config, "device_map": {"": device.index or 0}, "dtype": compute}


def load_synthetic(shape: str, device: str = "auto", dtype: ComputeDtype | str = "auto",
                   weights: WeightFormat | str = "auto", quantize: str | None = None) -> LoadedModel:
    """A model of a real architecture's shape with random weights (model/synthetic.py): timing
    only. It has no tokenizer; benchmarks feed it token ids."""
    import torch

    from ra_cli.engine.attention import install
    from ra_cli.engine.forward import LeanDecoder, supports
    from ra_cli.model.synthetic import synthetic_model

    torch_device = pick_device(device)
    lean_ok = quantize is None and torch_device.type == "cpu"
    torch_dtype, weight_format = plan(dtype, weights, torch_device, lean_ok)
    build_dtype = torch.float32 if weight_format is not WeightFormat.dense else torch_dtype
    model, seconds = synthetic_model(shape, torch_device, build_dtype, quantize)
    if weight_format is not WeightFormat.dense and supports(model.config):
        model.ra_lean = LeanDecoder.from_model(model, weight_format, torch_dtype, torch.float32).to(torch_device)
        model.model.layers = torch.nn.ModuleList()
    install(model)
    label = dtype_name(torch_dtype) + ("" if weight_format is WeightFormat.dense else f"+{weight_format.value}")
    label += f"-{quantize}" if quantize else ""
    fingerprint = Fingerprint(source=f"synthetic:{shape}", weights_id=f"synthetic:{shape}:seed0",
                              config_sha256=config_sha256(model.config), tokenizer_sha256="none", dtype=label)
    spec = ModelSpec(name=f"synthetic:{shape}", kind="synthetic")
    return LoadedModel(model, None, spec, fingerprint, torch_device, torch_dtype, seconds, weight_format,
                       trained_context(model.config))


def cap_device_memory(device: str, gigabytes: float | None) -> None:
    """Make a big accelerator stand in for a smaller one: torch may allocate at most `gigabytes`
    in this process (beyond it, allocations fail as they would on the smaller card)."""
    if gigabytes is None:
        return
    import torch

    if not torch.cuda.is_available() or pick_device(device).type != "cuda":
        raise RaError("--gpu-mem-gb caps accelerator memory, and no CUDA GPU is in use; drop it or use --device cuda")
    target = pick_device(device)
    total = torch.cuda.get_device_properties(target).total_memory
    if gigabytes * 2**30 > total:
        raise RaError(f"--gpu-mem-gb {gigabytes:g} is more than this GPU has ({total / 2**30:.1f} GB)")
    torch.cuda.set_per_process_memory_fraction(gigabytes * 2**30 / total, device_index(target))
    set_cap(target, int(gigabytes * 2**30))  # what ingest and chat plan their device memory within
