"""LLM.update_weights: weights B copied into an LLM started from A behave like an LLM loaded from B;
bad updates are refused before anything changes; cached prefixes never outlive the weights."""

from __future__ import annotations

import pytest
import torch

from conftest import FAMILIES, make_hf_model
from forklm import LLM, SamplingParams
from forklm.errors import CheckpointError
from forklm.model import Transformer

PROMPTS = [[5, 17, 33, 2, 101, 7, 64, 9, 12], [5, 17, 33, 2, 88]]  # sharing a prefix
PARAMS = SamplingParams(n=3, temperature=0.8, top_p=0.9, max_tokens=6, seed=7, logprobs=0)


def _run(llm: LLM):
    outs = llm.generate(prompt_token_ids=PROMPTS, sampling_params=PARAMS)
    return [[o.token_ids for o in r.outputs] for r in outs], [[o.cumulative_logprob for o in r.outputs] for r in outs], outs


@pytest.fixture(scope="module")
def b_models(tmp_path_factory):
    """family -> (transformers model B, its folder), other random weights than conftest's A."""
    out = {}
    for family in FAMILIES:
        model = make_hf_model(family, seed=1)
        folder = tmp_path_factory.mktemp(f"{family}_b")
        model.save_pretrained(folder)
        out[family] = (model, folder)
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_update_equals_loading_b(family, hf_models, b_models):
    _, folder_a = hf_models[family]
    model_b, folder_b = b_models[family]
    llm = LLM(folder_a)
    tokens_a, _, _ = _run(llm)  # warms the prefix cache with A's K/V for these prompts
    n = llm.update_weights(model_b.state_dict().items())
    with torch.device("meta"):
        assert n == len(dict(Transformer(llm.config).named_parameters()))  # every weight
    tokens, logprobs, outs = _run(llm)
    ref_tokens, ref_logprobs, ref_outs = _run(LLM(folder_b))
    cached = [r.num_cached_tokens for r in outs]
    assert cached == [r.num_cached_tokens for r in ref_outs]  # A's K/V is not reused (only B's, within the call)
    assert tokens == ref_tokens and tokens != tokens_a
    assert torch.allclose(torch.tensor(logprobs), torch.tensor(ref_logprobs), atol=1e-4)
    _, _, again = _run(llm)  # B's K/V is cached from here on
    assert all(r.num_cached_tokens > c for r, c in zip(again, cached))


def test_update_a_subset_and_bfloat16(hf_models, b_models):
    """Only some tensors, given float32 to a bfloat16 LLM: those change, the rest stay."""
    _, folder_a = hf_models["llama_mha"]
    model_b, _ = b_models["llama_mha"]
    llm = LLM(folder_a, dtype="bfloat16")
    before = {n: p.clone() for n, p in llm.model.named_parameters()}
    sd = model_b.state_dict()
    llm.update_weights({"model.layers.1.mlp.down_proj.weight": sd["model.layers.1.mlp.down_proj.weight"],
                        "lm_head.weight": sd["lm_head.weight"]})
    after = dict(llm.model.named_parameters())
    changed = {n for n in after if not torch.equal(after[n], before[n])}
    assert changed == {"layers.1.mlp.w_down.weight", "lm_head.weight"}
    assert after["lm_head.weight"].dtype == torch.bfloat16
    assert torch.equal(after["lm_head.weight"], sd["lm_head.weight"].to(torch.bfloat16))


def test_tied_lm_head_alone_updates_the_embedding(hf_models, b_models):
    _, folder_a = hf_models["qwen2"]  # tie_word_embeddings
    model_b, folder_b = b_models["qwen2"]
    llm = LLM(folder_a)
    llm.update_weights([("lm_head.weight", model_b.state_dict()["lm_head.weight"])])
    assert torch.equal(llm.model.tok_embeddings.weight, model_b.model.embed_tokens.weight)
    logits = llm.generate(prompt_token_ids=[PROMPTS[0]], sampling_params=SamplingParams(max_tokens=1, temperature=0, logprobs=5))
    ref = LLM(folder_a)
    ref.update_weights(model_b.state_dict().items())
    # the tied head changed with the embedding (packed copies too): same as a full update of that tensor
    sd_a = make_hf_model("qwen2").state_dict()
    mixed = {k: (model_b.state_dict()[k] if k in ("lm_head.weight", "model.embed_tokens.weight") else v) for k, v in sd_a.items()}
    ref.update_weights(mixed)
    want = ref.generate(prompt_token_ids=[PROMPTS[0]], sampling_params=SamplingParams(max_tokens=1, temperature=0, logprobs=5))
    assert logits[0].outputs[0].logprobs == want[0].outputs[0].logprobs


@pytest.mark.parametrize("bad, match", [
    ({"model.layers.0.self_attn.q_proj.weight": "ones", "model.nonsense.weight": torch.ones(3)}, "nonsense"),
    ({"model.layers.0.self_attn.q_proj.weight": "ones", "model.layers.1.self_attn.k_proj.weight": torch.ones(64, 63)},
     r"k_proj.weight.*\(64, 63\)"),
    ({"model.layers.0.self_attn.q_proj.weight": "ones", "model.norm.weight": torch.ones(64, dtype=torch.int64)}, "dtype"),
    ({"model.layers.0.self_attn.q_proj.weight": "ones", "model.norm.weight": [1.0] * 64}, "not a tensor"),
])
def test_bad_update_is_refused_and_changes_nothing(hf_models, bad, match):
    _, folder = hf_models["llama_mha"]
    llm = LLM(folder)
    before_tokens, before_lp, _ = _run(llm)
    params = {n: p.clone() for n, p in llm.model.named_parameters()}
    bad = {k: (torch.ones(64, 64) if isinstance(v, str) else v) for k, v in bad.items()}  # a valid first entry
    with pytest.raises(CheckpointError, match=match):
        llm.update_weights(bad.items())
    assert all(torch.equal(p, params[n]) for n, p in llm.model.named_parameters())
    tokens, lp, outs = _run(llm)
    assert tokens == before_tokens  # the packed linears are A's too
    assert torch.allclose(torch.tensor(lp), torch.tensor(before_lp), atol=1e-4)
    assert outs[0].num_cached_tokens > 0  # a refused update keeps the cache


def test_update_with_cached_prefix_in_use_detaches_it(hf_models):
    """A prefix pinned by a running request leaves the tree at the update: later requests recompute."""
    from forklm.kv.prefix_cache import PrefixCache
    from forklm.kv.storage import CacheShape, KVStorage

    _, folder = hf_models["llama_mha"]
    llm = LLM(folder)
    storage = KVStorage(llm.config, CacheShape(2, 2, 1, 16, 4), 4, 1 << 24, torch.float32, torch.device("cpu"))
    cache = PrefixCache(storage)
    kv = torch.randn(llm.config.n_layers, 2, llm.config.n_kv_heads, 5, llm.config.head_dim)
    held = cache.insert(cache.root, [1, 2, 3, 4, 5], storage.adopt(kv.clone()))
    cache.lock(held)
    cache.insert(cache.root, [9, 9], storage.adopt(kv[:, :, :, :2].clone()))
    used = storage.free_tokens
    cache.invalidate()
    assert cache.match([1, 2, 3, 4, 5]).length == 0 and cache.match([9, 9]).length == 0
    assert storage.free_tokens == used + 2  # the unpinned one is freed now
    cache.unlock(held)
    assert storage.free_tokens == used + 7 and cache.nodes() == []  # the pinned one when released


def test_offloaded_or_non_tensor_updates_are_refused(hf_models):
    _, folder = hf_models["llama_mha"]
    llm = LLM(folder)
    with pytest.raises(CheckpointError, match="no dense values"):
        llm.update_weights({"model.norm.weight": torch.empty(64, device="meta")})
    with pytest.raises(CheckpointError, match="pairs or a state_dict"):
        llm.update_weights(None)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])  # float32: oneDNN-packed linears; bfloat16: plain ones
def test_some_parts_of_a_fused_linear_replace_only_their_rows(hf_models, b_models, tmp_path, dtype):
    """forklm holds q/k/v (with Qwen2's biases) and gate/up as one linear each. q_proj, v_proj's bias and
    up_proj alone: those rows take B's values, the parts not given keep A's, and the LLM then equals one
    loaded from A's checkpoint with just those tensors replaced."""
    import copy

    model_a, folder_a = hf_models["qwen2"]
    model_b, _ = b_models["qwen2"]
    sd_b = model_b.state_dict()
    picked = {name: sd_b[name] for name in ("model.layers.0.self_attn.q_proj.weight",
                                            "model.layers.0.self_attn.v_proj.bias",
                                            "model.layers.1.mlp.up_proj.weight")}
    llm = LLM(folder_a, dtype=dtype)
    before = {n: p.clone() for n, p in llm.model.named_parameters()}
    assert llm.update_weights(picked) == 3
    mixed = copy.deepcopy(model_a)
    mixed.load_state_dict(model_a.state_dict() | picked)
    mixed.save_pretrained(tmp_path / "mixed")
    ref = LLM(tmp_path / "mixed", dtype=dtype)
    tokens, logprobs, _ = _run(llm)
    ref_tokens, ref_logprobs, _ = _run(ref)
    assert tokens == ref_tokens and logprobs == ref_logprobs  # the very same values
    if dtype == "bfloat16":  # plain nn.Linear parameters: compare the rows themselves
        after, q_rows = dict(llm.model.named_parameters()), llm.config.n_heads * llm.config.head_dim
        qkv = after["layers.0.attn.wqkv.weight"]
        assert torch.equal(qkv[:q_rows], picked["model.layers.0.self_attn.q_proj.weight"].bfloat16())
        assert torch.equal(qkv[q_rows:], before["layers.0.attn.wqkv.weight"][q_rows:])  # k and v: A's
        bias, inter = after["layers.0.attn.wqkv.bias"], llm.config.intermediate_size
        assert torch.equal(bias[:-llm.config.n_kv_heads * llm.config.head_dim],
                           before["layers.0.attn.wqkv.bias"][:-llm.config.n_kv_heads * llm.config.head_dim])
        gate_up = after["layers.1.mlp.w_gate_up.weight"]
        assert torch.equal(gate_up[:inter], before["layers.1.mlp.w_gate_up.weight"][:inter])  # gate: A's
        assert torch.equal(gate_up[inter:], picked["model.layers.1.mlp.up_proj.weight"].bfloat16())
        assert {n for n in after if not torch.equal(after[n], before[n])} == {
            "layers.0.attn.wqkv.weight", "layers.0.attn.wqkv.bias", "layers.1.mlp.w_gate_up.weight"}

