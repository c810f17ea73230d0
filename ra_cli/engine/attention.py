"""The attention function ra registers with transformers, and the exact attention math it uses.

We do not fork model code: transformers calls `ra_attention` for every attention layer (registered
through AttentionInterface), and it hands the work to the layer object of the active
`ContextCache`. A full-attention layer attends to all of its KV on the compute device; a retrieval
layer (see retrieval/layer.py) attends to a static set on the device plus keys retrieved from CPU
memory and merges the two exactly by log-sum-exp.
"""

from __future__ import annotations

import contextlib
import contextvars

import numpy as np
import torch
import torch.nn.functional as F

from ra_cli.engine.dense_decode import cpu_decode_attention

ATTENTION_NAME = "ra"
_active_cache: contextvars.ContextVar = contextvars.ContextVar("ra_active_cache", default=None)


def install(model) -> None:
    from transformers import AttentionInterface

    AttentionInterface.register(ATTENTION_NAME, ra_attention)
    model.set_attn_implementation(ATTENTION_NAME)


@contextlib.contextmanager
def active(cache):
    """Route the model's attention through `cache` for the duration of one or more forwards."""
    token = _active_cache.set(cache)
    try:
        yield cache
    finally:
        _active_cache.reset(token)


def ra_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    cache = _active_cache.get()
    if cache is None:
        raise RuntimeError("ra attention called outside engine.attention.active(cache)")
    layer = cache.layers[module.layer_idx]
    output = layer.attend(
        query,
        scaling=scaling if scaling is not None else query.shape[-1] ** -0.5,
        sliding_window=kwargs.get("sliding_window"),
        softcap=kwargs.get("softcap"),
    )
    # transformers expects [batch, q_len, heads, head_dim]
    return output.transpose(1, 2).contiguous(), None


def causal_mask(q_len: int, q_offset: int, kv_len: int, kv_offset: int = 0, sliding_window: int | None = None,
                device=None) -> torch.Tensor:
    """Boolean [q_len, kv_len] mask: True where query (absolute position q_offset+i) may see key
    (absolute position kv_offset+j). Sliding windows follow transformers: key > query - window."""
    q_pos = torch.arange(q_offset, q_offset + q_len, device=device)[:, None]
    k_pos = torch.arange(kv_offset, kv_offset + kv_len, device=device)[None, :]
    mask = k_pos <= q_pos
    if sliding_window is not None:
        mask &= k_pos > q_pos - sliding_window
    return mask


# Up to this many query positions, attention runs as grouped matmuls over the cache in place;
# above it (prefill chunks), through scaled_dot_product_attention's fused kernels.
SMALL_QUERY = 16
# On a CPU, up to this many query positions that see a prefix of the keys (a question read after
# the document) go through engine/dense_decode.py's float32 kernel instead: exact where bf16
# matmuls round every score, faster than them up to ~32 positions and level with SDPA up to 64
# (benchmarks/question_attention.py).
CPU_KERNEL_QUERY = 64


def exact_attention(query, keys, values, scaling: float, q_offset: int, kv_offset: int = 0,
                    sliding_window: int | None = None, softcap: float | None = None, mass=None,
                    kernels: bool = True) -> torch.Tensor:
    """softmax(q k^T) v over every visible key. query [B,H,q,D], keys/values [B,KVH,n,D] -> [B,H,q,D].
    `mass` (an engine.mass.AttentionMass) collects a decode step's weights by position; `kernels`
    False keeps to torch (the same result whichever build of the numba kernels is loaded)."""
    out_dtype = query.dtype
    q_len, kv_len = query.shape[2], keys.shape[2]
    needs_mask = q_len > 1 or (sliding_window is not None and q_offset - kv_offset >= sliding_window)
    mask = causal_mask(q_len, q_offset, kv_len, kv_offset, sliding_window, query.device) if needs_mask else None
    if kernels and mask is None and softcap is None and q_len <= SMALL_QUERY and query.shape[0] == 1:
        return decode_attention(query, keys, values, scaling, mass, kv_offset).to(out_dtype)
    if kernels and sliding_window is None and softcap is None and q_len <= CPU_KERNEL_QUERY and query.shape[0] == 1:
        # causal only: query i sees keys [0, q_offset - kv_offset + i] — a prefix the kernel masks per row
        kv_heads = keys.shape[1]
        seen = np.minimum(np.arange(q_offset - kv_offset + 1, q_offset - kv_offset + 1 + q_len), kv_len)
        computed = cpu_decode_attention(grouped_rows(query[0], kv_heads), keys[0], values[0], scaling,
                                        visible=np.tile(seen, query.shape[1] // kv_heads))
        if computed is not None:
            return computed[0].reshape(1, query.shape[1], q_len, values.shape[3]).to(out_dtype)
    query = query.to(keys.dtype)  # e.g. a float32 query over bf16 KV: bf16 matmuls, float32 softmax
    if q_len <= SMALL_QUERY or softcap is not None:
        out, _ = attention_with_lse(query, keys, values, scaling, mask, softcap)
        return out.to(out_dtype)
    if query.is_cuda and sliding_window is None and kv_offset == 0 and q_offset + q_len == kv_len:
        # a prefill chunk after its prefix: flash attention's own causal alignment, with no [q, n]
        # mask in memory (a mask rules flash out, and the fallback's scores at 128K keys would not fit)
        from torch.nn.attention.bias import causal_lower_right

        mask = causal_lower_right(q_len, kv_len)
    return F.scaled_dot_product_attention(query, keys, values, attn_mask=mask, scale=scaling,
                                          enable_gqa=keys.shape[1] != query.shape[1]).to(out_dtype)


def decode_attention(query, keys, values, scaling: float, mass=None, kv_offset: int = 0) -> torch.Tensor:
    """softmax(q k^T) v for a few query positions that see every key, no log-sum-exp: query
    [1, H, q, D], keys/values [1, KVH, n, D] -> [1, H, q, D]. On a CPU, engine/dense_decode.py's
    kernel (one float32 pass over the KV); on an accelerator, scaled_dot_product_attention (its
    fused kernels split the keys across the device, where the per-head matmuls below launch six
    small kernels per KV head and layer); matmul_decode_attention where the weights are wanted."""
    if query.is_cuda and mass is None:
        return F.scaled_dot_product_attention(query.to(keys.dtype), keys, values, scale=scaling,
                                              enable_gqa=keys.shape[1] != query.shape[1])
    heads, count = query.shape[1], query.shape[2]
    kv_heads = keys.shape[1]
    rows = grouped_rows(query[0], kv_heads)  # [KVH, G*q, D]
    computed = cpu_decode_attention(rows, keys[0], values[0], scaling, None if mass is None else mass.floor)
    if computed is not None:
        out, heavy = computed
        if mass is not None:
            at, weights = heavy
            for g in range(kv_heads):
                mass.add(g * (heads // kv_heads), at[g].ravel() + kv_offset, weights[g].ravel())
    else:
        out, weights = matmul_decode_attention(rows, keys[0], values[0], scaling)
        if mass is not None:
            for g in range(kv_heads):
                mass.add_dense(g * (heads // kv_heads), weights[g], kv_offset)
    return out.reshape(1, heads, count, values.shape[3])


def matmul_decode_attention(rows, keys, values, scaling: float):
    """Decode attention as torch matmuls, rows [KVH, R, D] over keys/values [KVH, n, D] -> (out
    [KVH, R, D], softmax weights per KV head [R, n]): q k^T and weights x V in the KV's dtype (e.g.
    bf16), the softmax in float32. One KV head at a time: a head's [n, D] slice of a cache buffer
    is contiguous while the whole [KVH, n, D] view is not, and bf16 matmuls on strided views run
    several times slower (measured: 4.9 vs 0.9 ms at 32K keys)."""
    rows = rows.to(keys.dtype)
    out, weights = [], []
    for g in range(keys.shape[0]):
        weights.append(torch.softmax(torch.matmul(rows[g], keys[g].transpose(0, 1)).float() * scaling, dim=-1))
        out.append(torch.matmul(weights[g].to(values.dtype), values[g]))
    return torch.stack(out), weights


def attention_with_lse(query, keys, values, scaling: float, mask: torch.Tensor | None = None,
                       softcap: float | None = None):
    """Attention over one key set, returning (output [B,H,q,D] float32, log-sum-exp [B,H,q] float32).

    Grouped-query heads are handled by viewing the G query heads of a KV head as G*q rows against
    that head's keys, so strided cache views are read in place and never expanded or copied.
    `mask` is [q, n] (True = visible), shared by all heads. Rows with no visible key get output 0
    and lse -inf, so they vanish in `merge_partial`.
    """
    batch, heads, q_len, _ = query.shape
    kv_heads = keys.shape[1]
    scores = grouped_scores(query, keys, grouped=True).float() * scaling  # [B, KVH, G*q, n]
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if mask is not None:
        scores = scores.masked_fill(~mask.repeat(heads // kv_heads, 1), float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    weights = torch.exp(scores - torch.where(torch.isinf(lse), 0.0, lse)[..., None])
    out = torch.matmul(weights.to(values.dtype), values).float()
    return out.reshape(batch, heads, q_len, -1), lse.reshape(batch, heads, q_len)


def grouped_scores(queries: torch.Tensor, keys: torch.Tensor, grouped: bool = False) -> torch.Tensor:
    """q·k of every query head against the keys of its KV head, without expanding or copying KV:
    queries [..., H, q, D], keys [..., KVH, n, D] -> [..., H, q, n] (query head h reads KV head
    h // (H / KVH)); with `grouped`, the matmul's own layout [..., KVH, G*q, n]."""
    *lead, heads, count, _ = queries.shape
    scores = torch.matmul(grouped_rows(queries, keys.shape[-3]), keys.transpose(-1, -2))
    return scores if grouped else scores.reshape(*lead, heads, count, keys.shape[-2])


def grouped_rows(queries: torch.Tensor, kv_heads: int) -> torch.Tensor:
    """The G query heads of each KV head as G*q rows against that head's keys: [..., H, q, D] ->
    [..., KVH, G*q, D], a view (query head h = kv * G + g)."""
    *lead, heads, count, dim = queries.shape
    return queries.reshape(*lead, kv_heads, (heads // kv_heads) * count, dim)


def static_and_top_mass(scores: torch.Tensor, lo: int, hi: int, budgets) -> dict[int, torch.Tensor]:
    """Softmax mass that the static set (key positions < lo or >= hi) plus the exact top-k
    indexed keys [lo, hi) hold, for each k in `budgets`: the best any retrieval with budget k can
    do. scores [..., n] are scaled logits, -inf where a key is invisible -> {k: mass [...]}."""
    probs = torch.softmax(scores.float(), dim=-1)
    lo = max(lo, 0)
    hi = max(hi, lo)
    static = probs[..., :lo].sum(-1) + probs[..., hi:].sum(-1)
    if hi == lo or max(budgets) <= 0:
        return {k: static for k in budgets}
    ranked = torch.topk(probs[..., lo:hi], min(max(budgets), hi - lo), dim=-1).values.cumsum(-1)
    return {k: static + ranked[..., min(k, ranked.shape[-1]) - 1] if k > 0 else static for k in budgets}


def merge_partial(outputs: list[torch.Tensor], lses: list[torch.Tensor]):
    """Exact merge of attentions over disjoint key sets: o = sum_j exp(s_j - s) o_j, s = logsumexp_j s_j."""
    stacked_lse = torch.stack(lses)
    total = torch.logsumexp(stacked_lse, dim=0)
    safe_total = torch.where(torch.isinf(total), 0.0, total)
    merged = torch.zeros_like(outputs[0])
    for out, lse in zip(outputs, lses):
        merged += torch.exp(lse - safe_total)[..., None] * out
    return merged, total
