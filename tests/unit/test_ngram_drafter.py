"""Prompt-lookup drafts: the longest recurring n-gram at the end, its earliest
occurrence, the tokens after it."""

from __future__ import annotations

from pdserve.engine.ngram_drafter import NgramDrafter


def test_the_tokens_after_the_earliest_occurrence_of_the_longest_ngram() -> None:
    d = NgramDrafter(3, prompt_lookup_min=1, prompt_lookup_max=3)
    #         0  1  2  3  4  5  6  7  8  9
    tokens = [1, 2, 3, 4, 5, 9, 2, 3, 6, 7, 1, 2, 3]
    assert d.propose(tokens) == [4, 5, 9]  # "1 2 3" at 0 beats "2 3" at 6
    assert d.propose([8, 2, 3, 6, 7, 9, 2, 3]) == [6, 7, 9]  # only "2 3" recurs
    assert d.propose(tokens, k=1) == [4]


def test_no_recurring_ngram_no_drafts() -> None:
    d = NgramDrafter(4, prompt_lookup_min=2, prompt_lookup_max=4)
    assert d.propose([1, 2, 3, 4, 5, 6]) == []
    assert d.propose([1, 2, 3, 9, 3]) == []  # "3" recurs, but 1 < prompt_lookup_min
    assert d.propose([5, 5]) == []  # too short for any 2-gram to recur with a successor
    assert d.propose([1, 2, 1, 2], k=0) == []


def test_a_match_needs_a_token_after_it_and_the_drafts_may_be_fewer_than_k() -> None:
    d = NgramDrafter(5, prompt_lookup_min=2, prompt_lookup_max=2)
    assert d.propose([7, 8, 1, 7, 8]) == [1, 7, 8]  # all that follows the match
    assert d.propose([4, 4, 4, 4]) == [4, 4]  # overlapping runs match too


def test_matches_are_whole_tokens_not_bytes() -> None:
    # 256 = bytes 00 01 00 00, 1 = 01 00 00 00: "1, 0" spans a byte match that is not
    # a token match; the drafter must skip it.
    d = NgramDrafter(2, prompt_lookup_min=2, prompt_lookup_max=2)
    assert d.propose([256, 0, 5, 9, 1, 0]) == []
    assert d.propose([1, 0, 5, 9, 256, 1, 0]) == [5, 9]


def test_disable_by_batch_size_allows_drafts_up_to_that_many_running() -> None:
    assert NgramDrafter(2, 1, 2).drafts_allowed(1000)
    capped = NgramDrafter(2, 1, 2, disable_by_batch_size=4)
    assert capped.drafts_allowed(4) and not capped.drafts_allowed(5)
