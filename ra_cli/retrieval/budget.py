"""How many keys a retrieval layer attends to: its budget, chosen at ingest and raised by the question.

Ingest measures, per layer, the softmax mass that the static set plus the exact top-k indexed keys
hold for held-out prefill queries at each k in IndexParams.budgets; a layer starts with the
smallest k reaching the coverage wanted. Those queries are the document's own last tokens. A
question attends more broadly: on Qwen2.5-Coder at 32K, layer 11's top-100 held 0.992 of the
held-out queries' mass and 0.917 of the chat prompts' (`ra eval`). Every question is read with
exact attention anyway (engine/generate.py), so its last queries measure the same coverage over
every indexed key at little cost, and a layer whose question needs more keys attends to more for
the answer (never fewer than ingest chose).
"""

from __future__ import annotations

import numpy as np
import torch

from ra_cli.engine.attention import grouped_scores
from ra_cli.index.flat import exact_scores

QUESTION_PROBES = 8  # the question's last positions whose attention sets the answer's budgets


def layer_budget(entry: dict, coverage: float, default: int = 100) -> int:
    """Smallest measured top-k reaching `coverage` (the largest measured one if none does)."""
    measured = {int(k): v for k, v in entry.get("coverage", {}).items()}
    if not measured:
        return default
    return next((k for k in sorted(measured) if measured[k] >= coverage), max(measured))


def measured_budgets(entry: dict) -> tuple[int, ...]:
    """The budgets whose coverage ingest measured for a layer, ascending (none: empty)."""
    return tuple(sorted(int(k) for k in entry.get("coverage", {})))


def question_budget(query: torch.Tensor, static_keys: torch.Tensor, static_positions: torch.Tensor, q_offset: int,
                    indexed_keys: np.ndarray, n_indexed: int, scaling: float, budgets: tuple[int, ...],
                    coverage: float) -> int:
    """Smallest of `budgets` whose static set + exact top-k indexed keys hold `coverage` of the mean
    softmax mass of the question's last QUESTION_PROBES queries (the largest if none does).

    query [1, H, q, D] at positions q_offset..; static_keys [1, KVH, s, D] at static_positions [s]
    (causally masked per query); indexed_keys [KVH, >= n_indexed, D] in host memory (float32 or
    bf16 bits), every one before the question."""
    probes = min(query.shape[2], QUESTION_PROBES)
    q = query[0, :, -probes:].float().cpu()  # [H, p, D]
    indexed = torch.from_numpy(exact_scores(q.numpy(), indexed_keys, n_indexed))  # [H, p, n]
    static = grouped_scores(q, static_keys[0].float().cpu())  # [H, p, s]
    positions = torch.arange(q_offset + query.shape[2] - probes, q_offset + query.shape[2])
    static.masked_fill_(static_positions.cpu()[None, None, :] > positions[None, :, None], float("-inf"))
    probs = torch.softmax(torch.cat([indexed, static], dim=-1) * scaling, dim=-1).numpy()
    static_mass = probs[..., n_indexed:].sum(-1)
    # the largest budget's best keys unordered (a selection, cheaper than torch.topk's ordered
    # answer for 1,600 of 32K keys a row), then only those ordered
    top = min(budgets[-1], n_indexed)
    best = np.partition(probs[..., :n_indexed], n_indexed - top, axis=-1)[..., n_indexed - top:]
    ranked = np.cumsum(np.sort(best, axis=-1)[..., ::-1], axis=-1)
    return next((k for k in budgets if float((static_mass + ranked[..., min(k, top) - 1]).mean()) >= coverage),
                budgets[-1])
