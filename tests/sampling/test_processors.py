"""Each logits processor against transformers' own (or the documented formula), row by row, on
batches whose rows have different settings; and TokenHistory's bookkeeping."""

from __future__ import annotations

from collections import Counter

import pytest
import torch
import transformers.generation.logits_process as tlp

from forklm.sampling import RowSpec, SamplingParams, SamplingTensors, TokenHistory, process_logits

V = 40
EOS = [1]


def make_rows(
    params: list[SamplingParams],
    prompts: list[list[int]],
    generated: list[list[int]],
    bad_words: list[list[list[int]]] | None = None,
    vocab: int = V,
):
    """SamplingTensors and a TokenHistory whose rows hold prompt + generated tokens (ragged: the
    generated tokens are appended column by column with an `active` mask)."""
    bad_words = bad_words or [[] for _ in params]
    rows = [RowSpec(p, i, 1000 + i, EOS, bw) for i, (p, bw) in enumerate(zip(params, bad_words))]
    t = SamplingTensors.build(rows, vocab, "cpu")
    h = TokenHistory.from_prompts(prompts, max(len(p) + len(g) for p, g in zip(prompts, generated)) + 2, vocab)
    for col in range(max(len(g) for g in generated)):
        active = torch.tensor([col < len(g) for g in generated])
        tokens = torch.tensor([g[col] if col < len(g) else 0 for g in generated])
        h.append(tokens, active)
    return t, h


def full_ids(prompts, generated, row) -> torch.Tensor:
    return torch.tensor([prompts[row] + generated[row]])  # [1, L]


def random_case(S: int, seed: int, vocab: int = V, max_prompt: int = 9, max_gen: int = 8):
    g = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(0, vocab, (int(torch.randint(1, max_prompt, (1,), generator=g)),), generator=g).tolist()
               for _ in range(S)]
    generated = [torch.randint(0, vocab, (int(torch.randint(0, max_gen, (1,), generator=g)),), generator=g).tolist()
                 for _ in range(S)]
    logits = torch.randn(S, vocab, generator=g) * 3
    return prompts, generated, logits


def assert_rows_equal(ours: torch.Tensor, ref: torch.Tensor, row: int):
    assert torch.equal(torch.isinf(ours), torch.isinf(ref)), f"row {row}: different tokens filtered"
    finite = ~torch.isinf(ref)
    torch.testing.assert_close(ours[finite], ref[finite], rtol=1e-6, atol=1e-6, msg=f"row {row}")


def test_repetition_penalty_vs_transformers():
    penalties = [1.0, 1.3, 0.7, 2.0, 1.05]
    prompts, generated, logits = random_case(len(penalties), 0)
    t, h = make_rows([SamplingParams(repetition_penalty=p) for p in penalties], prompts, generated)
    out = process_logits(logits, t, h)
    for i, p in enumerate(penalties):
        ref = tlp.RepetitionPenaltyLogitsProcessor(float(p))(full_ids(prompts, generated, i), logits[i : i + 1])
        assert_rows_equal(out[i], ref[0], i)


def test_presence_frequency_penalty_formula():
    """OpenAI: logit - count * frequency_penalty - (count > 0) * presence_penalty, generated tokens only."""
    settings = [(0.0, 0.0), (0.5, 0.0), (0.0, 0.7), (-1.0, 2.0), (2.0, -2.0)]
    prompts, generated, logits = random_case(len(settings), 1, vocab=12, max_gen=12)
    params = [SamplingParams(presence_penalty=pp, frequency_penalty=fp) for pp, fp in settings]
    t, h = make_rows(params, prompts, generated, vocab=12)
    out = process_logits(logits, t, h)
    for i, (pp, fp) in enumerate(settings):
        ref = logits[i].clone()
        for tok, count in Counter(generated[i]).items():
            ref[tok] -= count * fp + pp
        assert_rows_equal(out[i], ref, i)


def test_logit_bias_vs_formula_and_sequence_bias():
    biases = [{}, {3: 5.0}, {0: -100.0, 39: 100.0, 7: 0.5}, {3: -2.0}]
    prompts, generated, logits = random_case(len(biases), 2)
    t, h = make_rows([SamplingParams(logit_bias=b) for b in biases], prompts, generated)
    out = process_logits(logits, t, h)
    for i, b in enumerate(biases):
        ref = logits[i].clone()
        for tok, val in b.items():
            ref[tok] += val
        assert_rows_equal(out[i], ref, i)
        if b:
            seq = tlp.SequenceBiasLogitsProcessor([[[tok], float(val)] for tok, val in b.items()])
            assert_rows_equal(out[i], seq(full_ids(prompts, generated, i), logits[i : i + 1])[0], i)


def test_logit_bias_outside_vocab_is_refused():
    from forklm.errors import InvalidParameterError

    with pytest.raises(InvalidParameterError) as e:
        SamplingTensors.build([RowSpec(SamplingParams(logit_bias={V: 1.0}), 0, 0)], V, "cpu")
    assert e.value.field == "logit_bias"


def test_no_repeat_ngram_vs_transformers():
    sizes = [0, 1, 2, 3, 4, 2, 3]
    # a small vocabulary so that n-grams repeat and bans actually happen
    prompts, generated, logits = random_case(len(sizes), 3, vocab=5, max_prompt=12, max_gen=10)
    t, h = make_rows([SamplingParams(no_repeat_ngram_size=n) for n in sizes], prompts, generated, vocab=5)
    out = process_logits(logits, t, h)
    banned = 0
    for i, n in enumerate(sizes):
        ref = logits[i : i + 1]
        if n:
            ref = tlp.NoRepeatNGramLogitsProcessor(n)(full_ids(prompts, generated, i), ref)
        assert_rows_equal(out[i], ref[0], i)
        banned += int(torch.isinf(ref).sum())
    assert banned > 3  # the case exercises the bans


def test_bad_words_vs_transformers():
    bad = [
        [],
        [[5]],  # always banned
        [[7, 8], [9, 10, 11], [12]],
        [[1], [2, 3]],  # [1] is the EOS: transformers drops it from bad words
        [[4, 4, 4, 6]],
        [[4, 4, 4, 6]],  # the history is shorter than the prefix: no ban
    ]
    prompts = [[5, 6], [3], [2, 7], [0, 2], [4, 4], [4]]
    generated = [[1], [2, 2], [9, 10], [9], [4], [4]]  # rows 2 and 4 end with a bad prefix
    logits = torch.randn(len(bad), V, generator=torch.Generator().manual_seed(4))
    t, h = make_rows([SamplingParams() for _ in bad], prompts, generated, bad_words=bad)
    out = process_logits(logits, t, h)
    for i, words in enumerate(bad):
        ref = logits[i : i + 1]
        if words:
            ref = tlp.NoBadWordsLogitsProcessor(words, eos_token_id=EOS)(full_ids(prompts, generated, i), ref)
        assert_rows_equal(out[i], ref[0], i)
    assert torch.isinf(out[2, 11]) and torch.isinf(out[4, 6]) and not torch.isinf(out[3, 1])
    assert not torch.isinf(out[5, 6])


def test_min_tokens_vs_transformers():
    cases = [(0, []), (3, []), (3, [5, 6]), (1, [7]), (10, [])]  # (min_tokens, stop_token_ids)
    prompts, generated, logits = random_case(len(cases), 5, max_gen=6)
    generated[1], generated[2], generated[3] = [9, 9], [4, 4, 4], []
    params = [SamplingParams(min_tokens=m, stop_token_ids=s) for m, s in cases]
    t, h = make_rows(params, prompts, generated)
    out = process_logits(logits, t, h)
    for i, (m, stops) in enumerate(cases):
        proc = tlp.MinNewTokensLengthLogitsProcessor(len(prompts[i]), m, EOS + stops)
        assert_rows_equal(out[i], proc(full_ids(prompts, generated, i), logits[i : i + 1])[0], i)
    assert torch.isinf(out[1, 1]) and not torch.isinf(out[2, 5]) and torch.isinf(out[3, 7])
    # ignore_eos: EOS does not end the sequence, so min_tokens has nothing to ban
    t, h = make_rows([SamplingParams(min_tokens=3, ignore_eos=True)], [[2]], [[]])
    assert not t.use_min_tokens


WARPERS = {
    "temperature": (tlp.TemperatureLogitsWarper, [1.0, 0.5, 1.7, 0.05]),
    "top_k": (tlp.TopKLogitsWarper, [0, 1, 5, 17]),
    "top_p": (tlp.TopPLogitsWarper, [1.0, 0.9, 0.3, 0.999]),
    "min_p": (tlp.MinPLogitsWarper, [0.0, 0.1, 0.5, 1.0]),
}


@pytest.mark.parametrize("name", list(WARPERS))
def test_warper_vs_transformers(name):
    cls, values = WARPERS[name]
    prompts, generated, logits = random_case(len(values), 6)
    t, h = make_rows([SamplingParams(**{name: v}) for v in values], prompts, generated)
    out = process_logits(logits, t, h)
    for i, v in enumerate(values):
        off = v == {"temperature": 1.0, "top_k": 0, "top_p": 1.0, "min_p": 0.0}[name]
        ref = logits[i : i + 1] if off else cls(v)(full_ids(prompts, generated, i), logits[i : i + 1])
        assert_rows_equal(out[i], ref[0], i)


def test_top_k_keeps_ties_like_transformers():
    logits = torch.tensor([[3.0, 2.0, 2.0, 2.0, 1.0, 0.0]])
    t, h = make_rows([SamplingParams(top_k=2)], [[0]], [[]], vocab=6)
    out = process_logits(logits, t, h)
    ref = tlp.TopKLogitsWarper(2)(torch.tensor([[0]]), logits)
    assert torch.equal(out, ref) and int(torch.isfinite(out).sum()) == 4


def _reference_chain(p: SamplingParams, row_bad_words, prompt, generated):
    """transformers' processors in forklm's order, with OpenAI's presence/frequency formula inserted."""
    chain = []
    if p.repetition_penalty != 1.0:
        chain.append(tlp.RepetitionPenaltyLogitsProcessor(p.repetition_penalty))
    if p.presence_penalty or p.frequency_penalty:
        def penalties(ids, scores, p=p):
            scores = scores.clone()
            for tok, count in Counter(generated).items():
                scores[:, tok] -= count * p.frequency_penalty + p.presence_penalty
            return scores
        chain.append(penalties)
    if p.logit_bias:
        chain.append(tlp.SequenceBiasLogitsProcessor([[[k], v] for k, v in p.logit_bias.items()]))
    if p.no_repeat_ngram_size:
        chain.append(tlp.NoRepeatNGramLogitsProcessor(p.no_repeat_ngram_size))
    if row_bad_words:
        chain.append(tlp.NoBadWordsLogitsProcessor(row_bad_words, eos_token_id=EOS))
    if p.min_tokens:
        chain.append(tlp.MinNewTokensLengthLogitsProcessor(len(prompt), p.min_tokens, EOS + p.stop_token_ids))
    if not p.greedy:
        if p.temperature != 1.0:
            chain.append(tlp.TemperatureLogitsWarper(p.temperature))
        if p.top_k > 0:
            chain.append(tlp.TopKLogitsWarper(p.top_k))
        if p.top_p < 1.0:
            chain.append(tlp.TopPLogitsWarper(p.top_p))
        if p.min_p > 0:
            chain.append(tlp.MinPLogitsWarper(p.min_p))
    return chain


def test_mixed_batch_full_chain_row_by_row():
    params = [
        SamplingParams(),
        SamplingParams(temperature=0.0, repetition_penalty=1.5, top_k=3, top_p=0.5),  # greedy: warpers off
        SamplingParams(temperature=0.7, top_k=8, top_p=0.8, repetition_penalty=1.2, presence_penalty=0.4),
        SamplingParams(temperature=1.3, min_p=0.1, frequency_penalty=0.6, logit_bias={2: 3.0, 5: -4.0}),
        SamplingParams(no_repeat_ngram_size=2, min_tokens=5, stop_token_ids=[3], top_p=0.95),
        SamplingParams(temperature=0.9, top_k=4, min_p=0.2, no_repeat_ngram_size=3, repetition_penalty=0.8),
    ]
    bad = [[], [[6]], [], [[2, 9], [11]], [[0, 1, 2]], []]
    prompts, generated, logits = random_case(len(params), 7, vocab=16, max_prompt=10, max_gen=9)
    t, h = make_rows(params, prompts, generated, bad_words=bad, vocab=16)
    out = process_logits(logits, t, h)
    for i, p in enumerate(params):
        ids, ref = full_ids(prompts, generated, i), logits[i : i + 1]
        for proc in _reference_chain(p, bad[i], prompts[i], generated[i]):
            ref = proc(ids, ref)
        assert_rows_equal(out[i], ref[0], i)


def test_unused_processors_are_skipped():
    t, h = make_rows([SamplingParams(temperature=0.0), SamplingParams()], [[1, 2], [3]], [[4], []])
    flags = [f for f in vars(t) if f.startswith("use_")]
    assert flags and not any(getattr(t, f) for f in flags)
    assert t.stop_ids is None and t.logit_bias_ids is None and t.bad_words is None and t.max_logprobs is None
    logits = torch.randn(2, V)
    assert process_logits(logits, t, h) is logits
    assert h._counts is None and h._seen is None  # never materialised


def test_input_is_not_modified():
    params = [SamplingParams(temperature=0.5, top_k=3, top_p=0.7, min_p=0.1, repetition_penalty=1.3,
                             presence_penalty=0.5, logit_bias={1: 2.0}, no_repeat_ngram_size=2, min_tokens=4)]
    t, h = make_rows(params, [[1, 2, 1]], [[2]], bad_words=[[[5]]])
    logits = torch.randn(1, V)
    before = logits.clone()
    process_logits(logits, t, h)
    assert torch.equal(logits, before)


@pytest.mark.parametrize("penalty", [False, True], ids=["temperature_first", "after_a_penalty"])
def test_owned_logits_are_divided_in_place_with_the_same_result(penalty):
    """`owned`: the caller's own logits may be overwritten: temperature divides them in place (the engine's
    fresh [S, V] a step), giving bitwise the result of the copy; without it the input stays as it was."""
    params = [SamplingParams(temperature=0.7, top_p=0.9, repetition_penalty=1.3 if penalty else 1.0),
              SamplingParams(temperature=1.3), SamplingParams(temperature=0.0)]
    t, h = make_rows(params, [[1, 2, 1], [3], [4, 4]], [[2], [], [1]])
    torch.manual_seed(3)
    logits = torch.randn(3, V)
    before = logits.clone()
    want = process_logits(logits, t, h)
    assert torch.equal(logits, before)
    mine = logits.clone()
    got = process_logits(mine, t, h, owned=True)
    assert torch.equal(got, want)
    if not penalty:  # the division went into the caller's tensor itself
        assert not torch.equal(mine, before)
        assert torch.equal(mine, before / t.temperature)


def test_token_history_bookkeeping():
    h = TokenHistory(3, 8, 10)
    h.reset_row(0, [1, 2, 2])
    h.reset_row(1, [5])
    h.reset_row(2, [7, 7])
    assert h.seen[0, 2] and not h.seen[0, 5] and float(h.counts.sum()) == 0  # materialised now
    h.append(torch.tensor([3, 5, 9]))
    h.append(torch.tensor([3, 4, 0]), active=torch.tensor([True, False, True]))
    assert h.length.tolist() == [5, 2, 4] and h.generated.tolist() == [2, 1, 2]
    assert h.tokens[0, :5].tolist() == [1, 2, 2, 3, 3] and h.tokens[1, :2].tolist() == [5, 5]
    assert h.counts[0, 3] == 2 and h.counts[1, 5] == 1 and h.counts[1, 4] == 0 and h.counts[2, 7] == 0
    assert h.seen[1, 5] and not h.seen[1, 4] and h.seen[2, 0]
    # incremental counts/seen equal the ones built from scratch
    fresh = TokenHistory(3, 8, 10)
    fresh.tokens.copy_(h.tokens), fresh.prompt_len.copy_(h.prompt_len), fresh.length.copy_(h.length)
    assert torch.equal(fresh.counts, h.counts) and torch.equal(fresh.seen, h.seen)
    # reorder (beam search): row i takes old row rows[i]
    h.index_select(torch.tensor([2, 2, 0]))
    assert h.length.tolist() == [4, 4, 5] and torch.equal(h.counts[0], h.counts[1])
    assert h.tokens[2, :5].tolist() == [1, 2, 2, 3, 3]
    # slot reuse
    h.reset_row(2, [4])
    assert h.length[2] == 1 and h.prompt_len[2] == 1 and h.counts[2].sum() == 0 and h.seen[2].sum() == 1
    with pytest.raises((IndexError, RuntimeError)):  # past capacity: an error, not an overwrite
        for _ in range(8):
            h.append(torch.tensor([1, 1, 1]))
