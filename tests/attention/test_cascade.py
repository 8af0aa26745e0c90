"""Level attention (attention/cascade.py) vs plain SDPA over each row's explicitly concatenated keys.

Decode: B rows under a tree of shared segments (1 to 4 levels, ragged lengths, empty levels), each
row with its own pool row; prefill: a chunk attending to cached levels and causally to itself."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from forklm.attention.cascade import DecodeAttention, PrefillAttention
import forklm.attention.ops as ops
from forklm.kv.plan import DecodePlan, LevelGroup, LevelPass, PrefillChunk, build_decode_plan
from forklm.kv.storage import SamplePool, Segment

HEADS = [(4, 4), (8, 2), (6, 1)]  # MHA, GQA, MQA
TOL = {torch.float32: 2e-5, torch.bfloat16: 3e-2}
LENGTHS = [1, 15, 16, 17, 300, 0]


def _random_pool(rows, hkv, t, d, dtype):
    """A one-layer sample pool full of random K/V."""
    return SamplePool(torch.randn(2, 1, rows, hkv, t, d).to(dtype))  # [2, layers, S, Hkv, T, D]


def _segment(hkv, length, d, dtype, spare=3):
    kv = torch.randn(1, 2, hkv, length + spare, d).to(dtype)  # spare slots hold garbage past `length`
    kv[..., length:, :] *= 50
    return Segment(kv, length)


def _reference(q, keys, values):
    """q [H, D]; keys/values [Hkv, L, D] -> SDPA over them, [H, D]."""
    g = q.shape[0] // keys.shape[0]
    out = F.scaled_dot_product_attention(q[None, :, None].float(), keys.repeat_interleave(g, 0)[None].float(),
                                         values.repeat_interleave(g, 0)[None].float())
    return out[0, :, 0]


@pytest.mark.parametrize("depth", [1, 2, 3, 4])
@pytest.mark.parametrize("heads", HEADS, ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("lockstep", [False, True], ids=["ragged", "lockstep"])
def test_decode_levels_match_sdpa_over_concatenated_cache(depth, heads, dtype, dense, lockstep):
    """Every level against SDPA over the row's concatenated keys; the token's K/V written to its slot and
    nowhere else (rows in lockstep, dense: by one strided copy, `DecodePlan.write_slot`)."""
    _check_decode_levels(depth, heads, dtype, dense, lockstep, 7)


@pytest.mark.parametrize("heads", HEADS[1:], ids=["gqa", "mqa"])  # (MHA: one query row a kv head, the reference)
@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("lockstep", [False, True], ids=["ragged", "lockstep"])
def test_decode_levels_of_many_samples_match_sdpa(heads, dense, lockstep, monkeypatch):
    """The same at large n in bfloat16, where the pool's level is many small problems and runs as float32
    GEMMs (`ops._cpu_gemm_with_lse`)."""
    calls = []
    gemm = ops._cpu_gemm_with_lse
    monkeypatch.setattr(ops, "_cpu_gemm_with_lse", lambda *a: calls.append(a[0].shape) or gemm(*a))
    _check_decode_levels(2, heads, torch.bfloat16, dense, lockstep, -(-ops._CPU_GEMM_MIN_PROBLEMS // heads[1]) + 5)
    assert calls  # the pool's level


def _check_decode_levels(depth, heads, dtype, dense, lockstep, B):
    torch.manual_seed(depth * 10 + heads[1] + B)
    h, hkv = heads
    d, T = 16, 24
    # a tree: level 0 one root segment; each further level splits the rows into more groups
    pool_rows = list(range(B)) if dense else [r + (r + 1) // 2 for r in range(B)]  # B=7: [0, 2, 3, 5, 6, 8, 9]
    R = pool_rows[-1] + 1
    pool = _random_pool(R, hkv, T, d, dtype)
    groups_per_level = [1, 2, 3, 7][:depth]
    levels, paths, by_depth = [], [[] for _ in range(B)], []
    for lvl, ngroups in enumerate(groups_per_level):
        by_depth.append([])
        bounds = torch.linspace(0, B, ngroups + 1).round().long().tolist()
        for gi in range(ngroups):
            lo, hi = bounds[gi], bounds[gi + 1]
            if lo == hi:
                continue
            length = LENGTHS[(lvl * 3 + gi) % len(LENGTHS)]
            seg = _segment(hkv, length, d, dtype)
            rows = slice(lo, hi) if (lvl + gi) % 2 == 0 else torch.arange(lo, hi)
            levels.append(LevelPass(seg, length, rows, hi - lo))
            by_depth[-1].append(levels[-1])
            for b in range(lo, hi):
                paths[b].append(seg)
    dec = [4] * B if lockstep else [(3, 0, 5, 1, 7, 2, 4)[b % 7] for b in range(B)]  # tokens in each row before
    write = torch.tensor(dec)
    pool_len = torch.zeros(R, dtype=torch.long)
    pool_len[pool_rows] = write + 1
    plan = DecodePlan(torch.tensor(pool_rows), write, write, pool_len, int(pool_len.max()), dense, levels,
                      [LevelGroup.of(passes[:: (-1) ** d], B, "cpu") for d, passes in enumerate(by_depth)],
                      write_slot=4 if lockstep and dense else None)
    # depths 1-3: ragged groups; odd depths list their passes backwards (rows not in order: an index)
    q, k, v = (torch.randn(B, x, 1, d).to(dtype) for x in (h, hkv, hkv))
    before = pool.kv.clone()
    out = DecodeAttention(pool, plan).attend(0, q, k, v)  # [B, H, 1, D]
    assert out.shape == (B, h, 1, d) and out.dtype == dtype
    written = torch.zeros(pool.kv.shape[:-1], dtype=torch.bool)  # [2, layers, S, Hkv, T]
    written[:, 0, pool_rows, :, dec] = True
    assert torch.equal(pool.kv[~written], before[~written])  # nothing else changed
    assert torch.equal(pool.v[0][pool_rows, :, dec], v[:, :, 0])
    for b, row in enumerate(pool_rows):
        ks = [s.k(0)[:, : s.length] for s in paths[b]] + [pool.k[0][row, :, : dec[b] + 1]]
        vs = [s.v(0)[:, : s.length] for s in paths[b]] + [pool.v[0][row, :, : dec[b] + 1]]
        assert torch.equal(pool.k[0][row, :, dec[b]], k[b, :, 0])  # the token was written first
        ref = _reference(q[b, :, 0], torch.cat(ks, 1), torch.cat(vs, 1))
        assert (out[b, :, 0].float() - ref).abs().max() < TOL[dtype], (b, depth)


@pytest.mark.parametrize("levels", [[], [17], [16, 1], [300, 15, 0]])
@pytest.mark.parametrize("offset, c", [(0, 1), (0, 9), (5, 1), (16, 17)])
@pytest.mark.parametrize("heads", HEADS, ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("flash", [True, False], ids=["cpu-flash", "reference"])
def test_prefill_chunk_matches_causal_sdpa_over_concatenation(levels, offset, c, heads, flash, monkeypatch):
    if not flash:
        monkeypatch.setattr(ops, "_HAS_CPU_FLASH", False)
    torch.manual_seed(offset + c)
    h, hkv = heads
    d = 16
    segs = [_segment(hkv, n, d, torch.float32) for n in levels]
    own = _segment(hkv, offset, d, torch.float32, spare=c)  # earlier chunks in [0, offset)
    start = sum(levels) + offset
    chunk = PrefillChunk("r", list(range(c)), start, [(s, n) for s, n in zip(segs, levels)], own, offset, True)
    q, k, v = torch.randn(1, h, c, d), torch.randn(1, hkv, c, d), torch.randn(1, hkv, c, d)
    out = PrefillAttention(chunk).attend(0, q, k, v)  # [1, H, c, D]
    K = torch.cat([s.k(0)[:, :n] for s, n in zip(segs, levels)] + [own.k(0)[:, : offset + c]], 1)  # [Hkv, Lk, D]
    V = torch.cat([s.v(0)[:, :n] for s, n in zip(segs, levels)] + [own.v(0)[:, : offset + c]], 1)
    assert torch.equal(own.k(0)[:, offset : offset + c], k[0])
    g = h // hkv
    Lk = K.shape[1]
    keep = torch.arange(Lk)[None, :] <= (start + torch.arange(c))[:, None]  # [c, Lk]
    ref = F.scaled_dot_product_attention(q, K.repeat_interleave(g, 0)[None], V.repeat_interleave(g, 0)[None],
                                         attn_mask=keep)
    assert (out - ref).abs().max() < 2e-5


@pytest.mark.parametrize("depth", [0, 1, 3])
@pytest.mark.parametrize("heads", HEADS, ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("flash", [True, False], ids=["cpu-flash", "reference"])
def test_multi_token_decode_matches_causal_sdpa_over_every_level(depth, heads, dtype, flash, monkeypatch):
    """A verify step: each row feeds 1..5 tokens (its last drawn one, then a draft), causal among
    themselves, after the row's own earlier tokens and every shared level above it."""
    if not flash:
        monkeypatch.setattr(ops, "_HAS_CPU_FLASH", False)
    torch.manual_seed(7 * depth + heads[1])
    h, hkv = heads
    d, T = 16, 24
    pool_rows = [0, 1, 3, 4, 5, 8]
    counts = [1, 5, 2, 4, 1, 3]
    dec = [3, 0, 6, 1, 9, 2]  # tokens already in each pool row
    B, R = len(pool_rows), pool_rows[-1] + 1
    pool = _random_pool(R, hkv, T, d, dtype)
    readers, paths = [], [[] for _ in range(B)]
    for lvl, ngroups in enumerate([1, 2, 3][:depth]):
        bounds = torch.linspace(0, B, ngroups + 1).round().long().tolist()
        for gi in range(ngroups):
            idx = list(range(bounds[gi], bounds[gi + 1]))
            length = LENGTHS[(lvl * 2 + gi) % len(LENGTHS)]
            seg = _segment(hkv, length, d, dtype)
            readers.append((lvl, seg, length, idx[::-1] if gi % 2 else idx))
            for b in idx:
                paths[b].append(seg)
    positions = [100 + x for x in dec]
    plan = build_decode_plan(pool_rows, counts, dec, positions, [True] * B, readers, "cpu")
    N = sum(counts)
    assert plan.num_rows == N and plan.positions.tolist() == [p + j for p, c in zip(positions, counts) for j in range(c)]
    q, k, v = (torch.randn(N, x, 1, d).to(dtype) for x in (h, hkv, hkv))
    out = DecodeAttention(pool, plan).attend(0, q, k, v)  # [N, H, 1, D]
    assert out.shape == (N, h, 1, d) and out.dtype == dtype
    i = 0
    for b, row in enumerate(pool_rows):
        for j in range(counts[b]):
            assert torch.equal(pool.k[0][row, :, dec[b] + j], k[i, :, 0])  # every fed token written first
            ks = [s.k(0)[:, : s.length] for s in paths[b]] + [pool.k[0][row, :, : dec[b] + j + 1]]
            vs = [s.v(0)[:, : s.length] for s in paths[b]] + [pool.v[0][row, :, : dec[b] + j + 1]]
            ref = _reference(q[i, :, 0], torch.cat(ks, 1), torch.cat(vs, 1))
            assert (out[i, :, 0].float() - ref).abs().max() < TOL[dtype], (b, j, depth)
            i += 1


def test_write_slot_only_for_a_dense_batch_in_lockstep():
    """`write_slot`: rows 0..B-1, one token each, all at one slot, no tail: else the index write."""
    seg = _segment(2, 5, 8, torch.float32)
    assert build_decode_plan([0, 1, 2], [1] * 3, [6] * 3, [9] * 3, [True] * 3, [], "cpu").write_slot == 6
    assert build_decode_plan([0, 1, 2], [1] * 3, [6, 5, 6], [9] * 3, [True] * 3, [], "cpu").write_slot is None
    assert build_decode_plan([0, 2], [1] * 2, [6] * 2, [9] * 2, [True] * 2, [], "cpu").write_slot is None
    assert build_decode_plan([0, 1], [2, 2], [6, 6], [9, 9], [True] * 2, [], "cpu").write_slot is None
    tails = build_decode_plan([0, 1], [1, 1], [0, 0], [9, 9], [True] * 2, [(0, seg, 6, [0])], "cpu", {0: (seg, 5)})
    assert tails.write_slot is None


def test_multi_token_plan_with_one_token_per_row_is_the_plain_plan():
    plan = build_decode_plan([0, 1, 2], [1, 1, 1], [4, 0, 2], [9, 5, 7], [True] * 3, [], "cpu")
    assert plan.query_len is None and plan.grid_index is None and plan.dense
    assert plan.pool_len.tolist() == [5, 1, 3] and plan.window == 5


@pytest.mark.parametrize("mixed", [False, True], ids=["tails-only", "with-pool-rows"])
@pytest.mark.parametrize("heads", HEADS, ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_rows_keeping_kv_after_their_prompt_match_sdpa(mixed, heads, dtype):
    """Rows whose own K/V follow their prompt in its segment (TailWrite): alone under their prompt (one
    pass over prompt and own tokens), under a shared system prompt, and, with pool rows beside them,
    under a prompt that pool rows read too (their own tokens a level below it)."""
    torch.manual_seed(3 + heads[1] + mixed)
    h, hkv = heads
    d, T = 16, 24
    system = _segment(hkv, 9, d, dtype)
    tails = {0: (13, 4), 1: (5, 0), 2: (300, 7)}  # batch row -> (prompt tokens, own tokens before this step)

    def prompt_with_room(p, t):  # p prompt tokens, t own ones after them, this step's slot; garbage past it
        seg = _segment(hkv, p + t + 1, d, dtype, spare=2)
        seg.length = p
        return seg

    own = {b: prompt_with_room(p, t) for b, (p, t) in tails.items()}
    # row 0: its prompt alone (one pass over prompt and own tokens); rows 1, 2 under the system prompt
    readers = [(0, own[0], 18, [0]), (0, system, 9, [1, 2]), (1, own[1], 6, [1]), (1, own[2], 308, [2])]
    paths = {0: [], 1: [system], 2: [system]}
    batch, dec = [0, 1, 2], [0, 0, 0]
    if mixed:  # pool rows 3 and 4 under the system prompt; row 5 a tail under row 4's prompt
        shared = prompt_with_room(17, 2)
        tails[5] = (17, 2)
        readers = [(0, own[0], 18, [0]), (0, system, 9, [1, 2, 3, 4, 5]), (1, own[1], 6, [1]),
                   (1, own[2], 308, [2]), (1, shared, 17, [4, 5]),
                   (2, Segment(shared.kv[:, :, :, 17:], 3), 3, [5])]
        paths.update({3: [system], 4: [system, shared], 5: [system]})
        own[5] = shared
        batch, dec = [0, 1, 2, 4, 6, 7], [0, 0, 0, 3, 5, 0]
    B = len(batch)
    pool = _random_pool(batch[-1] + 1, hkv, T, d, dtype)
    slots = {b: p + t for b, (p, t) in tails.items()}
    plan = build_decode_plan(batch, [1] * B, dec, [50] * B, [True] * B, readers, "cpu",
                             {b: (own[b], s) for b, s in slots.items()})
    assert plan.pool_pass == mixed and [t.token for t in plan.tails] == sorted(tails)
    q, k, v = (torch.randn(B, x, 1, d).to(dtype) for x in (h, hkv, hkv))
    pool_before = pool.k[0].clone()
    out = DecodeAttention(pool, plan).attend(0, q, k, v)  # [B, H, 1, D]
    assert out.shape == (B, h, 1, d) and out.dtype == dtype
    for b, row in enumerate(batch):
        if b in tails:
            p, t = tails[b]
            seg = own[b]
            assert torch.equal(seg.k(0)[:, p + t], k[b, :, 0]) and torch.equal(seg.v(0)[:, p + t], v[b, :, 0])
            assert torch.equal(pool.k[0][row], pool_before[row])  # nothing written to its pool row
            ks = [s.k(0)[:, : s.length] for s in paths[b]] + [seg.k(0)[:, : p + t + 1]]
            vs = [s.v(0)[:, : s.length] for s in paths[b]] + [seg.v(0)[:, : p + t + 1]]
        else:
            assert torch.equal(pool.k[0][row, :, dec[b]], k[b, :, 0])
            ks = [s.k(0)[:, : s.length] for s in paths[b]] + [pool.k[0][row, :, : dec[b] + 1]]
            vs = [s.v(0)[:, : s.length] for s in paths[b]] + [pool.v[0][row, :, : dec[b] + 1]]
        ref = _reference(q[b, :, 0], torch.cat(ks, 1), torch.cat(vs, 1))
        assert (out[b, :, 0].float() - ref).abs().max() < TOL[dtype], b


def test_a_tail_row_feeds_one_token_per_step():
    seg = _segment(2, 4, 8, torch.float32, spare=4)
    with pytest.raises(ValueError, match="one token"):
        build_decode_plan([0], [2], [0], [4], [True], [(0, seg, 5, [0])], "cpu", {0: (seg, 4)})


@pytest.mark.parametrize("prompt, own", [(1, 0), (16, 5), (299, 1)])
@pytest.mark.parametrize("heads", HEADS, ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_one_row_alone_after_its_prompt_takes_the_short_path_and_matches_sdpa(prompt, own, heads, dtype, monkeypatch):
    """One row whose K/V follow its prompt and that reads nothing else (n=1 after a cached prompt):
    the short path writes this token's K/V at its slot of the layer asked for and attends to the valid
    keys only (garbage past them), as SDPA over them and as the general path (pool, levels, merge)."""
    torch.manual_seed(prompt + 7 * heads[1])
    h, hkv = heads
    d, layers, layer = 16, 3, 2
    slot = prompt + own
    kv = torch.randn(layers, 2, hkv, slot + 4, d).to(dtype)
    kv[..., slot + 1:, :] *= 50  # past this step's slot: never read
    results = []
    for short in (True, False):
        if not short:
            monkeypatch.setattr("forklm.attention.cascade._only_tails", lambda plan: False)
        seg = Segment(kv.clone(), prompt)
        plan = build_decode_plan([0], [1], [0], [slot], [True], [(0, seg, slot + 1, [0])], "cpu", {0: (seg, slot)})
        torch.manual_seed(1)
        q, k, v = (torch.randn(1, x, 1, d).to(dtype) for x in (h, hkv, hkv))
        pool = _random_pool(1, hkv, 4, d, dtype)
        pool.k, pool.v = pool.k * layers, pool.v * layers  # the general path takes the layer's pool buffers
        attn = DecodeAttention(pool, plan)
        assert attn._only_tails == short
        out = attn.attend(layer, q, k, v)  # [1, H, 1, D]
        assert out.shape == (1, h, 1, d) and out.dtype == dtype
        assert torch.equal(seg.k(layer)[:, slot], k[0, :, 0]) and torch.equal(seg.v(layer)[:, slot], v[0, :, 0])
        written = seg.kv.clone()
        written[layer, :, :, slot] = kv[layer, :, :, slot]
        assert torch.equal(written, kv)  # nothing else written, other layers untouched
        ref = _reference(q[0, :, 0], seg.k(layer)[:, : slot + 1], seg.v(layer)[:, : slot + 1])
        assert (out[0, :, 0].float() - ref).abs().max() < TOL[dtype]
        results.append(out)
    assert (results[0].float() - results[1].float()).abs().max() < TOL[dtype]


@pytest.mark.parametrize("shape", ["alone", "under-system", "beside-pool-rows"])
@pytest.mark.parametrize("heads", HEADS, ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("short", [True, False], ids=["short-path", "general-path"])
def test_interleaved_samples_after_their_prompt_match_sdpa(shape, heads, dtype, short, monkeypatch):
    """A request of n=4 samples keeping its K/V after its prompt, interleaved (sample j's t-th token at
    p + t*n + j; sample 2 finished, so its turns hold stale values): each live row attends to the prompt
    and its own tokens only, as SDPA over exactly those; this step's tokens written to their turns and
    nothing else. Alone (one masked call), under a shared system prompt, and beside pool rows that read
    the prompt too (the samples' own tokens then a level below it)."""
    if not short:
        monkeypatch.setattr("forklm.attention.cascade._only_tails", lambda plan: False)
    torch.manual_seed(5 + heads[1] + len(shape))
    h, hkv = heads
    d, T, n, p, t = 16, 24, 4, 13, 5  # t own tokens of each sample before this step
    seg = _segment(hkv, p + n * (t + 1), d, dtype, spare=n * 3)
    seg.length = p
    live = [0, 1, 3]  # batch rows 0..2 are samples 0, 1, 3
    owners = {b: j for b, j in enumerate(live)}
    end = t * n + max(live) + 1
    system = _segment(hkv, 9, d, dtype)
    if shape == "alone":
        readers, batch, paths = [(0, seg, p + end, [0, 1, 2], (p, n, owners))], [0, 1, 2], {b: [] for b in range(3)}
    elif shape == "under-system":
        readers = [(0, system, 9, [0, 1, 2]), (1, seg, p + end, [0, 1, 2], (p, n, owners))]
        batch, paths = [0, 1, 2], {b: [system] for b in range(3)}
    else:  # pool rows 3, 4 read the prompt too
        own = Segment(seg.kv[:, :, :, p:], end)
        readers = [(0, seg, p, [0, 1, 2, 3, 4]), (1, own, end, [0, 1, 2], (0, n, owners))]
        batch, paths = [0, 1, 2, 3, 5], {b: [] for b in range(5)}
    B = len(batch)
    dec = [0, 0, 0, 2, 6][:B]
    tails = {b: (seg, p + t * n + j) for b, j in owners.items()}
    plan = build_decode_plan(batch, [1] * B, dec, [50] * B, [True] * B, readers, "cpu", tails)
    attn_ = DecodeAttention(_random_pool(batch[-1] + 1, hkv, T, d, dtype), plan)
    assert attn_._only_tails == (short and shape == "alone")
    q, k, v = (torch.randn(B, x, 1, d).to(dtype) for x in (h, hkv, hkv))
    before = seg.kv.clone()
    out = attn_.attend(0, q, k, v)  # [B, H, 1, D]
    assert out.shape == (B, h, 1, d) and out.dtype == dtype
    written = torch.zeros(seg.kv.shape[:-1], dtype=torch.bool)  # [layers, 2, Hkv, cap]
    for b, j in owners.items():
        written[0, :, :, p + t * n + j] = True
        assert torch.equal(seg.k(0)[:, p + t * n + j], k[b, :, 0]) and torch.equal(seg.v(0)[:, p + t * n + j], v[b, :, 0])
    assert torch.equal(seg.kv[~written], before[~written])
    pool = attn_.pool
    for b in range(B):
        if b in owners:
            mine = list(range(p)) + [p + s * n + owners[b] for s in range(t + 1)]  # prompt, then its own turns
            ks = [s_.k(0)[:, : s_.length] for s_ in paths[b]] + [seg.k(0)[:, mine]]
            vs = [s_.v(0)[:, : s_.length] for s_ in paths[b]] + [seg.v(0)[:, mine]]
        else:
            ks = [seg.k(0)[:, :p], pool.k[0][batch[b], :, : dec[b] + 1]]
            vs = [seg.v(0)[:, :p], pool.v[0][batch[b], :, : dec[b] + 1]]
        ref = _reference(q[b, :, 0], torch.cat(ks, 1), torch.cat(vs, 1))
        assert (out[b, :, 0].float() - ref).abs().max() < TOL[dtype], b


@pytest.mark.parametrize("flash", [True, False], ids=["cpu-flash", "reference"])
def test_interleaved_key_mask_keeps_the_prompt_and_each_rows_turns(flash, monkeypatch):
    """The mask of rows owning every n-th key after the prompt, against the positions written out, and
    attention under it as SDPA over each row's keys alone (one row and a long segment: the reference path)."""
    if not flash:
        monkeypatch.setattr(ops, "_HAS_CPU_FLASH", False)
    owners = torch.tensor([2, 0])
    m = ops.interleaved_key_mask(11, 4, 3, owners, 2, torch.float32)
    want = [[c < 4 or (c - 4) % 3 == j for c in range(11)] for j in (2, 2, 0, 0)]
    assert m.keep[0, 0].tolist() == want and m.additive.shape == (1, 1, 4, 11)
    torch.manual_seed(0)
    for rows, length in ((2, 11), (1, 200)):
        q, k, v = torch.randn(1, 1, rows, 8), torch.randn(1, 1, length, 8), torch.randn(1, 1, length, 8)
        mask = ops.interleaved_key_mask(length, 4, 3, owners[:rows], 1, torch.float32)
        out = ops.attention_with_lse(q, k, v, torch.tensor([length]), 8**-0.5, mask)[0]
        for r in range(rows):
            mine = [c for c in range(length) if c < 4 or (c - 4) % 3 == owners[r]]
            ref = _reference(q[0, :, r], k[0][:, mine], v[0][:, mine])
            assert (out[0, :, r] - ref).abs().max() < 2e-5
