"""The sampler: target distributions, per-row seed invariance, greedy rows, log probs and ranks,
and parity with transformers' generate (processed scores, tokens, transition scores)."""

from __future__ import annotations

import pytest
import torch

from forklm.sampling import (
    RowSpec,
    SamplingParams,
    SamplingTensors,
    TokenHistory,
    compute_logprobs,
    fresh_seed,
    process_logits,
    sample,
)

# Empirical frequencies of N draws are compared with the target probabilities. With N = 20000 the
# standard deviation of a frequency is at most sqrt(0.25 / N) = 0.0035, so 0.015 is > 4 sigma.
N_DRAWS = 20000
FREQ_TOL = 0.015


def draw(logits: torch.Tensor, rows: list[RowSpec], history: TokenHistory | None = None):
    """Process and sample logits [S, V] for `rows`; a one-token prompt history by default."""
    S, V = logits.shape
    t = SamplingTensors.build(rows, V, "cpu")
    h = history or TokenHistory.from_prompts([[0]] * S, 4, V)
    processed = process_logits(logits, t, h)
    return processed, sample(processed, t, h)


TEN = torch.tensor([2.0, 1.5, 1.0, 0.9, 0.5, 0.0, -0.5, -1.0, -2.0, -3.0])

DISTRIBUTIONS = {
    "plain": SamplingParams(),
    "temperature_0.5": SamplingParams(temperature=0.5),
    "temperature_2": SamplingParams(temperature=2.0),
    "top_k_3": SamplingParams(top_k=3),
    "top_p_0.8": SamplingParams(top_p=0.8),
    "min_p_0.2": SamplingParams(min_p=0.2),
    "combined": SamplingParams(temperature=0.8, top_k=6, top_p=0.9, min_p=0.05),
}


def _target(p: SamplingParams) -> torch.Tensor:
    """The renormalised distribution, computed with transformers' warpers."""
    import transformers.generation.logits_process as tlp

    scores, ids = TEN[None, :].clone(), torch.zeros(1, 1, dtype=torch.long)
    if p.temperature != 1.0:
        scores = tlp.TemperatureLogitsWarper(p.temperature)(ids, scores)
    if p.top_k:
        scores = tlp.TopKLogitsWarper(p.top_k)(ids, scores)
    if p.top_p < 1.0:
        scores = tlp.TopPLogitsWarper(p.top_p)(ids, scores)
    if p.min_p:
        scores = tlp.MinPLogitsWarper(p.min_p)(ids, scores)
    return scores.softmax(-1)[0]


@pytest.mark.parametrize("name", list(DISTRIBUTIONS))
def test_empirical_frequencies_match_target(name):
    p = DISTRIBUTIONS[name]
    rows = [RowSpec(p, i, 12345) for i in range(N_DRAWS)]  # one request, N samples
    _, result = draw(TEN.repeat(N_DRAWS, 1), rows)
    freq = torch.bincount(result.tokens, minlength=10).double() / N_DRAWS
    target = _target(p).double()
    assert float((freq - target).abs().max()) < FREQ_TOL, (freq, target)
    assert torch.all(freq[target == 0] == 0)  # filtered tokens are never drawn


def test_frequencies_over_steps_and_seeds():
    """Draws of one row across steps, and across seeds, also follow the target."""
    p = SamplingParams(temperature=0.7)
    target = _target(p).double()
    rows = [RowSpec(p, 0, seed) for seed in range(N_DRAWS)]
    _, result = draw(TEN.repeat(N_DRAWS, 1), rows)
    freq = torch.bincount(result.tokens, minlength=10).double() / N_DRAWS
    assert float((freq - target).abs().max()) < FREQ_TOL
    # one sample, N steps: history lengths 1..N give the step counters
    h = TokenHistory(N_DRAWS, 2, 10)
    h.length.copy_(torch.arange(N_DRAWS) + 1)
    _, result = draw(TEN.repeat(N_DRAWS, 1), [RowSpec(p, 0, 99)] * N_DRAWS, h)
    freq = torch.bincount(result.tokens, minlength=10).double() / N_DRAWS
    assert float((freq - target).abs().max()) < FREQ_TOL


def _varied_batch(S: int, V: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    kinds = [SamplingParams(), SamplingParams(temperature=0.6, top_k=20), SamplingParams(top_p=0.9),
             SamplingParams(min_p=0.05, temperature=1.4), SamplingParams(temperature=0.0),
             SamplingParams(repetition_penalty=1.3, logprobs=3)]
    rows = [RowSpec(kinds[i % len(kinds)], i % 5, int(torch.randint(0, 2**62, (1,), generator=g))) for i in range(S)]
    prompts = [torch.randint(0, V, (1 + i % 7,), generator=g).tolist() for i in range(S)]
    logits = torch.randn(S, V, generator=g) * 2
    return rows, prompts, logits


def _draw_rows(rows, prompts, logits, order):
    rows = [rows[i] for i in order]
    h = TokenHistory.from_prompts([prompts[i] for i in order], 12, logits.shape[1])
    return draw(logits[order], rows, h)[1]


def test_row_draw_does_not_depend_on_the_batch():
    S, V = 24, 300
    rows, prompts, logits = _varied_batch(S, V, 0)
    full = _draw_rows(rows, prompts, logits, list(range(S)))
    perm = torch.randperm(S, generator=torch.Generator().manual_seed(1)).tolist()
    permuted = _draw_rows(rows, prompts, logits, perm)
    assert permuted.tokens.tolist() == [full.tokens[i].item() for i in perm]
    torch.testing.assert_close(permuted.logprobs, full.logprobs[perm])
    for i in range(S):  # alone, and next to unrelated rows
        assert _draw_rows(rows, prompts, logits, [i]).tokens.item() == full.tokens[i].item()
    others, other_prompts, other_logits = _varied_batch(9, V, 2)
    mixed = _draw_rows(others + rows[:5], other_prompts + prompts[:5], torch.cat([other_logits, logits[:5]]),
                       list(range(14)))
    assert mixed.tokens[9:].tolist() == full.tokens[:5].tolist()


def test_draws_are_stable_under_tiny_logit_shifts():
    """A 1e-5 shift of the logits (another GEMM shape) almost never changes a draw."""
    S, V = 4000, 200
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(S, V, generator=g) * 2
    rows = [RowSpec(SamplingParams(), i, 7) for i in range(S)]
    _, a = draw(logits, rows)
    _, b = draw(logits + torch.randn(S, V, generator=g) * 1e-5, rows)
    assert float((a.tokens != b.tokens).float().mean()) < 0.002


def test_seeds_sample_indexes_and_steps_differ():
    V, S = 1000, 200
    flat = torch.zeros(S, V)  # uniform over 1000 tokens: equal draws would be a coincidence
    by_seed = draw(flat, [RowSpec(SamplingParams(), 0, s) for s in range(S)])[1].tokens
    by_index = draw(flat, [RowSpec(SamplingParams(), i, 5) for i in range(S)])[1].tokens
    h = TokenHistory(S, 2, V)
    h.length.copy_(torch.arange(S) + 1)
    by_step = draw(flat, [RowSpec(SamplingParams(), 0, 5)] * S, h)[1].tokens
    for tokens in (by_seed, by_index, by_step):
        assert tokens.unique().numel() > 0.7 * S
    assert not torch.equal(by_seed, by_index)


def test_requests_without_seed_get_fresh_seeds():
    V, S = 1000, 64
    flat = torch.zeros(S, V)
    a = draw(flat, [RowSpec(SamplingParams(), i, fresh_seed()) for i in range(S)])[1].tokens
    b = draw(flat, [RowSpec(SamplingParams(), i, fresh_seed()) for i in range(S)])[1].tokens
    assert (a != b).float().mean() > 0.9
    same = [RowSpec(SamplingParams(seed=3), i, 3) for i in range(S)]
    assert torch.equal(draw(flat, same)[1].tokens, draw(flat, same)[1].tokens)


def test_greedy_rows_take_argmax_in_a_mixed_batch():
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(6, 50, generator=g)
    params = [SamplingParams(temperature=0.0), SamplingParams(), SamplingParams(temperature=0.0, top_k=5)]
    rows = [RowSpec(params[i % 3], i, i) for i in range(6)]
    processed, result = draw(logits, rows)
    for i in (0, 2, 3, 5):
        assert result.tokens[i] == logits[i].argmax()
    torch.testing.assert_close(processed[[0, 2, 3, 5]], logits[[0, 2, 3, 5]])  # warpers off for greedy rows
    _, all_greedy = draw(logits, [RowSpec(params[0], i, i) for i in range(6)])
    assert torch.equal(all_greedy.tokens, logits.argmax(-1))


def test_logprobs_top_alternatives_and_ranks():
    g = torch.Generator().manual_seed(5)
    S, V = 8, 60
    logits = torch.randn(S, V, generator=g) * 2
    asked = [None, 0, 2, 5, None, 5, 1, 3]
    rows = [RowSpec(SamplingParams(temperature=0.9, top_k=30, logprobs=k), i, 11) for i, k in enumerate(asked)]
    processed, r = draw(logits, rows)
    reference = torch.log_softmax(processed, dim=-1)
    torch.testing.assert_close(r.logprobs, reference.gather(1, r.tokens[:, None])[:, 0])
    values, ids = r.top_logprobs
    assert values.shape == (S, 5) and ids.shape == (S, 5)
    ref_values, ref_ids = reference.sort(dim=-1, descending=True)
    torch.testing.assert_close(values, ref_values[:, :5])
    assert torch.equal(ids, ref_ids[:, :5])
    assert torch.all(values[:, :-1] >= values[:, 1:])
    for i in range(S):
        rank = int(r.ranks[i])
        assert rank == 1 + int((reference[i] > reference[i, r.tokens[i]]).sum())
        if rank <= 5:
            assert ids[i, rank - 1] == r.tokens[i]
            assert values[i, rank - 1] == r.logprobs[i]  # the chosen token's own entry, bitwise
    assert torch.isinf(reference).any()  # top_k removed tokens: their log prob is -inf
    _, none_asked = draw(logits, [RowSpec(SamplingParams(), i, 11) for i in range(S)])
    assert none_asked.top_logprobs is None and none_asked.ranks is None and none_asked.logprobs.shape == (S,)


@pytest.mark.parametrize("block_rows", [1, 3, 5])
def test_draw_in_row_blocks_equals_one_block(monkeypatch, block_rows):
    """The eager draw runs in blocks of rows (to stay in cache); any block size gives the tokens and
    log probs of one block over the whole batch (what the compiled draw computes), greedy rows too."""
    import forklm.sampling.sampler as sampler

    S, V = 13, 1000
    rows, prompts, logits = _varied_batch(S, V, 3)
    order = list(range(S))
    monkeypatch.setattr(sampler, "RACE_BLOCK", 10 * S * V)
    whole = _draw_rows(rows, prompts, logits, order)
    monkeypatch.setattr(sampler, "RACE_BLOCK", block_rows * V)
    blocked = _draw_rows(rows, prompts, logits, order)
    assert torch.equal(blocked.tokens, whole.tokens) and torch.equal(blocked.logprobs, whole.logprobs)
    assert any(not r.params.temperature for r in rows) and len(set(whole.tokens.tolist())) > 3


def _mixed_step_inputs(device: str):
    params = [SamplingParams(temperature=0.7, top_k=5, top_p=0.9, min_p=0.05, repetition_penalty=1.3,
                             presence_penalty=0.5, logit_bias={3: 5.0}, no_repeat_ngram_size=2, min_tokens=3,
                             logprobs=3),
              SamplingParams(temperature=0.0), SamplingParams(top_p=0.8, frequency_penalty=0.4)]
    rows = [RowSpec(params[i % 3], i, 100 + i, [2], [[4], [5, 6]]) for i in range(6)]
    t = SamplingTensors.build(rows, 40, device)
    h = TokenHistory.from_prompts([[1, 5, 7, 1], [3, 3], [9], [1, 2, 3], [4, 4, 4], [0]], 16, 40, device)
    return t, h


def test_step_is_traceable_by_torch_compile():
    """process_logits + sample capture as one graph (fullgraph) once counts/seen exist."""
    t, h = _mixed_step_inputs("cpu")
    _ = (h.counts, h.seen)  # materialise before tracing (their lazy creation is a Python-side effect)

    def step(logits):
        return sample(process_logits(logits, t, h), t, h)

    compiled = torch.compile(step, backend="eager", fullgraph=True)
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(0))
    eager, traced = step(logits), compiled(logits)
    assert torch.equal(eager.tokens, traced.tokens) and torch.equal(eager.logprobs, traced.logprobs)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_tokens_on_cuda():
    logits = torch.randn(6, 40, generator=torch.Generator().manual_seed(0)) * 3
    results = []
    for device in ("cpu", "cuda"):
        t, h = _mixed_step_inputs(device)
        tokens = []
        for _ in range(8):
            r = sample(process_logits(logits.to(device), t, h), t, h)
            h.append(r.tokens)
            tokens.append(r.tokens.cpu())
        results.append(torch.stack(tokens))
    assert torch.equal(results[0], results[1])


# ---- parity with transformers' generate -----------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama():
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128)
    model = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(40.0)  # peaked next-token distributions, far from ties
    return model


def _generate(model, prompts, **kwargs):
    from transformers import GenerationConfig

    settings = dict(max_new_tokens=12, pad_token_id=0, eos_token_id=None, bos_token_id=None, output_scores=True,
                    output_logits=True, return_dict_in_generate=True, top_k=None)  # no default top_k=50
    config = GenerationConfig(**{**settings, **kwargs})
    ids = torch.tensor(prompts)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), generation_config=config)
    transition = model.compute_transition_scores(out.sequences, out.scores, normalize_logits=True)  # [B, T]
    return out, transition


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(do_sample=False, repetition_penalty=1.4, no_repeat_ngram_size=2, min_new_tokens=4),
        dict(do_sample=True, temperature=0.7, top_k=20, top_p=0.9, repetition_penalty=1.2),
        dict(do_sample=True, min_p=0.1, no_repeat_ngram_size=3),
    ],
    ids=["greedy", "sampled_topk_topp", "sampled_minp"],
)
def test_processed_scores_tokens_and_logprobs_match_transformers(tiny_llama, kwargs):
    """Feed transformers' raw logits through forklm step by step: the processed logits equal
    transformers' `scores`, greedy tokens equal its tokens, and forklm's log probs of its tokens
    equal `compute_transition_scores(normalize_logits=True)` (cumulative sums too)."""
    torch.manual_seed(0)
    prompts = [[5, 17, 99, 3, 42, 8], [77, 1, 64, 64, 12, 30]]
    eos = [2]
    out, transition = _generate(tiny_llama, prompts, **kwargs)
    L = len(prompts[0])
    params = SamplingParams(
        temperature=kwargs.get("temperature", 1.0) if kwargs["do_sample"] else 0.0,
        top_k=kwargs.get("top_k", 0), top_p=kwargs.get("top_p", 1.0), min_p=kwargs.get("min_p", 0.0),
        repetition_penalty=kwargs.get("repetition_penalty", 1.0),
        no_repeat_ngram_size=kwargs.get("no_repeat_ngram_size", 0),
        min_tokens=kwargs.get("min_new_tokens", 0), max_tokens=12,
    )
    t = SamplingTensors.build([RowSpec(params, i, 0, eos) for i in range(2)], 128, "cpu")
    h = TokenHistory.from_prompts(prompts, L + 12, 128)
    ours = []
    for step, (raw, scores) in enumerate(zip(out.logits, out.scores)):
        processed = process_logits(raw.float(), t, h)
        assert_same_scores(processed, scores.float())
        theirs = out.sequences[:, L + step]
        if not kwargs["do_sample"]:
            assert torch.equal(sample(processed, t, h).tokens, theirs)
        ours.append(compute_logprobs(processed, theirs, None).logprobs)
        h.append(theirs)
    ours = torch.stack(ours, dim=1)  # [B, T]
    torch.testing.assert_close(ours, transition, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ours.sum(1), transition.sum(1), rtol=1e-5, atol=1e-4)


def assert_same_scores(ours: torch.Tensor, theirs: torch.Tensor):
    assert torch.equal(torch.isinf(ours), torch.isinf(theirs))
    finite = ~torch.isinf(theirs)
    torch.testing.assert_close(ours[finite], theirs[finite], rtol=1e-5, atol=1e-5)


def test_idle_rows_do_not_make_a_batch_greedy_nor_change_its_draws():
    """Spare rows of a padded engine are greedy but do not switch the sampler's path or the others' tokens."""
    torch.manual_seed(0)
    logits = torch.randn(3, 50)
    live = [RowSpec(SamplingParams(seed=4), i, 4) for i in range(2)]
    t = SamplingTensors.build(live + [RowSpec.idle()], 50, "cpu")
    assert not t.any_greedy and not t.all_greedy
    _, full = draw(logits, live + [RowSpec.idle()])
    _, alone = draw(logits[:2], live)
    assert torch.equal(full.tokens[:2], alone.tokens)
    greedy = SamplingTensors.build([RowSpec(SamplingParams(temperature=0.0), 0, 0), RowSpec.idle()], 50, "cpu")
    assert greedy.any_greedy and greedy.all_greedy
