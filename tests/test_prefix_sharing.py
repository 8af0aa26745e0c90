"""Prefix sharing end to end: shared prefixes in one call, across calls, continuations, chunked
prefill, eviction under a tiny budget: token-identical to each prompt computed alone and cold."""

from __future__ import annotations

import random

import pytest

from forklm import LLM, SamplingParams
from forklm.errors import CapacityError
from forklm.kv import CacheShape
from forklm.kv.storage import bytes_per_token

FAMILIES = ["llama_mha", "llama_gqa", "mistral", "qwen2", "gpt2", "gpt_bigcode_mqa"]
SYSTEM = [(7 * i + 3) % 200 + 5 for i in range(23)]  # a 23-token "system prompt"
QUESTIONS = [[11, 12, 13, 14, 15, 16, 17], [30 + i for i in range(16)], [40 + i for i in range(17)]]
PROMPTS = [SYSTEM + QUESTIONS[0], SYSTEM + QUESTIONS[1], SYSTEM + QUESTIONS[0] + [99, 98], SYSTEM,
           SYSTEM + QUESTIONS[2]]


def tokens(outs):
    return [[o.token_ids for o in r.outputs] for r in outs]


def cold(folder, prompts, params):
    """Each prompt alone in a fresh LLM with the prefix cache off."""
    return [tokens(LLM(folder, enable_prefix_caching=False).generate(prompt_token_ids=[p], sampling_params=params))[0]
            for p in prompts]


@pytest.mark.parametrize("family", FAMILIES)
def test_shared_prefixes_in_one_call_and_the_next_equal_cold(hf_models, family):
    folder = str(hf_models[family][1])
    p = SamplingParams(n=3, max_tokens=12, temperature=1.0, top_p=0.9, seed=4, ignore_eos=True)
    llm = LLM(folder)
    first = llm.generate(prompt_token_ids=PROMPTS, sampling_params=p)
    assert tokens(first) == cold(folder, PROMPTS, p)
    again = llm.generate(prompt_token_ids=PROMPTS[::-1], sampling_params=p)  # a later call: all cached
    assert tokens(again) == tokens(first)[::-1]
    assert [r.num_cached_tokens for r in again] == [len(q) for q in PROMPTS[::-1]]


@pytest.mark.parametrize("family", FAMILIES)
def test_chunked_prefill_equals_unchunked(hf_models, family):
    folder = str(hf_models[family][1])
    p = SamplingParams(n=2, max_tokens=10, temperature=0.8, seed=2, ignore_eos=True)
    chunked = LLM(folder, prefill_chunk_tokens=5).generate(prompt_token_ids=PROMPTS, sampling_params=p)
    whole = LLM(folder, enable_prefix_caching=False).generate(prompt_token_ids=PROMPTS, sampling_params=p)
    assert tokens(chunked) == tokens(whole)


@pytest.mark.parametrize("family", FAMILIES)
def test_continuation_reuses_prompt_and_sample(hf_models, family):
    """A chat turn that resends the conversation: prompt + one generated sample + new text."""
    folder = str(hf_models[family][1])
    llm = LLM(folder)
    turn1 = llm.generate(prompt_token_ids=[PROMPTS[0]], sampling_params=SamplingParams(
        n=4, max_tokens=9, temperature=1.0, seed=8, ignore_eos=True))[0]
    reply = turn1.outputs[2].token_ids
    conversation = PROMPTS[0] + reply + [50, 51, 52]
    p = SamplingParams(n=2, max_tokens=8, temperature=1.0, seed=3, ignore_eos=True)
    warm = llm.generate(prompt_token_ids=[conversation], sampling_params=p)[0]
    assert warm.num_cached_tokens == len(PROMPTS[0]) + len(reply) - 1  # the last drawn token has no K/V yet
    assert tokens([warm]) == cold(folder, [conversation], p)


def test_pool_samples_are_cached_as_copies_of_their_own_and_resent_turns_equal_cold(hf_models):
    """Samples decoded in the pool are cached at release by one copy each, not as views: the pool's slots
    are overwritten (here with NaN) and the resent conversation still matches prompt + sample, equal to cold."""
    import torch

    folder = str(hf_models["llama_gqa"][1])
    llm = LLM(folder)
    engine = llm.make_engine(CacheShape(1, 4, 4, 64, 9))
    engine.scheduler.tails = False  # the pool, not the room after the prompt
    engine.add_request("a", PROMPTS[0], SamplingParams(n=4, max_tokens=9, temperature=1.0, seed=8, ignore_eos=True))
    while engine.has_unfinished():
        engine.step()
    reply = engine.pop_output("a").outputs[2].token_ids
    pool = engine.storage.pool.kv
    kept = [n.segment.kv for n in engine.prefix_cache.nodes() if n.segment is not None and n.tokens != PROMPTS[0]]
    assert kept and all(kv.is_contiguous() and kv.untyped_storage().data_ptr() != pool.untyped_storage().data_ptr()
                        for kv in kept)
    pool.fill_(float("nan"))
    conversation = PROMPTS[0] + reply + [50, 51, 52]
    p = SamplingParams(n=2, max_tokens=8, temperature=1.0, seed=3, ignore_eos=True)
    engine.add_request("b", conversation, p)
    while engine.has_unfinished():
        engine.step()
    warm = engine.pop_output("b")
    assert warm.num_cached_tokens == len(PROMPTS[0]) + len(reply) - 1
    assert tokens([warm]) == cold(folder, [conversation], p)


def test_levels_are_read_once_per_step(hf_models):
    """Two questions under one system prompt, n=2 each: the decode plan reads the system prompt once
    for 4 rows and each question once for its 2 rows (3 levels above the samples). (Samples in the pool:
    a request of few samples keeps them after its prompt otherwise, tested below.)"""
    llm = LLM(str(hf_models["llama_gqa"][1]))
    engine = llm.make_engine(CacheShape(4, 8, 4, 64, 8))
    engine.scheduler.tails = False
    p = SamplingParams(n=2, max_tokens=8, temperature=1.0, seed=1, ignore_eos=True)
    engine.add_request("a", SYSTEM + QUESTIONS[0], p)
    engine.step()
    engine.add_request("b", SYSTEM + QUESTIONS[1], p)
    engine.add_request("c", SYSTEM + QUESTIONS[1] + [7], p)
    engine.step()  # "c" waits while "b"'s question is being prefilled, then reuses it
    assert engine.num_waiting == 1
    engine.step()
    plan = engine.scheduler.schedule()[0].decode
    passes = sorted((lv.length, lv.num_rows) for lv in plan.levels)
    assert passes == [(1, 2), (7, 2), (16, 4), (23, 6)]
    # one batched call per depth: the system prompt; both questions (disjoint rows); "c"'s last token
    assert [sorted((lp.length, lp.num_rows) for lp in g.passes) for g in plan.groups] == \
        [[(23, 6)], [(7, 2), (16, 4)], [(1, 2)]]
    assert plan.num_rows == 6
    assert engine.scheduler.running["b"].num_cached_tokens == len(SYSTEM)
    assert engine.scheduler.running["c"].num_cached_tokens == len(SYSTEM) + 16


def test_separate_n1_requests_decode_like_one_request_with_n(hf_models):
    folder = str(hf_models["llama_gqa"][1])
    llm = LLM(folder)
    engine = llm.make_engine(CacheShape(16, 16, 1, 64, 6))
    for i in range(16):
        engine.add_request(str(i), PROMPTS[1], SamplingParams(max_tokens=6, temperature=1.0, seed=i, ignore_eos=True))
    engine.step()  # the first prefills; the others wait for its prefix rather than computing it again
    # the first one's segment has room for its own 6 tokens after the prompt
    assert engine.num_running == 1 and engine.storage.segment_tokens == len(PROMPTS[1]) + 6
    engine.step()
    plan = engine.scheduler.schedule()[0].decode
    # the prompt read once for all 16 rows; the first row's own token after it, a level below
    assert sorted((lv.length, lv.num_rows) for lv in plan.levels) == [(2, 1), (len(PROMPTS[1]), 16)]
    assert [t.token for t in plan.tails] == [0] and plan.pool_tokens.tolist() == list(range(1, 16))
    while engine.has_unfinished():
        engine.step()
    together = [engine.pop_output(str(i)).outputs[0].token_ids for i in range(16)]
    alone = [tokens(LLM(folder, enable_prefix_caching=False).generate(prompt_token_ids=[PROMPTS[1]], sampling_params=
             SamplingParams(max_tokens=6, temperature=1.0, seed=i, ignore_eos=True)))[0][0] for i in range(16)]
    assert together == alone


def test_eviction_under_a_tiny_budget_never_changes_results(hf_models):
    folder = str(hf_models["llama_gqa"][1])
    llm = LLM(folder)
    per_token = bytes_per_token(llm.config, llm.dtype)
    p = SamplingParams(n=2, max_tokens=6, temperature=1.0, seed=5, ignore_eos=True)
    pool = 2 * 6 * per_token
    small = LLM(folder, kv_cache_memory=(pool + 45 * per_token) / 2**30)  # room for one prompt and a little
    outs = [tokens(small.generate(prompt_token_ids=[q], sampling_params=p))[0] for q in PROMPTS + PROMPTS]
    assert outs == cold(folder, PROMPTS + PROMPTS, p)
    engine = small._engine
    assert engine.prefix_cache.evictions > 0
    assert engine.storage.segment_tokens <= engine.storage.budget_tokens
    with pytest.raises(CapacityError):
        small.generate(prompt_token_ids=[list(range(1, 60))], sampling_params=p)
    assert small.generate(prompt_token_ids=[PROMPTS[0]], sampling_params=p)[0].finished  # still serving


def test_no_leak_after_1000_requests_with_random_prefixes(hf_models):
    llm = LLM(str(hf_models["llama_mha"][1]), kv_cache_memory=0.0005)
    engine = llm.make_engine(CacheShape(8, 12, 3, 40, 4))
    rng = random.Random(0)
    stems = [[rng.randrange(5, 200) for _ in range(rng.randrange(1, 20))] for _ in range(12)]
    done = 0
    for wave in range(50):
        for i in range(20):
            prompt = list(rng.choice(stems)) + [rng.randrange(5, 200) for _ in range(rng.randrange(0, 12))]
            p = SamplingParams(n=rng.randrange(1, 4), max_tokens=rng.randrange(1, 5), temperature=1.0, seed=i)
            engine.add_request(f"{wave}-{i}", prompt[:40], p)
        if wave % 7 == 3:
            engine.step()
            engine.abort(f"{wave}-0")  # aborted mid-way
        while engine.has_unfinished():
            engine.step()
        for i in range(20):
            done += engine.pop_output(f"{wave}-{i}") is not None
    assert done >= 1000 - 8
    cache, storage = engine.prefix_cache, engine.storage
    assert cache.total_refs() == 0 and storage.rows_in_use == 0
    # every segment is a cached node (with the room its last samples left after it), nothing else
    assert storage.segment_tokens == cache.cached_tokens() + cache.room_tokens()
    assert cache.hit_tokens > 0
    cache.clear()
    assert storage.segment_tokens == 0 and not cache.nodes()


def test_a_short_prompt_is_not_held_behind_a_long_prefill(hf_models):
    """Chunked prefill, 8 tokens a step: a 3-token prompt sent while a 60-token prompt prefills gets
    its first token in the next step (shortest rest first), and both give the cold tokens."""
    folder = str(hf_models["llama_gqa"][1])
    long_prompt, short_prompt = [(5 * i + 1) % 200 + 3 for i in range(60)], [21, 22, 23]
    p = SamplingParams(n=2, max_tokens=3, temperature=1.0, seed=4, ignore_eos=True)
    engine = LLM(folder, prefill_chunk_tokens=8).make_engine(CacheShape(2, 4, 2, 64, 3))
    engine.add_request("long", long_prompt, p)
    engine.step()
    engine.add_request("short", short_prompt, p)
    firsts = {d.request_id for d in engine.step()}
    assert firsts == {"short"}
    assert engine.scheduler.running["long"].prefilled == 8 + 5  # the rest of the step's budget
    while engine.has_unfinished():
        engine.step()
    got = [[o.token_ids for o in engine.pop_output(r).outputs] for r in ("long", "short")]
    assert got == cold(folder, [long_prompt, short_prompt], p)


def _run(engine, requests, before=None):
    """Add (id, prompt, params) requests to `engine`, step it to the end; returns id -> token ids. `before`:
    called once after the first two steps (the first request then decodes)."""
    for rid, prompt, params in requests:
        engine.add_request(rid, prompt, params)
    engine.step()
    engine.step()
    if before is not None:
        before()
    while engine.has_unfinished():
        engine.step()
    return {rid: engine.pop_output(rid).outputs[0] for rid, _, _ in requests}


def test_one_sample_keeps_its_kv_after_its_prompt(hf_models):
    """n=1 on a prompt it prefills: the prompt's segment has room for the sample's tokens and decode reads
    one level (no pool pass). Same tokens and log probs as the same request with its K/V in the pool; at
    the end the sample is cached as a continuation and the room stays with the prompt."""
    folder = str(hf_models["llama_gqa"][1])
    llm = LLM(folder)
    p = SamplingParams(max_tokens=9, temperature=1.0, seed=11, logprobs=0, ignore_eos=True)
    pool_engine = llm.make_engine(CacheShape(2, 2, 1, 64, 9))
    pool_engine.scheduler.tails = False
    ref = _run(pool_engine, [("a", PROMPTS[1], p)])["a"]
    engine = llm.make_engine(CacheShape(2, 2, 1, 64, 9))
    plans = []
    out = _run(engine, [("a", PROMPTS[1], p)], before=lambda: plans.append(engine.scheduler.schedule()[0].decode))["a"]
    assert out.token_ids == ref.token_ids
    assert out.cumulative_logprob == pytest.approx(ref.cumulative_logprob, abs=1e-4)
    plan = plans[0]
    assert not plan.pool_pass and plan.tails and [(lv.length, lv.num_rows) for lv in plan.levels] == \
        [(len(PROMPTS[1]) + 2, 1)]
    L, t = len(PROMPTS[1]), 8  # the last drawn token has no K/V
    nodes = engine.prefix_cache.nodes()
    # the prompt with its room (max_tokens slots), and the sample after it
    assert sorted((len(n.tokens), n.segment.capacity) for n in nodes) == [(t, t), (L, L + 9)]
    assert engine.storage.segment_tokens == L + 9 + t and engine.prefix_cache.room_tokens() == 9
    again = [50, 51]
    follow = PROMPTS[1] + out.token_ids[:5] + again  # a later turn: prompt + sample + new text, cached up to it
    cont = _run(engine, [("b", follow, p)])
    assert engine.scheduler.running == {} and cont["b"].token_ids == cold(folder, [follow], p)[0][0]


def test_a_repeated_prompt_keeps_the_sample_after_its_cached_prompt(hf_models):
    """n=1 on a prompt already cached (its logits kept, or not: then the last position is recomputed): the
    room the first request left after the node's K/V is used again, with no copy, and decode reads one
    level. Two n=1 requests on it at once: the first follows the prompt there, the second decodes from the
    pool. Tokens as computed cold; afterwards only the prompt's node keeps room, the same segment."""
    folder = str(hf_models["llama_gqa"][1])
    llm = LLM(folder)
    p = SamplingParams(max_tokens=7, temperature=1.0, seed=3, ignore_eos=True)
    q = SamplingParams(max_tokens=7, temperature=1.0, seed=4, ignore_eos=True)
    want_p, want_q = cold(folder, [PROMPTS[4]], p)[0][0], cold(folder, [PROMPTS[4]], q)[0][0]
    engine = llm.make_engine(CacheShape(4, 4, 1, 64, 7))
    assert _run(engine, [("a", PROMPTS[4], p)])["a"].token_ids == want_p
    L = len(PROMPTS[4])
    segment = engine.prefix_cache.match(PROMPTS[4]).node.segment
    assert segment.capacity == L + 7  # the room stays with the prompt
    for recompute in (False, True):
        if recompute:  # the prompt's node without its logits: its last position is computed again
            engine.prefix_cache.match(PROMPTS[4]).node.logits = None
        seen, plans = [], []

        def look():
            seen.append({r: engine.scheduler.running[r].tail for r in ("b", "c")})
            plans.append(engine.scheduler.schedule()[0].decode)

        out = _run(engine, [("b", PROMPTS[4], p), ("c", PROMPTS[4], q)], before=look)
        assert out["b"].token_ids == want_p and out["c"].token_ids == want_q
        assert seen == [{"b": True, "c": False}]
        assert plans[0].pool_pass and len(plans[0].tails) == 1
        node = engine.prefix_cache.match(PROMPTS[4]).node
        assert node.segment is segment and len(node.tokens) == L  # no new segment, no copy of the prompt
        assert all(n.segment.capacity == len(n.tokens) for n in engine.prefix_cache.nodes() if n is not node)
        assert engine.prefix_cache.room_tokens() == 7 and engine.prefix_cache.total_refs() == 0
    plans = []
    out = _run(engine, [("d", PROMPTS[4], p)], before=lambda: plans.append(engine.scheduler.schedule()[0].decode))
    assert out["d"].token_ids == want_p
    assert not plans[0].pool_pass and [(lv.length, lv.num_rows) for lv in plans[0].levels] == \
        [(len(PROMPTS[4]) + 2, 1)]


def test_a_tail_request_survives_a_split_of_its_prompt_and_an_abort(hf_models):
    """A second prompt sharing the start of a decoding n=1 request's prompt splits that node mid-decode: its
    tokens are unchanged. An aborted one leaves its prompt's K/V and the room after them, which the next
    request on that prompt fills again."""
    folder = str(hf_models["llama_gqa"][1])
    llm = LLM(folder)
    p = SamplingParams(max_tokens=8, temperature=1.0, seed=2, ignore_eos=True)
    engine = llm.make_engine(CacheShape(4, 4, 1, 64, 8))
    other = SYSTEM + QUESTIONS[2]
    out = _run(engine, [("a", PROMPTS[1], p)], before=lambda: engine.add_request("b", other, p))
    assert out["a"].token_ids == cold(folder, [PROMPTS[1]], p)[0][0]
    assert engine.pop_output("b").outputs[0].token_ids == cold(folder, [other], p)[0][0]
    engine = llm.make_engine(CacheShape(4, 4, 1, 64, 8))
    engine.add_request("c", PROMPTS[4], p)
    engine.step()
    engine.step()
    assert engine.scheduler.running["c"].tail
    engine.abort("c")
    assert engine.storage.segment_tokens == len(PROMPTS[4]) + 8 and engine.prefix_cache.total_refs() == 0
    seen = []
    out = _run(engine, [("d", PROMPTS[4], p)], before=lambda: seen.append(engine.scheduler.running["d"].tail))
    assert seen == [True] and out["d"].token_ids == cold(folder, [PROMPTS[4]], p)[0][0]


def test_no_room_after_the_prompt_decodes_from_the_pool(hf_models):
    """A budget that holds the prompt but not the sample's tokens after it: the row decodes from the pool."""
    folder = str(hf_models["llama_gqa"][1])
    llm = LLM(folder)
    per_token = bytes_per_token(llm.config, llm.dtype)
    p = SamplingParams(max_tokens=6, temperature=1.0, seed=5, ignore_eos=True)
    small = LLM(folder, kv_cache_memory=(6 * per_token + (len(PROMPTS[1]) + 2) * per_token) / 2**30)
    engine = small.make_engine(CacheShape(1, 1, 1, len(PROMPTS[1]), 6), resident_prompts=1)
    seen = []
    out = _run(engine, [("a", PROMPTS[1], p)], before=lambda: seen.append(engine.scheduler.running["a"].tail))
    assert seen == [False] and out["a"].token_ids == cold(folder, [PROMPTS[1]], p)[0][0]


def test_idle_room_after_a_prompt_is_given_back_before_anything_is_evicted(hf_models):
    """The room a finished sample left after its prompt counts against the budget; a prompt that needs
    that space gets it by cutting the room back, and every cached token stays cached."""
    folder = str(hf_models["llama_gqa"][1])
    llm = LLM(folder)
    per_token = bytes_per_token(llm.config, llm.dtype)
    p = SamplingParams(max_tokens=6, temperature=1.0, seed=5, ignore_eos=True)
    other = [200 + i % 10 for i in range(20)]  # starts unlike PROMPTS[1]
    L = len(PROMPTS[1])
    segments = L + 6 + 5 + len(other) - 4  # the prompt, its room, the sample; then `other` lacks 4 slots
    small = LLM(folder, kv_cache_memory=(6 * per_token + segments * per_token) / 2**30)
    engine = small.make_engine(CacheShape(1, 1, 1, L + 5, 6), resident_prompts=1)
    assert engine.storage.budget_tokens == segments
    first = _run(engine, [("a", PROMPTS[1], p)])["a"]
    cache = engine.prefix_cache
    assert cache.cached_tokens() == L + 5 and cache.room_tokens() == 6 and engine.storage.free_tokens == 20 - 4
    one = SamplingParams(max_tokens=1, temperature=1.0, seed=5, ignore_eos=True)
    out = _run(engine, [("b", other, one)])["b"]
    assert out.token_ids == cold(folder, [other], one)[0][0]
    assert cache.evictions == 0 and cache.room_tokens() == 0  # the room went, nothing cached did
    assert cache.cached_tokens() == L + 5 + len(other)
    assert engine.storage.segment_tokens == cache.cached_tokens()
    again = _run(engine, [("c", PROMPTS[1] + first.token_ids[:5], one)])["c"]  # prompt and sample still cached
    assert engine.prefix_cache.hit_tokens >= L + 5 and again.token_ids == \
        cold(folder, [PROMPTS[1] + first.token_ids[:5]], one)[0][0]


@pytest.mark.parametrize("family", ["llama_gqa", "gpt_bigcode_mqa"])
def test_a_few_samples_keep_their_kv_interleaved_after_their_prompt(hf_models, family):
    """n=4, few new tokens: the prompt's segment has room for every sample's tokens, interleaved, and
    decode reads one level (no pool pass, one masked call). One sample stops early (its turns then stay
    unwritten, masked). Tokens and log probs as with the samples in the pool; at the end each sample is
    cached as a continuation of the prompt, and the room stays with it: the same request again uses it
    (zeroed) and draws the same tokens. Many samples, or many new tokens, decode from the pool."""
    folder = str(hf_models[family][1])
    llm = LLM(folder)
    p = SamplingParams(n=4, max_tokens=9, temperature=1.0, seed=7, logprobs=0, ignore_eos=True)
    pool_engine = llm.make_engine(CacheShape(2, 4, 4, 64, 9))
    pool_engine.scheduler.tails = False
    free = _run(pool_engine, [("a", PROMPTS[1], p)])["a"]
    stop = [free.token_ids[2]]  # sample 0 ends at its third token or earlier
    p = SamplingParams(n=4, max_tokens=9, temperature=1.0, seed=7, logprobs=0, ignore_eos=True, stop_token_ids=stop)
    pool_engine = llm.make_engine(CacheShape(2, 4, 4, 64, 9))
    pool_engine.scheduler.tails = False
    pool_engine.add_request("a", PROMPTS[1], p)
    while pool_engine.has_unfinished():
        pool_engine.step()
    ref = pool_engine.pop_output("a").outputs
    engine = llm.make_engine(CacheShape(2, 4, 4, 64, 9))
    plans = []
    engine.add_request("a", PROMPTS[1], p)
    while engine.has_unfinished():
        if engine.scheduler.running and engine.scheduler.running["a"].samples:
            plans.append(engine.scheduler.schedule()[0].decode)
        engine.step()
    out = engine.pop_output("a").outputs
    assert [o.token_ids for o in out] == [o.token_ids for o in ref]
    assert [o.cumulative_logprob for o in out] == pytest.approx([o.cumulative_logprob for o in ref], abs=1e-4)
    lengths = sorted(len(o.token_ids) for o in out)
    assert lengths[0] < 9 == lengths[-1]  # some sample stopped early, another ran to the end
    L = len(PROMPTS[1])
    first = plans[0]
    assert not first.pool_pass and len(first.tails) == 4 and len(first.groups) == 1
    assert [(lv.length, lv.num_rows, lv.interleave.stride) for lv in first.levels] == [(L + 4, 4, 4)]
    assert all(len(pl.tails) == pl.num_rows for pl in plans if pl is not None)
    assert engine.storage.pool.kv.abs().sum() == 0  # nothing went to the pool
    for o in out:  # each sample cached after the prompt: the prompt and its tokens but the last are all reused
        if len(o.token_ids) > 1:
            m = engine.prefix_cache.match(PROMPTS[1] + o.token_ids[:-1])
            assert m.length + (m.partial[1] if m.partial else 0) == L + len(o.token_ids) - 1
    node = engine.prefix_cache.match(PROMPTS[1]).node
    segment = node.segment
    assert segment.capacity == L + 4 * 9 and engine.prefix_cache.room_tokens() == 4 * 9
    assert engine.prefix_cache.total_refs() == 0
    engine.add_request("r", PROMPTS[1], p)
    engine.step()
    assert engine.scheduler.running["r"].tail and node.segment is segment  # the room used again, no copy
    while engine.has_unfinished():
        engine.step()
    assert [o.token_ids for o in engine.pop_output("r").outputs] == [o.token_ids for o in out]
    one = SamplingParams(max_tokens=6, temperature=1.0, seed=3, logprobs=0, ignore_eos=True)
    for j in (1, 3):  # a later turn on sample j (its cached K/V taken from every 4th slot) as computed cold
        follow = PROMPTS[1] + out[j].token_ids[:5] + [50, 51]
        cont = _run(engine, [("b", follow, one)])["b"]
        want = LLM(folder, enable_prefix_caching=False).generate(prompt_token_ids=[follow], sampling_params=one)
        assert cont.token_ids == want[0].outputs[0].token_ids
        assert cont.cumulative_logprob == pytest.approx(want[0].outputs[0].cumulative_logprob, abs=1e-4)
    for n, max_tokens in ((16, 32), (2, 1100)):  # n * n * max_tokens above scheduler.INTERLEAVE_MAX_WORK
        q = SamplingParams(n=n, max_tokens=max_tokens, temperature=1.0, seed=1)
        assert not LLM(folder).make_engine(CacheShape(1, 16, 16, 64, 1100)).scheduler._wants_tail(q)
