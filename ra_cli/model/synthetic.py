"""Models of a real architecture's exact shape with random weights, made on the device without any
download: for timing 8B-class models where their weights are not at hand. Random weights' queries
and keys have none of a trained model's structure, so nothing about recall or fidelity may be
read from them — reports mark them `"synthetic": true`."""

from __future__ import annotations

import time

from ra_cli.errors import RaError

SHAPES = {
    # Llama-3-8B: 32 layers, 32 query / 8 KV heads of 128, MLP 14336, vocabulary 128256
    "llama-3-8b": dict(model_type="llama", hidden_size=4096, num_hidden_layers=32, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=14336, vocab_size=128256, rope_theta=500000.0,
                       max_position_embeddings=131072, rms_norm_eps=1e-5),
    # Qwen2.5-7B: 28 layers, 28 query / 4 KV heads of 128, MLP 18944, q/k/v biases
    "qwen2.5-7b": dict(model_type="qwen2", hidden_size=3584, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, intermediate_size=18944, vocab_size=152064, rope_theta=1000000.0,
                       max_position_embeddings=131072, rms_norm_eps=1e-6),
    # a few small layers of the same structure: the whole path, in CI
    "tiny": dict(model_type="llama", hidden_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                 intermediate_size=256, vocab_size=512, rope_theta=10000.0, max_position_embeddings=131072,
                 rms_norm_eps=1e-5),
}


def synthetic_model(shape: str, device, dtype, quantize: str | None = None, seed: int = 0):
    """(model, seconds) with random weights of `shape`, created directly on `device` in `dtype`
    (an 8B model never exists in float32 first); `quantize` "4bit"/"8bit" converts its linear
    layers with bitsandbytes (GPU)."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    if shape not in SHAPES:
        raise RaError(f"unknown --synthetic '{shape}'; choose {', '.join(SHAPES)}")
    began = time.perf_counter()
    fields = dict(SHAPES[shape])
    config = AutoConfig.for_model(fields.pop("model_type"), **fields, tie_word_embeddings=False)
    torch.manual_seed(seed)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    for name, parameter in model.named_parameters():  # small weights keep activations finite in every layer
        if parameter.dim() > 1:
            parameter.data.normal_(0.0, 0.02)
        else:
            parameter.data.fill_(1.0 if "norm" in name else 0.0)
    if quantize:
        model = _quantize(model, quantize, device)
    return model.eval(), time.perf_counter() - began


def _quantize(model, quantize: str, device):
    if device.type != "cuda":
        raise RaError(f"--load-in-{quantize} needs a CUDA GPU (bitsandbytes)")
    import bitsandbytes as bnb
    import torch

    # parents only: a list holding the Linear modules themselves would keep every bf16 weight alive;
    # the new layers are made on "meta" (no host weights initialised only to be replaced)
    for module in [m for m in model.modules() if not isinstance(m, torch.nn.Linear)]:
        for name, child in list(module.named_children()):
            if isinstance(child, torch.nn.Linear) and name != "lm_head":
                if quantize == "4bit":
                    layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=child.bias is not None,
                                              compute_dtype=child.weight.dtype, quant_type="nf4", device="meta")
                    # quantized where the weights are, by the .to(device) below: an 8B model's
                    # bf16 weights never travel to the host and back
                    layer.weight = bnb.nn.Params4bit(child.weight.data, requires_grad=False, quant_type="nf4")
                else:
                    layer = bnb.nn.Linear8bitLt(child.in_features, child.out_features, bias=child.bias is not None,
                                                has_fp16_weights=False, device="meta")
                    layer.weight = bnb.nn.Int8Params(child.weight.data.cpu(), requires_grad=False)  # quantizes on its way to the device
                if child.bias is not None:
                    layer.bias = child.bias
                setattr(module, name, layer.to(device))
    return model
