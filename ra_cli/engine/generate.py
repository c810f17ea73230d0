"""Prefill and decode as plain functions over a model and a ContextCache (gpt-fast style)."""

from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Callable

import torch

from ra_cli.engine.attention import active


@dataclass
class Sampling:
    temperature: float = 0.0  # 0 = greedy
    top_p: float = 1.0
    seed: int | None = None
    repeat_penalty: float = 1.0  # >1 discourages tokens of the answer's last `repeat_window` tokens
    repeat_window: int = 64


def _cache_kwarg(model) -> str:
    """transformers 5.x renamed `past_key_values` to `cache`; accept both."""
    params = inspect.signature(model.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def base_model(model):
    return getattr(model, model.base_model_prefix, model)


# A question (a forward of several tokens) is read with exact attention, as the paper prefills its
# whole prompt, while its tokens times the context's stay under this: 256 tokens at 16K, 32 at
# 128K. A 19-token question at 32K took 0.50 s either way on a 2-core CPU, so this bounds the
# exact read to a few seconds; longer pasted text is searched (it would cost what a prefill does).
EXACT_QUESTION_WORK = 1 << 22


@torch.inference_mode()
def prefill(model, cache, token_ids: list[int] | torch.Tensor, want_logits: bool = True,
            greedy: bool = True) -> torch.Tensor | None:
    """Run tokens through the model, appending their KV to `cache`. Returns last-position logits
    [vocab] (float32) or None; without logits the LM head is skipped entirely.

    A retrieval cache with an exact margin (RetrievalSettings.exact_margin) is exact where its
    approximation would show: a question is read with exact attention, since every token of the
    answer attends to its keys (measured: a needle answer lost when the cue's own forward was
    approximate, and kept when it was exact); and a one-token step whose two likeliest next
    tokens are closer than the margin is run again exactly, since the small error of attending
    to the top-k keys can swap them (measured: every greedy token retrieval chose differently
    from full attention had a gap of at most 0.55 nats; benchmarks/exact_margin.py). Only for a
    greedy choice (`greedy`): a sampled token is no argmax, and a close call is not a wrong one."""
    ids = token_ids if isinstance(token_ids, torch.Tensor) else torch.tensor(token_ids, dtype=torch.long)
    cache.feed(ids)
    count = ids.numel()
    if cache.exact_margin > 0 and 1 < count and count * (cache.length + count) <= EXACT_QUESTION_WORK:
        with cache.exactly():
            logits = _forward(model, cache, ids, want_logits)
    else:
        length = cache.length
        logits = _forward(model, cache, ids, want_logits)
        if logits is not None and greedy and cache.uncertain(logits):
            began = time.perf_counter()
            cache.truncate(length)  # before settle(): the forward's tokens are all still in the window
            with cache.exactly():
                logits = _forward(model, cache, ids, want_logits)
            cache.exact_steps += 1
            cache.exact_seconds += time.perf_counter() - began
    cache.settle()
    return logits


def _forward(model, cache, ids: torch.Tensor, want_logits: bool) -> torch.Tensor | None:
    lean = getattr(model, "ra_lean", None)
    if lean is not None:  # engine/forward.py: the same maths without transformers' module overhead
        return lean(ids.reshape(1, -1).to(lean.embed.device), cache, want_logits)
    ids = ids.reshape(1, -1).to(model.device)
    with active(cache):
        if not want_logits:
            target = base_model(model)
            target(input_ids=ids, use_cache=True, **{_cache_kwarg(target): cache})
            return None
        out = model(input_ids=ids, use_cache=True, logits_to_keep=1, **{_cache_kwarg(model): cache})
    return out.logits[0, -1].float()


def sample(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None = None,
           recent: list[int] = ()) -> int:
    if sampling.repeat_penalty != 1.0 and recent:
        # llama.cpp-style penalty over the answer's own recent tokens (not the document: quoting
        # the document is what the user wants).
        ids = torch.tensor(sorted(set(recent[-sampling.repeat_window:])), dtype=torch.long, device=logits.device)
        picked = logits[ids]
        logits = logits.clone()
        logits[ids] = torch.where(picked > 0, picked / sampling.repeat_penalty, picked * sampling.repeat_penalty)
    if sampling.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits / sampling.temperature, dim=-1)
    if sampling.top_p < 1.0:
        sorted_probs, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_probs, dim=-1) - sorted_probs < sampling.top_p
        keep[0] = True
        probs = torch.zeros_like(probs).scatter_(0, order[keep], sorted_probs[keep])
        probs /= probs.sum()
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@dataclass
class Decoded:
    tokens: list[int]  # every sampled token except a final stop token
    stop_reason: str  # "stop", "length" or "interrupted"
    fed: int  # how many of `tokens` are in the cache (the last sampled one usually is not)


def decode(model, cache, logits: torch.Tensor, max_new_tokens: int, stop_ids: set[int], sampling: Sampling,
           on_token: Callable[[list[int]], bool] | None = None) -> Decoded:
    """Sample up to max_new_tokens after `logits`. `on_token(tokens)` may return True to stop early.

    Ctrl-C stops the reply, not the program: the cache is rolled back to its last whole step.
    """
    generator = None
    if sampling.seed is not None:
        generator = torch.Generator().manual_seed(sampling.seed)
    tokens: list[int] = []
    fed = 0
    try:
        while len(tokens) < max_new_tokens:
            token = sample(logits, sampling, generator, tokens)
            if token in stop_ids:
                return Decoded(tokens, "stop", fed)
            tokens.append(token)
            if on_token is not None and on_token(tokens):
                return Decoded(tokens, "stop", fed)
            if len(tokens) == max_new_tokens:
                break
            length = cache.length
            try:
                logits = prefill(model, cache, [token], greedy=sampling.temperature <= 0)
            except KeyboardInterrupt:
                cache.truncate(length)
                raise
            fed += 1
        return Decoded(tokens, "length", fed)
    except KeyboardInterrupt:
        return Decoded(tokens, "interrupted", fed)
