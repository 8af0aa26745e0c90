"""End-to-end generation through LLM: greedy parity with `transformers`, stopping, finish reasons."""

import pytest
import torch

from forklm import LLM, SamplingParams

from conftest import FAMILIES

NEW_TOKENS = 40


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_matches_transformers_generate(hf_models, family):
    hf, folder = hf_models[family]
    llm = LLM(str(folder))
    torch.manual_seed(3)
    prompts = [torch.randint(3, 200, (L,)).tolist() for L in (5, 12)]
    outs = llm.generate(prompt_token_ids=prompts,
                        sampling_params=SamplingParams(max_tokens=NEW_TOKENS, min_tokens=NEW_TOKENS, temperature=0))
    for prompt, out in zip(prompts, outs):
        with torch.no_grad():
            ref = hf.generate(torch.tensor([prompt]), max_new_tokens=NEW_TOKENS, min_new_tokens=NEW_TOKENS,
                              do_sample=False, pad_token_id=0)[0, len(prompt):].tolist()
        assert out.outputs[0].token_ids == ref, family
        assert out.outputs[0].finish_reason == "length"


def test_stops_at_eos_with_finish_reason_stop(hf_models):
    _, folder = hf_models["llama_gqa"]
    llm = LLM(str(folder))
    prompt = [[5, 6, 7]]
    free = llm.generate(prompt_token_ids=prompt, sampling_params=SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))
    tokens = free[0].outputs[0].token_ids
    llm.eos_token_ids = [tokens[4]]  # pretend the 5th greedy token is EOS
    out = llm.generate(prompt_token_ids=prompt, sampling_params=SamplingParams(max_tokens=20, temperature=0))[0].outputs[0]
    first = tokens.index(tokens[4])
    assert out.token_ids == tokens[: first + 1] and out.finish_reason == "stop"
    ignored = llm.generate(prompt_token_ids=prompt,
                           sampling_params=SamplingParams(max_tokens=20, temperature=0, ignore_eos=True))[0].outputs[0]
    assert ignored.token_ids == tokens and ignored.finish_reason == "length"


def test_seeded_sampling_is_reproducible_and_samples_differ(hf_models):
    _, folder = hf_models["mistral"]
    llm = LLM(str(folder))
    p = SamplingParams(n=4, max_tokens=16, temperature=1.0, top_p=0.9, top_k=50, seed=123)
    a = llm.generate(prompt_token_ids=[[9, 8, 7]], sampling_params=p)[0]
    b = llm.generate(prompt_token_ids=[[9, 8, 7]], sampling_params=p)[0]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len({tuple(o.token_ids) for o in a.outputs}) > 1
    c = llm.generate(prompt_token_ids=[[9, 8, 7]], sampling_params=SamplingParams(n=4, max_tokens=16, seed=124))[0]
    assert [o.token_ids for o in a.outputs] != [o.token_ids for o in c.outputs]
