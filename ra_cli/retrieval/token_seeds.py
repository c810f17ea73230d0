"""Entry points from the text itself: where the tokens being read occurred before.

The graph's edges come from what prefill queries selected, so a fact stated once and never referred
to again has keys no query selected, and a search that starts from query-trained entry points may
never walk into them. Yet the heads that read such a fact back look for it by its tokens:
duplicate-token heads attend to earlier occurrences of the current token, induction (copying)
heads to the token after them. Measured on the needle sweep's misses (docs/benchmarks.md): at the
second token of the cue "The password to the archive is", layer 7 head 7 of the embedded model put
94–97% of its indexed attention on the needle's own "password"; the graph search at the
calibrated ef found none of it, and the answer was lost.

So each forward's tokens are looked up in an inverted index of the document's tokens, and the
indexed positions where they (or, for common tokens, their last two or three tokens) occurred are
added, with their successors, to every search's entry points. A forward's seeds stay after it,
behind newer ones, until LIMIT newer ones push them out: an answer reads what its question pointed
at (measured: the needle sweep's python 75% placement, where a duplicate-token head spelling out
the needle's " amber" as '"am' found it only from the question's seeds, at the needle's " is").
They only seed the beam: every key is still scored exactly and kept only if it ranks in the
top-k, so a seed that does not matter costs one evaluation and changes nothing.
"""

from __future__ import annotations

import numpy as np

from ra_cli.buffers import with_room

RARE = 8  # a token (or n-gram) occurring at most this often in the indexed range seeds its places
LONGEST = 3  # common tokens are narrowed by up to this many preceding tokens
LIMIT = 48  # seeds at most (this forward's last query positions first, then earlier forwards')
NO_SEEDS = np.full((1, 0), -1, np.int32)


class TokenSeeds:
    """Inverted index of the tokens at positions [lo, hi) of a context (`indexed_end` grows past
    hi as the conversation moves into the index); `feed` turns the tokens of a forward into seeds:
    indexed ids (position - lo) of matching places and their successors, [1, X] int32."""

    def __init__(self, tokens: np.ndarray, lo: int, hi: int):
        self.lo = lo
        self.tokens = np.array(tokens, dtype=np.int64)  # every token of the sequence so far (and spare room)
        indexed = self.tokens[lo:hi]
        order = np.argsort(indexed, kind="stable")
        ranked = indexed[order]
        starts = np.flatnonzero(np.r_[True, ranked[1:] != ranked[:-1]]) if ranked.size else np.empty(0, np.int64)
        ends = np.r_[starts[1:], len(ranked)]
        self.places = {int(ranked[s]): order[s:e] + lo for s, e in zip(starts, ends)}  # token -> positions
        self.document_end = hi  # places beyond it are looked up in the conversation tokens...
        self.indexed_end = hi  # ...up to here: the conversation moved into the index (the window is searched anyway)
        self.seeds = NO_SEEDS

    def feed(self, ids: np.ndarray, start: int) -> np.ndarray:
        """Tokens `ids` about to be run at positions start.. (an earlier, rolled-back forward's
        tokens at those positions are forgotten); returns and keeps this forward's seeds, followed
        by the earlier forwards' that still fit."""
        ids = np.asarray(ids, dtype=np.int64).reshape(-1)
        self.tokens = with_room(self.tokens, start, start + len(ids), axis=0, minimum=1024)
        self.tokens[start:start + len(ids)] = ids
        chosen: list[int] = []
        seen: set[int] = set()
        for position in range(start + len(ids) - 1, start - 1, -1):  # the last positions matter most
            for place in (self._matches(position) - self.lo).tolist():
                for seed in (place, place + 1):  # each place, then its successor
                    if seed not in seen:
                        seen.add(seed)
                        chosen.append(seed)
            if len(chosen) >= LIMIT:
                break
        for seed in self.seeds[0].tolist():
            if len(chosen) >= LIMIT:
                break
            if seed not in seen and seed + self.lo < start:  # not a place being rewritten (rolled back)
                seen.add(seed)
                chosen.append(seed)
        self.seeds = np.asarray(chosen[:LIMIT], np.int32)[None] if chosen else NO_SEEDS
        return self.seeds

    def _matches(self, position: int) -> np.ndarray:
        """Earlier positions whose token equals position's and whose preceding tokens match as far
        as needed to leave at most RARE of them; empty if none narrow so far."""
        token = int(self.tokens[position])
        places = self.places.get(token, np.empty(0, np.int64))
        end = min(position, self.indexed_end)
        later = np.flatnonzero(self.tokens[self.document_end:end] == token) + self.document_end
        if later.size:
            places = np.concatenate([places, later])
        places = places[places < end]
        for back in range(1, LONGEST):
            if places.size <= RARE:
                return places
            if position - back < 0:
                return np.empty(0, np.int64)
            earlier = places - back
            places = places[(earlier >= 0) & (self.tokens[np.maximum(earlier, 0)] == self.tokens[position - back])]
        return places if places.size <= RARE else np.empty(0, np.int64)
