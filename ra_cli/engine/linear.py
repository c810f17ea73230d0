"""Linear layers for CPU inference: the weights kept in two forms, each where it is fastest.

A decode step multiplies one row by every weight matrix, so its cost is the bytes of weights
streamed from memory: 4-bit groups (a quarter of bf16) win there. Prefill multiplies hundreds of
rows, where bf16 GEMMs run ~4x faster than the int4 kernel (measured: docs/benchmarks.md). So a
`PackedLinear` holds bf16 weights for batches of more than DECODE_ROWS rows and int4 (or int8)
weights for decode.

int4 is used only where it loses nothing: GGUF checkpoints are already quantized in groups of 32
along the input dimension (Q4_0/Q4_1/Q4_K), so their dequantized weights lie exactly on a
16-level grid per group, which torch's int4 kernel represents as (q - 8) * scale + zero. Weights
not on such a grid (Q5/Q6/Q8, float checkpoints) get int8 rows, 255 levels per output channel.
"""

from __future__ import annotations

from ra_cli.choices import WeightFormat
import torch
import torch.nn.functional as F

from ra_cli.engine.int8_decode import int8_matmul

DECODE_ROWS = 16  # up to this many rows use the decode weights
GROUP = 32  # int4 group size along the input dimension (the GGUF block size)



def int4_groups(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
    """If every group of GROUP inputs of `weight` [N, K] (float32) lies on a grid of at most 16
    evenly spaced levels, return (q [N, K] int32 in 0..15, step [N, K/G], low [N, K/G]) with
    weight = low + q * step; else None. The step is each group's smallest gap between values."""
    n, k = weight.shape
    if k % GROUP:
        return None
    groups = weight.reshape(n, k // GROUP, GROUP)
    ordered = torch.sort(groups, dim=-1).values
    low = ordered[..., 0]
    gaps = torch.diff(ordered, dim=-1)
    resolution = 1e-6 * ordered.abs().amax(-1, keepdim=True).clamp_min(1e-30)
    step = torch.where(gaps > resolution, gaps, torch.full_like(gaps, float("inf"))).amin(-1)
    step = torch.where(torch.isinf(step), torch.ones_like(step), step)  # constant groups
    q = torch.round((groups - low[..., None]) / step[..., None])
    exact = (groups - (low[..., None] + q * step[..., None])).abs() <= 1e-3 * step[..., None]
    if not bool(exact.all()) or float(q.max()) > 15:
        return None
    return q.reshape(n, k).to(torch.int32), step, low


class PackedLinear(torch.nn.Module):
    """y = x W^T (+ b) with dense weights (bf16 by default) for prefill and int4/int8 weights for
    decode; activations run in the dense weights' dtype."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, decode: WeightFormat,
                 dtype: torch.dtype = torch.bfloat16):
        super().__init__()
        weight = weight.detach().float()
        self.out_features, self.in_features = weight.shape
        if decode in (WeightFormat.int4, WeightFormat.int8) and dtype != torch.bfloat16:
            raise ValueError("int4/int8 decode weights take bfloat16 activations")
        self.register_buffer("dense", weight.to(dtype))
        self.register_buffer("bias", None if bias is None else bias.detach().to(dtype))
        self.kind = "dense"
        groups = int4_groups(weight) if decode is WeightFormat.int4 else None
        if groups is not None:
            q, step, low = groups
            self.register_buffer("packed", torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1))
            # torch's int4 convention: w = (q - 8) * scale + zero, [K/G, N, 2] in bf16
            self.register_buffer("scales_zeros", torch.stack([step, low + 8 * step], -1).transpose(0, 1)
                                 .contiguous().to(torch.bfloat16))
            self.kind = "int4"
        elif decode in (WeightFormat.int4, WeightFormat.int8):
            scale = weight.abs().amax(1).clamp_min(1e-30) / 127
            self.register_buffer("int8", torch.round(weight / scale[:, None]).to(torch.int8))
            self.register_buffer("int8_scales", scale.to(torch.bfloat16))
            self.kind = "int8"

    @classmethod
    def from_state(cls, state: dict, prefix: str) -> "PackedLinear":
        """A layer from the tensors a saved state holds under `prefix` (no packing work)."""
        layer = cls.__new__(cls)
        torch.nn.Module.__init__(layer)
        for name in ("dense", "bias", "packed", "scales_zeros", "int8", "int8_scales"):
            layer.register_buffer(name, state.get(prefix + name))
        layer.out_features, layer.in_features = layer.dense.shape
        layer.kind = "int4" if layer.packed is not None else "int8" if layer.int8 is not None else "dense"
        return layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(self.dense.dtype)
        if rows.shape[0] > DECODE_ROWS or self.kind == "dense":
            out = F.linear(rows, self.dense)
        elif self.kind == "int4":
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(rows, self.packed, GROUP, self.scales_zeros)
        else:
            out = int8_matmul(rows, self.int8, self.int8_scales)
            if out is None:  # off a CPU, or a matrix too small to pay: torch's kernel
                out = torch._weight_int8pack_mm(rows, self.int8, self.int8_scales)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    @property
    def decode_bytes(self) -> int:
        """Weight bytes one decode step streams through this layer."""
        if self.kind == "int4":
            return self.packed.numel() * self.packed.element_size() + self.scales_zeros.numel() * 2
        if self.kind == "int8":
            return self.int8.numel() + self.int8_scales.numel() * 2
        return self.dense.numel() * 2


def fused(linears, decode: WeightFormat, dtype: torch.dtype = torch.bfloat16) -> PackedLinear:
    """One PackedLinear computing several nn.Linear layers of the same input (their outputs
    concatenated): one kernel call instead of several per step (q|k|v, gate|up)."""
    weight = torch.cat([layer.weight.detach().float() for layer in linears])
    biases = [layer.bias for layer in linears]
    bias = None if all(b is None for b in biases) else torch.cat(
        [b.detach().float() if b is not None else torch.zeros(layer.out_features) for b, layer in zip(biases, linears)])
    return PackedLinear(weight, bias, decode, dtype)
