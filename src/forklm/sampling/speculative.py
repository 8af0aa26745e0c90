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
    so its draw at j is produced); each produced draw is appended to `h` as it is made. Positions
    after the first mismatch of some row are processed and drawn for the rows still accepting only.
    """
    results, kept = [], []
    going = producing & (first == drafts[:, 0])  # [R]
    for j in range(drafts.shape[1]):
        rows = going.nonzero().squeeze(1)  # [r] rows still accepting
        if len(rows) == 0:
            break
        if len(rows) == len(going):
            res = sample_fn(process_logits(logits[:, j], t, h), t, h)
        else:  # only the rows still accepting: a row's draw depends on its own logits, settings and history
            ts, hs = t.select(rows), h.select(rows)
            res = _scatter(sample_fn(process_logits(logits[rows, j], ts, hs), ts, hs), rows, len(going))
        h.append(res.tokens, going)
        results.append(res)
        kept.append(going)
        if j + 1 < drafts.shape[1]:
            going = going & (res.tokens == drafts[:, j + 1])
    return results, kept


def _scatter(res: SampleResult, rows: Tensor, num_rows: int) -> SampleResult:
    """A result for `rows [r]` spread onto all `num_rows` rows (the others: token 0, log prob 0)."""
    def full(x: Tensor) -> Tensor:
        out = x.new_zeros((num_rows, *x.shape[1:]))  # [R, ...]
        out[rows] = x
        return out

    top = None if res.top_logprobs is None else (full(res.top_logprobs[0]), full(res.top_logprobs[1]))
    return SampleResult(full(res.tokens), full(res.logprobs), top, None if res.ranks is None else full(res.ranks))
