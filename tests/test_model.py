"""forklm's transformer vs `transformers` itself, on tiny random models of every family."""

import pytest
import torch

from forklm.checkpoint import load_checkpoint
from forklm.config import ModelConfig
from forklm.attention.cascade import CausalAttention
from forklm.model import RMSNorm, apply_rope, rope_tables

from conftest import FAMILIES

LOGITS_ATOL = 1e-4  # float32; observed ~2e-7


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_logits_match_transformers(hf_models, family):
    hf, folder = hf_models[family]
    ckpt = load_checkpoint(folder, torch.float32, "cpu")
    torch.manual_seed(1)
    for L in (1, 2, 7, 33):
        ids = torch.randint(0, ckpt.config.vocab_size, (1, L))
        with torch.no_grad():
            ref = hf(ids).logits[0]  # [L, V]
            ours = ckpt.model(ids, torch.arange(L)[None], CausalAttention(), last_only=False)[0]
        assert (ours - ref).abs().max().item() < LOGITS_ATOL, (family, L)


def test_gpt_bigcode_mha_per_head_qkv_rows_are_reordered_to_forklms_fused_layout(tmp_path):
    """GPT-BigCode without multi_query stores c_attn's rows per head as [H, 3, D]; forklm's fused q/k/v
    linear wants [3, H, D]. Logits vs transformers, prefill and a bias that differs per head."""
    from conftest import make_hf_model

    hf = make_hf_model("gpt_bigcode_mha")
    hf.save_pretrained(tmp_path)
    ckpt = load_checkpoint(tmp_path, torch.float32, "cpu")
    assert ckpt.config.n_kv_heads == ckpt.config.n_heads == 4
    torch.manual_seed(2)
    for L in (1, 9):
        ids = torch.randint(0, ckpt.config.vocab_size, (1, L))
        with torch.no_grad():
            ref = hf(ids).logits[0]  # [L, V]
            ours = ckpt.model(ids, torch.arange(L)[None], CausalAttention(), last_only=False)[0]
        assert (ours - ref).abs().max().item() < LOGITS_ATOL, L


def test_config_family_comes_from_model_type_not_folder_name(hf_models):
    _, folder = hf_models["qwen2"]
    import json

    cfg = ModelConfig.from_hf(json.loads((folder / "config.json").read_text()))
    assert cfg.model_type == "qwen2" and cfg.qkv_bias and cfg.n_kv_heads == 1
    # architectures alone is enough when model_type is missing
    assert ModelConfig.from_hf({"architectures": ["GPT2LMHeadModel"], "n_embd": 8, "n_layer": 1, "n_head": 2,
                                "vocab_size": 5, "n_positions": 8}).family == "gpt2"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("shape", [(1, 9, 1, 64), (5, 3, 7, 32), (2, 4, 33, 16)], ids=["decode", "odd", "chunk"])
def test_rope_and_norm_match_their_textbook_forms(dtype, shape):
    """apply_rope on rope_tables == Hugging Face's rotation (q * cos + rotate_half(q) * sin, the tables in q's
    dtype); RMSNorm == x * rsqrt(mean(x^2) + eps) in float32, within a stated bound."""
    torch.manual_seed(sum(shape))
    n, _, length, d = shape
    x = torch.randn(shape).to(dtype)
    angles = torch.rand(n, 1, length, d // 2) * 100
    emb = torch.cat((angles, angles), dim=-1)
    cos, sin = emb.cos().to(dtype), emb.sin().to(dtype)  # LlamaRotaryEmbedding
    x1, x2 = x.chunk(2, dim=-1)
    want = x * cos + torch.cat((-x2, x1), dim=-1) * sin  # apply_rotary_pos_emb
    assert torch.equal(apply_rope(x, *rope_tables(angles, dtype)), want)
    norm = RMSNorm(d, 1e-5)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(d))
    norm = norm.to(dtype)
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5)  # [..., d] float32
    want = norm.weight * normed.to(dtype)
    got = norm(x)
    assert got.dtype == dtype and got.shape == x.shape
    # through layer_norm on [x, -x]: float32 rounding, plus |mean| * rstd with the mean 0 up to rounding
    # (2 d float32 roundings of values <= max|x|); in bf16 one rounding step of the normalized value at most
    w = norm.weight.float()
    if dtype == torch.float32:
        bound = w.abs() * (4e-7 * normed.abs() + 2 * d * 6e-8 * xf.abs().amax(-1, keepdim=True) *
                           torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-5))
    else:
        bound = (w * normed).abs() * 2**-7
    assert ((got.float() - want.float()).abs() <= bound).all()
    if dtype == torch.bfloat16:  # nearly always bitwise
        assert (got != want).float().mean().item() < 1e-3
