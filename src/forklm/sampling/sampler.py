"""Draw one token per row from processed logits, and its log probability.

What the log probs are computed on: the *processed* logits, i.e. `log_softmax` of what
`process_logits` returned (after penalties, bias, bans, temperature and top-k/top-p/min-p), which
is exactly the distribution the token was drawn from. A token removed by a filter has log prob
-inf. Greedy rows skip temperature and the filters, so theirs is the penalised model distribution
at temperature 1. This equals transformers' `compute_transition_scores(..., normalize_logits=True)`
over the scores `generate` returns; it differs from vLLM's default, which reports the raw model
distribution (log_softmax of the logits before any processing). The engine can still report raw
log probs by passing the unprocessed logits to `compute_logprobs`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from forklm.sampling.random import row_keys, uniform_from_keys
from forklm.sampling.tensors import SamplingTensors, TokenHistory


@dataclass
class SampleResult:
    """One step's draw for S rows."""

    tokens: Tensor
    """[S] int64: the chosen token of each row."""
    logprobs: Tensor
    """[S] float32: the chosen token's log prob under the processed distribution (always)."""
    top_logprobs: tuple[Tensor, Tensor] | None
    """(values [S, K] float32, ids [S, K] int64), sorted by descending log prob, K = the largest
    number any row asked for; None when no row asked for logprobs. Rows that asked for fewer use
    the first entries; entry j has rank j + 1."""
    ranks: Tensor | None
    """[S] int64: 1 + the number of tokens strictly more likely than the chosen one (vLLM's
    rank); None when no row asked for logprobs."""


def chosen_logprobs(logits: Tensor, tokens: Tensor) -> Tensor:
    """[S]: log probs of `tokens [S]` under softmax(`logits [S, V]`). (One log_softmax kernel: torch's
    logsumexp is a chain of operators over [S, V], about twice the time.)"""
    return torch.log_softmax(logits, dim=-1).gather(1, tokens[:, None]).squeeze(1)  # [S]


def with_alternatives(logits: Tensor, tokens: Tensor, chosen: Tensor, max_logprobs: int | None) -> SampleResult:
    """The result for `tokens [S]` with log probs `chosen [S]`, plus the top `max_logprobs` alternatives
    and the chosen tokens' ranks when `max_logprobs` is not None. Apart from the draw: compiled, a new K
    would otherwise build another graph of the whole draw (and enough distinct K would pass dynamo's
    recompile limit)."""
    top = ranks = None
    if max_logprobs is not None:
        ids = torch.topk(logits, max_logprobs, dim=-1).indices  # [S, K], descending
        top = (torch.log_softmax(logits, dim=-1).gather(1, ids), ids)  # the chosen token's value, bitwise
        ranks = (logits > logits.gather(1, tokens[:, None])).sum(dim=-1) + 1  # [S]
    return SampleResult(tokens, chosen, top, ranks)


def compute_logprobs(logits: Tensor, tokens: Tensor, max_logprobs: int | None) -> SampleResult:
    """Log probs of `tokens [S]` under softmax(`logits [S, V]`), with the top `max_logprobs`
    alternatives and the chosen tokens' ranks when `max_logprobs` is not None."""
    return with_alternatives(logits, tokens, chosen_logprobs(logits, tokens), max_logprobs)


def draw(logits: Tensor, t: SamplingTensors, h: TokenHistory) -> tuple[Tensor, Tensor]:
    """One token per row from processed logits [S, V] float32 (the output of `process_logits`) and its
    log prob: tokens [S] int64, logprobs [S] float32.

    Greedy rows take the argmax. Sampled rows draw with counter-based uniforms keyed by
    (seed, sample index, step = tokens generated so far), so a row's draw does not depend on the
    batch around it.
    """
    compiling = torch.compiler.is_compiling()
    if not compiling and t.all_greedy:  # compiled, one graph serves greedy, sampled and mixed batches
        tokens = logits.argmax(dim=-1)  # [S]
        return tokens, chosen_logprobs(logits, tokens)
    s, v = logits.shape
    keys = row_keys(t.seeds.long(), t.sample_index.long(), h.generated.long())  # [S]: each row's key this step
    if compiling or logits.device.type != "cpu":  # one fused loop (any row count)
        tokens = _race(logits, t, keys, slice(None))  # [S]
        return tokens, chosen_logprobs(logits, tokens)
    # Eagerly the draw is ~16 elementwise passes over [S, V]: blocks of rows that stay in the CPU's
    # caches between passes run them faster (docs/architecture.md), and so do the log probs' passes,
    # taken block by block as well
    block = max(1, RACE_BLOCK // v)
    tokens, chosen = [], []
    for r in range(0, s, block):
        rows = logits[r : r + block]  # [b, V]
        tokens.append(_race(rows, t, keys[r : r + block], slice(r, r + block)))  # [b]
        chosen.append(chosen_logprobs(rows, tokens[-1]))  # [b]
    if len(tokens) == 1:
        return tokens[0], chosen[0]
    return torch.cat(tokens), torch.cat(chosen)  # [S], [S]


def sample(logits: Tensor, t: SamplingTensors, h: TokenHistory) -> SampleResult:
    """`draw`, with the top alternatives and ranks when a row asked for log probs."""
    return with_alternatives(logits, *draw(logits, t, h), t.max_logprobs)


RACE_BLOCK = 1 << 18  # elements of [S, V] per block of the eager draw (1 MB of float32)


def _race(logits: Tensor, t: SamplingTensors, keys: Tensor, rows: slice) -> Tensor:
    """The draw of `rows` (logits [b, V], the rows' slice of the batch; keys [b] their `row_keys` this
    step) -> tokens [b].

    Exponential race: argmax_i p_i / E_i with E_i = -log(u_i) ~ Exp(1) picks i with probability p_i;
    in logs it is Gumbel-max (logit_i - log E_i), so no softmax, cumsum or multinomial (no device
    sync), and the winner depends only on each token's own logit and noise: a 1e-5 shift of the
    logits (another GEMM shape) flips it only when two perturbed scores are within 1e-5, unlike
    inverse-CDF sampling against a cumulative sum.
    """
    u = uniform_from_keys(keys, t.token_keys)  # [b, V] in (0, 1)
    noise = u.log_().neg_().log_()  # [b, V] log E = log(-log u), in place
    race = torch.sub(logits, noise, out=noise)  # [b, V] logits - log E (bitwise -log E + logits)
    if torch.compiler.is_compiling() or t.any_greedy:  # greedy rows take their logits' argmax
        race = torch.where(t.greedy[rows, None], logits, race)  # [b, V]
    return race.argmax(dim=-1)  # [b]
