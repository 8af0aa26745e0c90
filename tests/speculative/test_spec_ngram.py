"""Prompt lookup (engine/speculative/ngram.py) vs a brute-force search, and sibling lookup."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from forklm.engine.speculative import NgramProposer, lookup_draft
from forklm.sampling import TokenHistory


def brute_force(seq, k, n_min, n_max, corpus=None):
    """The longest suffix n-gram (n_min..n_max) with an earlier occurrence followed by a token; the
    latest occurrence among the longest; the k tokens after it."""
    seq = list(seq)
    own = corpus is None
    src = seq if own else list(corpus)
    for n in range(min(n_max, len(seq)), n_min - 1, -1):
        pat = seq[len(seq) - n :]
        last_end = len(seq) - 2 if own else len(src) - 2  # a match's last token, with a token after it
        for end in range(last_end, n - 2, -1):
            if src[end - n + 1 : end + 1] == pat:
                return src[end + 1 : end + 1 + k]
    return []


@pytest.mark.parametrize("seed", range(40))
def test_lookup_equals_brute_force(seed):
    rng = np.random.default_rng(seed)
    vocab = int(rng.integers(2, 6))  # small vocabularies: many matches of every length
    seq = rng.integers(0, vocab, size=int(rng.integers(1, 60)))
    k, n_min = int(rng.integers(1, 6)), int(rng.integers(1, 4))
    n_max = n_min + int(rng.integers(0, 4))
    assert lookup_draft(seq, k, n_min, n_max) == brute_force(seq, k, n_min, n_max)
    corpus = rng.integers(0, vocab, size=int(rng.integers(0, 30)))
    assert lookup_draft(seq, k, n_min, n_max, corpus) == brute_force(seq, k, n_min, n_max, corpus)


def test_examples():
    seq = np.array([1, 2, 3, 4, 9, 1, 2, 3])
    assert lookup_draft(seq, 3, 1, 3) == [4, 9, 1]  # "1 2 3" seen before: what followed it
    assert lookup_draft(seq, 3, 4, 5) == []  # no 4-gram repeats
    assert lookup_draft(np.array([7]), 2, 1, 2) == []


def test_sibling_lookup_drafts_from_other_samples_outputs():
    prompt = [50, 51, 52]
    h = TokenHistory(3, 20, 100)
    for row in range(3):
        h.reset_row(row, prompt)
    for t in [10, 11, 12, 13, 14]:  # sample 0 wrote "10 11 12 13 14"
        h.append(torch.tensor([t, 0, 0]), torch.tensor([True, False, False]))
    for t in [60, 10, 11]:  # sample 1 is at "... 10 11": its own text has no earlier "10 11"
        h.append(torch.tensor([0, t, 0]), torch.tensor([False, True, False]))
    with_siblings = NgramProposer(3, 2, 3, sibling_lookup=True)
    alone = NgramProposer(3, 2, 3, sibling_lookup=False)
    assert with_siblings.propose(h, [([(1, 3)], [0, 1, 2])]) == {1: [12, 13, 14]}
    assert alone.propose(h, [([(1, 3)], [0, 1, 2])]) == {}
    assert with_siblings.propose(h, [([(1, 2)], [0, 1, 2])]) == {1: [12, 13]}  # at most the row's own limit
