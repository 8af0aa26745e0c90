"""Beam search through the engine vs `transformers` generate(num_beams=k, do_sample=False)."""

import pytest
import torch

from forklm import LLM, SamplingParams
from forklm.kv import CacheShape


@pytest.fixture(scope="module")
def beam_model(tmp_path_factory):
    import transformers as tf

    torch.manual_seed(0)  # a larger init than the default gives varied (non-repeating) greedy text
    cfg = tf.LlamaConfig(vocab_size=97, hidden_size=64, intermediate_size=112, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         initializer_range=0.3, eos_token_id=19, bos_token_id=1)
    hf = tf.LlamaForCausalLM(cfg).eval()
    folder = tmp_path_factory.mktemp("beam")
    hf.save_pretrained(folder)
    return hf, str(folder)


@pytest.mark.parametrize("layout", ["bifurcated", "replicated"])
@pytest.mark.parametrize("k, n, early_stopping, length_penalty",
                         [(2, 1, False, 1.0), (2, 2, True, 1.0), (4, 2, True, 2.0), (4, 4, False, 1.0),
                          (4, 3, "never", 0.5)])
def test_beams_match_transformers(beam_model, layout, k, n, early_stopping, length_penalty):
    hf, folder = beam_model
    llm = LLM(folder, kv_layout=layout)
    prompts = [[7, 8, 9, 10], [20, 30], [44, 3, 61]]
    p = SamplingParams(beam_width=k, n=n, max_tokens=16, temperature=0, early_stopping=early_stopping,
                       length_penalty=length_penalty)
    outs = llm.generate(prompt_token_ids=prompts, sampling_params=p)  # three beam requests in one batch
    any_eos = False
    for prompt, out in zip(prompts, outs):
        ref = hf.generate(torch.tensor([prompt]), num_beams=k, num_return_sequences=n, max_new_tokens=16,
                          do_sample=False, early_stopping=early_stopping, length_penalty=length_penalty,
                          pad_token_id=0)
        for o, r in zip(out.outputs, ref):
            r = r[len(prompt):].tolist()
            if 19 in r:
                r = r[: r.index(19) + 1]
                any_eos = True
            assert o.token_ids == r
            assert o.finish_reason == ("stop" if r[-1] == 19 else "length")
        assert len(out.outputs) == n
    if k == 4:
        assert any_eos  # the EOS (19) really ends some hypotheses


def test_beams_share_the_prompt_kv(beam_model):
    _, folder = beam_model
    llm = LLM(folder)
    p = SamplingParams(beam_width=4, n=1, max_tokens=8, temperature=0)
    engine = llm.make_engine(CacheShape(max_prompts=1, max_samples=4, max_samples_per_prompt=4, max_prompt_len=8,
                                        max_new_tokens=8))
    engine.add_request("b", [7, 8, 9, 10], p)
    engine.step()
    segment = engine.scheduler.running["b"].node.segment
    assert segment.kv.shape[3] == 4 and engine.storage.segment_tokens == 4  # one prompt copy for 4 beams
    kc = segment.kv.clone()
    while engine.has_unfinished():
        engine.step()
    assert torch.equal(kc, segment.kv)  # re-ranking beams never touched the prompt's K/V
    assert len(engine.pop_output("b").outputs) == 1
