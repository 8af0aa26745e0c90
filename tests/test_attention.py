"""Attention kernels against plain references: bifurcated decode vs SDPA over a replicated cache."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from forklm.attention import (
    _cpu_flash_with_lse,
    _cpu_gemm_with_lse,
    attention_with_lse,
    attention_with_lse_reference,
    bifurcated_decode_attention,
    causal_attention,
    decode_rows_from_counts,
    merge_attention,
    merge_with_lse,
    replicated_decode_attention,
)

TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
HEADS = [(4, 4), (8, 2), (4, 1)]  # (H, Hkv): MHA, GQA (G=4), MQA
HEAD_IDS = ["mha", "gqa", "mqa"]


def _rand(*shape: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    return torch.randn(*shape, dtype=torch.float32).to(dtype)


def _rand_cache(rows: int, hkv: int, length: int, d: int, valid: list[int], dtype: torch.dtype) -> torch.Tensor:
    """Random cache whose positions past valid[r] hold large garbage, so a missing mask shows."""
    x = _rand(rows, hkv, length, d)  # [R, Hkv, L, D]
    pos = torch.arange(length)  # [L]
    pad = pos[None, :] >= torch.tensor(valid, dtype=torch.int64)[:, None]  # [R, L]
    x = torch.where(pad[:, None, :, None], x * 50.0, x)
    return x.to(dtype)


def _replicated_reference(q, kc, vc, ctx_len, sample_to_prompt, kd, vd, dec_len, scale):
    """Per sample row: SDPA over cat(prompt's context K/V, row's decoded K/V), K/V repeated per group."""
    s, h, d = q.shape
    g = h // kc.shape[1]
    out = torch.zeros(s, h, d, dtype=torch.float32)
    for r in range(s):
        p = int(sample_to_prompt[r])
        k = torch.cat([kc[p, :, : int(ctx_len[p])], kd[r, :, : int(dec_len[r])]], dim=1).float()  # [Hkv, t, D]
        v = torch.cat([vc[p, :, : int(ctx_len[p])], vd[r, :, : int(dec_len[r])]], dim=1).float()  # [Hkv, t, D]
        if k.shape[1] == 0:
            continue  # no key at all: the defined answer is 0
        k = k.repeat_interleave(g, dim=0)  # [H, t, D]
        v = v.repeat_interleave(g, dim=0)  # [H, t, D]
        o = F.scaled_dot_product_attention(q[r].float()[None, :, None], k[None], v[None], scale=scale)  # [1, H, 1, D]
        out[r] = o[0, :, 0]
    return out


def _run_bifurcated(h, hkv, d, dtype, ctx, n, dec, lc_max=None, t_max=None):
    """Builds caches for prompts of lengths `ctx` with n[p] samples and decode lengths `dec`; returns (got, want)."""
    prompt_rows, row_pos, sample_to_prompt = decode_rows_from_counts(n)
    p, s = len(ctx), sum(n)
    lc_max = lc_max or max(max(ctx), 1) + 3
    t_max = t_max or max(dec) + 2
    scale = 1.0 / math.sqrt(d)
    q = _rand(s, h, d, dtype=dtype)
    kc = _rand_cache(p, hkv, lc_max, d, ctx, dtype)
    vc = _rand_cache(p, hkv, lc_max, d, ctx, dtype)
    kd = _rand_cache(s, hkv, t_max, d, dec, dtype)
    vd = _rand_cache(s, hkv, t_max, d, dec, dtype)
    ctx_len = torch.tensor(ctx, dtype=torch.int64)
    dec_len = torch.tensor(dec, dtype=torch.int64)
    got = bifurcated_decode_attention(q, kc, vc, ctx_len, prompt_rows, row_pos, kd, vd, dec_len, scale)
    want = _replicated_reference(q, kc, vc, ctx_len, sample_to_prompt, kd, vd, dec_len, scale)
    return got, want


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("lc", [1, 7, 300])
@pytest.mark.parametrize("n", [1, 3, 8])
def test_bifurcated_single_prompt_matches_replicated(n, lc, heads, d, dtype):
    torch.manual_seed(1000 * n + lc)
    h, hkv = heads
    dec = [1 + (7 * i + lc) % 40 for i in range(n)]  # ragged, odd and even, within 1..40
    got, want = _run_bifurcated(h, hkv, d, dtype, [lc], [n], dec)
    assert got.shape == (n, h, d) and got.dtype == dtype
    assert torch.isfinite(got).all()
    assert (got.float() - want).abs().max().item() <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
def test_bifurcated_mixed_batch(heads, dtype):
    """Prompts of different lengths and n, a padded unused slot, an empty context, dead rows."""
    torch.manual_seed(7)
    h, hkv = heads
    d = 64
    ctx = [300, 7, 0, 1, 0]  # slot 2: a prompt with an empty context; slot 4: unused (n = 0)
    n = [3, 8, 1, 2, 0]
    # rows 0-2 -> prompt 0, 3-10 -> prompt 1, 11 -> prompt 2, 12-13 -> prompt 3
    dec = [1, 40, 0, 5, 17, 23, 1, 2, 39, 11, 0, 9, 31, 3]
    # row 2 and row 10: dead rows (dec_len = 0) with a context; row 11: empty context part.
    got, want = _run_bifurcated(h, hkv, d, dtype, ctx, n, dec, lc_max=305, t_max=41)
    assert torch.isfinite(got).all()
    assert (got.float() - want).abs().max().item() <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_bifurcated_row_with_nothing_is_zero(dtype):
    """A dead row of an unused slot (no context, no decoded key) gives 0, not NaN."""
    torch.manual_seed(11)
    got, want = _run_bifurcated(8, 2, 64, dtype, [5, 0], [2, 1], [3, 6, 0])
    assert torch.isfinite(got).all()
    assert got[2].abs().max().item() == 0.0
    assert (got.float() - want).abs().max().item() <= TOL[dtype]


def _lse_inputs(b, hkv, m, length, d, dtype, valid):
    q = _rand(b, hkv, m, d, dtype=dtype)
    k = _rand_cache(b, hkv, length, d, valid, dtype)
    v = _rand_cache(b, hkv, length, d, valid, dtype)
    return q, k, v, torch.tensor(valid, dtype=torch.int64)


def _naive_lse(q, k, v, valid_len, scale):
    """Loop over rows in float64: the reference of the reference."""
    b, hkv, m, d = q.shape
    out = torch.zeros(b, hkv, m, d, dtype=torch.float64)
    lse = torch.full((b, hkv, m), -math.inf, dtype=torch.float64)
    for i in range(b):
        t = int(valid_len[i])
        if t == 0:
            continue
        sc = q[i].double() @ k[i, :, :t].double().transpose(-2, -1) * scale  # [Hkv, M, t]
        lse[i] = torch.logsumexp(sc, -1)
        out[i] = torch.softmax(sc, -1) @ v[i, :, :t].double()
    return out, lse


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m", [1, 3, 6, 7])
@pytest.mark.parametrize("length", [1, 9, 130, 1030])
@pytest.mark.parametrize("path", ["flash_cpu", "gemm_cpu", "matmul", "dispatch"])
def test_attention_with_lse_paths(path, length, m, dtype):
    torch.manual_seed(31 * length + m)
    valid = [0, length, max(length // 2, 1), 1]
    q, k, v, valid_len = _lse_inputs(4, 2, m, length, 64, dtype, valid)
    scale = 0.125
    fn = {"flash_cpu": _cpu_flash_with_lse, "gemm_cpu": _cpu_gemm_with_lse, "matmul": attention_with_lse_reference,
          "dispatch": attention_with_lse}[path]
    out, lse = fn(q, k, v, valid_len, scale)
    assert out.shape == q.shape and out.dtype == dtype
    assert lse.shape == q.shape[:-1] and lse.dtype == torch.float32
    assert not torch.isnan(out).any() and not torch.isnan(lse).any()
    # valid_len == 0: out 0, lse -inf
    assert out[0].abs().max().item() == 0.0
    assert torch.isneginf(lse[0]).all()
    assert torch.isfinite(lse[1:]).all()
    want_out, want_lse = _naive_lse(q, k, v, valid_len, scale)
    assert (out[1:].double() - want_out[1:]).abs().max().item() <= TOL[dtype]
    assert (lse[1:].double() - want_lse[1:]).abs().max().item() <= TOL[dtype]
    # and the two paths agree with each other
    ref_out, ref_lse = attention_with_lse_reference(q, k, v, valid_len, scale)
    assert (out.float() - ref_out.float()).abs().max().item() <= TOL[dtype]
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))


@pytest.mark.parametrize("hkv,m", [(3, 3), (2, 4), (1, 8)], ids=["3x3", "2x4", "mqa"])
@pytest.mark.parametrize("length", [2, 17, 64])
def test_many_small_problems_run_the_gemm_path_and_match_float64(length, hkv, m):
    """A sample pool's level at large n in bfloat16 (>= _CPU_GEMM_MIN_PROBLEMS problems of a few rows against
    a few keys each) goes to the float32 GEMMs; its result, empty rows and rows a few keys short included,
    is the float64 loop's within bfloat16's tolerance, and the flash kernel's on the same inputs."""
    from forklm.attention.ops import _CPU_GEMM_MIN_PROBLEMS, _fast_path, key_mask

    torch.manual_seed(101 * length + m)
    b = -(-_CPU_GEMM_MIN_PROBLEMS // hkv) + 3  # [B, Hkv]: just above the bound
    valid = torch.randint(1, length + 1, (b,))
    valid[0], valid[1], valid[2] = 0, length, 1
    q, k, v, valid_len = _lse_inputs(b, hkv, m, length, 64, torch.bfloat16, valid.tolist())
    assert _fast_path(q, k) is _cpu_gemm_with_lse
    assert _fast_path(q[: b // 2], k[: b // 2]) is not _cpu_gemm_with_lse  # fewer problems: the flash kernel
    mask = key_mask(valid_len, length, torch.bfloat16)
    out, lse = attention_with_lse(q, k, v, valid_len, 0.125, mask)
    assert out.dtype == torch.bfloat16 and lse.dtype == torch.float32
    assert out[0].abs().max().item() == 0.0 and torch.isneginf(lse[0]).all() and torch.isfinite(lse[1:]).all()
    want_out, want_lse = _naive_lse(q, k, v, valid_len, 0.125)
    assert (out.double() - want_out).abs().max().item() <= TOL[torch.bfloat16]
    assert (lse[1:].double() - want_lse[1:]).abs().max().item() <= 1e-4  # float32 throughout
    flash_out, flash_lse = _cpu_flash_with_lse(q, k, v, valid_len, 0.125, mask)
    assert (out.float() - flash_out.float()).abs().max().item() <= TOL[torch.bfloat16]
    assert (lse[1:] - flash_lse[1:]).abs().max().item() <= 1e-3


def test_gemm_path_bounds():
    """Which shapes `_fast_path` sends to the GEMMs: one query row against few keys (any dtype), many small
    bfloat16 problems against 2..64 keys; from a bfloat16 cache never past _CPU_GEMM_MAX_KEY_ROWS keys in all
    (the size of its float32 copies, where they ran into cliffs); the flash kernel otherwise."""
    from forklm.attention.ops import _CPU_GEMM_MAX_KEY_ROWS, _fast_path

    def path(b, hkv, m, length, dtype=torch.bfloat16):
        q, k = torch.empty(b, hkv, m, 64, dtype=dtype), torch.empty(b, hkv, length, 64, dtype=dtype)
        return {_cpu_gemm_with_lse: "gemm", _cpu_flash_with_lse: "flash"}[_fast_path(q, k)]

    assert path(4, 8, 1, 100) == "gemm" and path(4, 8, 1, 100, torch.float32) == "gemm"
    assert path(4, 8, 1, 200) == "flash"  # one row, many keys
    assert path(64, 3, 3, 32) == "gemm" and path(64, 3, 3, 32, torch.float32) == "flash"
    assert path(64, 3, 3, 1) == "flash" and path(64, 3, 3, 65) == "flash" and path(63, 3, 3, 32) == "flash"
    b = _CPU_GEMM_MAX_KEY_ROWS // (8 * 96) + 1
    assert path(b, 8, 1, 96) == "flash" and path(b - 1, 8, 1, 96) == "gemm"
    assert path(b, 8, 1, 96, torch.float32) == "gemm"  # read in place: no copies


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m", [2, 9, 192])
@pytest.mark.parametrize("length", [1, 37, 600])
def test_every_key_valid_runs_the_kernel_without_a_mask_and_gives_the_masked_result(length, m, dtype):
    """Rows that all see every key (a prompt's segment read to its end, sample rows in lockstep) need no
    mask: `key_mask` says so (additive None) and the kernel's result is that of the zero mask, bitwise;
    one row a key short, or an empty row, keeps a mask."""
    from forklm.attention.ops import key_mask

    torch.manual_seed(7 * length + m)
    b, hkv, d = 3, 3, 64
    q, k, v, valid_len = _lse_inputs(b, hkv, m, length, d, dtype, [length] * b)
    full = key_mask(valid_len, length, dtype)
    assert full.additive is None and full.empty is None
    out, lse = _cpu_flash_with_lse(q, k, v, valid_len, 0.125, full)
    zeros = torch.zeros(b, 1, 1, length, dtype=dtype)
    want_out, want_lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=zeros, scale=0.125)[:2]
    if m == 1:
        want_out, want_lse = want_out[:, :, :1], want_lse[:, :, :1]
    assert torch.equal(out, want_out) and torch.equal(lse, want_lse.float())
    naive_out, naive_lse = _naive_lse(q, k, v, valid_len, 0.125)
    assert (out.double() - naive_out).abs().max().item() <= TOL[dtype]
    assert (lse.double() - naive_lse).abs().max().item() <= TOL[dtype]
    for short in ([length - 1, length, length], [length, 0, length]):
        masked = key_mask(torch.tensor(short), length, dtype)
        assert masked.additive is not None and masked.additive.shape == (b, 1, 1, length)
        assert (masked.empty is not None) == (0 in short)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("m", [1, 3, 5, 8])
@pytest.mark.parametrize("length", [1, 37, 257, 1031])
def test_attention_without_lse_calls_the_kernel_directly_and_matches_sdpa(length, m, dtype):
    """`attention` (one row's only level: the n=1 decode step) runs the CPU flash kernel itself, one query
    row doubled in bf16: the same result as F.scaled_dot_product_attention (the kernel it dispatches to)
    within the dtype's tolerance, and the float64 reference's."""
    from forklm.attention.ops import attention

    torch.manual_seed(11 * length + m)
    b, hkv, d = 1, 3, 64
    q, k, v, valid_len = _lse_inputs(b, hkv, m, length, d, dtype, [length] * b)
    out = attention(q, k, v, 0.125)
    assert out.shape == q.shape and out.dtype == dtype
    want = F.scaled_dot_product_attention(q, k, v, scale=0.125)
    assert (out.float() - want.float()).abs().max().item() <= TOL[dtype]
    naive_out, _ = _naive_lse(q, k, v, valid_len, 0.125)
    assert (out.double() - naive_out).abs().max().item() <= TOL[dtype]


def test_one_bf16_query_row_and_three_over_many_keys_get_a_zero_row_and_nothing_else():
    """What the CPU kernel is given: one bf16 / fp16 row, and three rows over THREE_ROWS_PADDED_FROM keys or
    more, gain a row of zeros (the kernel runs them faster); other counts and float32 are left as they are."""
    from forklm.attention.ops import THREE_ROWS_PADDED_FROM as FROM, _even_rows

    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        for keys in (1, FROM - 1, FROM, 4 * FROM):
            for m in range(1, 10):
                q = torch.randn(2, 3, m, 8).to(dtype)
                out = _even_rows(q, keys)
                if dtype != torch.float32 and (m == 1 or (m == 3 and keys >= FROM)):
                    assert out.shape == (2, 3, m + 1, 8) and torch.equal(out[:, :, :m], q)
                    assert not out[:, :, m].any()
                else:
                    assert out is q


@pytest.mark.parametrize("shape", [(2, 3, 0, 5, 16), (2, 3, 4, 0, 16)], ids=["no_query", "no_key"])
def test_attention_with_lse_empty_shapes(shape):
    """M == 0 or L == 0 must not reach the CPU kernel (it SIGFPEs there)."""
    torch.manual_seed(3)
    b, hkv, m, length, d = shape
    q = _rand(b, hkv, m, d)
    k = _rand(b, hkv, length, d)
    v = _rand(b, hkv, length, d)
    valid_len = torch.full((b,), length, dtype=torch.int64)
    out, lse = attention_with_lse(q, k, v, valid_len, 0.25)
    assert out.shape == (b, hkv, m, d) and lse.shape == (b, hkv, m)
    assert not torch.isnan(out).any()
    if m:
        assert (out == 0).all() and torch.isneginf(lse).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("length", [2, 17, 150])
def test_merge_attention_is_exact(length, dtype):
    torch.manual_seed(100 + length)
    b, hkv, m, d = 3, 2, 5, 32
    scale = 1.0 / math.sqrt(d)
    q = _rand(b, hkv, m, d, dtype=dtype)
    k = _rand(b, hkv, length, d, dtype=dtype)
    v = _rand(b, hkv, length, d, dtype=dtype)
    cut = int(torch.randint(1, length, ()).item())
    full = torch.full((b,), length, dtype=torch.int64)
    out_a, lse_a = attention_with_lse(q, k[:, :, :cut], v[:, :, :cut], torch.full((b,), cut), scale)
    out_b, lse_b = attention_with_lse(q, k[:, :, cut:], v[:, :, cut:], torch.full((b,), length - cut), scale)
    merged = merge_attention(out_a, lse_a, out_b, lse_b)
    assert merged.dtype == dtype
    want, _ = _naive_lse(q, k, v, full, scale)
    assert (merged.double() - want).abs().max().item() <= TOL[dtype]


def test_merge_attention_empty_parts():
    torch.manual_seed(5)
    out_a = _rand(4, 3, 8)
    out_b = _rand(4, 3, 8)
    lse_a = _rand(4, 3)
    lse_b = _rand(4, 3)
    inf = torch.full((4, 3), -math.inf)
    assert torch.allclose(merge_attention(out_a, lse_a, torch.zeros_like(out_b), inf), out_a, atol=1e-6)
    assert torch.allclose(merge_attention(torch.zeros_like(out_a), inf, out_b, lse_b), out_b, atol=1e-6)
    both = merge_attention(torch.zeros_like(out_a), inf, torch.zeros_like(out_b), inf)
    assert (both == 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_merge_never_empty_matches_guarded_merge(dtype):
    """may_be_empty=False (sigmoid weight, lerp) gives the guarded merge's result, also where part b is
    empty (lse -inf) or far larger / smaller than part a."""
    torch.manual_seed(7)
    out_a, out_b = _rand(6, 3, 16, dtype=dtype), _rand(6, 3, 16, dtype=dtype)
    lse_a = _rand(6, 3) * 5
    lse_b = _rand(6, 3) * 5
    lse_b[0] = -math.inf  # empty b
    lse_b[1] = lse_a[1] + 60.0  # b dominates
    lse_b[2] = lse_a[2] - 60.0  # a dominates
    fast_out, fast_lse = merge_with_lse(out_a, lse_a, out_b, lse_b, may_be_empty=False)
    ref_out, ref_lse = merge_with_lse(out_a, lse_a, out_b, lse_b)
    assert fast_out.dtype == dtype and fast_lse.dtype == torch.float32
    assert torch.allclose(fast_lse, ref_lse, atol=1e-5, rtol=1e-6)
    assert (fast_out.float() - ref_out.float()).abs().max().item() <= (1e-6 if dtype == torch.float32 else 1e-2)
    assert torch.equal(fast_out[0], out_a[0]) and torch.equal(fast_lse[0], lse_a[0])
    last_out, no_lse = merge_with_lse(out_a, lse_a, out_b, lse_b, may_be_empty=False, need_lse=False)  # a last merge
    assert no_lse is None and torch.equal(last_out, fast_out)


def _masked_softmax_attention(q, k, v, keep, scale):
    """Hand-written attention in float64, K/V repeated per group; keep [.., Lq, Lk] bool."""
    g = q.shape[1] // k.shape[1]
    k = k.double().repeat_interleave(g, dim=1)  # [B, H, Lk, D]
    v = v.double().repeat_interleave(g, dim=1)  # [B, H, Lk, D]
    scores = (q.double() @ k.transpose(-2, -1)) * scale  # [B, H, Lq, Lk]
    scores = scores.masked_fill(~keep, -math.inf)
    return torch.softmax(scores, dim=-1) @ v  # [B, H, Lq, D]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
@pytest.mark.parametrize("length", [1, 13, 70])
def test_causal_attention(length, heads, dtype):
    torch.manual_seed(200 + length)
    h, hkv = heads
    b, d = 2, 64
    q = _rand(b, h, length, d, dtype=dtype)
    k = _rand(b, hkv, length, d, dtype=dtype)
    v = _rand(b, hkv, length, d, dtype=dtype)
    scale = 1.0 / math.sqrt(d)
    got = causal_attention(q, k, v, scale)
    keep = torch.ones(length, length, dtype=torch.bool).tril()  # [L, L]
    want = _masked_softmax_attention(q, k, v, keep, scale)
    assert got.shape == (b, h, length, d) and got.dtype == dtype
    assert (got.double() - want).abs().max().item() <= TOL[dtype]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("heads", HEADS, ids=HEAD_IDS)
def test_replicated_decode_attention(heads, dtype):
    torch.manual_seed(300)
    h, hkv = heads
    s, length, d = 5, 50, 64
    valid = [1, 50, 17, 0, 33]
    q = _rand(s, h, d, dtype=dtype)
    k = _rand_cache(s, hkv, length, d, valid, dtype)
    v = _rand_cache(s, hkv, length, d, valid, dtype)
    valid_len = torch.tensor(valid, dtype=torch.int64)
    got = replicated_decode_attention(q, k, v, valid_len, 0.125)
    assert got.shape == (s, h, d) and got.dtype == dtype
    assert torch.isfinite(got).all()
    keep = (torch.arange(length)[None, :] < valid_len[:, None])[:, None, None, :]  # [S, 1, 1, L]
    want = _masked_softmax_attention(q[:, :, None], k, v, keep, 0.125)[:, :, 0]  # [S, H, D]
    want[3] = 0.0  # no valid key: defined as 0
    assert (got.double() - want).abs().max().item() <= TOL[dtype]


def test_decode_rows_from_counts():
    prompt_rows, row_pos, sample_to_prompt = decode_rows_from_counts([2, 0, 3])
    assert prompt_rows.tolist() == [[0, 1, 0], [0, 0, 0], [2, 3, 4]]
    assert row_pos.tolist() == [0, 1, 6, 7, 8]
    assert sample_to_prompt.tolist() == [0, 0, 2, 2, 2]
    assert torch.equal(prompt_rows.flatten()[row_pos], torch.arange(5))
    wide, _, _ = decode_rows_from_counts([1, 2], n_max=4)
    assert wide.shape == (2, 4)
    with pytest.raises(ValueError):
        decode_rows_from_counts([5], n_max=4)


def test_bifurcated_compiles_fullgraph():
    """torch.compile(fullgraph=True) traces both CPU paths (flash context part, matmul sample part)."""
    torch.manual_seed(9)
    h, hkv, d = 2, 2, 16
    prompt_rows, row_pos, _ = decode_rows_from_counts([2, 1])
    s, p = 3, 2
    q = _rand(s, h, d)
    kc, vc = _rand(p, hkv, 40, d), _rand(p, hkv, 40, d)
    kd, vd = _rand(s, hkv, 8, d), _rand(s, hkv, 8, d)
    ctx_len = torch.tensor([33, 4])
    compiled = torch.compile(bifurcated_decode_attention, fullgraph=True)
    for dec in ([1, 5, 0], [2, 8, 1]):  # new lengths, same shapes: no retrace needed
        dec_len = torch.tensor(dec)
        args = (q, kc, vc, ctx_len, prompt_rows, row_pos, kd, vd, dec_len, 0.25)
        got = compiled(*args)
        want = bifurcated_decode_attention(*args)
        assert torch.isfinite(got).all()
        assert (got - want).abs().max().item() <= 1e-5
