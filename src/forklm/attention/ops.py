"""Attention kernels: causal prefill, attention with log-sum-exp, and bifurcated decode.

Everything here is a pure function of tensors, traceable by
``torch.compile(fullgraph=True)`` with static shapes: lengths arrive as int64
tensors and are turned into masks, never read back to Python.

Bifurcated decode: the prompt's keys/values are stored
once per prompt (context cache) and each sample's own decoded keys/values in a
sample cache. One decode step attends to both parts separately, each returning
its output and the log-sum-exp (LSE) of its scores, and merges them exactly with
``merge_attention``. The context part regroups the queries of all samples of a
prompt (times the GQA group) into the rows of one matrix, so the prompt's K/V are
read once per step for all samples and never repeated.

Shape letters used in comments:
  B  batch (prompts for prefill / context slots)     S  sample rows
  P  prompt (context) slots                          J  n_max, samples per prompt slot
  H  query heads    Hkv  key/value heads    G = H // Hkv (GQA group)
  M  query rows of one kv head                       L / Lc / T  key positions
  D  head dim

Dispatch of ``attention_with_lse`` (CPU choice measured, see the table below):
  * CPU: ``aten._scaled_dot_product_flash_attention_for_cpu`` with an additive
    float mask; the plain matmul reference for one query row against <= 128 keys
    (faster there) and for empty shapes (the op SIGFPEs on Lq == 0 or Lk == 0).
  * CUDA fp16/bf16: ``aten._scaled_dot_product_efficient_attention`` with an
    additive bias. The fixed-length flash op takes no mask, and ``valid_len`` is
    ragged per row, so the masked memory-efficient op is the kernel that fits.
  * Anything else (fp32 on CUDA, other devices, ops missing in this torch build,
    a kernel refusing the shapes in eager mode): ``attention_with_lse_reference``.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor

logger = logging.getLogger(__name__)

__all__ = [
    "attention",
    "attention_with_lse",
    "attention_with_lse_per_query",
    "causal_attention_with_lse",
    "merge_with_lse",
    "attention_with_lse_reference",
    "interleaved_key_mask",
    "bifurcated_decode_attention",
    "causal_attention",
    "decode_rows_from_counts",
    "merge_attention",
    "replicated_decode_attention",
]

# Feature detection, once at import (immutable flags). torch.ops.aten raises
# AttributeError for an op this build does not have.
# The CPU flash kernel through torch's own Python binding: 1-3 us less a call than through torch.ops, whose
# packet resolves the overload at every call (30-60 calls a decode step; benchmarks/results/op_calls_*.md)
_cpu_flash = getattr(torch, "_scaled_dot_product_flash_attention_for_cpu", None)
_HAS_CPU_FLASH = _cpu_flash is not None
_HAS_CUDA_EFFICIENT = hasattr(torch.ops.aten, "_scaled_dot_product_efficient_attention")

# The memory-efficient CUDA kernel wants the bias's last-dim stride aligned to 16
# elements (public SDPA pads the mask the same way before calling it).
_CUDA_BIAS_ALIGN = 16
# The memory-efficient CUDA kernel supports head dims up to this.
_CUDA_EFFICIENT_MAX_HEAD_DIM = 256

# CPU timings (torch 2.13 CPU, AVX-512 host, 2 threads shared with other jobs so
# +-30% noise; median ms per call, flash_for_cpu vs the fp32 matmul reference,
# D=64, valid_len drawn in [L/2, L]; each line measured twice in one process):
#   B=1,  Hkv=12, M=64, L=2048  fp32:  flash 3.3-3.9  reference 13.2-13.3
#   B=1,  Hkv=12, M=64, L=2048  bf16:  flash 4.2      reference 13.1-13.2
#   B=1,  Hkv=3,  M=192,L=2048  bf16:  flash 9.5      reference 105
#   B=64, Hkv=12, M=1,  L=32    fp32:  flash 0.39-0.46 reference 0.34-0.39
#   B=64, Hkv=12, M=1,  L=32    bf16:  flash 1.4-1.5  reference 0.48-0.72
#   B=64, Hkv=12, M=1,  L=128   fp32:  flash 2.6      reference 1.6-1.8
#   B=64, Hkv=12, M=1,  L=128   bf16:  flash 5.7-6.0  reference 2.8-2.9
#   B=64, Hkv=12, M=1,  L=256   fp32:  flash 4.6-4.7  reference 3.6-4.2
#   B=64, Hkv=12, M=1,  L=256   bf16:  flash 11.6-11.9 reference 34.7-34.9
#   B=64, Hkv=3,  M=3,  L=32..128 both dtypes: within 15% (flash 0.22-0.78, reference 0.25-0.81)
#   B=64, Hkv=3,  M=3,  L=512   fp32 / bf16: flash 3.5 / 16.0  reference 5.1 / 120
# So: the matmuls for a single query row against few keys (M == 1, L <= 128:
# 1.3-3x faster), flash_for_cpu everywhere else. The matmuls are `_cpu_gemm_with_lse` since it exists: the
# reference's math with fewer passes, as fast or up to 1.3x faster (benchmarks/results/attention_small_*.md,
# the 8 x 1 rows).
_CPU_REFERENCE_MAX_KEYS_AT_ONE_ROW = 128
# Many small problems (each sample's own keys at large n: B x Hkv problems of a few query rows against
# the tokens it generated) cost the bfloat16 flash kernel ~2-4 us each whatever their size; float32 batched
# GEMMs (`_cpu_gemm_with_lse`) take them together. On the AVX512-BF16 host, SmolLM2's 3 kv heads x 3 rows and
# 2 x 4, three runs: from 192 problems and 8 to 32 keys 1.0-2.9x faster (median ~1.5), at 64 keys 0.84-1.44
# (median ~1.25); slower below 192 problems, with one key now and then, and from 96 keys down to 0.56x
# (benchmarks/results/attention_small_avx512bf16.md). In float32 the flash kernel is cheaper per problem and
# the GEMMs won only some of those cells: it stays.
_CPU_GEMM_MIN_PROBLEMS = 192
_CPU_GEMM_KEYS = (2, 64)
# ... and for either rule, from a bfloat16 cache, at most this many keys in all (B x Hkv x L): the float32
# copies of K and V are then at most 8 MiB each. Larger ones ran into cliffs (8 x 1 rows: B=256 at 96-128 keys
# 18-50 ms against the flash kernel's 9-12, B=64 at 128 keys 4.0 against 3.0; the same attention_small
# tables). A float32 cache is read in place, and its GEMMs stayed ahead there.
_CPU_GEMM_MAX_KEY_ROWS = 1 << 15


def causal_attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Causal self-attention for prefill.

    q: [B, H, L, D]; k, v: [B, Hkv, L, D] with H % Hkv == 0 (MHA, GQA, MQA).
    K/V are not repeated per group: SDPA's ``enable_gqa`` maps query head h to
    kv head h // G. Returns [B, H, L, D].
    """
    h, hkv = q.shape[1], k.shape[1]
    if h % hkv != 0:
        raise ValueError(f"query heads {h} not a multiple of kv heads {hkv}")
    return F.scaled_dot_product_attention(
        q, k, v, is_causal=True, scale=scale, enable_gqa=h != hkv
    )


def _key_mask(valid_len: Tensor, length: int) -> Tensor:
    """Bool keep-mask of the first valid_len[b] of `length` keys: [B, 1, 1, length]."""
    pos = torch.arange(length, device=valid_len.device)  # [L]
    return pos < valid_len[:, None, None, None]  # [B, 1, 1, L]


def _additive_mask(keep: Tensor, dtype: torch.dtype, neg: float) -> Tensor:
    """0 where keep, `neg` elsewhere, in `dtype`; same shape as keep."""
    return torch.zeros(keep.shape, dtype=dtype, device=keep.device).masked_fill_(~keep, neg)


@dataclass(frozen=True)
class KeyMask:
    """One attention call's key mask, prepared once and reused by every layer of a step (the lengths
    do not change between layers): the CPU kernel's additive mask, and which rows have no key."""

    additive: Tensor | None  # [B, 1, 1, L] 0 where a key is valid, -inf elsewhere, in the queries' dtype;
    # None when every key of every row is valid (a prompt's segment read to its end, rows in lockstep):
    # the kernel then runs without a mask (M=192, L=2048 bf16: 2.5 vs 2.9 ms), adding zeros changes nothing
    empty: Tensor | None  # [B] bool: rows with valid_len == 0; None when no row is empty
    length: int  # L, the keys it masks
    dtype: torch.dtype
    keep: Tensor | None = None  # [B, 1, M, L] bool when the keys differ per query row (`interleaved_key_mask`);
    # `additive` is then [B, 1, M, L] too, and valid_len only bounds the keys read


def key_mask(valid_len: Tensor, length: int, dtype: torch.dtype) -> KeyMask:
    """The KeyMask of `attention_with_lse(q, k, v, valid_len, ...)` for keys of `length` and q of `dtype`."""
    eager = not torch.compiler.is_compiling()  # (compiled: no data-dependent branch, always mask and fix)
    if eager and length > 0 and bool((valid_len == length).all()):
        return KeyMask(None, None, length, dtype)
    empty = valid_len == 0  # [B]
    if eager and not empty.any():
        empty = None
    return KeyMask(_additive_mask(_key_mask(valid_len, length), dtype, -math.inf), empty, length, dtype)


def interleaved_key_mask(length: int, start: int, stride: int, owners: Tensor, group: int,
                         dtype: torch.dtype) -> KeyMask:
    """The KeyMask of R rows of `group` query rows each (row-major: query r * group + g) reading one
    segment of `length` keys whose keys before `start` are every row's and key start + t * stride + j
    is row r's when owners[r] == j (a request's samples interleaved after their prompt, kv/plan.py's
    `Interleave`). owners: [R] int64 -> additive and keep masks [1, 1, R * group, length]."""
    key = torch.arange(length, device=owners.device)  # [L]
    keep = (key < start) | ((key - start).remainder(stride) == owners[:, None])  # [R, L]
    keep = keep.repeat_interleave(group, dim=0)[None, None]  # [1, 1, R*G, L]
    return KeyMask(_additive_mask(keep, dtype, -math.inf), None, length, dtype, keep)


def _fix_empty_rows(out: Tensor, lse: Tensor, valid_len: Tensor) -> tuple[Tensor, Tensor]:
    """Rows with no valid key: out = 0, lse = -inf (kernels return lse = 0 or garbage)."""
    empty = (valid_len == 0)[:, None, None]  # [B, 1, 1]
    out = torch.where(empty[..., None], torch.zeros((), dtype=out.dtype, device=out.device), out)
    lse = torch.where(empty, torch.full((), -math.inf, dtype=lse.dtype, device=lse.device), lse)
    return out, lse


def attention_with_lse_reference(
    q: Tensor, k: Tensor, v: Tensor, valid_len: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """Plain matmul + logsumexp attention in float32; the reference and the fallback.

    Same contract as ``attention_with_lse``. Handles empty shapes (M == 0, L == 0).
    """
    keep = _key_mask(valid_len, k.shape[-2])  # [B, 1, 1, L]
    # [B, Hkv, M, D] @ [B, Hkv, D, L] -> [B, Hkv, M, L]
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale
    scores = scores.masked_fill(~keep, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, M]; -inf where no key is valid
    # Subtract a finite lse so that fully masked rows give exp(-inf) = 0, not NaN.
    lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    probs = torch.exp(scores - lse_safe[..., None])  # [B, Hkv, M, L]
    out = torch.matmul(probs, v.float())  # [B, Hkv, M, D]
    return out.to(q.dtype), lse


# The CPU flash kernel runs one bfloat16 / float16 query row per kv head 2x slower than two, and three
# (SmolLM2's 3 query heads per kv head at n=1) 1.03-1.12x slower than four over 1024-2048 keys, as fast at 256
# and 512; float32 and five or seven rows gained nothing
# (benchmarks/results/attention_rows_*.md). So one row always, and three over this many keys, get a zero row.
THREE_ROWS_PADDED_FROM = 1024


def _even_rows(q: Tensor, keys: int) -> Tensor:
    """q [B, Hkv, M, D] with a row of zeros after its last where M is 1, or 3 with `keys` keys from
    THREE_ROWS_PADDED_FROM, in bf16 / fp16 (the caller drops the extra row of the result; a zero query attends
    uniformly, finite wherever the other rows are): the rows do not see each other, so the others are unchanged."""
    m = q.shape[-2]
    if q.dtype == torch.float32 or not (m == 1 or (m == 3 and keys >= THREE_ROWS_PADDED_FROM)):
        return q
    return torch.constant_pad_nd(q, (0, 0, 0, 1))  # [B, Hkv, M + 1, D] (one operator: half a cat's cost)


def _cpu_flash_with_lse(
    q: Tensor, k: Tensor, v: Tensor, valid_len: Tensor, scale: float, prepared: KeyMask | None = None
) -> tuple[Tensor, Tensor]:
    """CPU flash kernel. Needs M > 0 and L > 0 (the op SIGFPEs otherwise: caller checks)."""
    if prepared is None or prepared.length != k.shape[-2] or prepared.dtype != q.dtype:
        prepared = key_mask(valid_len, k.shape[-2], q.dtype)  # an additive mask in q's dtype: a bool one is refused
    mask = prepared.additive  # [B, 1, 1, L], or None: every key valid
    m = q.shape[-2]
    if mask is None or mask.shape[-2] == 1:  # (a mask per query row would need the extra row too)
        q = _even_rows(q, k.shape[-2])  # [B, Hkv, M', D]
    out, lse = _cpu_flash(
        q, k, v, attn_mask=mask, scale=scale
    )  # out [B, Hkv, M', D] q.dtype, lse [B, Hkv, M'] float32
    if out.shape[-2] != m:  # a row was added above
        out, lse = out.narrow(-2, 0, m), lse.narrow(-1, 0, m)
    return (out, lse) if prepared.empty is None else _fix_empty_rows(out, lse, valid_len)


def _cpu_gemm_with_lse(
    q: Tensor, k: Tensor, v: Tensor, valid_len: Tensor, scale: float, prepared: KeyMask | None = None
) -> tuple[Tensor, Tensor]:
    """Many small problems at once: float32 batched GEMMs, the softmax between them in place. Needs
    L > 0. The scores and the softmax in float32 (the flash kernel's accumulation; bfloat16 inputs are
    widened, nothing is rounded to bfloat16 before the output)."""
    if prepared is None or prepared.length != k.shape[-2] or prepared.dtype != q.dtype:
        prepared = key_mask(valid_len, k.shape[-2], q.dtype)
    s = torch.matmul(q.float(), k.float().transpose(-2, -1)).mul_(scale)  # [B, Hkv, M, L] float32
    if prepared.additive is not None:
        s.add_(prepared.additive)  # [B, 1, 1 or M, L]: -inf past each row's valid keys
    lse = torch.logsumexp(s, dim=-1)  # [B, Hkv, M]; -inf for an empty row
    p = s.sub_(lse[..., None]).exp_()  # [B, Hkv, M, L]; NaN in an empty row, replaced below
    out = torch.matmul(p, v.float()).to(q.dtype)  # [B, Hkv, M, D]
    return (out, lse) if prepared.empty is None else _fix_empty_rows(out, lse, valid_len)


def _cuda_efficient_with_lse(
    q: Tensor, k: Tensor, v: Tensor, valid_len: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """CUDA memory-efficient kernel with an additive bias; fp16/bf16."""
    b, hkv, m, _ = q.shape
    length = k.shape[-2]
    padded = -(-length // _CUDA_BIAS_ALIGN) * _CUDA_BIAS_ALIGN
    keep = _key_mask(valid_len, padded)  # [B, 1, 1, Lpad]
    # A finite "minus infinity" keeps fully masked rows NaN-free inside the kernel
    # (they are overwritten below); -1e30 stays finite after the kernel's log2e
    # rescale, fp16 clamps to its own minimum.
    neg = max(torch.finfo(q.dtype).min, -1e30)
    bias = _additive_mask(keep, q.dtype, neg)  # [B, 1, 1, Lpad]
    # Slice back to L keeping the aligned row stride, then broadcast (stride 0).
    bias = bias[..., :length].expand(b, hkv, m, length)  # [B, Hkv, M, L]
    out, lse, _, _ = torch.ops.aten._scaled_dot_product_efficient_attention(
        q, k, v, bias, True, 0.0, False, scale=scale
    )  # out [B, Hkv, M, D], lse [B, Hkv, ceil(M/32)*32] float32
    lse = lse[..., :m].float()  # [B, Hkv, M]
    return _fix_empty_rows(out, lse, valid_len)


def _fast_path(q: Tensor, k: Tensor):
    """The kernel for these (static) shapes and dtypes, or None for the reference."""
    m, length, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if m == 0 or length == 0:
        return None
    if q.device.type == "cpu" and _HAS_CPU_FLASH:
        problems = q.shape[0] * q.shape[1]  # B x Hkv
        if (q.dtype == torch.float32 or problems * length <= _CPU_GEMM_MAX_KEY_ROWS) and (
                (m == 1 and length <= _CPU_REFERENCE_MAX_KEYS_AT_ONE_ROW)
                or (q.dtype == torch.bfloat16 and problems >= _CPU_GEMM_MIN_PROBLEMS
                    and _CPU_GEMM_KEYS[0] <= length <= _CPU_GEMM_KEYS[1])):
            return _cpu_gemm_with_lse
        return _cpu_flash_with_lse
    if (
        q.device.type == "cuda"
        and _HAS_CUDA_EFFICIENT
        and q.dtype in (torch.float16, torch.bfloat16)
        and d % 8 == 0
        and d <= _CUDA_EFFICIENT_MAX_HEAD_DIM
    ):
        return _cuda_efficient_with_lse
    return None


def attention_with_lse(
    q: Tensor, k: Tensor, v: Tensor, valid_len: Tensor, scale: float, mask: KeyMask | None = None
) -> tuple[Tensor, Tensor]:
    """Non-causal attention of M query rows per kv head to the first valid_len[b] keys.

    q: [B, Hkv, M, D]; k, v: [B, Hkv, L, D]; valid_len: [B] int64, 0 <= valid_len <= L.
    mask: `key_mask(valid_len, L, q.dtype)`, when the caller reuses one across layers (else built here).
    Returns out [B, Hkv, M, D] in q.dtype and lse [B, Hkv, M] float32, the
    log-sum-exp of the scaled, masked scores. Rows with valid_len == 0 give
    out = 0 and lse = -inf.
    """
    kernel = _fast_path(q, k)
    if mask is not None and mask.keep is not None and kernel not in (_cpu_flash_with_lse, _cpu_gemm_with_lse):
        return _masked_reference(q, k, v, mask.keep, scale)  # keys per query row: only the CPU kernels take them
    if kernel is None:
        return attention_with_lse_reference(q, k, v, valid_len, scale)
    args = (q, k, v, valid_len, scale) + ((mask,) if kernel in (_cpu_flash_with_lse, _cpu_gemm_with_lse) else ())
    if torch.compiler.is_compiling():
        return kernel(*args)
    try:
        return kernel(*args)
    except RuntimeError as exc:  # a private kernel refusing these shapes/strides
        logger.debug("attention kernel %s refused, using reference: %s", kernel.__name__, exc)
        if mask is not None and mask.keep is not None:
            return _masked_reference(q, k, v, mask.keep, scale)
        return attention_with_lse_reference(q, k, v, valid_len, scale)


def attention(q: Tensor, k: Tensor, v: Tensor, scale: float) -> Tensor:
    """Non-causal attention of M query rows per kv head to every key, without the LSE (a row's only
    level: nothing to merge). q: [B, Hkv, M, D]; k, v: [B, Hkv, L, D], L > 0 -> [B, Hkv, M, D]."""
    if q.device.type == "cpu" and _HAS_CPU_FLASH and not torch.compiler.is_compiling():
        # the kernel F.scaled_dot_product_attention picks here, called directly: the dispatcher's choice
        # cost about as much as the kernel at one decode row (docs/architecture.md)
        m = q.shape[-2]
        q = _even_rows(q, k.shape[-2])  # [B, Hkv, M', D]: 1 row, or 3 over many keys, run slower
        out = _cpu_flash(q, k, v, scale=scale)[0]  # [B, Hkv, M', D]
        return out if out.shape[-2] == m else out.narrow(-2, 0, m)
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def attention_with_lse_per_query(
    q: Tensor, k: Tensor, v: Tensor, query_len: Tensor, scale: float
) -> tuple[Tensor, Tensor]:
    """`attention_with_lse` with a valid length per query row: query m of batch b sees keys
    0 .. query_len[b, m] - 1 (several new tokens of one sample, causal among themselves).

    q: [B, Hkv, M, D]; k, v: [B, Hkv, L, D]; query_len: [B, M] int64 in [1, L] (every query sees
    at least one key: callers pad unused queries with a valid length, and ignore their output).
    Returns out [B, Hkv, M, D] in q.dtype and lse [B, Hkv, M] float32.
    """
    length = k.shape[-2]
    keep = torch.arange(length, device=q.device) < query_len[:, None, :, None]  # [B, 1, M, L]
    if q.device.type == "cpu" and _HAS_CPU_FLASH and q.shape[-2] > 0 and length > 0:
        mask = _additive_mask(keep, q.dtype, -math.inf)  # [B, 1, M, L]
        out, lse = _cpu_flash(q, k, v, attn_mask=mask, scale=scale)
        return out, lse.float()  # [B, Hkv, M, D], [B, Hkv, M]
    return _masked_reference(q, k, v, keep, scale)


def merge_with_lse(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor,
                   may_be_empty: bool = True, need_lse: bool = True) -> tuple[Tensor, Tensor | None]:
    """Exact merge of two attentions over disjoint key sets by their log-sum-exps.

    out_*: [..., D]; lse_*: [...] (float32). Returns (out in out_a.dtype, lse float32), the lse being
    that of the union of both key sets, so merges fold: merging level after level is exact in any
    order. Where both lse are -inf (no key in either part) out is 0 and lse -inf. A caller that
    knows part a has a key in every row passes may_be_empty=False and skips those guards; one that
    merges the last part passes need_lse=False and gets None for the lse (only there).
    """
    lse_a = lse_a if lse_a.dtype == torch.float32 else lse_a.float()  # (a no-op .float() is still an operator)
    lse_b = lse_b if lse_b.dtype == torch.float32 else lse_b.float()
    if not may_be_empty:
        # lse_a finite everywhere: b's weight is sigmoid(lse_b - lse_a) (0 where b is empty), and the
        # output a lerp between the two parts; 8 operators instead of 17, once per level per layer
        w_b = torch.sigmoid(lse_b - lse_a)  # [...]
        out = torch.lerp(out_a.float(), out_b.float(), w_b[..., None])  # [..., D]
        return out.to(out_a.dtype), torch.logaddexp(lse_a, lse_b) if need_lse else None
    m = torch.maximum(lse_a, lse_b)  # [...]
    m = torch.where(torch.isinf(m), torch.zeros_like(m), m)  # -inf only when both parts are empty
    w_a = torch.exp(lse_a - m)  # [...]
    w_b = torch.exp(lse_b - m)  # [...]
    denom = w_a + w_b
    lse = m + torch.log(denom)  # [...]; log(0) = -inf where both are empty
    denom = torch.where(denom == 0, torch.ones_like(denom), denom)
    out = (out_a.float() * w_a[..., None] + out_b.float() * w_b[..., None]) / denom[..., None]  # [..., D]
    return out.to(out_a.dtype), lse


def merge_attention(out_a: Tensor, lse_a: Tensor, out_b: Tensor, lse_b: Tensor) -> Tensor:
    """`merge_with_lse` without the merged lse: out_*: [..., D]; lse_*: [...]. Returns [..., D]."""
    return merge_with_lse(out_a, lse_a, out_b, lse_b)[0]


def causal_attention_with_lse(q: Tensor, k: Tensor, v: Tensor, q_offset: int, scale: float) -> tuple[Tensor, Tensor]:
    """A chunk of c query tokens at positions q_offset .. q_offset + c - 1 against keys 0 .. Lk - 1,
    causally (query i sees keys j <= q_offset + i), returning the LSE for merging with other levels.

    q: [1, H, c, D]; k, v: [1, Hkv, Lk, D] with Lk >= q_offset + c. Returns out [1, H, c, D] in
    q.dtype and lse [1, H, c] float32. Two parts merged exactly: the keys before the chunk, seen
    by every query (no mask: the G query heads of a kv head are G * c rows of one kernel call), and
    the chunk's own keys, causally (the kernel's causal mode skips the masked half; no [c, Lk] mask).
    """
    _, h, c, d = q.shape
    hkv = k.shape[1]
    g = h // hkv
    ks, vs = k[:, :, q_offset : q_offset + c], v[:, :, q_offset : q_offset + c]  # [1, Hkv, c, D]
    if q.device.type == "cpu" and _HAS_CPU_FLASH and c > 0:
        ks, vs = ks.repeat_interleave(g, dim=1), vs.repeat_interleave(g, dim=1)  # [1, H, c, D]
        out, lse = _cpu_flash(q, ks, vs, is_causal=True, scale=scale)
        lse = lse.float()  # [1, H, c]
    else:
        keep = torch.arange(c, device=q.device)[None, :] <= torch.arange(c, device=q.device)[:, None]  # [c, c]
        qg = q.reshape(1, hkv, g * c, d)  # [1, Hkv, G*c, D]: row g*c + i is head (kv, g), token i
        out, lse = _masked_reference(qg, ks, vs, keep.repeat(g, 1)[None, None], scale)
        out, lse = out.reshape(1, h, c, d), lse.reshape(1, h, c)  # [1, H, c, D], [1, H, c]
    if q_offset == 0:
        return out, lse
    qg = q.reshape(1, hkv, g * c, d)  # [1, Hkv, G*c, D]
    length = torch.tensor([q_offset], dtype=torch.long, device=q.device)  # [1]
    o, l = attention_with_lse(qg, k[:, :, :q_offset], v[:, :, :q_offset], length, scale)  # [1, Hkv, G*c, D], [1, Hkv, G*c]
    return merge_with_lse(out, lse, o.reshape(1, h, c, d), l.reshape(1, h, c))


def _masked_reference(q: Tensor, k: Tensor, v: Tensor, keep: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """Matmul attention with an explicit keep mask (broadcast to [B, Hkv, M, L]); float32 math."""
    scores = torch.matmul(q.float(), k.float().transpose(-2, -1)) * scale  # [B, Hkv, M, L]
    scores = scores.masked_fill(~keep, -math.inf)
    lse = torch.logsumexp(scores, dim=-1)  # [B, Hkv, M]
    lse_safe = torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)
    out = torch.matmul(torch.exp(scores - lse_safe[..., None]), v.float())  # [B, Hkv, M, D]
    return out.to(q.dtype), lse


def bifurcated_decode_attention(
    q: Tensor,
    kc: Tensor,
    vc: Tensor,
    ctx_len: Tensor,
    prompt_rows: Tensor,
    row_pos: Tensor,
    kd: Tensor,
    vd: Tensor,
    dec_len: Tensor,
    scale: float,
) -> Tensor:
    """One decode step of S sample rows over a shared context cache and per-sample caches.

    q: [S, H, D] current-token queries (RoPE applied).
    kc, vc: [P, Hkv, Lc, D] context cache, one copy per prompt slot; ctx_len: [P] int64.
    prompt_rows: [P, J] int64 sample rows of each prompt (padded with any valid row).
    row_pos: [S] int64 flat index p * J + j of each sample row into prompt_rows.
    kd, vd: [S, Hkv, T, D] sample cache, current token already written; dec_len: [S] int64.
    Returns [S, H, D] in q.dtype; finite also for rows with no valid key at all.
    """
    s, h, d = q.shape
    p, hkv = kc.shape[0], kc.shape[1]
    j = prompt_rows.shape[1]
    g = h // hkv

    # Context part: every sample's and every grouped head's query is a row against
    # its prompt's kv head.
    qc = q[prompt_rows]  # [P, J, H, D]
    qc = qc.reshape(p, j, hkv, g, d)  # [P, J, Hkv, G, D]
    qc = qc.permute(0, 2, 1, 3, 4)  # [P, Hkv, J, G, D]
    qc = qc.reshape(p, hkv, j * g, d)  # [P, Hkv, J*G, D]
    out_c, lse_c = attention_with_lse(qc, kc, vc, ctx_len, scale)  # [P, Hkv, J*G, D], [P, Hkv, J*G]
    out_c = out_c.reshape(p, hkv, j, g, d)  # [P, Hkv, J, G, D]
    out_c = out_c.permute(0, 2, 1, 3, 4)  # [P, J, Hkv, G, D]
    out_c = out_c.reshape(p * j, h, d)  # [P*J, H, D]
    out_c = out_c[row_pos]  # [S, H, D]
    lse_c = lse_c.reshape(p, hkv, j, g)  # [P, Hkv, J, G]
    lse_c = lse_c.permute(0, 2, 1, 3)  # [P, J, Hkv, G]
    lse_c = lse_c.reshape(p * j, h)  # [P*J, H]
    lse_c = lse_c[row_pos]  # [S, H]

    # Sample part: each row's G grouped heads against its own kv heads.
    qd = q.reshape(s, hkv, g, d)  # [S, Hkv, G, D]
    out_d, lse_d = attention_with_lse(qd, kd, vd, dec_len, scale)  # [S, Hkv, G, D], [S, Hkv, G]
    out_d = out_d.reshape(s, h, d)  # [S, H, D]
    lse_d = lse_d.reshape(s, h)  # [S, H]

    return merge_attention(out_c, lse_c, out_d, lse_d)  # [S, H, D]


def replicated_decode_attention(
    q: Tensor, k: Tensor, v: Tensor, valid_len: Tensor, scale: float
) -> Tensor:
    """Baseline decode step over a replicated cache: plain SDPA with a key mask.

    q: [S, H, D]; k, v: [S, Hkv, L, D] each row's [prompt ; decoded] keys, the
    first valid_len[s] valid. Returns [S, H, D]; rows with no valid key give 0.
    """
    h, hkv = q.shape[1], k.shape[1]
    keep = _key_mask(valid_len, k.shape[-2])  # [S, 1, 1, L]
    # Additive mask: -inf would make an empty row NaN; the finite minimum gives a
    # uniform average there, which is zeroed below.
    mask = _additive_mask(keep, q.dtype, torch.finfo(q.dtype).min)  # [S, 1, 1, L]
    out = F.scaled_dot_product_attention(
        q.unsqueeze(2), k, v, attn_mask=mask, scale=scale, enable_gqa=h != hkv
    )  # [S, H, 1, D]
    out = out.squeeze(2)  # [S, H, D]
    empty = (valid_len == 0)[:, None, None]  # [S, 1, 1]
    return torch.where(empty, torch.zeros((), dtype=out.dtype, device=out.device), out)


def decode_rows_from_counts(
    n_per_prompt: list[int],
    n_max: int | None = None,
    device: torch.device | str | None = None,
) -> tuple[Tensor, Tensor, Tensor]:
    """Row maps for contiguous sample rows: prompt 0's samples first, then prompt 1's...

    Returns int64 tensors
      prompt_rows [P, J]: the sample rows of prompt p, padded with row 0;
      row_pos [S]: flat index p * J + j of sample row s into prompt_rows;
      sample_to_prompt [S]: the prompt of sample row s.
    J = n_max if given (a fixed capacity keeps shapes static across steps),
    else max(n_per_prompt). A prompt with 0 samples (an unused slot) is all padding.
    """
    if any(n < 0 for n in n_per_prompt):
        raise ValueError(f"negative sample count in {n_per_prompt}")
    width = max(n_per_prompt, default=0) if n_max is None else n_max
    if any(n > width for n in n_per_prompt):
        raise ValueError(f"n_max={width} smaller than a sample count in {n_per_prompt}")
    rows: list[list[int]] = []
    row_pos: list[int] = []
    sample_to_prompt: list[int] = []
    start = 0
    for p, n in enumerate(n_per_prompt):
        rows.append(list(range(start, start + n)) + [0] * (width - n))
        row_pos.extend(p * width + j for j in range(n))
        sample_to_prompt.extend([p] * n)
        start += n
    prompt_rows = torch.tensor(rows, dtype=torch.int64, device=device).reshape(len(n_per_prompt), width)  # [P, J]
    return (
        prompt_rows,
        torch.tensor(row_pos, dtype=torch.int64, device=device),  # [S]
        torch.tensor(sample_to_prompt, dtype=torch.int64, device=device),  # [S]
    )
