"""Speculative decoding (engine/speculative) vs plain decoding: the same tokens, log probs, finish
reasons and texts, for n = 1, 4, 16, greedy and sampled with processors, both proposers, several
prompts per call; EOS, stop tokens, stop strings and max_tokens falling inside drafted runs."""

from __future__ import annotations

import pytest
import torch

from forklm import LLM, SamplingParams

NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_min": 1, "adaptive": False}
# prompts that repeat themselves, so that prompt lookup finds drafts; lengths odd and ragged
PROMPTS = [[5, 9, 13, 17, 5, 9, 13, 17, 5, 9, 13], [40, 41, 42, 43, 44, 40, 41, 42, 43, 44, 40, 41, 2, 3, 40, 41, 42],
           list(range(60, 90)) + list(range(60, 75))]
SAMPLED = dict(temperature=0.8, top_p=0.9, top_k=50, repetition_penalty=1.15, presence_penalty=0.2,
               frequency_penalty=0.1, min_p=0.02, logprobs=3)


def same(plain, spec, tol=1e-4):
    """Two calls' outputs agree token for token, log prob for log prob (float32 tolerance)."""
    assert len(plain) == len(spec)
    for a, b in zip(plain, spec):
        assert len(a.outputs) == len(b.outputs)
        for x, y in zip(a.outputs, b.outputs):
            assert x.token_ids == y.token_ids
            assert (x.finish_reason, x.stop_reason, x.text) == (y.finish_reason, y.stop_reason, y.text)
            assert abs(x.cumulative_logprob - y.cumulative_logprob) <= tol * max(1, len(x.token_ids))
            if x.logprobs is not None:
                assert len(x.logprobs) == len(y.logprobs) == len(x.token_ids)
                for ex, ey in zip(x.logprobs, y.logprobs):
                    assert ex.keys() == ey.keys()
                    for t in ex:
                        assert ex[t].rank == ey[t].rank
                        assert ex[t].logprob == ey[t].logprob or abs(ex[t].logprob - ey[t].logprob) <= tol


def generate(llm, prompts, params):
    return llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)


def accepted(outs) -> int:
    return sum(o.metrics["num_accepted_tokens"] for o in outs)


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    """A tiny random GQA Llama with a sharpened LM head: its samples repeat themselves often enough at
    temperature 0.8 for drafts to be kept (a plain random model's are near uniform over 211 tokens)."""
    from conftest import make_hf_model

    model = make_hf_model("llama_gqa", seed=3)
    model.config.tie_word_embeddings = False
    with torch.no_grad():
        model.lm_head.weight = torch.nn.Parameter(model.model.embed_tokens.weight * 6.0)
    folder = tmp_path_factory.mktemp("peaked_llama")
    model.save_pretrained(folder)
    return str(folder)


@pytest.mark.parametrize("n", [1, 4, 16])
@pytest.mark.parametrize("sampled", [False, True], ids=["greedy", "sampled"])
def test_ngram_equals_plain(llama, n, sampled):
    params = SamplingParams(n=n, max_tokens=24, seed=11, **(SAMPLED if sampled else dict(temperature=0.0, logprobs=2)))
    plain = generate(LLM(llama), PROMPTS, params)
    spec = generate(LLM(llama, speculative_config=NGRAM), PROMPTS, params)
    same(plain, spec)
    assert all(o.metrics["num_verify_steps"] > 0 for o in spec)
    assert accepted(spec) > 0  # drafts were kept, so multi-token steps produced tokens


@pytest.mark.parametrize("family", ["llama_mha", "qwen2", "gpt2", "gpt_bigcode_mqa"])
def test_ngram_equals_plain_in_every_family(hf_models, family):
    folder = str(hf_models[family][1])
    params = [SamplingParams(n=3, max_tokens=20, seed=5, **SAMPLED), SamplingParams(temperature=0, max_tokens=17),
              SamplingParams(n=2, best_of=4, temperature=1.0, max_tokens=9, seed=2)]
    plain = generate(LLM(folder), PROMPTS, params)
    spec = generate(LLM(folder, speculative_config=dict(NGRAM, sibling_lookup=True)), PROMPTS, params)
    same(plain, spec)
    assert accepted(spec) > 0


def test_replicated_layout_and_prefix_cache_off(llama):
    params = SamplingParams(n=4, max_tokens=20, seed=3, **SAMPLED)
    plain = generate(LLM(llama, kv_layout="replicated"), PROMPTS, params)
    for kwargs in (dict(kv_layout="replicated"), dict(enable_prefix_caching=False)):
        same(plain, generate(LLM(llama, speculative_config=NGRAM, **kwargs), PROMPTS, params))


@pytest.mark.parametrize("max_tokens", [1, 2, 3, 7, 13])
def test_max_tokens_inside_a_drafted_run(llama, max_tokens):
    """A draft model equal to the target keeps every draft (greedy), so each step runs k + 1 tokens
    and max_tokens falls inside a run; rows never draft past what max_tokens leaves."""
    spec = LLM(llama, speculative_config={"method": "draft_model", "model": llama, "num_speculative_tokens": 4,
                                          "adaptive": False})
    params = SamplingParams(n=2, temperature=0.0, max_tokens=max_tokens, logprobs=1)
    plain = generate(LLM(llama), PROMPTS, params)
    outs = generate(spec, PROMPTS, params)
    same(plain, outs)
    assert all(len(c.token_ids) == max_tokens and c.finish_reason == "length" for o in outs for c in o.outputs)
    if max_tokens >= 7:  # (the engine's first decode step is plain: it measures the plain step's time)
        assert accepted(outs) > 0


def test_eos_and_stop_tokens_inside_a_drafted_run(llama):
    """A draft model equal to the target keeps whole runs; tokens the plain run reaches mid-way are made
    the EOS / a stop token, so samples end inside a run, where plain decoding ends them."""
    plain_llm = LLM(llama)
    spec = LLM(llama, speculative_config={"method": "draft_model", "model": llama, "num_speculative_tokens": 4,
                                          "adaptive": False})
    greedy = SamplingParams(temperature=0.0, max_tokens=20, logprobs=1)
    sampled = dict(n=4, temperature=0.7, max_tokens=20, seed=9)
    eos = generate(plain_llm, PROMPTS, greedy)[0].outputs[0].token_ids[9]
    stop = generate(plain_llm, PROMPTS, SamplingParams(**sampled))[1].outputs[2].token_ids[8]
    for llm in (plain_llm, spec):
        llm.eos_token_ids = [eos]
    for p in (greedy, SamplingParams(**sampled, stop_token_ids=[stop], min_tokens=3)):
        plain, outs = generate(plain_llm, PROMPTS, p), generate(spec, PROMPTS, p)
        same(plain, outs)
        assert accepted(outs) > 0
        assert any(c.finish_reason == "stop" and len(c.token_ids) < 20 for o in outs for c in o.outputs)
    assert outs[1].outputs[2].stop_reason == stop or outs[1].outputs[2].finish_reason == "stop"


def test_draft_model_that_disagrees_equals_plain(hf_models, llama):
    """Another random model as the draft: most drafts are rejected, so the caches roll back often."""
    other = str(hf_models["llama_mha"][1])
    spec = LLM(llama, speculative_config={"method": "draft_model", "model": other, "num_speculative_tokens": 3,
                                          "adaptive": False})
    for params in (SamplingParams(n=16, max_tokens=24, seed=4, **SAMPLED),
                   SamplingParams(n=4, temperature=0.0, max_tokens=30, logprobs=5)):
        plain = generate(LLM(llama), PROMPTS, params)
        outs = generate(spec, PROMPTS, params)
        same(plain, outs)
        assert sum(o.metrics["num_draft_tokens"] for o in outs) > accepted(outs)


def test_rollback_leaves_the_cache_as_if_never_written(hf_models, llama):
    """After generation each sample's K/V is cached as a continuation of its prompt: with rejected
    drafts along the way, it equals plain decoding's K/V."""
    other = str(hf_models["llama_mha"][1])
    params = SamplingParams(n=4, max_tokens=20, seed=8, **SAMPLED)
    plain = LLM(llama)
    spec = LLM(llama, speculative_config={"method": "draft_model", "model": other, "num_speculative_tokens": 4,
                                          "adaptive": False})
    outs = generate(spec, PROMPTS[:1], params)
    same(generate(plain, PROMPTS[:1], params), outs)
    assert sum(o.metrics["num_draft_tokens"] for o in outs) > accepted(outs)  # some drafts were rejected

    def continuations(llm):
        root = llm._engine.prefix_cache.root
        prompt = next(iter(root.children.values()))
        return {tuple(c.tokens): c.segment.kv[:, :, :, : len(c.tokens)] for c in prompt.children.values()}

    a, b = continuations(plain), continuations(spec)
    assert a.keys() == b.keys() and len(a) >= 1
    for key in a:
        assert torch.allclose(a[key], b[key], atol=1e-4, rtol=1e-4)


def test_beam_search_runs_plainly_beside_drafting_requests(llama):
    params = [SamplingParams(n=2, beam_width=3, max_tokens=10, temperature=0.0),
              SamplingParams(n=4, temperature=0.0, max_tokens=16), SamplingParams(n=3, max_tokens=16, seed=1, **SAMPLED)]
    plain = generate(LLM(llama), PROMPTS, params)
    spec = generate(LLM(llama, speculative_config=NGRAM), PROMPTS, params)
    same(plain, spec)
    assert spec[0].metrics["num_draft_tokens"] == 0 and accepted(spec[1:]) > 0


def test_text_and_stop_strings_inside_drafted_runs(smollm_path):
    """The embedded model asked to edit code repeats most of it: prompt lookup drafts long runs, and
    stop strings cut them where plain decoding stops."""
    code = "def area(width, height):\n    return width * height\n\ndef perimeter(width, height):\n    return 2 * (width + height)\n"
    msgs = [{"role": "user", "content": "Add a docstring to each function below. Reply with the code only.\n\n" + code}]
    plain_llm = LLM(smollm_path, dtype="float32")  # exact: the float32 tolerance of `same`
    spec = LLM(smollm_path, dtype="float32",
               speculative_config={"method": "ngram", "num_speculative_tokens": 5, "adaptive": False})
    ids = [plain_llm.encode_chat(msgs)]
    base = generate(plain_llm, ids, SamplingParams(temperature=0.0, max_tokens=40))[0].outputs[0].text
    assert len(base) > 40
    stops = [base[30:33], base[38:40]]  # strings the greedy text holds mid-way
    for p in (SamplingParams(temperature=0.0, max_tokens=40, stop=stops, logprobs=1),
              SamplingParams(temperature=0.0, max_tokens=40, stop=stops[:1], include_stop_str_in_output=True),
              SamplingParams(n=4, temperature=0.8, top_p=0.95, max_tokens=30, seed=21, stop=["\n\n"])):
        a, b = generate(plain_llm, ids, p), generate(spec, ids, p)
        same(a, b)
        assert accepted(b) > 0
        if p.n == 1:
            assert b[0].outputs[0].finish_reason == "stop" and b[0].outputs[0].stop_reason in stops


def test_streaming_deltas_carry_every_kept_token(llama):
    spec = LLM(llama, speculative_config=NGRAM)
    params = SamplingParams(n=2, temperature=0.0, max_tokens=20, logprobs=1)
    streamed: dict[tuple[int, int], list[int]] = {}
    for i, d in spec.stream(prompt_token_ids=PROMPTS, sampling_params=params):
        assert d.logprobs is not None and len(d.logprobs) == len(d.token_ids)
        streamed.setdefault((i, d.index), []).extend(d.token_ids)
    plain = generate(LLM(llama), PROMPTS, params)
    assert {(i, c.index): c.token_ids for i, o in enumerate(plain) for c in o.outputs} == streamed
    assert max(len(v) for v in streamed.values()) == 20


def test_adaptive_switch_on_changes_no_output(hf_models, llama):
    """With the switch on (the default), requests probe, pause and resume drafting as the measured
    step times say; whatever it decides, the outputs are plain decoding's."""
    other = str(hf_models["llama_mha"][1])
    params = [SamplingParams(n=4, max_tokens=40, seed=6, **SAMPLED), SamplingParams(temperature=0.0, max_tokens=40),
              SamplingParams(n=2, temperature=0.0, max_tokens=30)]
    plain = generate(LLM(llama), PROMPTS, params)
    for cfg in ({"method": "draft_model", "model": other, "num_speculative_tokens": 3},
                {"method": "ngram", "num_speculative_tokens": 3}):
        spec = LLM(llama, speculative_config=cfg)
        for _ in range(2):  # the second call starts with the costs the first one measured
            same(plain, generate(spec, PROMPTS, params))
        assert spec._engine.switch.cost_ratio is not None


def test_an_aborted_stream_leaves_nothing_behind(hf_models, llama):
    """Stopping a stream mid-way aborts its requests: the draft model's segments and rows and the
    requests' speculation state are released, and the next call equals plain decoding."""
    spec = LLM(llama, speculative_config={"method": "draft_model", "model": str(hf_models["llama_mha"][1]),
                                          "num_speculative_tokens": 3, "adaptive": False})
    params = SamplingParams(n=4, temperature=0.0, max_tokens=20)
    stream = spec.stream(prompt_token_ids=PROMPTS, sampling_params=params)
    for _ in range(5):
        next(stream)
    stream.close()
    engine = spec._engine
    assert not engine.has_unfinished() and not engine._spec
    assert not engine._proposer._prompts and engine._proposer.storage.segment_tokens == 0
    same(generate(LLM(llama), PROMPTS, params), generate(spec, PROMPTS, params))
