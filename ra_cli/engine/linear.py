"""Linear layers for CPU inference: the weights kept in two forms, each where it is fastest.

A decode step multiplies one row by every weight matrix, so its cost is the bytes of weights
streamed from memory: 4-bit groups (a quarter of bf16) win there. Prefill multiplies hundreds of
rows, where bf16 GEMMs run ~4x faster than the int4 kernel (measured: docs/benchmarks.md). So a
`PackedLinear` holds bf16 weights for batches of more than DECODE_ROWS rows and int4 (or int8)
weights for decode.

A CPU without bf16 dot-product instructions (AVX512-BF16 or AMX; most laptops and desktops)
runs torch's bf16 GEMMs in software, ~3x slower than float32 (measured: docs/benchmarks.md). There
the batched products run in float32 on a float32 copy of the weights, made on the first batch: the
same products (a bf16 value is exact in float32), summed in float32 as oneDNN's bf16 kernels sum.

int4 is used only where it loses nothing: GGUF checkpoints are already quantized in groups of 32
along the input dimension (Q4_0/Q4_1/Q4_K), so their dequantized weights lie exactly on a
16-level grid per group, low + q * step (engine/int4_decode.py multiplies them). Weights not on
such a grid (Q5/Q6/Q8, float checkpoints) get int8 rows, 255 levels per output channel
(engine/int8_decode.py).
"""

from __future__ import annotations

import functools

from ra_cli.choices import WeightFormat
import torch
import torch.nn.functional as F

from ra_cli.engine.int4_decode import GROUP, int4_matmul, int4_views, pack_int4_tiles
from ra_cli.engine.int8_decode import SMALLEST, int8_matmul, int8_views

BUFFERS = ("dense", "bias", "int4_tiles", "int4_step", "int4_low", "int8", "int8_scales")
DECODE_ROWS = 16  # up to this many rows use the decode weights


@functools.cache
def _cpu_has_bf16_instructions() -> bool:
    return any(getattr(torch.cpu, check, lambda: False)() for check in ("_is_avx512_bf16_supported",
                                                                          "_is_amx_tile_supported"))


def cpu_multiplies_bf16() -> bool:
    """Whether torch's bf16 GEMMs run in hardware here: bf16 instructions, reached through oneDNN
    (torch's other bf16 GEMM widens in software)."""
    return torch.backends.mkldnn.is_available() and torch.backends.mkldnn.enabled and _cpu_has_bf16_instructions()


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


def aligned(tensor: torch.Tensor | None, alignment: int = 64) -> torch.Tensor | None:
    """The tensor, copied when its data does not start on a cache line: a saved state is loaded
    with tensors back to back at any offset, and torch's int8 kernel reads its weights with aligned
    vector loads (a weight at offset 8 crashed it). Only what that kernel reads is copied: the
    rest stays in the loaded file's pages (a copy of them would be resident memory twice over)."""
    if tensor is None or tensor.data_ptr() % alignment == 0:
        return tensor
    return tensor.clone()


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
            tiles, step, low = pack_int4_tiles(*groups)
            self.register_buffer("int4_tiles", tiles)
            self.register_buffer("int4_step", step)
            self.register_buffer("int4_low", low)
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
        for name in BUFFERS:
            tensor = state.get(prefix + name)
            if name == "int8_scales" or (name == "int8" and tensor is not None and tensor.numel() < SMALLEST):
                tensor = aligned(tensor)  # what torch's int8 kernel reads (int8_decode.SMALLEST)
            layer.register_buffer(name, tensor)
        layer.out_features, layer.in_features = layer.dense.shape
        layer.kind = "int4" if layer.int4_tiles is not None else "int8" if layer.int8 is not None else "dense"
        return layer

    def host_weights(self) -> tuple | None:
        """The decode weights as the numba kernels read them (int4: tiles, step and low bits; int8:
        rows and scale bits; None for dense weights), viewed once and kept: converting them on every
        call costs microseconds."""
        if self.kind == "dense":
            return None
        source = self.int4_tiles if self.kind == "int4" else self.int8
        if getattr(self, "_host", None) is None or self._host[0] != source.data_ptr():
            views = int4_views(self.int4_tiles, self.int4_step, self.int4_low) if self.kind == "int4" \
                else int8_views(self.int8, self.int8_scales)
            self._host = (source.data_ptr(), views)
        return self._host[1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).to(self.dense.dtype)
        if rows.shape[0] > DECODE_ROWS or self.kind == "dense":
            out = self._dense_product(rows)
        elif self.kind == "int4":
            out = int4_matmul(rows, self.host_weights(), self.out_features)
        else:
            out = int8_matmul(rows, self.int8, self.int8_scales, views=self.host_weights())
            if out is None:  # off a CPU, or a matrix too small to pay: torch's kernel
                out = torch._weight_int8pack_mm(rows, self.int8, self.int8_scales)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)

    def _dense_product(self, rows: torch.Tensor) -> torch.Tensor:
        if self.dense.dtype != torch.bfloat16 or self.dense.device.type != "cpu" or cpu_multiplies_bf16():
            return F.linear(rows, self.dense)
        if getattr(self, "_float32", None) is None or self._float32[0] != self.dense.data_ptr():
            self._float32 = (self.dense.data_ptr(), self.dense.float())
        return F.linear(rows.float(), self._float32[1]).to(torch.bfloat16)

    @property
    def decode_bytes(self) -> int:
        """Weight bytes one decode step streams through this layer."""
        if self.kind == "int4":
            return self.int4_tiles.numel() + (self.int4_step.numel() + self.int4_low.numel()) * 2
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
