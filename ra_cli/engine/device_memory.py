"""What fits on the accelerator: the room left under `--gpu-mem-gb` (or on the card), and which
layers' KV a prefill or a chat keeps there — the rest stays in page-locked host memory and is
streamed to the device layer by layer (engine/cache.py HostKVLayer). Planned up front, so a
context that cannot fit fails with a message that says what to do, never an out-of-memory
traceback halfway through."""

from __future__ import annotations

from ra_cli.errors import RaError

GIB = 2**30
# Most bytes of scores a prefill's top-k collection (index/collect.py) makes at once on a device
SCORE_BYTES = 256 * 2**20
_cap: dict[int, int] = {}  # CUDA device number -> bytes this process may allocate there (--gpu-mem-gb)


class DoesNotFit(RaError):
    """A plan that needs more accelerator memory than the process may use."""


def device_index(device) -> int:
    """The CUDA device's number ("cuda" alone means the current one)."""
    import torch

    device = torch.device(device)
    return torch.cuda.current_device() if device.index is None else device.index


def set_cap(device, limit: int) -> None:
    _cap[device_index(device)] = limit


def cap_of(device) -> int | None:
    return _cap.get(device_index(device))


def room(device) -> int | None:
    """Bytes this process can still allocate on `device`: under its cap, within what the card has
    free (plus what torch's allocator holds unused); None on a CPU (host memory is not planned)."""
    import torch

    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    allocated = torch.cuda.memory_allocated(device)
    available = free + torch.cuda.memory_reserved(device) - allocated
    cap = cap_of(device)
    return max(0, available if cap is None else min(available, cap - allocated))


def kv_bytes(tokens: int, kv_heads: int, head_dim: int, element_bytes: int) -> int:
    """Keys and values of one layer."""
    return 2 * tokens * kv_heads * head_dim * element_bytes


def prefill_reserve(config, chunk: int, element_bytes: int, streamed_layer: int) -> int:
    """Working memory of one prefill chunk beyond the weights and the resident KV: activations of
    the widest layer (residual, norms, q/k/v/o, the MLP's three projections) with a margin for
    dequantized 4-bit weights and the index's top-k scores (index/collect.py keeps those under
    SCORE_BYTES), one streamed layer's KV, and a fixed slack for torch's allocator."""
    text = config.get_text_config(decoder=True)
    activations = chunk * (12 * text.hidden_size + 4 * text.intermediate_size) * element_bytes
    widest_weight = text.hidden_size * max(text.intermediate_size, text.hidden_size) * element_bytes
    return activations + 2 * widest_weight + 3 * SCORE_BYTES + streamed_layer + GIB


def layers_that_fit(layer_bytes: list[int], available: int) -> int:
    """How many of the layers (in order) fit in `available` bytes together."""
    used = count = 0
    for size in layer_bytes:
        if used + size > available:
            break
        used += size
        count += 1
    return count


def layers_on_device(device, layer_bytes: int, count: int, reserve: int) -> int:
    """How many of `count` layers (in order) keep their `layer_bytes` of KV on `device` beside
    `reserve` bytes of working memory; all of them on a CPU, whose memory is not planned."""
    available = room(device)
    return count if available is None else layers_that_fit([layer_bytes] * count, available - reserve)


def check_fits(device, needed: int, what: str, advice: str, margin: int = GIB // 2) -> None:
    """Raise DoesNotFit when `needed` bytes plus `margin` (by default, a decode step's working
    memory) exceed the room."""
    available = room(device)
    if available is None or needed + margin <= available:
        return
    cap = cap_of(device)
    where = f"under --gpu-mem-gb {cap / GIB:g}" if cap is not None else "on the accelerator"
    raise DoesNotFit(f"{what} needs {needed / GIB:.1f} GB on the accelerator and {available / GIB:.1f} GB free "
                     f"{where}; {advice}")
