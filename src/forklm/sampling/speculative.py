"""Verifying drafted tokens exactly: each position is drawn as plain decoding would draw it, and a
draft is kept while it equals that draw.

A row's token at generated step g is a deterministic function of the target's logits there, its
history (penalties, bans) and the counter (seed, sample, g) of its random numbers. So after the
target scored [last token, d1 .. dk] in one step, position j is processed with the history that
holds d1 .. dj (the tokens plain decoding would have by then, if they were kept) and drawn with
counter g + j: the draw at j is the plain draw whenever d1 .. dj were kept, and d(j+1) is kept iff
it equals it. Accepted tokens are the plain tokens for every temperature and processor, with no
second random stream; the first mismatching draw is itself the plain token, so a verify step always
yields at least one.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import Tensor

from .processors import process_logits
from .sampler import SampleResult
from .tensors import SamplingTensors, TokenHistory


def verify_draws(first: Tensor, logits: Tensor, drafts: Tensor, producing: Tensor, t: SamplingTensors,
                 h: TokenHistory, sample_fn: Callable) -> tuple[list[SampleResult], list[Tensor]]:
    """The draws after position 0 of a verify step (position 0 drawn and appended to `h` already).

    first [R]: each row's draw at position 0; logits [R, Q-1, V]: the target's logits after each draft
    token; drafts [R, Q-1] int64, -1 past a row's draft; producing [R] bool. Returns, per position
    j = 1 .. (at most Q-1), the sampler's result and kept [R] bool (the row's drafts up to j matched,
    so its draw at j is produced); each produced draw is appended to `h` as it is made.
    """
    results, kept = [], []
    going = producing & (first == drafts[:, 0])  # [R]
    for j in range(drafts.shape[1]):
        if not bool(going.any()):
            break
        res = sample_fn(process_logits(logits[:, j], t, h), t, h)
        h.append(res.tokens, going)
        results.append(res)
        kept.append(going)
        if j + 1 < drafts.shape[1]:
            going = going & (res.tokens == drafts[:, j + 1])
    return results, kept
