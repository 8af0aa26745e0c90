"""The embedded default model (SmolLM2-135M-Instruct GGUF) end to end against `transformers`."""

import pytest
import torch

from forklm import LLM, SamplingParams
from forklm.default_model import default_model_path


@pytest.fixture(scope="module")
def llm():
    return LLM(None)


def test_greedy_output_equals_transformers_from_the_same_file(llm):
    from transformers import AutoModelForCausalLM

    path = default_model_path()
    hf = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    prompt = llm.tokenizer.apply_chat_template([{"role": "user", "content": "Name three colors of the rainbow."}])
    ids = llm.tokenizer.encode(prompt, add_special_tokens=False)
    out = llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(max_tokens=32, temperature=0))[0]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=32, do_sample=False)[0, len(ids):].tolist()
    got = out.outputs[0].token_ids
    assert got == ref[: len(got)] and len(got) >= min(len(ref), 8)
    if out.outputs[0].finish_reason == "stop":
        assert got[-1] in llm.eos_token_ids
    assert out.outputs[0].text == llm.tokenizer.decode(got)


def test_default_model_writes_english(llm):
    out = llm.chat([{"role": "user", "content": "What is the capital of France?"}],
                   SamplingParams(max_tokens=16, temperature=0))
    assert "Paris" in out.outputs[0].text
