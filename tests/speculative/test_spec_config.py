"""speculative_config (engine/speculative/config.py) and the LLM's checks of it: every bad value is
an error naming the field, raised before any work."""

from __future__ import annotations

import pytest

from forklm import LLM
from forklm.engine.speculative import SpeculativeConfig
from forklm.errors import InvalidParameterError


def test_vllm_keys_parse_with_defaults():
    c = SpeculativeConfig.parse({"method": "ngram", "num_speculative_tokens": 3})
    assert (c.method, c.num_speculative_tokens, c.prompt_lookup_max, c.prompt_lookup_min, c.adaptive, c.sibling_lookup) == \
        ("ngram", 3, 4, 2, True, False)
    c = SpeculativeConfig.parse('{"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 6}')
    assert (c.prompt_lookup_min, c.prompt_lookup_max) == (6, 6)
    c = SpeculativeConfig.parse({"model": "some/path", "num_speculative_tokens": 5})  # vLLM infers the method
    assert (c.method, c.model) == ("draft_model", "some/path")
    assert SpeculativeConfig.parse(None) is None and SpeculativeConfig.parse(c) is c


@pytest.mark.parametrize("value, field", [
    ({"method": "eagle", "num_speculative_tokens": 2}, "speculative_config.method"),
    ({"num_speculative_tokens": 2}, "speculative_config.method"),
    ({"method": "ngram"}, "speculative_config.num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 0}, "speculative_config.num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": -3}, "speculative_config.num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 99}, "speculative_config.num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2.5}, "speculative_config.num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": True}, "speculative_config.num_speculative_tokens"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_min": 5, "prompt_lookup_max": 3},
     "speculative_config.prompt_lookup_min"),
    ({"method": "ngram", "num_speculative_tokens": 2, "prompt_lookup_max": 0}, "speculative_config.prompt_lookup_max"),
    ({"method": "ngram", "num_speculative_tokens": 2, "model": "x"}, "speculative_config.model"),
    ({"method": "draft_model", "num_speculative_tokens": 2}, "speculative_config.model"),
    ({"method": "draft_model", "num_speculative_tokens": 2, "model": "x", "prompt_lookup_max": 3},
     "speculative_config.prompt_lookup_max"),
    ({"method": "ngram", "num_speculative_tokens": 2, "adaptive": "yes"}, "speculative_config.adaptive"),
    ({"method": "ngram", "num_speculative_tokens": 2, "draft_tensor_parallel_size": 1},
     "speculative_config.draft_tensor_parallel_size"),
    ("{not json", "speculative_config"),
    ([1, 2], "speculative_config"),
])
def test_bad_config_names_the_field(value, field):
    with pytest.raises(InvalidParameterError) as e:
        SpeculativeConfig.parse(value)
    assert e.value.field == field


def test_llm_refuses_before_loading_anything(tmp_path):
    # a bad config is refused before the checkpoint is read (the path does not even exist)
    with pytest.raises(InvalidParameterError, match="speculative_config.method"):
        LLM(str(tmp_path / "missing"), speculative_config={"method": "medusa", "num_speculative_tokens": 2})
    with pytest.raises(InvalidParameterError, match="compile=True"):
        LLM(str(tmp_path / "missing"), compile=True, speculative_config={"method": "ngram", "num_speculative_tokens": 2})


def test_missing_corrupt_or_incompatible_draft_model(hf_models, tmp_path):
    import transformers as tf

    target = str(hf_models["llama_gqa"][1])
    with pytest.raises(InvalidParameterError, match="speculative_config.model.*could not be loaded"):
        LLM(target, speculative_config={"method": "draft_model", "model": str(tmp_path / "nope"),
                                        "num_speculative_tokens": 2})
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "config.json").write_text((hf_models["llama_mha"][1] / "config.json").read_text())
    (corrupt / "model.safetensors").write_bytes(b"\x00" * 64)
    with pytest.raises(InvalidParameterError, match="speculative_config.model.*could not be loaded"):
        LLM(target, speculative_config={"method": "draft_model", "model": str(corrupt), "num_speculative_tokens": 2})
    other = tmp_path / "other_vocab"
    tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=300, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, max_position_embeddings=256)).save_pretrained(other)
    with pytest.raises(InvalidParameterError, match="speculative_config.model.*vocabulary \\(300 tokens\\) differs"):
        LLM(target, speculative_config={"method": "draft_model", "model": str(other), "num_speculative_tokens": 2})


def _with_tokenizer(src, dst, order):
    """A copy of the model folder `src` with a word-level tokenizer whose ids follow `order`."""
    import shutil

    from tokenizers import Tokenizer, models, pre_tokenizers

    shutil.copytree(src, dst)
    vocab = {f"w{j}": i for i, j in enumerate(order)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=f"w{order[0]}"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(dst / "tokenizer.json"))
    return str(dst)


def test_a_draft_with_another_tokenizer_is_refused(hf_models, tmp_path):
    """Same vocabulary size, other tokens: refused; the same tokenizer: accepted."""
    from forklm import SamplingParams

    ids = list(range(211))
    target = _with_tokenizer(hf_models["llama_gqa"][1], tmp_path / "target", ids)
    same_tok = _with_tokenizer(hf_models["llama_mha"][1], tmp_path / "same", ids)
    other_tok = _with_tokenizer(hf_models["llama_mha"][1], tmp_path / "other", ids[::-1])
    llm = LLM(target, speculative_config={"method": "draft_model", "model": same_tok, "num_speculative_tokens": 2})
    assert llm.tokenizer is not None
    assert llm.generate("w1 w2 w3", SamplingParams(max_tokens=4), use_tqdm=False)[0].outputs[0].token_ids
    with pytest.raises(InvalidParameterError, match="speculative_config.model.*tokenizer differs"):
        LLM(target, speculative_config={"method": "draft_model", "model": other_tok, "num_speculative_tokens": 2})


def test_short_draft_context_is_a_request_error(hf_models, tmp_path):
    import transformers as tf

    from forklm import SamplingParams
    from forklm.errors import ContextLengthError

    short = tmp_path / "short"
    tf.LlamaForCausalLM(tf.LlamaConfig(vocab_size=211, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                       num_attention_heads=2, max_position_embeddings=40)).save_pretrained(short)
    llm = LLM(str(hf_models["llama_gqa"][1]),
              speculative_config={"method": "draft_model", "model": str(short), "num_speculative_tokens": 2})
    assert llm.generate(prompt_token_ids=[[3] * 20], sampling_params=SamplingParams(max_tokens=10), use_tqdm=False)
    with pytest.raises(ContextLengthError, match="speculative_config.model"):
        llm.generate(prompt_token_ids=[[3] * 30], sampling_params=SamplingParams(max_tokens=20), use_tqdm=False)
