"""Token seeds: the places where the tokens being read occurred before, as search entry points."""

from __future__ import annotations

import numpy as np

from ra_cli.retrieval.token_seeds import LIMIT, RARE, TokenSeeds

LO = 4  # sinks: positions below are not indexed


def seeds_of(document, fed, lo=LO, hi=None):
    seeds = TokenSeeds(np.asarray(document), lo, len(document) if hi is None else hi)
    return seeds.feed(np.asarray(fed), len(document))[0].tolist()


def test_a_rare_token_seeds_its_earlier_places_and_their_successors():
    #            0  1  2  3  4  5  6   7  8  9  10  11
    document = [1, 1, 1, 1, 5, 6, 50, 7, 8, 9, 50, 3]
    # 50 occurs at positions 6 and 10: indexed ids 2, 6 and the successors 3, 7
    assert sorted(seeds_of(document, [50])) == [2, 3, 6, 7]


def test_a_token_in_the_sinks_only_seeds_nothing():
    document = [42, 1, 1, 1, 5, 6, 7, 8]
    assert seeds_of(document, [42]) == []


def test_a_common_token_is_narrowed_by_the_tokens_before_it():
    filler = [2, 3] * 20  # token 3 occurs 20 times, each after 2
    document = [0] * LO + filler + [9, 3] + filler
    fed = [9, 3]  # "9 3" occurred once: at position LO + 40 (9) and LO + 41 (3)
    assert document.count(3) > RARE
    seeds = seeds_of(document, fed)
    # the narrowed "9 3" place (id 41) and its successor first (the last token's), then 9's (id 40)
    assert seeds == [41, 42, 40]


def test_a_token_too_common_to_narrow_seeds_nothing():
    document = [0] * LO + [2, 3] * 30
    assert seeds_of(document, [2, 3]) == []


def test_conversation_tokens_are_seeded_once_indexed_and_forgotten_when_rolled_back():
    document = [1] * LO + list(range(10, 30))
    seeds = TokenSeeds(np.asarray(document), LO, len(document))
    n = len(document)
    seeds.feed(np.asarray([77, 78, 79]), n)  # the conversation says 77 at position n
    assert seeds.feed(np.asarray([77]), n + 3)[0].tolist() == []  # still in the window: searched anyway
    seeds.indexed_end = n + 2  # the window's oldest tokens moved into the index
    assert seeds.feed(np.asarray([77]), n + 3)[0].tolist() == [n - LO, n + 1 - LO]
    seeds.feed(np.asarray([80]), n)  # rolled back to n: 77 was never said
    assert seeds.feed(np.asarray([77]), n + 1)[0].tolist() == []


def test_a_forwards_seeds_stay_behind_newer_ones_until_pushed_out():
    """An answer reads what its question pointed at: a forward that matches nothing keeps the
    question's seeds; newer matches come first, and LIMIT bounds them all."""
    document = [0] * LO + list(range(100, 200))  # every token once
    seeds = TokenSeeds(np.asarray(document), LO, len(document))
    n = len(document)
    question = seeds.feed(np.asarray([150, 151]), n)[0].tolist()
    assert question == [51, 52, 50]  # 151's place and successor, then 150's
    assert seeds.feed(np.asarray([7]), n + 2)[0].tolist() == question  # 7 occurs nowhere
    assert seeds.feed(np.asarray([120]), n + 3)[0].tolist() == [20, 21] + question
    pushed = seeds.feed(np.asarray(list(range(155, 200))), n + 4)[0].tolist()  # 46 new seeds
    assert len(pushed) == LIMIT and pushed[-2:] == [20, 21]  # the question's seeds pushed out first...
    assert set(pushed[:-2]).isdisjoint(question)  # ...behind every newer one


def test_seeds_are_bounded_and_the_last_positions_come_first():
    document = [0] * LO + list(range(100, 200))  # every token once
    fed = list(range(100, 200))
    got = seeds_of(document, fed)
    assert len(got) == LIMIT
    # the last fed tokens' places (ids 99, 98, ...) are kept, the first ones' dropped
    assert 99 in got and 0 not in got


def test_a_context_with_nothing_indexed_seeds_nothing():
    document = [5, 6, 7]  # shorter than the sinks: lo = hi
    assert seeds_of(document, [5, 6], lo=3, hi=3) == []
