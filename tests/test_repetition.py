"""Repetition statistics with hand-worked numbers, and the longest repeated span against a brute-force reference."""

from __future__ import annotations

import math
import random

import pytest

from dynlab.evaluation.repetition import (
    COLUMNS,
    distinct_n,
    longest_repeated_span,
    markdown_table,
    ngrams,
    repeated_ngram_fraction,
    repetition_stats,
    summarize,
    words,
)


def test_words_split_lowercased_words_and_punctuation():
    assert words("The cat, the CAT!") == ["the", "cat", ",", "the", "cat", "!"]
    assert words("  ") == []


def test_ngrams():
    assert ngrams([1, 2, 3], 1) == [(1,), (2,), (3,)]
    assert ngrams([1, 2, 3], 3) == [(1, 2, 3)]
    assert ngrams([1, 2, 3], 4) == []
    with pytest.raises(ValueError):
        ngrams([1], 0)


def test_distinct_n_by_hand():
    tokens = list("abab")
    assert distinct_n(tokens, 1) == 2 / 4
    assert distinct_n(tokens, 2) == 2 / 3  # ab, ba, ab
    assert distinct_n(tokens, 3) == 1.0  # aba, bab
    assert distinct_n(tokens, 4) == 1.0
    assert math.isnan(distinct_n(tokens, 5))
    assert math.isnan(distinct_n([], 1))


def test_repeated_ngram_fraction_by_hand():
    assert repeated_ngram_fraction(list("abcab"), 2) == 2 / 4  # ab, bc, ca, ab: both ab count
    assert repeated_ngram_fraction(list("abab"), 2) == 2 / 3
    assert repeated_ngram_fraction(list("aaaa"), 1) == 1.0
    assert repeated_ngram_fraction(list("abcd"), 1) == 0.0
    # a repeater: "i ' m sorry" three times, 12 tokens, 10 trigrams
    tokens = words("I'm sorry I'm sorry I'm sorry")
    assert len(tokens) == 12
    # trigrams: (i ' m) x3, (' m sorry) x3, (m sorry i) x2, (sorry i ') x2 -> every one of the 10 is repeated
    assert repeated_ngram_fraction(tokens, 3) == 1.0
    assert distinct_n(tokens, 3) == 4 / 10
    assert math.isnan(repeated_ngram_fraction(list("ab"), 3))


@pytest.mark.parametrize("text, expected", [
    ("", 0), ("a", 0), ("abcd", 0), ("aa", 1), ("aaaa", 3), ("abab", 2), ("abcXabcY", 3), ("abcabcabc", 6),
    ("xabcyabcz", 3), ("abcdeXbcdY", 3),
])
def test_longest_repeated_span_by_hand(text, expected):
    assert longest_repeated_span(list(text)) == expected


def brute_force_longest_repeat(tokens: list) -> int:
    n = len(tokens)
    for length in range(n - 1, 0, -1):
        seen = set()
        for i in range(n - length + 1):
            span = tuple(tokens[i : i + length])
            if span in seen:
                return length
            seen.add(span)
    return 0


def test_longest_repeated_span_matches_brute_force():
    rng = random.Random(0)
    for _ in range(200):
        tokens = [rng.choice("abc") for _ in range(rng.randint(0, 25))]
        assert longest_repeated_span(tokens) == brute_force_longest_repeat(tokens), tokens


def test_repetition_stats_of_one_response():
    stats = repetition_stats(words("the cat sat on the cat"))
    assert stats == {"len": 6.0, "distinct_1": 4 / 6, "distinct_2": 4 / 5, "distinct_3": 1.0, "distinct_4": 1.0,
                     "rep_3": 0.0, "longest_repeat": 2.0}


def test_summarize_by_hand():
    out = summarize(["the cat sat on the cat", "the cat", ""])
    assert list(out) == list(COLUMNS)
    assert out["n"] == 3
    assert out["mean_len"] == pytest.approx(8 / 3)
    assert out["empty_frac"] == pytest.approx(1 / 3)
    # per-response means over the responses long enough for each n
    assert out["distinct_1"] == pytest.approx((4 / 6 + 1) / 2)
    assert out["distinct_2"] == pytest.approx((4 / 5 + 1) / 2)
    assert out["distinct_3"] == out["distinct_4"] == 1.0
    assert out["rep_3"] == 0.0
    assert out["longest_repeat"] == pytest.approx(2 / 3)
    # pooled bigrams: the cat (x3), cat sat, sat on, on the -> 4 distinct of 6
    assert out["corpus_distinct_2"] == pytest.approx(4 / 6)
    assert out["unique_frac"] == 1.0


def test_summarize_a_model_that_says_the_same_thing_everywhere():
    out = summarize(["sure , sure , sure"] * 4)
    assert out["unique_frac"] == 0.25
    assert out["corpus_distinct_2"] == pytest.approx(2 / 16)  # "sure ," and ", sure" over 4 x 4 bigrams
    assert out["longest_repeat"] == 3  # "sure , sure"


def test_summarize_nothing_is_nan_not_an_error():
    out = summarize([])
    assert out["n"] == 0 and all(math.isnan(out[c]) for c in COLUMNS if c != "n")


def test_markdown_table():
    table = markdown_table({"greedy": summarize(["a b a b"]), "sampled": summarize([""])}, first="mode")
    lines = table.splitlines()
    assert lines[0] == "| mode | " + " | ".join(COLUMNS) + " |"
    assert lines[1].count("---") == len(COLUMNS) + 1
    assert lines[2].startswith("| greedy | 1 | 4.0 | 0.000 | 0.500 | 0.667 | 1.000 | 1.000 | 0.000 | 2.0 |")
    assert "| sampled | 1 | 0.0 | 1.000 | – |" in lines[3]
