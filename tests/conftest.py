"""Tiny random models of every supported family, saved in Hugging Face layout once per session."""

from __future__ import annotations

import pytest
import torch

FAMILIES = ["llama_mha", "llama_gqa", "mistral", "qwen2", "gpt2", "gpt_bigcode_mqa"]


def make_hf_model(family: str, seed: int = 0):
    """A tiny random `transformers` model of `family` (float32, eval mode)."""
    import transformers as tf

    torch.manual_seed(seed)
    common = dict(vocab_size=211, max_position_embeddings=256)
    llama = dict(common, hidden_size=64, intermediate_size=112, num_hidden_layers=2, num_attention_heads=4)
    if family == "llama_mha":
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**llama, num_key_value_heads=4, tie_word_embeddings=False))
    elif family == "llama_gqa":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                "original_max_position_embeddings": 32, "rope_theta": 500000.0}
        model = tf.LlamaForCausalLM(tf.LlamaConfig(**llama, num_key_value_heads=2, tie_word_embeddings=True, rope_scaling=rope))
    elif family == "mistral":
        model = tf.MistralForCausalLM(tf.MistralConfig(**llama, num_key_value_heads=2, sliding_window=None))
    elif family == "qwen2":
        model = tf.Qwen2ForCausalLM(tf.Qwen2Config(**llama, num_key_value_heads=1, tie_word_embeddings=True))
    elif family == "gpt2":
        model = tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=211, n_positions=256, n_embd=64, n_layer=2, n_head=4,
                                                 bos_token_id=0, eos_token_id=1))
    elif family in ("gpt_bigcode_mqa", "gpt_bigcode_mha"):  # MHA: c_attn's rows interleaved per head
        model = tf.GPTBigCodeForCausalLM(tf.GPTBigCodeConfig(vocab_size=211, n_positions=256, n_embd=64, n_layer=2,
                                                            n_head=4, multi_query=family.endswith("mqa"),
                                                            bos_token_id=0, eos_token_id=1))
    else:
        raise ValueError(family)
    # random, non-trivial biases and norms (transformers initialises them to 0 / 1)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_" in name:
                p.add_(torch.randn_like(p) * 0.1)
    return model.eval()


@pytest.fixture(scope="session", autouse=True)
def _own_cache_dir(tmp_path_factory):
    """forklm's per-host cache (kernel menus, GGUF headers) in a folder of this test session, not the
    user's: the tests write GGUF files by the hundred at temporary paths, each an entry there. Child
    processes inherit it."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("FORKLM_CACHE_DIR", str(tmp_path_factory.mktemp("forklm-cache")))
        yield


@pytest.fixture(scope="session")
def hf_models(tmp_path_factory):
    """family -> (transformers model, folder it was saved to)."""
    out = {}
    for family in FAMILIES:
        model = make_hf_model(family)
        folder = tmp_path_factory.mktemp(family)
        model.save_pretrained(folder)
        out[family] = (model, folder)
    return out


@pytest.fixture(scope="session")
def smollm_path():
    """The embedded SmolLM2 GGUF (installed by the README's commands; a missing one fails loudly)."""
    from forklm.default_model import default_model_path

    return default_model_path()
