"""Logits processors, vectorized over the batch with one setting per row.

Every function takes logits [S, V] float32 and per-row tensors, and returns new logits (the
input is not modified). No function loops over rows. `process_logits` applies them in the order
transformers applies its equivalents, skipping those that no row uses (decided once, in
`SamplingTensors.build`):

  repetition penalty, presence/frequency penalty, logit_bias, no_repeat_ngram, bad words,
  min_tokens, temperature, top-k, top-p, min-p.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from forklm.sampling.tensors import SamplingTensors, TokenHistory

_NEG_INF = float("-inf")


def ban_mask(vocab_size: int, ids: Tensor, banned: Tensor) -> Tensor:
    """[S, V] bool, True at `ids [S, K]` where `banned [S, K]`; ids outside a ban may be any
    valid index. Duplicate ids are fine: the hits are summed, never overwritten."""
    hits = torch.zeros((ids.shape[0], vocab_size), device=ids.device)  # [S, V]
    return hits.scatter_add_(1, ids, banned.float()) > 0


def apply_repetition_penalty(logits: Tensor, penalty: Tensor, seen: Tensor) -> Tensor:
    """transformers' rule on every token seen in prompt or output: divide a positive logit by the
    penalty, multiply a negative one. penalty [S, 1], seen [S, V] bool."""
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)  # [S, V]
    return torch.where(seen, penalised, logits)


def apply_presence_frequency(logits: Tensor, presence: Tensor, frequency: Tensor, counts: Tensor) -> Tensor:
    """OpenAI's rule on generated tokens: logit - count * frequency - (count > 0) * presence.
    presence, frequency [S, 1]; counts [S, V]."""
    return logits - counts * frequency - (counts > 0).to(logits.dtype) * presence


def apply_logit_bias(logits: Tensor, ids: Tensor, values: Tensor) -> Tensor:
    """Add `values [S, B]` at token `ids [S, B]` (padding carries a bias of 0)."""
    return logits.scatter_add(1, ids, values.to(logits.dtype))


def apply_no_repeat_ngram(logits: Tensor, tokens: Tensor, length: Tensor, ngram_size: Tensor, max_ngram: int) -> Tensor:
    """Ban every token that would repeat an n-gram of the row's history (prompt included), as
    transformers' NoRepeatNGramLogitsProcessor. tokens [S, L], length [S], ngram_size [S] (0 = off).

    A window ending at position p (tokens[p-n+1 .. p]) bans tokens[p] when its first n-1 tokens
    equal the row's last n-1 tokens. The loop runs over the n-1 offsets (bounded by `max_ngram`),
    each a comparison of the whole [S, L] history.
    """
    S, L = tokens.shape
    n = ngram_size[:, None]  # [S, 1]
    pos = torch.arange(L, device=tokens.device)[None, :]  # [1, L]
    match = (pos >= n - 1) & (pos < length[:, None]) & (n > 0)  # [S, L] windows that exist
    for offset in range(1, min(max_ngram, L + 1)):  # an n-gram longer than the history matches nothing
        suffix_token = tokens.gather(1, (length - offset).clamp(min=0)[:, None])  # [S, 1]
        window_token = F.pad(tokens, (offset, 0), value=-1)[:, :L]  # [S, L]: tokens[p - offset]
        match &= (window_token == suffix_token) | (offset >= n)
    return logits.masked_fill(ban_mask(logits.shape[1], tokens, match), _NEG_INF)


def apply_bad_words(logits: Tensor, tokens: Tensor, length: Tensor, bad_words: Tensor, bad_len: Tensor) -> Tensor:
    """Ban the last token of every bad sequence whose other tokens end the row's history (a
    single-token sequence is always banned), as transformers' NoBadWordsLogitsProcessor.

    tokens [S, L], length [S]; bad_words [S, W, M] right-aligned, padded with -1; bad_len [S, W].
    """
    S, W, M = bad_words.shape
    back = torch.arange(1, M, device=tokens.device)  # [M-1]: 1 = the last token of the history
    hist_pos = length[:, None] - back[None, :]  # [S, M-1]
    history = tokens.gather(1, hist_pos.clamp(min=0))  # [S, M-1]: history[:, o-1] = o-th token from the end
    prefix = bad_words[:, :, : M - 1].flip(-1)  # [S, W, M-1]: prefix[..., o-1] = o-th token before the banned one
    needed = back[None, None, :] < bad_len[:, :, None]  # [S, W, M-1]: offsets inside the sequence
    agree = (prefix == history[:, None, :]) & (hist_pos >= 0)[:, None, :]  # [S, W, M-1]
    match = (agree | ~needed).all(dim=-1) & (bad_len > 0)  # [S, W]
    last = bad_words[:, :, M - 1].clamp(min=0)  # [S, W]
    return logits.masked_fill(ban_mask(logits.shape[1], last, match), _NEG_INF)


def apply_min_tokens(
    logits: Tensor, generated: Tensor, min_tokens: Tensor, stop_ids: Tensor, stop_valid: Tensor
) -> Tensor:
    """Ban the row's stop ids (EOS, stop_token_ids) while generated [S] < min_tokens [S].
    stop_ids, stop_valid [S, E]."""
    banned = stop_valid & (generated < min_tokens)[:, None]  # [S, E]
    return logits.masked_fill(ban_mask(logits.shape[1], stop_ids, banned), _NEG_INF)


def apply_temperature(logits: Tensor, temperature: Tensor, in_place: bool = False) -> Tensor:
    """logits / temperature [S, 1] (greedy rows carry 1); into `logits` itself when `in_place`."""
    return logits.div_(temperature) if in_place else logits / temperature


def apply_top_k(logits: Tensor, top_k: Tensor, max_top_k: int) -> Tensor:
    """Keep the logits >= the row's k-th largest (ties kept, as transformers); top_k [S], 0 = off."""
    largest = torch.topk(logits, max_top_k, dim=-1).values  # [S, max_top_k], descending
    kth = largest.gather(1, (top_k - 1).clamp(min=0)[:, None])  # [S, 1]
    threshold = torch.where(top_k[:, None] > 0, kth, _NEG_INF)  # [S, 1]
    return logits.masked_fill(logits < threshold, _NEG_INF)


def apply_top_p(logits: Tensor, top_p: Tensor) -> Tensor:
    """Nucleus filter, as transformers: in ascending order, drop tokens whose cumulative
    probability is <= 1 - top_p, always keeping the most likely one. top_p [S, 1], 1 = off."""
    ascending, order = torch.sort(logits, dim=-1)  # [S, V] each
    cumulative = ascending.softmax(dim=-1).cumsum(dim=-1)  # [S, V]
    drop = (cumulative <= 1 - top_p) & (top_p < 1)  # [S, V]
    drop[:, -1] = False
    drop = drop.scatter(1, order, drop)  # back to vocabulary order
    return logits.masked_fill(drop, _NEG_INF)


def apply_min_p(logits: Tensor, min_p: Tensor) -> Tensor:
    """Drop tokens whose probability is below min_p [S, 1] times the row's largest (0 = off)."""
    probs = logits.softmax(dim=-1)  # [S, V]
    drop = probs < min_p * probs.amax(dim=-1, keepdim=True)  # [S, V]
    return logits.masked_fill(drop, _NEG_INF)


def process_logits(logits: Tensor, t: SamplingTensors, h: TokenHistory, owned: bool = False) -> Tensor:
    """Apply every processor some row uses: logits [S, V] float32 -> [S, V] float32.

    The input is not modified (it is returned as is when no processor applies), unless the caller says
    it is its own to overwrite (`owned`, the engine's fresh logits of a step): then temperature divides
    it in place, as it does a tensor an earlier processor made (one [S, V] float32 tensor fewer a step:
    docs/architecture.md).
    """
    given = logits
    if t.use_repetition_penalty:
        logits = apply_repetition_penalty(logits, t.repetition_penalty, h.seen)
    if t.use_presence_frequency:
        logits = apply_presence_frequency(logits, t.presence_penalty, t.frequency_penalty, h.counts)
    if t.use_logit_bias:
        logits = apply_logit_bias(logits, t.logit_bias_ids, t.logit_bias_values)
    if t.use_no_repeat_ngram:
        logits = apply_no_repeat_ngram(logits, h.tokens, h.length, t.ngram_size, t.max_ngram_size)
    if t.use_bad_words:
        logits = apply_bad_words(logits, h.tokens, h.length, t.bad_words, t.bad_words_len)
    if t.use_min_tokens:
        logits = apply_min_tokens(logits, h.generated, t.min_tokens, t.stop_ids, t.stop_ids_valid)
    if t.use_temperature:
        logits = apply_temperature(logits, t.temperature, in_place=owned or logits is not given)  # a fresh one is ours
    if t.use_top_k:
        logits = apply_top_k(logits, t.top_k, t.max_top_k)
    if t.use_top_p:
        logits = apply_top_p(logits, t.top_p)
    if t.use_min_p:
        logits = apply_min_p(logits, t.min_p)
    return logits
