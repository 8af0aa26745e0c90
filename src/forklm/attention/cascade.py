"""Attention backends bound to a step plan: the objects the model's layers call `attend` on.

Decode (`DecodeAttention`): the current token's K/V is written to each row's pool slot, then one
LSE-returning pass per level (the sample level over the pool rows, then every shared segment of the
plan over exactly the rows below it) folded by the exact merge. Cost follows the live rows and the
real lengths: the pool is read up to the longest live row and the highest live row, a segment up to
its valid length, and no level is padded to a fixed number of samples.

Prefill (`PrefillAttention`): a chunk of one prompt writes its K/V, attends causally to itself (and
to earlier chunks of the same segment) and fully to the cached segments above it.
"""

from __future__ import annotations

import torch
from torch import Tensor

from ..kv.plan import DecodePlan, PrefillChunk
from ..kv.storage import SamplePool, write_at
from .ops import attention_with_lse, causal_attention, causal_attention_with_lse, merge_with_lse


def _level_pass(q: Tensor, k: Tensor, v: Tensor, length: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """R rows' queries q [R, H, D] against one segment k/v [Hkv, L, D] (first `length` valid):
    the R * G queries of a kv head are the rows of one kernel call. Returns [R, H, D], [R, H]."""
    r, h, d = q.shape
    hkv = k.shape[0]
    g = h // hkv
    qs = q.reshape(r, hkv, g, d).permute(1, 0, 2, 3).reshape(1, hkv, r * g, d)  # [1, Hkv, R*G, D]
    out, lse = attention_with_lse(qs, k.unsqueeze(0), v.unsqueeze(0), length, scale)  # [1, Hkv, R*G, D], [1, Hkv, R*G]
    out = out.reshape(hkv, r, g, d).permute(1, 0, 2, 3).reshape(r, h, d)  # [R, H, D]
    lse = lse.reshape(hkv, r, g).permute(1, 0, 2).reshape(r, h)  # [R, H]
    return out, lse


class DecodeAttention:
    def __init__(self, pool: SamplePool, plan: DecodePlan):
        self.pool, self.plan = pool, plan
        device = plan.pool_rows.device
        self._lengths = [torch.tensor([lv.length], dtype=torch.long, device=device) for lv in plan.levels]  # [1] each

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # q [B, H, 1, D]; k, v [B, Hkv, 1, D]
        plan, pool = self.plan, self.pool
        kp, vp = pool.k[layer], pool.v[layer]  # [S, Hkv, T, D]
        write_at(kp, plan.pool_rows, plan.write_pos, k[:, :, 0])  # written before attending: no level is empty
        write_at(vp, plan.pool_rows, plan.write_pos, v[:, :, 0])
        b, h, _, d = q.shape
        hkv = k.shape[1]
        scale = d**-0.5
        q = q[:, :, 0]  # [B, H, D]
        r, w = plan.pool_len.shape[0], plan.window
        if plan.dense:
            qp = q
        else:
            qp = q.new_zeros(r, h, d).index_copy_(0, plan.pool_rows, q)  # [R, H, D] in pool order
        out, lse = attention_with_lse(
            qp.reshape(r, hkv, h // hkv, d), kp[:r, :, :w], vp[:r, :, :w], plan.pool_len, scale
        )  # [R, Hkv, G, D], [R, Hkv, G]
        out, lse = out.reshape(r, h, d), lse.reshape(r, h)  # [R, H, D], [R, H]
        if not plan.dense:
            out, lse = out[plan.pool_rows], lse[plan.pool_rows]  # [B, H, D], [B, H]
        for lv, length in zip(plan.levels, self._lengths):
            seg = lv.segment
            o, l = _level_pass(q[lv.rows], seg.k(layer)[:, : lv.length], seg.v(layer)[:, : lv.length], length, scale)
            o, l = merge_with_lse(out[lv.rows], lse[lv.rows], o, l)  # [R, H, D], [R, H]
            if isinstance(lv.rows, slice):
                out[lv.rows], lse[lv.rows] = o, l
            else:
                out.index_copy_(0, lv.rows, o)
                lse.index_copy_(0, lv.rows, l)
        return out.unsqueeze(2)  # [B, H, 1, D]


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
            o, l = _level_pass(qt, seg.k(layer)[:, :n], seg.v(layer)[:, :n], length, scale)  # [c, H, D], [c, H]
            out, lse = merge_with_lse(out, lse, o, l)
        return out.transpose(0, 1).unsqueeze(0)  # [1, H, c, D]


class CausalAttention:
    """No cache at all: plain causal attention over the tokens given (scoring whole sequences)."""

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # q [N, H, L, D]; k, v [N, Hkv, L, D]
        return causal_attention(q, k, v, scale=q.shape[-1] ** -0.5)
