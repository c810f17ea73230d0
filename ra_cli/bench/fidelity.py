"""`ra eval`: how closely retrieval attention follows full attention on one stored context.

For each prompt, full attention generates a greedy continuation of N tokens (stop tokens
suppressed so every prompt yields N). Both attention modes are then teacher-forced through the
same tokens and compared position by position: greedy-token agreement and KL(full || retrieval)
of the next-token distributions (retrieval as chat runs it: a step whose two likeliest tokens are
closer than the exact margin is run again exactly; `exact_step_fraction` says how often, and
`--exact-margin 0` grades retrieval alone). While retrieval runs, an auditor scores every query against all
indexed keys to report the softmax mass that static + retrieved keys cover, Recall@k of the
retrieval, and the keys the search scanned.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np
import torch

from ra_cli.engine.generate import prefill
from ra_cli.index.flat import exact_scores
from ra_cli.prompt import Prompter, PromptLayout
from ra_cli.retrieval.layer import RetrievalSettings
from ra_cli.retrieval.modes import open_cache

DEFAULT_PROMPTS = (
    ("chat", "Summarize the document in a few sentences."),
    ("chat", "What is the most important detail in the text above?"),
    ("chat", "List three facts the document states, with numbers if it has any."),
    ("chat", "Who is the document written for, and why?"),
    ("raw", "In summary,"),  # plain continuations right after the document
    ("raw", "The most important point is that"),
)


@dataclass
class EvalConfig:
    tokens: int = 64
    prompts: tuple = DEFAULT_PROMPTS
    attention: str = "retrieval"
    settings: RetrievalSettings = field(default_factory=RetrievalSettings)


class Auditor:
    """Scores each retrieval query against every indexed key (exact) to measure the search."""

    def __init__(self):
        self.seconds = 0.0  # time spent auditing, subtracted from retrieval timings
        self.coverage: list[np.ndarray] = []
        self.recall: list[float] = []
        self.per_layer: dict[int, list[float]] = {}

    def __call__(self, layer, query, q_offset, retrieved_ids, scaling):
        started = time.perf_counter()
        try:
            self._audit(layer, query, q_offset, retrieved_ids, scaling)
        finally:
            self.seconds += time.perf_counter() - started

    def _audit(self, layer, query, q_offset, retrieved_ids, scaling):
        n = layer.n_indexed
        if n == 0:
            return
        q = torch.from_numpy(query)
        scores = torch.from_numpy(exact_scores(query, layer.host.keys, n)) * scaling  # [H, q, n]
        indexed_lse = torch.logsumexp(scores, dim=-1)
        found = torch.from_numpy(retrieved_ids.astype(np.int64))
        picked = torch.gather(scores, -1, found.clamp_min(0)).masked_fill(found < 0, float("-inf"))
        retrieved_lse = torch.logsumexp(picked, dim=-1)
        _, static_lse = layer.static_attention(q[None].to(layer.keys.dtype).to(layer.device), q_offset, scaling)
        static = static_lse[0].float().cpu()
        covered = torch.exp(torch.logaddexp(static, retrieved_lse) - torch.logaddexp(static, indexed_lse))
        self.coverage.append(covered.reshape(-1).numpy())
        self.per_layer.setdefault(layer.layer_idx, []).append(float(covered.mean()))
        k = retrieved_ids.shape[-1]
        exact = torch.topk(scores, min(k, n), dim=-1).indices.numpy()
        for found_row, truth in zip(retrieved_ids.reshape(-1, k), exact.reshape(-1, exact.shape[-1])):
            self.recall.append(np.isin(truth, found_row).mean())


def reference_continuation(loaded, cache, prompt_tokens: list[int], count: int, stop_ids: set[int]) -> list[int]:
    logits = prefill(loaded.model, cache, prompt_tokens)
    generated = []
    for _ in range(count):
        masked = logits.clone()
        masked[list(stop_ids)] = float("-inf")  # every prompt yields `count` tokens
        token = int(torch.argmax(masked))
        generated.append(token)
        logits = prefill(loaded.model, cache, [token])
    return generated


def forced_logits(loaded, cache, prompt_tokens: list[int], continuation: list[int],
                  overhead=lambda: 0.0) -> tuple[torch.Tensor, float]:
    """Next-token log-probabilities at each continuation position, one token at a time (decode
    path); returns them and the seconds per token, minus what `overhead()` grew by meanwhile."""
    rows = [torch.log_softmax(prefill(loaded.model, cache, prompt_tokens), -1)]
    started, excluded = time.perf_counter(), overhead()
    for token in continuation[:-1]:
        rows.append(torch.log_softmax(prefill(loaded.model, cache, [token]), -1))
    seconds = (time.perf_counter() - started - (overhead() - excluded)) / max(1, len(continuation) - 1)
    return torch.stack(rows), seconds


def run_eval(loaded, store, config: EvalConfig, status=print) -> dict:
    layout = PromptLayout.from_dict(store.manifest["prompt"])
    prompter = Prompter(loaded.tokenizer, layout)
    stop_ids = prompter.stop_ids(loaded.eos_token_id)
    agreements, kls = [], []
    full_seconds, retrieval_seconds = [], []
    auditor = Auditor()
    evaluations = searches = redone = forwards = 0
    n_indexed = store.manifest["index"]["hi"] - store.manifest["index"]["lo"]
    per_prompt = []
    for style, text in config.prompts:
        prompt = prompter.question_tokens(text, first_turn=True, raw=style == "raw")
        status(f"prompt ({style}): {text}")
        continuation = reference_continuation(loaded, open_cache(loaded, store, "full"), prompt, config.tokens, stop_ids)
        full, full_time = forced_logits(loaded, open_cache(loaded, store, "full"), prompt, continuation)
        cache = open_cache(loaded, store, config.attention, config.settings)
        for layer in cache.layers:
            if hasattr(layer, "auditor"):
                layer.auditor = auditor
        approx, approx_time = forced_logits(loaded, cache, prompt, continuation, lambda: auditor.seconds)
        agree = (full.argmax(-1) == approx.argmax(-1)).float().mean().item()
        kl = (full.exp() * (full - approx)).sum(-1).mean().item()
        agreements.append(agree)
        kls.append(kl)
        full_seconds.append(full_time)
        retrieval_seconds.append(approx_time)
        stats = cache.retrieval_stats
        evaluations += stats.evaluations
        searches += stats.searches
        redone += cache.exact_steps
        forwards += len(continuation) - 1  # one-token steps (the prompt's forward is read exactly)
        per_prompt.append({"style": style, "prompt": text, "token_agreement": round(agree, 4), "kl_mean": round(kl, 5),
                           "continuation": loaded.tokenizer.decode(continuation)})
    coverage = np.concatenate(auditor.coverage) if auditor.coverage else np.array([1.0])
    scanned = evaluations / searches if searches else 0.0
    return {
        "context_tokens": store.n_tokens,
        "indexed_keys": n_indexed,
        "attention": getattr(config.attention, "value", config.attention),
        "top_k": config.settings.top_k,
        "continuation_tokens": config.tokens,
        "token_agreement": round(float(np.mean(agreements)), 4),
        "kl_mean": round(float(np.mean(kls)), 5),
        "mass_coverage": round(float(coverage.mean()), 4),
        "mass_coverage_p05": round(float(np.quantile(coverage, 0.05)), 4),
        "recall_at_k": round(float(np.mean(auditor.recall)), 4) if auditor.recall else None,
        "keys_scanned_per_search": round(scanned, 1),
        "exact_margin": config.settings.exact_margin,
        "exact_step_fraction": round(redone / forwards, 4) if forwards else 0.0,
        "dense_layers": stats.dense_layers, "cheaper_dense_layers": stats.cheaper_dense_layers,
        "budgets": stats.budgets,
        "scanned_fraction": round(scanned / n_indexed, 4) if n_indexed else 0.0,
        "mass_coverage_per_layer": {str(k): round(float(np.mean(v)), 4) for k, v in sorted(auditor.per_layer.items())},
        "ms_per_token_full": round(1000 * float(np.mean(full_seconds)), 2),
        "ms_per_token_retrieval": round(1000 * float(np.mean(retrieval_seconds)), 2),
        "prompts": per_prompt,
    }
