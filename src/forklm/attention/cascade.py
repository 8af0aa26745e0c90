"""Attention backends bound to a step plan: the objects the model's layers call `attend` on.

Decode (`DecodeAttention`): the current token's K/V is written to each row's pool slot (or, for a
row that keeps its K/V after its prompt, to its slot in the prompt's segment, a request's samples
taking turns there when it has several: one masked call then reads the prompt and their own), then one
LSE-returning pass per level (the sample level over the pool rows, then the plan's shared segments
over exactly the rows below them, one batched call per depth of the tree) folded by the exact
merge. Cost follows the live rows and the real lengths: the pool is read up to the longest live row
and the highest live row, a segment up to its valid length, and no level is padded to a fixed
number of samples.

Prefill (`PrefillAttention`): a chunk of one prompt writes its K/V, attends causally to itself (and
to earlier chunks of the same segment) and fully to the cached segments above it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kv.plan import DecodePlan, LevelGroup, PrefillChunk
from ..kv.storage import SamplePool, flat_index, write_at
from .ops import (KeyMask, attention, attention_with_lse, attention_with_lse_per_query, causal_attention, causal_attention_with_lse,
                  interleaved_key_mask, key_mask, merge_with_lse)


def _level_pass(q: Tensor, k: Tensor, v: Tensor, length: Tensor, scale: float,
                mask: KeyMask | None = None) -> tuple[Tensor, Tensor]:
    """R rows' queries q [R, H, D] against one segment k/v [1, Hkv, L, D] (first `length` valid):
    the R * G queries of a kv head are the rows of one kernel call. Returns [R, H, D], [R, H]."""
    r, h, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    if r == 1:  # one row: [1, H, D] is [1, Hkv, G, D] as it stands (no permutes)
        out, lse = attention_with_lse(q.reshape(1, hkv, g, d), k, v, length, scale, mask)
        return out.reshape(1, h, d), lse.reshape(1, h)  # [1, H, D], [1, H]
    qs = q.reshape(r, hkv, g, d).permute(1, 0, 2, 3).reshape(1, hkv, r * g, d)  # [1, Hkv, R*G, D]
    out, lse = attention_with_lse(qs, k, v, length, scale, mask)  # [1, Hkv, R*G, D], [1, Hkv, R*G]
    out = out.reshape(hkv, r, g, d).permute(1, 0, 2, 3).reshape(r, h, d)  # [R, H, D]
    lse = lse.reshape(hkv, r, g).permute(1, 0, 2).reshape(r, h)  # [R, H]
    return out, lse


def _group_pass(qz: Tensor, group: LevelGroup, k: Tensor, v: Tensor, scale: float,
                mask: KeyMask | None = None) -> tuple[Tensor, Tensor]:
    """P segments k/v [P, Hkv, W, D] (first group.lengths[p] valid), each against its own rows'
    queries, in one kernel call. qz [B + 1, H, D]: the batch's queries and a zero row (padding).
    Returns [U, H, D], [U, H] for group.rows."""
    p, m = group.query_index.shape
    h, d = qz.shape[1:]
    hkv = k.shape[1]
    g = h // hkv
    qs = qz[group.query_index]  # [P, M, H, D]
    qs = qs.reshape(p, m, hkv, g, d).permute(0, 2, 1, 3, 4).reshape(p, hkv, m * g, d)  # [P, Hkv, M*G, D]
    out, lse = attention_with_lse(qs, k, v, group.lengths, scale, mask)  # [P, Hkv, M*G, D], [P, Hkv, M*G]
    out = out.reshape(p, hkv, m, g, d).permute(0, 2, 1, 3, 4).reshape(p * m, h, d)  # [P*M, H, D]
    lse = lse.reshape(p, hkv, m, g).permute(0, 2, 1, 3).reshape(p * m, h)  # [P*M, H]
    return out[group.out_index], lse[group.out_index]  # [U, H, D], [U, H]


def _only_tails(plan: DecodePlan) -> bool:
    """Every row keeps its K/V after one prompt and reads nothing else (no pool pass, one level: the
    prompt's segment with the rows' own tokens after it)."""
    if plan.pool_pass or len(plan.tails) != plan.num_rows or len(plan.groups) != 1:
        return False
    group = plan.groups[0]
    segment = group.passes[0].segment
    return group.query_index is None and all(tw.segment is segment for tw in plan.tails)


class DecodeAttention:
    """One decode step's attention. What depends only on the plan (the pool's write index, each
    level's key mask) is built at the first layer and reused by the others: the lengths are the same
    in every layer, and rebuilding them cost ~10 small ops per level per layer."""

    def __init__(self, pool: SamplePool, plan: DecodePlan):
        self.pool, self.plan = pool, plan
        self._stacks: dict[int, Tensor] = {}  # group -> [2, P, Hkv, W, D] zeros, refilled per layer
        # one-segment group -> its K and V, per layer [1, Hkv, W, D] views
        self._segments: dict[int, tuple[tuple[Tensor, ...], tuple[Tensor, ...]]] = {}
        self._write_index: Tensor | None = None  # [N * Hkv] into a pool buffer's flat [S*Hkv*T, D] view
        self._pool_views: tuple[tuple[Tensor, ...], tuple[Tensor, ...]] | None = None  # pool.window, per layer
        self._masks: dict[object, KeyMask | None] = {}  # "pool" / group index -> its key mask (CPU only)
        self._only_tails = _only_tails(plan)
        # rows keeping their K/V after their prompt, per segment: (its layers as flat [2*Hkv*cap, D] views,
        # the [R * Hkv] write indexes of its rows' K heads and of their V heads, their query tokens: None for
        # every row of the batch); made at the first layer
        self._tail_writes: list[tuple[tuple[Tensor, ...], Tensor, Tensor, slice | Tensor | None]] | None = None
        self._tail_views: tuple[tuple[Tensor, ...], tuple[Tensor, ...]] | None = None  # the one level's K, V

    def _mask(self, key, valid: Tensor, length: int, q: Tensor) -> KeyMask | None:
        if key not in self._masks:
            group = self.plan.groups[key] if isinstance(key, int) else None
            il = None if group is None else group.passes[0].interleave
            if il is not None:  # rows read their own keys only: a mask per query row
                owners = torch.tensor(il.owners, device=q.device)  # [R]
                g = q.shape[1] // self.pool.k[0].shape[1]
                self._masks[key] = interleaved_key_mask(length, il.start, il.stride, owners, g, q.dtype)
            elif q.device.type != "cpu":
                return None
            else:
                self._masks[key] = key_mask(valid, length, q.dtype)
        return self._masks[key]

    def _write_tails(self, layer: int, k: Tensor, v: Tensor) -> None:
        """This token's K/V of every row keeping them after its prompt, to its slot there: one index_copy_
        per segment (per row, two copies a layer were a step's largest glue at n=16)."""
        if self._tail_writes is None:
            by_segment: dict[int, list] = {}
            for tw in self.plan.tails:
                by_segment.setdefault(id(tw.segment), []).append(tw)
            self._tail_writes = []
            for tws in by_segment.values():
                kv = tws[0].segment.kv  # [layers, 2, Hkv, cap, D]
                layers, _, hkv, cap, d = kv.shape
                heads = torch.arange(hkv, device=kv.device) * cap  # [Hkv]
                slots = torch.tensor([tw.slot for tw in tws], device=kv.device)  # [R]
                index = (slots[:, None] + heads).flatten()  # [R*Hkv]: row r's K head h (its V head: + Hkv*cap)
                toks = [tw.token for tw in tws]
                if toks == list(range(len(k))):
                    sel = None  # every row of the batch, in order
                elif toks == list(range(toks[0], toks[-1] + 1)):
                    sel = slice(toks[0], toks[-1] + 1)
                else:
                    sel = slots.new_tensor(toks)
                self._tail_writes.append((kv.view(layers, 2 * hkv * cap, d).unbind(0), index, index + hkv * cap, sel))
        d = k.shape[-1]
        for flat, index_k, index_v, sel in self._tail_writes:
            ks, vs = (k, v) if sel is None else (k[sel], v[sel])  # [R, Hkv, 1, D] each
            # two copies from views, no cat: 2 operators a layer fewer at n=1
            flat[layer].index_copy_(0, index_k, ks.reshape(-1, d))  # [R*Hkv, D]
            flat[layer].index_copy_(0, index_v, vs.reshape(-1, d))

    def _attend_tails(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """Every row reads only its prompt's segment, its own K/V after the prompt (n=1), or its turns of
        them (a few samples): write them, attend to the segment's valid keys in place in one call (masked
        per row when several samples interleave): no pool pass, LSE or merge. (The general path below gives
        the same for this plan, in about twice the operators a layer: what a small-n step mostly spends on.)"""
        self._write_tails(layer, k, v)
        group = self.plan.groups[0]
        if self._tail_views is None:
            kv = group.passes[0].segment.kv  # [layers, 2, Hkv, cap, D]
            n = group.width  # the prompt and the rows' tokens, this step's included
            self._tail_views = (kv[:, 0:1, :, :n].unbind(0), kv[:, 1:2, :, :n].unbind(0))  # valid K, V: [1, Hkv, n, D]
        ks, vs = self._tail_views
        r, h, _, d = q.shape
        hkv = k.shape[1]
        g = h // hkv
        if group.passes[0].interleave is None:  # one sample: every valid key, no mask or LSE
            out = attention(q.reshape(1, hkv, g, d), ks[layer], vs[layer], d**-0.5)  # [1, Hkv, G, D]
            return out.reshape(1, h, 1, d)  # [1, H, 1, D]
        # several samples taking turns: a mask per sample (its LSE unused)
        qs = q.reshape(r, hkv, g, d).permute(1, 0, 2, 3).reshape(1, hkv, r * g, d)  # [1, Hkv, R*G, D]
        mask = self._mask(0, group.lengths, group.width, q)
        out = attention_with_lse(qs, ks[layer], vs[layer], group.lengths, d**-0.5, mask)[0]  # [1, Hkv, R*G, D]
        return out.reshape(hkv, r, g, d).permute(1, 0, 2, 3).reshape(r, h, 1, d)  # [R, H, 1, D]

    def _segment(self, i: int, group: LevelGroup) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """The one segment of group i, its valid keys: per layer [1, Hkv, W, D] views of K and of V (made at
        the first layer, all layers' in a few operators: per layer they are a tuple index instead of four)."""
        views = self._segments.get(i)
        if views is None:
            kv = group.passes[0].segment.kv  # [layers, 2, Hkv, cap, D]
            views = self._segments[i] = (kv[:, 0:1, :, : group.width].unbind(0), kv[:, 1:2, :, : group.width].unbind(0))
        return views

    def _stack(self, i: int, group: LevelGroup, layer: int) -> tuple[Tensor, Tensor]:
        """The group's segments side by side for `layer`: [P, Hkv, W, D] each for K and V (slots past a
        segment's length stay zero, and are masked)."""
        first = group.passes[0].segment.kv  # [layers, 2, Hkv, cap, D]
        buf = self._stacks.get(i)
        if buf is None:
            buf = self._stacks[i] = first.new_zeros(2, len(group.passes), first.shape[2], group.width, first.shape[4])
        for j, lp in enumerate(group.passes):
            buf[:, j, :, : lp.length] = lp.segment.kv[layer, :, :, : lp.length]  # [2, Hkv, n, D]
        return buf[0], buf[1]

    def _layer_window(self, layer: int) -> tuple[Tensor, Tensor]:
        """The pool's written slots of this step's rows in `layer`: K, V [R, Hkv, W, D]."""
        ks, vs = self._pool_views
        return ks[layer], vs[layer]

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # q [N, H, 1, D]; k, v [N, Hkv, 1, D]: one query token per row, or several (a verified draft)
        if self._only_tails:
            return self._attend_tails(layer, q, k, v)
        plan, pool = self.plan, self.pool
        kp = pool.k[layer]  # [S, Hkv, T, D]
        pt = plan.pool_tokens  # None: every token's K/V goes to the pool
        # written before attending: no level is empty
        if plan.write_slot is not None:  # rows 0..B-1 in lockstep: a strided copy per buffer (cheaper than
            # an index_copy_ and its reshape: docs/architecture.md)
            kp[: q.shape[0], :, plan.write_slot] = k[:, :, 0]  # [B, Hkv, D]
            pool.v[layer][: q.shape[0], :, plan.write_slot] = v[:, :, 0]
        elif pt is None or pt.numel():
            if self._write_index is None:
                rows, pos = (plan.pool_rows, plan.write_pos) if pt is None else (plan.pool_rows[pt], plan.write_pos[pt])
                self._write_index = flat_index(kp.shape, rows, pos)
            write_at(pool.k_flat[layer], self._write_index, k if pt is None else k[pt])  # [N, Hkv, 1, D]
            write_at(pool.v_flat[layer], self._write_index, v if pt is None else v[pt])
        if plan.tails:  # rows keeping their K/V after their prompt, in its segment
            self._write_tails(layer, k, v)
        b, h, _, d = q.shape
        hkv = k.shape[1]
        g = h // hkv
        scale = d**-0.5
        q = q[:, :, 0]  # [N, H, D]
        r, w = plan.pool_len.shape[0], plan.window
        if plan.pool_pass and self._pool_views is None:  # the rows' written slots, all layers' at the first
            self._pool_views = pool.window(r, w)
        out = lse = None  # no pool pass: the depth-0 level's result is every row's first part
        if plan.pool_pass and plan.query_len is not None:  # several tokens per row: the [R, Q] grid, causal within a row
            nq = plan.query_len.shape[1]
            qp = q.new_zeros(r * nq, h, d).index_copy_(0, plan.grid_index, q)  # [R*Q, H, D]
            qp = qp.reshape(r, nq, hkv, g, d).permute(0, 2, 1, 3, 4).reshape(r, hkv, nq * g, d)  # [R, Hkv, Q*G, D]
            valid = plan.query_len.repeat_interleave(g, dim=1)  # [R, Q*G]: query j*G + g
            out, lse = attention_with_lse_per_query(qp, *self._layer_window(layer), valid, scale)
            out = out.reshape(r, hkv, nq, g, d).permute(0, 2, 1, 3, 4).reshape(r * nq, h, d)  # [R*Q, H, D]
            lse = lse.reshape(r, hkv, nq, g).permute(0, 2, 1, 3).reshape(r * nq, h)  # [R*Q, H]
            out, lse = out[plan.grid_index], lse[plan.grid_index]  # [N, H, D], [N, H]
        elif plan.pool_pass:
            qp = q if plan.dense else q.new_zeros(r, h, d).index_copy_(0, plan.pool_rows, q)  # [R, H, D] pool order
            out, lse = attention_with_lse(
                qp.reshape(r, hkv, g, d), *self._layer_window(layer), plan.pool_len, scale,
                self._mask("pool", plan.pool_len, w, q),
            )  # [R, Hkv, G, D], [R, Hkv, G]
            out, lse = out.reshape(r, h, d), lse.reshape(r, h)  # [R, H, D], [R, H]
            if not plan.dense:
                out, lse = out[plan.pool_rows], lse[plan.pool_rows]  # [B, H, D], [B, H]
        qz = None
        last = len(plan.groups) - 1
        for i, group in enumerate(plan.groups):
            every = isinstance(group.rows, slice) and group.rows == slice(0, b)  # the group covers every row
            if group.query_index is None:  # one segment: read in place
                ks, vs = self._segment(i, group)
                o, l = _level_pass(q if every else q[group.rows], ks[layer], vs[layer], group.lengths, scale,
                                   self._mask(i, group.lengths, group.width, q))
            else:
                if qz is None:
                    qz = torch.cat([q, q.new_zeros(1, h, d)])  # [N + 1, H, D]: row N pads
                o, l = _group_pass(qz, group, *self._stack(i, group, layer), scale,
                                   self._mask(i, group.lengths, group.width, q))
            if out is None or (not plan.pool_pass and group.depth == 0):
                # the first part of its rows: with no pool pass, the depth-0 levels cover every row between
                # them (the plan checks), a request's interleaved samples in a group of their own
                if out is None and every:
                    out, lse = o, l
                    continue
                if out is None:
                    out, lse = o.new_empty(b, h, d), l.new_empty(b, h)  # [N, H, D], [N, H]
                if isinstance(group.rows, slice):
                    out[group.rows], lse[group.rows] = o, l
                else:
                    out.index_copy_(0, group.rows, o)
                    lse.index_copy_(0, group.rows, l)
                continue
            # the running part a has a key in every row (the pool level, written above, or a row's own
            # segment first) unless the plan says otherwise: then the guarded merge
            o, l = merge_with_lse(out if every else out[group.rows], lse if every else lse[group.rows], o, l,
                                  may_be_empty=plan.may_be_empty, need_lse=i < last or not every)  # [U, H, D], [U, H]
            if every:
                out, lse = o, l
            elif isinstance(group.rows, slice):
                out[group.rows], lse[group.rows] = o, l
            else:
                out.index_copy_(0, group.rows, o)
                lse.index_copy_(0, group.rows, l)
        return out.unsqueeze(2)  # [N, H, 1, D]


class PrefillAttention:
    def __init__(self, chunk: PrefillChunk):
        self.chunk = chunk
        device = chunk.own.kv.device
        self._lengths = [torch.tensor([n], dtype=torch.long, device=device) for _, n in chunk.levels]  # [1] each

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # q [1, H, c, D]; k, v [1, Hkv, c, D]
        ch = self.chunk
        ch.own.write(layer, ch.own_offset, k[0], v[0])
        scale = q.shape[-1] ** -0.5
        if not ch.levels and ch.own_offset == 0:  # the whole prompt at once: plain causal attention
            return causal_attention(q, k, v, scale=scale)
        end = ch.own_offset + q.shape[2]
        ko, vo = ch.own.k(layer)[:, :end].unsqueeze(0), ch.own.v(layer)[:, :end].unsqueeze(0)  # [1, Hkv, end, D]
        out, lse = causal_attention_with_lse(q, ko, vo, ch.own_offset, scale)  # [1, H, c, D], [1, H, c]
        out, lse = out[0].transpose(0, 1), lse[0].transpose(0, 1)  # [c, H, D], [c, H]: tokens as rows
        qt = q[0].transpose(0, 1)  # [c, H, D]
        for (seg, n), length in zip(ch.levels, self._lengths):
            ks, vs = seg.k(layer)[None, :, :n], seg.v(layer)[None, :, :n]  # [1, Hkv, n, D]
            o, l = _level_pass(qt, ks, vs, length, scale)  # [c, H, D], [c, H]
            out, lse = merge_with_lse(out, lse, o, l)
        return out.transpose(0, 1).unsqueeze(0)  # [1, H, c, D]


class CausalAttention:
    """No cache at all: plain causal attention over the tokens given (scoring whole sequences)."""

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # q [N, H, L, D]; k, v [N, Hkv, L, D]
        return causal_attention(q, k, v, scale=q.shape[-1] ** -0.5)
