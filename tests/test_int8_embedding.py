"""The token embedding held as a GGUF file's Q8_0 blocks: bitwise the dense embedding's values, refused
where it is not, dense again after a weight update."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import quantize
from torch import nn

from forklm import LLM, SamplingParams
from forklm.gguf import q8_0_blocks
from forklm.int8_embedding import BLOCK, Int8BlockEmbedding, use_q8_0_embedding


def random_blocks(rows: int, cols: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    codes = torch.randint(-127, 128, (rows, cols), generator=g, dtype=torch.int8)
    scales = (torch.rand(rows, cols // BLOCK, generator=g) * 0.01 + 1e-4).half()  # [rows, cols / 32]
    return codes, scales


def reference(codes: torch.Tensor, scales: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """gguf's dequantization: code * scale in float32, then the model's dtype."""
    return (codes.float() * scales.float().repeat_interleave(BLOCK, dim=-1)).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("tokens_shape", [(1,), (3, 1), (2, 7)])
def test_lookups_are_the_dequantized_blocks_bitwise(dtype, tokens_shape):
    codes, scales = random_blocks(50, 96, seed=len(tokens_shape))
    emb = Int8BlockEmbedding(codes, scales, dtype)
    table = reference(codes, scales, dtype)
    tokens = torch.randint(0, 50, tokens_shape)
    out = emb(tokens)
    assert out.shape == (*tokens_shape, 96) and out.dtype == dtype
    assert torch.equal(out, table[tokens]) and torch.equal(emb.weight, table)
    assert emb.codes.dtype == torch.int8 and emb.scales.dtype == torch.float16 and emb.dense is None


def test_new_values_are_held_dense_and_exact():
    codes, scales = random_blocks(40, 64, seed=3)
    emb = Int8BlockEmbedding(codes, scales, torch.bfloat16)
    new = torch.randn(40, 64)
    emb.repack(new)
    assert emb.codes is None and emb.scales is None
    tokens = torch.tensor([[0, 39, 5]])
    assert torch.equal(emb(tokens), new.bfloat16()[tokens]) and torch.equal(emb.weight, new.bfloat16())


def _model_with(embedding: nn.Embedding, tied: bool) -> nn.Module:
    model = nn.Module()
    model.tok_embeddings = embedding
    model.lm_head = nn.Linear(embedding.embedding_dim, embedding.num_embeddings, bias=False)
    if tied:
        model.lm_head.weight = embedding.weight
    return model


def test_swapped_only_for_its_own_values_and_an_untied_weight():
    codes, scales = random_blocks(32, 64, seed=5)
    values = reference(codes, scales, torch.bfloat16)
    untied = _model_with(nn.Embedding(32, 64, _weight=values.clone()), tied=False)
    assert use_q8_0_embedding(untied, codes, scales) and isinstance(untied.tok_embeddings, Int8BlockEmbedding)
    tied = _model_with(nn.Embedding(32, 64, _weight=values.clone()), tied=True)  # the head still reads it
    assert not use_q8_0_embedding(tied, codes, scales) and type(tied.tok_embeddings) is nn.Embedding
    other = values.clone()
    other[17, 3] += 1
    moved = _model_with(nn.Embedding(32, 64, _weight=other), tied=False)
    assert not use_q8_0_embedding(moved, codes, scales) and type(moved.tok_embeddings) is nn.Embedding
    wrong_shape = _model_with(nn.Embedding(32, 32, _weight=values[:, :32].clone()), tied=False)
    assert not use_q8_0_embedding(wrong_shape, codes, scales)


TINY = dict(hidden=64, heads=4, kv_heads=2, ffn=128, vocab=96)


def write_tiny_llama(path, tied: bool, seed: int = 0) -> dict[str, np.ndarray]:
    """A one-layer llama GGUF with every 2-D weight in Q8_0 (the head tied to the embedding or its own)."""
    rng = np.random.default_rng(seed)
    h, ffn, vocab = TINY["hidden"], TINY["ffn"], TINY["vocab"]
    kv = TINY["kv_heads"] * h // TINY["heads"]
    shapes = {"token_embd.weight": (vocab, h), "output_norm.weight": (h,), "blk.0.attn_norm.weight": (h,),
              "blk.0.ffn_norm.weight": (h,), "blk.0.attn_q.weight": (h, h), "blk.0.attn_k.weight": (kv, h),
              "blk.0.attn_v.weight": (kv, h), "blk.0.attn_output.weight": (h, h), "blk.0.ffn_gate.weight": (ffn, h),
              "blk.0.ffn_up.weight": (ffn, h), "blk.0.ffn_down.weight": (h, ffn)}
    if not tied:
        shapes["output.weight"] = (vocab, h)
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    writer.add_context_length(256)
    writer.add_embedding_length(h)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(TINY["heads"])
    writer.add_head_count_kv(TINY["kv_heads"])
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    writer.add_rope_dimension_count(h // TINY["heads"])
    writer.add_tokenizer_model("gpt2")  # the vocabulary's size comes from its token list
    writer.add_token_list(["<|endoftext|>", "<|im_start|>", "<|im_end|>", '!"'] + [chr(ord("!") + i) for i in range(vocab - 4)])
    writer.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    writer.add_token_merges(['! "'])
    writer.add_eos_token_id(0)
    values = {}
    for name, shape in shapes.items():
        value = rng.standard_normal(shape).astype(np.float32) * (0.05 if len(shape) == 2 else 1.0)
        if len(shape) == 2:
            writer.add_tensor(name, quantize(value, Q.Q8_0), raw_dtype=Q.Q8_0)
        else:
            writer.add_tensor(name, value)
        values[name] = value
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return values


def test_the_gguf_reader_gives_the_files_own_blocks(tmp_path):
    path = tmp_path / "tiny.gguf"
    values = write_tiny_llama(path, tied=True)
    codes, scales = q8_0_blocks(path, "token_embd.weight")
    assert codes.shape == (TINY["vocab"], TINY["hidden"]) and scales.shape == (TINY["vocab"], TINY["hidden"] // 32)
    want = gguf.quants.dequantize(quantize(values["token_embd.weight"], Q.Q8_0), Q.Q8_0)
    assert torch.equal(reference(codes, scales, torch.float32), torch.from_numpy(np.asarray(want, dtype=np.float32)))
    assert q8_0_blocks(path, "output_norm.weight") is None and q8_0_blocks(path, "no.such.tensor") is None


@pytest.mark.parametrize("tied", [True, False], ids=["tied", "own_head"])
def test_auto_dtype_holds_the_embedding_as_blocks_with_the_exact_values(tmp_path, tied):
    """Under dtype="auto" the Q8_0 embedding is held as its blocks and looks up exactly what the same dtype
    asked for explicitly holds densely; an explicit dtype keeps nn.Embedding. Generation runs."""
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, tied=tied)
    auto = LLM(str(path))
    dense = LLM(str(path), dtype=str(auto.dtype).removeprefix("torch."))
    assert isinstance(auto.model.tok_embeddings, Int8BlockEmbedding) and type(dense.model.tok_embeddings) is nn.Embedding
    assert "Q8_0 blocks" in auto.precision_summary() and "Q8_0 blocks" not in dense.precision_summary()
    assert torch.equal(auto.model.tok_embeddings.weight, dense.model.tok_embeddings.weight)
    out = auto.generate(prompt_token_ids=[[3, 4, 5]], sampling_params=SamplingParams(max_tokens=4, temperature=0))
    assert len(out[0].outputs[0].token_ids) == 4


def test_a_weight_update_makes_it_dense_and_a_tied_head_follows(tmp_path):
    path = tmp_path / "tiny.gguf"
    write_tiny_llama(path, tied=True)
    llm = LLM(str(path))
    assert isinstance(llm.model.tok_embeddings, Int8BlockEmbedding)
    new = torch.randn(TINY["vocab"], TINY["hidden"]) * 0.05
    llm.update_weights({"model.embed_tokens.weight": new})
    emb = llm.model.tok_embeddings
    assert emb.dense is not None and torch.equal(emb.weight, new.to(llm.dtype))
    assert "Q8_0 blocks" not in llm.precision_summary()
    x = torch.randn(3, TINY["hidden"]).to(llm.dtype)
    with torch.inference_mode():
        head = llm.model.lm_head(x).float()
    ref = x.float() @ new.to(llm.dtype).float().t()  # the tied head packed again from the new values
    assert ((head - ref).abs() <= 2.0 ** -6 * (x.float().abs() @ new.abs().t() + ref.abs()) + 1e-5).all()
