"""Repetition and peakiness of generated text: distinct-n, the repeated n-gram fraction, the longest repeated span
and lengths. Pure functions on token sequences (any hashable items) and on lists of response strings."""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Callable, Hashable, Mapping, Sequence

DISTINCT_NS = (1, 2, 3, 4)
REPEAT_N = 3
# the columns of :func:`summarize`, in table order
COLUMNS = ("n", "mean_len", "empty_frac", *(f"distinct_{n}" for n in DISTINCT_NS), f"rep_{REPEAT_N}",
           "longest_repeat", "corpus_distinct_2", "unique_frac")
_LENGTHS = ("mean_len", "longest_repeat")
_WORD = re.compile(r"\w+|[^\w\s]")


def words(text: str) -> list[str]:
    """Lower-cased words and punctuation marks, so statistics compare across models with different tokenizers.

    >>> words("I'm sorry, sorry!")
    ['i', "'", 'm', 'sorry', ',', 'sorry', '!']
    """
    return _WORD.findall(text.lower())


def ngrams(tokens: Sequence[Hashable], n: int) -> list[tuple]:
    """The ``len(tokens) - n + 1`` contiguous n-grams, in order.

    >>> ngrams("abc", 2)
    [('a', 'b'), ('b', 'c')]
    """
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    return [tuple(tokens[i : i + n]) for i in range(len(tokens) - n + 1)]


def distinct_n(tokens: Sequence[Hashable], n: int) -> float:
    """Distinct n-grams over all n-grams of one sequence (1 = no n-gram repeats); NaN when it has fewer than n tokens.

    >>> distinct_n("abab", 2)  # ab, ba, ab
    0.6666666666666666
    """
    grams = ngrams(tokens, n)
    return len(set(grams)) / len(grams) if grams else math.nan


def repeated_ngram_fraction(tokens: Sequence[Hashable], n: int) -> float:
    """The fraction of n-gram positions whose n-gram occurs at least twice in the sequence (first occurrence
    included); NaN when there are fewer than n tokens.

    >>> repeated_ngram_fraction("abcab", 2)  # ab, bc, ca, ab: the two ab are repeats
    0.5
    """
    counts = Counter(ngrams(tokens, n))
    total = sum(counts.values())
    return sum(c for c in counts.values() if c > 1) / total if total else math.nan


def longest_repeated_span(tokens: Sequence[Hashable]) -> int:
    """Length of the longest contiguous run of tokens that occurs at least twice (occurrences may overlap).

    Dynamic programming over pairs of start positions: O(len²) time, O(len) memory.

    >>> longest_repeated_span("abcXabcY")
    3
    >>> longest_repeated_span("aaaa")  # "aaa" at 0 and at 1
    3
    """
    n, best = len(tokens), 0
    # after processing row i, below[j] = longest common prefix of tokens[i:] and tokens[j:] for j > i
    below = [0] * (n + 1)
    for i in range(n - 1, -1, -1):
        row = [0] * (n + 1)
        for j in range(n - 1, i, -1):
            if tokens[i] == tokens[j]:
                row[j] = below[j + 1] + 1
                best = max(best, row[j])
        below = row
    return best


def repetition_stats(tokens: Sequence[Hashable]) -> dict[str, float]:
    """Every per-response statistic of one token sequence (NaN where a sequence is too short for an n)."""
    stats: dict[str, float] = {"len": float(len(tokens))}
    stats.update({f"distinct_{n}": distinct_n(tokens, n) for n in DISTINCT_NS})
    stats[f"rep_{REPEAT_N}"] = repeated_ngram_fraction(tokens, REPEAT_N)
    stats["longest_repeat"] = float(longest_repeated_span(tokens))
    return stats


def summarize(texts: Sequence[str], tokenize: Callable[[str], Sequence[Hashable]] = words) -> dict[str, float]:
    """Statistics of a set of responses: means of the per-response values over the responses long enough to have
    them, plus two across responses: ``corpus_distinct_2`` (distinct bigrams of all responses pooled; low when
    the model says the same thing to every prompt) and ``unique_frac`` (distinct response strings / responses).

    Args:
        texts: the responses.
        tokenize: splits a response into tokens (default :func:`words`).

    Returns:
        A dict with the keys of :data:`COLUMNS`.
    """
    tokens = [list(tokenize(t)) for t in texts]
    per = [repetition_stats(t) for t in tokens]
    out: dict[str, float] = {"n": float(len(texts))}
    out["mean_len"] = _nanmean([p["len"] for p in per])
    out["empty_frac"] = _nanmean([float(not t) for t in tokens])
    for key in (*(f"distinct_{n}" for n in DISTINCT_NS), f"rep_{REPEAT_N}", "longest_repeat"):
        out[key] = _nanmean([p[key] for p in per])
    pooled = [g for t in tokens for g in ngrams(t, 2)]
    out["corpus_distinct_2"] = len(set(pooled)) / len(pooled) if pooled else math.nan
    out["unique_frac"] = len(set(texts)) / len(texts) if texts else math.nan
    return out


def markdown_table(rows: Mapping[str, Mapping[str, float]], columns: Sequence[str] = COLUMNS,
                   first: str = "responses") -> str:
    """A markdown table, one line per entry of ``rows`` (its key in the first column); counts as integers, lengths
    to 1 decimal, fractions to 3."""
    def cell(column: str, value: float) -> str:
        if math.isnan(value):
            return "–"
        return f"{value:.0f}" if column == "n" else f"{value:.1f}" if column in _LENGTHS else f"{value:.3f}"

    lines = ["| " + " | ".join([first, *columns]) + " |", "|" + "---|" * (len(columns) + 1)]
    lines += ["| " + " | ".join([name, *(cell(c, stats[c]) for c in columns)]) + " |" for name, stats in rows.items()]
    return "\n".join(lines)


def _nanmean(values: Sequence[float]) -> float:
    kept = [v for v in values if not math.isnan(v)]
    return sum(kept) / len(kept) if kept else math.nan
