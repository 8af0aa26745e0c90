"""KV cache layouts: memory held, row maps, and decode attention through the cache vs plain SDPA."""

import pytest
import torch
import torch.nn.functional as F

from forklm.config import ModelConfig
from forklm.kv_cache import BifurcatedCache, CacheShape, ReplicatedCache


def tiny_config(n_heads=4, n_kv_heads=2, head_dim=16, layers=2):
    return ModelConfig(model_type="llama", vocab_size=50, dim=n_heads * head_dim, n_layers=layers, n_heads=n_heads,
                       n_kv_heads=n_kv_heads, intermediate_size=32, max_position_embeddings=512, norm_eps=1e-6)


def test_bifurcated_cache_holds_one_copy_of_each_prompt():
    cfg = tiny_config()
    B, n, Lc, T = 3, 16, 300, 32
    shape = CacheShape(max_prompts=B, max_samples=B * n, max_samples_per_prompt=n, max_prompt_len=Lc, max_new_tokens=T)
    bif = BifurcatedCache(cfg, shape, torch.float32, "cpu")
    rep = ReplicatedCache(cfg, shape, torch.float32, "cpu")
    assert bif.kc[0].shape == (B, cfg.n_kv_heads, Lc, cfg.head_dim)  # one copy per prompt
    assert bif.kd[0].shape == (B * n, cfg.n_kv_heads, T, cfg.head_dim)  # each sample's own tokens
    assert rep.k[0].shape == (B * n, cfg.n_kv_heads, Lc + T, cfg.head_dim)
    per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * 4
    assert bif.nbytes() == per_token * (B * Lc + B * n * T) == BifurcatedCache.bytes_needed(cfg, shape, torch.float32)
    assert rep.nbytes() == per_token * B * n * (Lc + T) == ReplicatedCache.bytes_needed(cfg, shape, torch.float32)
    assert rep.nbytes() / bif.nbytes() > 6  # 48 samples of a 300-token prompt


@pytest.mark.parametrize("n_heads, n_kv_heads", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("layout", [BifurcatedCache, ReplicatedCache])
def test_decode_through_cache_matches_sdpa_over_full_sequence(layout, n_heads, n_kv_heads):
    """Prefill two prompts (different lengths, different n), decode a few steps, compare each step's
    attention output with SDPA over that sample's explicit [prompt ; decoded] keys."""
    torch.manual_seed(0)
    cfg = tiny_config(n_heads, n_kv_heads)
    D, G = cfg.head_dim, n_heads // n_kv_heads
    lens, ns = [7, 13], [3, 2]
    shape = CacheShape(max_prompts=2, max_samples=5, max_samples_per_prompt=3, max_prompt_len=16, max_new_tokens=6)
    cache = layout(cfg, shape, torch.float32, "cpu")
    rows_of = [[0, 1, 2], [3, 4]]
    keys = {}  # row -> (K, V) full sequence so far [Hkv, L, D]
    for slot, (L, rows) in enumerate(zip(lens, rows_of)):
        cache.assign(slot, L, rows)
        k, v = torch.randn(1, n_kv_heads, L, D), torch.randn(1, n_kv_heads, L, D)
        cache.prefill_view(slot, rows).attend(0, torch.randn(1, n_heads, L, D), k, v)
        for r in rows:
            keys[r] = (k[0], v[0])
    for step in range(4):
        q = torch.randn(5, n_heads, 1, D)
        k, v = torch.randn(5, n_kv_heads, 1, D), torch.randn(5, n_kv_heads, 1, D)
        out = cache.attend(0, q, k, v)  # [S, H, 1, D]
        cache.advance()
        for r in range(5):
            K = torch.cat([keys[r][0], k[r]], dim=1)
            V = torch.cat([keys[r][1], v[r]], dim=1)
            keys[r] = (K, V)
            ref = F.scaled_dot_product_attention(q[r:r + 1], K.repeat_interleave(G, 0)[None],
                                                 V.repeat_interleave(G, 0)[None])
            assert (out[r] - ref[0]).abs().max() < 1e-5, (step, r)
