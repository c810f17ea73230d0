"""A lean forward pass for llama-family decoders (Llama, Qwen2, Mistral): the model's own weights
without transformers' per-module overhead (gpt-fast style: prefill and decode are one plain
function over a token batch and a ContextCache).

A decode step of the 135M embedded model streams ~4 ms of weights on this class of CPU, but
transformers' module stack spent ~10 ms more on Python and ~600 small tensor ops around it
(measured: docs/benchmarks.md). This forward computes what transformers' LlamaDecoderLayer
computes — RMSNorm, rotary embedding, grouped-query attention, SwiGLU MLP, residuals — with q|k|v
and gate|up fused into one projection each, one `rms_norm` kernel per norm, a rotary table built
once, a float32 residual stream, and ra's cache layers called directly for attention. A
one-token step on a CPU with packed weights (the default) goes further: each layer's glue is two
numba calls around its attention (fused_decode.py), no torch ops but the cache layers'.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from ra_cli.choices import WeightFormat
from ra_cli.engine.fused_decode import NO_BIAS, after_attention, before_attention, final_logits
from ra_cli.engine.linear import PackedLinear, fused

SUPPORTED = {"llama", "qwen2", "mistral"}


# Rope types whose frequencies change with the sequence's length: the table below is fixed.
LENGTH_DEPENDENT_ROPE = {"dynamic", "longrope"}


def supports(config) -> bool:
    """Whether a config (transformers' or the plain one of a pack) describes a decoder this forward
    computes exactly."""
    scaling = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None) or {}
    rope_type = scaling.get("rope_type", scaling.get("type", "default")) if isinstance(scaling, dict) else "default"
    return (config.model_type in SUPPORTED and getattr(config, "hidden_act", "silu") == "silu"
            and not getattr(config, "mlp_bias", False) and rope_type not in LENGTH_DEPENDENT_ROPE)


class LeanDecoder(torch.nn.Module):
    """The decoder's weights in the forms ra runs them, and the forward over them. Built once from
    a transformers model (`from_model`: packing costs seconds) and then reloaded from the packed
    tensors (`from_state`)."""

    def __init__(self, config, dtype: torch.dtype = torch.bfloat16, cache_dtype: torch.dtype | None = None):
        super().__init__()
        self.kv_dtype = dtype  # precision of keys and values (what a store keeps)
        self.cache_dtype = cache_dtype or dtype  # dtype of the query handed to the cache layers
        self.heads = config.num_attention_heads
        self.kv_heads = config.num_key_value_heads or self.heads
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.heads
        self.scaling = self.head_dim ** -0.5
        self.eps = config.rms_norm_eps
        self.hidden = config.hidden_size
        self.blocks = torch.nn.ModuleList()
        self._cos = self._sin = None
        self._host = None  # per block, the arrays fused_decode reads (built on the first decode step)

    @classmethod
    def from_model(cls, model, decode: WeightFormat, dtype: torch.dtype = torch.bfloat16,
                   cache_dtype: torch.dtype | None = None) -> "LeanDecoder":
        base = model.model
        lean = cls(model.config, dtype, cache_dtype)
        # the frequencies transformers' rotary module made from the config (any static rope scaling)
        lean.register_buffer("rope_inv_freq", base.rotary_emb.inv_freq.detach().float().clone())
        lean.register_buffer("rope_scale", torch.tensor(float(base.rotary_emb.attention_scaling)))
        lean.register_buffer("embed", base.embed_tokens.weight.detach().to(dtype))
        for layer in base.layers:
            attention, mlp = layer.self_attn, layer.mlp
            block = torch.nn.Module()
            block.register_buffer("attn_norm", layer.input_layernorm.weight.detach().float())
            block.qkv = fused([attention.q_proj, attention.k_proj, attention.v_proj], decode, dtype)
            block.out = PackedLinear(attention.o_proj.weight, attention.o_proj.bias, decode, dtype)
            block.register_buffer("mlp_norm", layer.post_attention_layernorm.weight.detach().float())
            block.gate_up = fused([mlp.gate_proj, mlp.up_proj], decode, dtype)
            block.down = PackedLinear(mlp.down_proj.weight, mlp.down_proj.bias, decode, dtype)
            lean.blocks.append(block)
        lean.register_buffer("norm", base.norm.weight.detach().float())
        lean.lm_head = PackedLinear(model.lm_head.weight, getattr(model.lm_head, "bias", None), decode, dtype)
        return lean

    @classmethod
    def from_state(cls, config, state: dict, dtype: torch.dtype, cache_dtype: torch.dtype | None = None):
        """The decoder `state()` saved: no packing, no transformers weights."""
        lean = cls(config, dtype, cache_dtype)
        for name in ("rope_inv_freq", "rope_scale", "embed"):
            lean.register_buffer(name, state[name])
        for i in range(config.num_hidden_layers):
            prefix = f"blocks.{i}."
            block = torch.nn.Module()
            block.register_buffer("attn_norm", state[prefix + "attn_norm"])
            block.register_buffer("mlp_norm", state[prefix + "mlp_norm"])
            for name in ("qkv", "out", "gate_up", "down"):
                setattr(block, name, PackedLinear.from_state(state, prefix + name + "."))
            lean.blocks.append(block)
        lean.register_buffer("norm", state["norm"])
        lean.lm_head = PackedLinear.from_state(state, "lm_head.")
        return lean

    def state(self) -> dict:
        return {name: tensor.contiguous() for name, tensor in self.state_dict().items()}

    @property
    def decode_bytes(self) -> int:
        """Weight bytes one decode step reads (embedding lookups aside)."""
        linears = [m for m in self.modules() if isinstance(m, PackedLinear)]
        return sum(m.decode_bytes for m in linears)

    def _rotary(self, start: int, count: int, device):
        """cos, sin [count, D] float32 for positions start.., from a table that doubles as needed;
        computed as transformers' rotary module computes them (float32 products, then cos and sin
        scaled by the rope's attention factor)."""
        end = start + count
        if self._cos is None or self._cos.shape[0] < end:
            size = max(end, 2 * (0 if self._cos is None else self._cos.shape[0]), 4096)
            freqs = torch.arange(size, device=device)[:, None].float() * self.rope_inv_freq.to(device)
            angles = torch.cat((freqs, freqs), dim=-1)
            self._cos, self._sin = angles.cos() * self.rope_scale, angles.sin() * self.rope_scale
        return self._cos[start:end], self._sin[start:end]

    def _apply(self, fn, *args, **kwargs):  # .to(), .float(), …: the arrays viewed before may be gone
        self._host = None
        return super()._apply(fn, *args, **kwargs)

    def _host_weights(self):
        """Per block the numpy arrays fused_decode reads, then the final norm and head; None when a
        weight is not int4/int8 on a CPU (dense weights, another device: the general forward)."""
        if self._host is None:
            linears = [m for m in self.modules() if isinstance(m, PackedLinear)]
            if self.embed.device.type != "cpu" or any(m.kind not in ("int4", "int8") for m in linears) or \
                    any(m.host_weights() is None for m in linears):
                self._host = False
            else:
                def bias(linear):
                    return NO_BIAS if linear.bias is None else linear.bias.float().numpy()

                blocks = [(block.attn_norm.numpy(), block.qkv.host_weights(), bias(block.qkv),
                           block.out.host_weights(), bias(block.out), block.mlp_norm.numpy(),
                           block.gate_up.host_weights(), bias(block.gate_up), block.down.host_weights(), bias(block.down),
                           block.down.in_features) for block in self.blocks]
                self._host = (blocks, self.norm.numpy(), self.lm_head.host_weights(), bias(self.lm_head),
                              self.lm_head.out_features)
        return self._host or None

    def _decode_token(self, ids: torch.Tensor, cache, want_logits: bool, host) -> torch.Tensor | None:
        """One token on a CPU with packed weights: the layers' glue in numba (fused_decode.py), the
        residual stream a float32 numpy vector, attention through the cache layers as in forward."""
        blocks, norm, head, head_bias, vocab = host
        cos, sin = self._rotary(cache.length, 1, ids.device)
        cos, sin = cos[0].numpy(), sin[0].numpy()
        x = self.embed[ids[0, 0]].float().numpy()
        for layer, (attn_norm, qkv, qkv_bias, out, out_bias, mlp_norm, gate_up, gate_up_bias, down, down_bias,
                    inner) in zip(cache.layers, blocks):
            query, key, value = before_attention(x, attn_norm, self.eps, qkv, qkv_bias, cos, sin, self.heads,
                                                 self.kv_heads)
            layer.update(torch.from_numpy(key)[None, :, None].to(self.kv_dtype),
                         torch.from_numpy(value)[None, :, None].to(self.kv_dtype))
            attended = layer.attend(torch.from_numpy(query)[None, :, None].to(self.cache_dtype), self.scaling)
            attended = np.ascontiguousarray(attended.reshape(-1).float().numpy())
            after_attention(x, attended, out, out_bias, mlp_norm, self.eps, gate_up, gate_up_bias, down, down_bias,
                            inner)
        if not want_logits:
            return None
        return torch.from_numpy(final_logits(x, norm, self.eps, head, head_bias, vocab))

    def forward(self, ids: torch.Tensor, cache, want_logits: bool = True) -> torch.Tensor | None:
        """Run token ids [1, T] after what `cache` holds; returns last-position logits [vocab]."""
        count = ids.shape[1]
        host = self._host_weights() if count == 1 else None
        if host is not None:
            return self._decode_token(ids, cache, want_logits, host)
        start = cache.length
        cos, sin = self._rotary(start, count, ids.device)
        cos, sin = cos[None, :, None, :], sin[None, :, None, :]  # [1, T, 1, D]
        half = self.head_dim // 2
        x = self.embed[ids[0]].float()[None]  # [1, T, hidden]
        q_width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        for index, block in enumerate(self.blocks):
            layer = cache.layers[index]
            h = F.rms_norm(x, (self.hidden,), block.attn_norm, self.eps)
            qkv = block.qkv(h).float()
            # rotate q and k together: [1, T, H + KVH, D]
            qk = qkv[..., : q_width + kv_width].reshape(1, count, self.heads + self.kv_heads, self.head_dim)
            rotated = torch.cat((-qk[..., half:], qk[..., :half]), dim=-1)
            qk = qk * cos + rotated * sin
            query = qk[:, :, : self.heads].transpose(1, 2).to(self.cache_dtype)
            key = qk[:, :, self.heads:].transpose(1, 2)
            value = qkv[..., q_width + kv_width:].reshape(1, count, self.kv_heads, self.head_dim).transpose(1, 2)
            # rounded to the KV precision (what a store reloads, exactly); each layer holds it in
            # its own buffer's dtype
            layer.update(key.to(self.kv_dtype), value.to(self.kv_dtype))
            attended = layer.attend(query, self.scaling)  # [1, H, T, D]
            x = x + block.out(attended.transpose(1, 2).reshape(1, count, q_width)).float()
            h = F.rms_norm(x, (self.hidden,), block.mlp_norm, self.eps)
            gate, up = block.gate_up(h).chunk(2, dim=-1)
            x = x + block.down(F.silu(gate) * up).float()
        if not want_logits:
            return None
        last = F.rms_norm(x[:, -1], (self.hidden,), self.norm, self.eps)
        return self.lm_head(last)[0].float()
