"""Weight quantization (quant.py): GGUF's block formats, the int4 kernel's exact mapping, and
`LLM(quantization=...)` against `transformers` running the same rounded weights."""

import gguf
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from forklm import LLM, SamplingParams
from forklm.errors import InvalidParameterError
from forklm.quant import GROUP_SIZE, LOW_PRECISION_REL_BOUND, QUANTIZATIONS, int4pack_blocks, quantize_values

Q = gguf.GGMLQuantizationType


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("shape", [(7, 32), (64, 96), (130, 256)])
def test_quantize_values_is_ggufs_own_round_trip_within_half_a_step(kind, shape):
    torch.manual_seed(shape[0])
    w = torch.randn(*shape) * 0.05
    w[0, :GROUP_SIZE] = 0.0  # an all-zero block
    ours = quantize_values(w, kind)
    qtype = QUANTIZATIONS[kind]
    theirs = gguf.quants.dequantize(gguf.quants.quantize(w.numpy(), qtype), qtype)
    assert ours.shape == w.shape and ours.dtype == w.dtype
    assert torch.equal(ours, torch.from_numpy(theirs))
    blocks = w.reshape(shape[0], -1, GROUP_SIZE)  # [out, groups, 32]
    levels = 127 if kind == "int8" else 15
    span = blocks.abs().amax(-1) if kind == "int8" else blocks.amax(-1) - blocks.amin(-1)  # [out, groups]
    step = span / levels  # a code step per block; its float16 scale (2^-11) adds up to levels * 2^-11 steps
    err = (ours - w).abs().reshape_as(blocks).amax(-1)
    assert (err <= step * (0.5 + levels * 2.0 ** -11) + 1e-7).all()
    assert torch.equal(ours[0, :GROUP_SIZE], torch.zeros(GROUP_SIZE))
    distinct = ours.reshape_as(blocks)[1, 0].unique().numel()  # one block: at most its code count
    assert distinct <= (2 * levels + 1 if kind == "int8" else levels + 1)


@pytest.mark.parametrize("qtype", [Q.Q4_0, Q.Q4_1])
@pytest.mark.parametrize("out_f,in_f,rows", [(64, 128, 1), (96, 256, 5), (48, 64, 17)])
def test_gguf_4bit_blocks_map_exactly_onto_the_int4pack_kernel(qtype, out_f, in_f, rows):
    """The file's Q4_x blocks are the int4 CPU kernel's groups: scale = d, zero = m + 8 d. The kernel's
    matmul of them equals F.linear on gguf-py's own dequantized weights up to float32 summation order."""
    rng = np.random.default_rng(out_f + in_f)
    w = (rng.standard_normal((out_f, in_f)) * 0.05).astype(np.float32)
    blocks = gguf.quants.quantize(w, qtype)
    dense = torch.from_numpy(gguf.quants.dequantize(blocks, qtype))
    codes, scales_zeros = int4pack_blocks(blocks, qtype, (out_f, in_f))
    assert codes.min() >= 0 and codes.max() <= 15
    d, z = scales_zeros[..., 0].t(), scales_zeros[..., 1].t()  # [out, groups]
    rebuilt = (codes.float().reshape(out_f, -1, GROUP_SIZE) - 8) * d[..., None] + z[..., None]
    assert torch.allclose(rebuilt.reshape(out_f, in_f), dense, rtol=0, atol=1e-6)
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes, 1)
    x = torch.randn(rows, in_f)
    ours = torch.ops.aten._weight_int4pack_mm_for_cpu(x, packed, GROUP_SIZE, scales_zeros)
    ref = F.linear(x, dense)
    assert (ours - ref).abs().max() <= 1e-5 * max(ref.abs().max().item(), 1.0)


def _llama(tie: bool, seed: int):
    import transformers as tf

    torch.manual_seed(seed)
    cfg = tf.LlamaConfig(vocab_size=211, max_position_embeddings=256, hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tie)
    return tf.LlamaForCausalLM(cfg).eval()


def _gpt2(seed: int):
    import transformers as tf

    torch.manual_seed(seed)
    return tf.GPT2LMHeadModel(tf.GPT2Config(vocab_size=211, n_positions=256, n_embd=64, n_layer=2, n_head=4,
                                            bos_token_id=0, eos_token_id=1)).eval()


def _rounded_reference(model, kind):
    """The transformers model with every linear weight rounded as forklm rounds it (tied heads untied)."""
    import copy

    import transformers as tf

    ref = copy.deepcopy(model)
    with torch.no_grad():
        if getattr(ref.config, "tie_word_embeddings", False):
            ref.lm_head.weight = torch.nn.Parameter(ref.lm_head.weight.detach().clone())
        for module in ref.modules():
            if isinstance(module, torch.nn.Linear):
                module.weight.copy_(quantize_values(module.weight, kind))
            elif isinstance(module, tf.pytorch_utils.Conv1D):  # GPT-2 stores [in, out]
                module.weight.copy_(quantize_values(module.weight.t(), kind).t())
    return ref


def _logprobs(llm, prompt, steps=6):
    out = llm.generate(prompt_token_ids=[prompt], sampling_params=SamplingParams(
        max_tokens=steps, temperature=0, logprobs=3, ignore_eos=True), use_tqdm=False)[0].outputs[0]
    return out.token_ids, [lp[t].logprob for t, lp in zip(out.token_ids, out.logprobs)]


def _hf_logprobs(model, prompt, tokens):
    ids = torch.tensor([prompt + tokens[:-1]])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt) - 1:].float()
    return [logits[i].log_softmax(-1)[t].item() for i, t in enumerate(tokens)]


@pytest.mark.parametrize("kind", ["int8", "int4"])
@pytest.mark.parametrize("family", ["llama", "llama_tied", "gpt2"])
def test_quantized_llm_equals_transformers_on_the_rounded_weights(tmp_path, kind, family):
    model = _gpt2(3) if family == "gpt2" else _llama(family == "llama_tied", 3)
    model.save_pretrained(tmp_path)
    ref = _rounded_reference(model, kind)
    prompt = [5, 17, 33, 2, 90, 11, 150]
    exact = LLM(tmp_path, quantization=kind, dtype="float32")  # the rounded values, in float32 kernels
    tokens, lps = _logprobs(exact, prompt)
    assert np.allclose(lps, _hf_logprobs(ref, prompt, tokens), atol=1e-4)
    auto = LLM(tmp_path, quantization=kind)  # "auto": this host's dtype and measured kernels
    tokens_auto, lps_auto = _logprobs(auto, prompt)
    if auto.dtype == torch.float32:  # float16-held weights where this host runs them faster
        assert np.allclose(lps_auto, _hf_logprobs(ref, prompt, tokens_auto), atol=2e-3)
    else:  # bfloat16 (a native-bfloat16 CPU): against the same dtype's dense kernels
        same = LLM(tmp_path, quantization=kind, dtype="bfloat16")
        tokens_same, lps_same = _logprobs(same, prompt)
        n = next((i for i, (a, b) in enumerate(zip(tokens_auto, tokens_same)) if a != b), len(tokens_auto))
        # int8 rows at few rows: measured up to 4e-3 here
        assert n >= 3 and np.allclose(lps_auto[:n], lps_same[:n], atol=0.02)
    # and quantizing changed the model: logits differ from the float model's
    plain = _hf_logprobs(model, prompt, tokens)
    assert not np.allclose(lps, plain, atol=1e-6)


def test_quantized_update_weights_rounds_the_new_weights(tmp_path):
    a, b = _llama(True, 1), _llama(True, 2)
    a.save_pretrained(tmp_path / "a")
    b.save_pretrained(tmp_path / "b")
    prompt = [3, 8, 21, 55, 144]
    llm = LLM(tmp_path / "a", quantization="int4", dtype="float32")
    _logprobs(llm, prompt)
    llm.update_weights(b.state_dict())
    assert _logprobs(llm, prompt) == _logprobs(LLM(tmp_path / "b", quantization="int4", dtype="float32"), prompt)


def test_parts_of_a_quantized_fused_linear_come_together(tmp_path):
    """With low-precision kernels a linear keeps packed codes, not its values: a part of a fused linear
    (q_proj without k_proj, v_proj) is refused, naming the parts missing, and changes nothing; all of
    them together are taken (and rounded as at load)."""
    from forklm.cpu_linear import LowPrecisionLinear
    from forklm.errors import CheckpointError

    a, b = _llama(True, 1), _llama(True, 2)
    a.save_pretrained(tmp_path / "a")
    prompt = [3, 8, 21, 55, 144]
    llm = LLM(tmp_path / "a", quantization="int8")
    assert isinstance(llm.model.layers[0].attn.wqkv, LowPrecisionLinear)
    before = _logprobs(llm, prompt)
    sd, p = b.state_dict(), "model.layers.0.self_attn."
    with pytest.raises(CheckpointError, match=r"q_proj.*without.*k_proj.*v_proj.*together"):
        llm.update_weights({p + "q_proj.weight": sd[p + "q_proj.weight"]})
    assert _logprobs(llm, prompt) == before
    assert llm.update_weights({p + f"{x}_proj.weight": sd[p + f"{x}_proj.weight"] for x in "qkv"}) == 1
    mixed = _llama(True, 1)
    mixed.load_state_dict(a.state_dict() | {p + f"{x}_proj.weight": sd[p + f"{x}_proj.weight"] for x in "qkv"})
    mixed.save_pretrained(tmp_path / "mixed")
    (tokens, lps), (ref_tokens, ref_lps) = _logprobs(llm, prompt), _logprobs(LLM(tmp_path / "mixed", quantization="int8"), prompt)
    # bfloat16 (dtype auto): each LLM measures its kernels per row count, so the two may sum in other orders
    assert tokens == ref_tokens and np.allclose(lps, ref_lps, atol=2e-2) and not np.allclose(lps, before[1], atol=2e-2)


def test_bad_quantization_is_refused_naming_the_field(tmp_path, hf_models):
    with pytest.raises(InvalidParameterError, match="quantization"):
        LLM(hf_models["llama_mha"][1], quantization="int3")
    # the conftest models' MLP is 112 wide: not whole groups of 32
    with pytest.raises(InvalidParameterError, match="quantization.*multiple of 32"):
        LLM(hf_models["llama_mha"][1], quantization="int8")


def test_low_precision_bound_is_float16s():
    w = torch.randn(10000) * 0.05
    err = ((w.half().float() - w).abs() / w.abs().clamp_min(torch.finfo(torch.float16).tiny)).max()
    assert err <= LOW_PRECISION_REL_BOUND
