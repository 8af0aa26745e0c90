"""The engine: bifurcated vs replicated, compiled vs eager, batches of prompts with their own n,
requests joining mid-run, per-sample stopping, and the errors raised before any work."""

import math

import pytest
import torch

from forklm import LLM, SamplingParams
from forklm.errors import CapacityError, ContextLengthError, InvalidParameterError, TokenizerError
from forklm.kv import CacheShape

PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12] * 7, [3]]


def tokens(outs):
    return [[o.token_ids for o in r.outputs] for r in outs]


@pytest.fixture(scope="module")
def folder(hf_models):
    return str(hf_models["llama_gqa"][1])


@pytest.mark.parametrize("family", ["llama_mha", "llama_gqa", "qwen2", "gpt2", "gpt_bigcode_mqa"])
def test_bifurcated_equals_replicated(hf_models, family):
    folder = str(hf_models[family][1])
    p = SamplingParams(n=8, max_tokens=32, temperature=1.0, top_p=0.95, seed=7, ignore_eos=True)
    bif = LLM(folder, kv_layout="bifurcated").generate(prompt_token_ids=PROMPTS, sampling_params=p)
    rep = LLM(folder, kv_layout="replicated").generate(prompt_token_ids=PROMPTS, sampling_params=p)
    assert tokens(bif) == tokens(rep)
    assert all(len(t) == 32 for r in tokens(bif) for t in r)
    assert len({tuple(t) for t in tokens(bif)[0]}) > 1  # samples differ


def test_compiled_decode_equals_eager(folder):
    from torch._dynamo.utils import counters

    # (a fixed thread count: each count the engine switches to is another graph, as inductor's kernels bake it in)
    eager_llm, compiled_llm = LLM(folder), LLM(folder, compile=True, adaptive_threads=False)

    def both(prompts, params):
        compiled = compiled_llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
        assert tokens(compiled) == tokens(eager_llm.generate(prompt_token_ids=prompts, sampling_params=params,
                                                             use_tqdm=False))

    # 8 rows, one row (a graph of its own: torch specializes sizes of 1), then 3 rows: a second size above
    # one makes the graphs dynamic in the batch
    both(PROMPTS[:2], SamplingParams(n=4, max_tokens=12, temperature=1.0, seed=3, ignore_eos=True))
    both(PROMPTS[2:3], SamplingParams(n=1, max_tokens=6, temperature=0.9, seed=4, ignore_eos=True))
    both(PROMPTS[2:3], SamplingParams(n=3, max_tokens=4, temperature=0.9, seed=7, ignore_eos=True))
    graphs = counters["stats"]["unique_graphs"]
    # other batch sizes (7 rows, samples finishing early, new prompt lengths, top-k) compile nothing more:
    # the batch follows the live rows, not a padded engine shape
    p2 = [SamplingParams(n=3, max_tokens=10, temperature=0.7, seed=5, ignore_eos=True),
          SamplingParams(n=4, max_tokens=9, temperature=1.0, top_k=20, seed=6, ignore_eos=True)]
    both([PROMPTS[1][:19], PROMPTS[0]], p2)
    both([PROMPTS[0][:7]], SamplingParams(n=6, max_tokens=5, temperature=1.0, seed=8, min_tokens=0, ignore_eos=True))
    assert counters["stats"]["unique_graphs"] == graphs


WARM_CHILD = r"""
import json, sys
import torch
from torch._dynamo.utils import counters
from forklm import LLM, SamplingParams
from forklm.kv import CacheShape
torch.set_num_threads(2)
llm = LLM(sys.argv[1], compile=True)
engine = llm.make_engine(CacheShape(4, 8, 8, 64, 48))
engine.warm_up()
warm = {"graphs": counters["stats"]["unique_graphs"], "probes": engine.threads.probes,
        "cached": engine.prefix_cache.cached_tokens(), "hits": engine.prefix_cache.hit_tokens}
greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
jobs = [[(1, greedy)], [(2, SamplingParams(n=5, max_tokens=40, temperature=0.9, seed=1, ignore_eos=True)), (3, greedy)],
        [(4, SamplingParams(n=3, max_tokens=30, temperature=1.0, top_k=7, seed=2, ignore_eos=True))], [(5, greedy)]]
out = {}
for batch in jobs:
    for i, p in batch:
        engine.add_request(str(i), [5 + i, 6, 7, 8, 9][: 2 + i], p)
    while engine.has_unfinished():
        engine.step()
    for i, _ in batch:
        out[str(i)] = [o.token_ids for o in engine.pop_output(str(i)).outputs]
print(json.dumps({"warm": warm, "graphs": counters["stats"]["unique_graphs"], "probes": engine.threads.probes,
                  "fallbacks": counters["stats"].get("recompile_limit", 0), "tokens": out}))
"""


def test_a_warmed_up_compiled_engine_compiles_nothing_while_it_serves(folder):
    """`Engine.warm_up` (what the server runs before serving): afterwards one row, several rows, greedy,
    sampled and mixed batches, and the thread governor's probes at one thread fewer compile no graph
    (a probe that compiled would stall every running request); tokens as an eager engine's; nothing is
    left in the prefix cache. In a fresh process: dynamo's graphs and recompile limit are per process."""
    import json
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-c", WARM_CHILD, folder], capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    res = json.loads(done.stdout.strip().splitlines()[-1])
    assert res["warm"]["graphs"] > 0 and res["warm"]["probes"] == 0
    assert res["warm"]["cached"] == 0 and res["warm"]["hits"] == 0
    assert res["probes"] >= 1 and res["graphs"] == res["warm"]["graphs"], res
    eager = LLM(folder).make_engine(CacheShape(4, 8, 8, 64, 48))
    greedy = SamplingParams(max_tokens=40, temperature=0.0, ignore_eos=True)
    for i, p in [(1, greedy), (2, SamplingParams(n=5, max_tokens=40, temperature=0.9, seed=1, ignore_eos=True)),
                 (3, greedy), (4, SamplingParams(n=3, max_tokens=30, temperature=1.0, top_k=7, seed=2, ignore_eos=True))]:
        eager.add_request(str(i), [5 + i, 6, 7, 8, 9][: 2 + i], p)
        while eager.has_unfinished():
            eager.step()
        assert [o.token_ids for o in eager.pop_output(str(i)).outputs] == res["tokens"][str(i)]


def test_warm_up_runs_on_an_idle_engine_and_leaves_nothing_behind(folder):
    engine = LLM(folder).make_engine(CacheShape(2, 4, 4, 32, 8))
    engine.warm_up()
    assert not engine.has_unfinished() and engine.prefix_cache.cached_tokens() == 0
    assert engine.storage.rows_in_use == 0 and engine.prefix_cache.hit_tokens == 0
    engine.add_request("a", [1, 2, 3], SamplingParams(max_tokens=2))
    with pytest.raises(RuntimeError, match="idle"):
        engine.warm_up()


def test_each_prompt_has_its_own_n_and_params(folder):
    llm = LLM(folder)
    params = [SamplingParams(n=1, max_tokens=5, temperature=0, ignore_eos=True),
              SamplingParams(n=6, max_tokens=9, seed=1, ignore_eos=True),
              SamplingParams(n=3, max_tokens=3, seed=2, top_k=5, ignore_eos=True)]
    outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=params)
    assert [len(r.outputs) for r in outs] == [1, 6, 3]
    assert [len(r.outputs[0].token_ids) for r in outs] == [5, 9, 3]
    # each request alone gives the same samples (seeded streams do not depend on the batch)
    for prompt, p, out in zip(PROMPTS, params, outs):
        alone = llm.generate(prompt_token_ids=[prompt], sampling_params=p)[0]
        assert [o.token_ids for o in alone.outputs] == [o.token_ids for o in out.outputs]


def test_finished_samples_do_not_change_the_others(folder):
    llm = LLM(folder)
    p = SamplingParams(n=8, max_tokens=24, temperature=1.0, seed=11, ignore_eos=True)
    free = tokens(llm.generate(prompt_token_ids=PROMPTS[:2], sampling_params=p))
    eos = free[0][0][3]  # a token that ends some samples early
    llm.eos_token_ids = [eos]
    stopped = llm.generate(prompt_token_ids=PROMPTS[:2],
                           sampling_params=SamplingParams(n=8, max_tokens=24, temperature=1.0, seed=11))
    n_stopped = 0
    for r_free, r_stop in zip(free, stopped):
        for f, o in zip(r_free, r_stop.outputs):
            if eos in f:
                cut = f.index(eos) + 1
                assert o.token_ids == f[:cut] and o.finish_reason == "stop"
                n_stopped += 1
            else:
                assert o.token_ids == f and o.finish_reason == "length"
    assert 0 < n_stopped < 16


def test_requests_join_a_running_engine(folder):
    llm = LLM(folder)
    p1 = SamplingParams(n=3, max_tokens=20, seed=5, ignore_eos=True)
    p2 = SamplingParams(n=2, max_tokens=6, seed=6, ignore_eos=True)
    engine = llm.make_engine(CacheShape(max_prompts=2, max_samples=5, max_samples_per_prompt=3,
                                        max_prompt_len=32, max_new_tokens=20))
    engine.add_request("a", PROMPTS[0], p1)
    for _ in range(7):
        engine.step()
    engine.add_request("b", PROMPTS[1], p2)  # joins while "a" is mid-way
    deltas = []
    while engine.has_unfinished():
        deltas += engine.step()
    a, b = engine.pop_output("a"), engine.pop_output("b")
    assert [o.token_ids for o in a.outputs] == tokens(llm.generate(prompt_token_ids=[PROMPTS[0]], sampling_params=p1))[0]
    assert [o.token_ids for o in b.outputs] == tokens(llm.generate(prompt_token_ids=[PROMPTS[1]], sampling_params=p2))[0]
    streamed = {}
    for d in deltas:
        streamed.setdefault((d.request_id, d.index), []).extend(d.token_ids)
    assert streamed[("b", 1)] == b.outputs[1].token_ids


def test_waiting_request_runs_when_a_slot_frees(folder):
    llm = LLM(folder)
    engine = llm.make_engine(CacheShape(1, 2, 2, 32, 8))
    p = SamplingParams(n=2, max_tokens=8, seed=1, ignore_eos=True)
    engine.add_request("a", PROMPTS[0], p)
    engine.add_request("b", PROMPTS[1], p)
    engine.step()
    assert engine.num_running == 1 and engine.num_waiting == 1
    while engine.has_unfinished():
        engine.step()
    assert engine.pop_output("a").finished and engine.pop_output("b").finished


def test_abort_frees_rows(folder):
    llm = LLM(folder)
    engine = llm.make_engine(CacheShape(1, 2, 2, 32, 8))
    engine.add_request("a", PROMPTS[0], SamplingParams(n=2, max_tokens=8, ignore_eos=True))
    engine.step()
    engine.abort("a")
    assert not engine.has_unfinished() and engine.rows_in_use == 0


def test_errors_before_any_work(folder, hf_models):
    llm = LLM(folder)
    with pytest.raises(ContextLengthError, match="context length"):
        llm.generate(prompt_token_ids=[[1] * 250], sampling_params=SamplingParams(max_tokens=10))
    with pytest.raises(InvalidParameterError, match="prompt_token_ids"):
        llm.generate(prompt_token_ids=[[1, 5000]])
    with pytest.raises(InvalidParameterError, match="prompt"):
        llm.generate(prompt_token_ids=[[]])
    with pytest.raises(TokenizerError, match="no tokenizer"):
        llm.generate(["text needs a tokenizer"])
    with pytest.raises(InvalidParameterError, match="sampling_params"):
        llm.generate(prompt_token_ids=[[1], [2]], sampling_params=[SamplingParams()])
    with pytest.raises(InvalidParameterError, match="kv_layout"):
        LLM(folder, kv_layout="paged")
    with pytest.raises(InvalidParameterError, match="dtype"):
        LLM(folder, dtype="float8")


@pytest.mark.parametrize("bad, match", [
    ({"prompt_token_ids": [1, 2, 3]}, "one prompt is"),  # a flat list instead of a list of lists
    ({"prompt_token_ids": [[1, 2.0]]}, "holds 2.0"),
    ({"prompt_token_ids": [[1, "2"]]}, "holds '2'"),
    ({"prompt_token_ids": [[True]]}, "holds True"),
    ({"prompt_token_ids": "1 2 3"}, "list of lists"),
    ({"prompts": ["a", 3]}, "prompt 1 is a int"),
    ({"prompts": ["a", None]}, "prompt 1 is a NoneType"),
    ({"prompts": 3}, "a string or a list of strings"),
    ({"prompts": ["ok", "a\udfffb"]}, "prompt 1 is not valid Unicode"),
])
def test_prompts_of_the_wrong_type_are_typed_errors(folder, bad, match):
    with pytest.raises(InvalidParameterError, match=match) as e:
        LLM(folder).generate(**bad)
    assert e.value.args and ("prompt_token_ids" if "prompt_token_ids" in bad else "prompts") in str(e.value)


def test_smallest_temperature_and_repetition_penalty_stay_finite(folder):
    """The smallest accepted values (1e-46 is refused by SamplingParams) give finite log probs."""
    from forklm.sampling.params import MIN_REPETITION_PENALTY, MIN_TEMPERATURE

    outs = LLM(folder).generate(prompt_token_ids=[[5, 6, 7, 5, 6]], sampling_params=SamplingParams(
        n=2, max_tokens=6, temperature=MIN_TEMPERATURE, repetition_penalty=MIN_REPETITION_PENALTY, logprobs=1,
        ignore_eos=True, seed=0))
    for o in outs[0].outputs:
        assert math.isfinite(o.cumulative_logprob) and len(o.token_ids) == 6


def test_max_tokens_beyond_the_context_is_a_context_error_not_a_memory_one(folder):
    with pytest.raises(ContextLengthError, match="context length"):
        LLM(folder).generate(prompt_token_ids=[[1, 2]], sampling_params=SamplingParams(max_tokens=10**9))


def test_n_too_large_for_memory_names_the_largest_n_that_fits(folder):
    llm = LLM(folder, memory_fraction=1e-6)  # a budget of a few KB of the free RAM
    with pytest.raises(CapacityError, match=r"at most n=\d+ fits") as e:
        llm.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=SamplingParams(n=4096, max_tokens=200))
    fit = e.value.max_n
    assert 0 <= fit < 4096
    if fit:
        llm.generate(prompt_token_ids=[[1, 2, 3]], sampling_params=SamplingParams(n=fit, max_tokens=200, ignore_eos=True))


def test_sliding_window_bounds_the_context(tmp_path):
    import transformers as tf

    tf.MistralForCausalLM(tf.MistralConfig(vocab_size=50, hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                                           num_attention_heads=2, num_key_value_heads=1, sliding_window=16,
                                           max_position_embeddings=128)).save_pretrained(tmp_path)
    llm = LLM(str(tmp_path))
    with pytest.raises(ContextLengthError, match="sliding_window"):
        llm.generate(prompt_token_ids=[[1] * 10], sampling_params=SamplingParams(max_tokens=8))
    assert len(llm.generate(prompt_token_ids=[[1] * 10], sampling_params=SamplingParams(max_tokens=6, ignore_eos=True))[0]
               .outputs[0].token_ids) == 6


def test_out_of_vocabulary_ids_in_params_fail_before_admission(folder):
    llm = LLM(folder)
    engine = llm.make_engine(CacheShape(1, 1, 1, 8, 4))
    for bad in (SamplingParams(max_tokens=2, stop_token_ids=[10**6]), SamplingParams(max_tokens=2, logit_bias={10**6: 1.0})):
        with pytest.raises(InvalidParameterError, match="stop_token_ids|logit_bias"):
            engine.add_request("x", [1, 2], bad)
    assert not engine.has_unfinished()


def test_huge_no_repeat_ngram_size_is_cheap(folder):
    out = LLM(folder).generate(prompt_token_ids=[[1, 2, 3]], sampling_params=SamplingParams(
        max_tokens=4, no_repeat_ngram_size=2**31, ignore_eos=True))
    assert len(out[0].outputs[0].token_ids) == 4


def test_compiled_long_generation_one_window_graph_equals_eager(hf_models):
    """Compiled on CPU, the attention window is a dynamic size: past 128 decoded tokens (where the
    sample part switches kernels) and up to the full capacity, the tokens stay eager's."""
    folder = str(hf_models["llama_mha"][1])
    p = SamplingParams(n=2, max_tokens=140, temperature=1.0, seed=9, ignore_eos=True)
    eager = LLM(folder).generate(prompt_token_ids=[PROMPTS[0]], sampling_params=p)
    compiled = LLM(folder, compile=True).generate(prompt_token_ids=[PROMPTS[0]], sampling_params=p)
    assert tokens(eager) == tokens(compiled)
    assert all(len(t) == 140 for t in tokens(compiled)[0])
