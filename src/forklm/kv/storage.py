"""K/V storage as levels: shared segments (a prompt or prefix, stored once) and the sample pool.

- A `Segment` holds the keys/values of consecutive tokens for every layer, allocated for a known
  number of tokens and filled as prefill chunks arrive. Shared levels of decode attention are
  segments: a system prompt, a question under it, an earlier turn of a conversation.
- The `SamplePool` holds each sample's own decoded K/V in a row of `[rows, Hkv, T, D]` per layer
  (the replicated layout keeps the prompt in the row too: T = prompt + new tokens).
- `KVStorage` owns both and accounts for memory as a token budget: the pool's rows are reserved
  when it is sized, segments come out of what is left. It never frees on its own: the scheduler
  and the prefix cache decide what is released and what is evicted.

Dense per-segment tensors rather than pages: on CPU a segment's K/V is read by one kernel call as a
plain strided view, with no block table and no gather.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from ..config import ModelConfig


@dataclass(frozen=True)
class CacheShape:
    """An engine's sizes: sample rows and their length, and the admission limits per request."""

    max_prompts: int  # requests running at once
    max_samples: int  # S: sample rows of the pool
    max_samples_per_prompt: int  # the most samples (n, best_of, beam width) one request may take
    max_prompt_len: int  # the longest prompt accepted
    max_new_tokens: int  # T: the largest max_tokens accepted (the length of a sample row)

    def __post_init__(self):
        for name in ("max_prompts", "max_samples", "max_samples_per_prompt", "max_prompt_len", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"CacheShape.{name} must be >= 1")


def bytes_per_token(cfg: ModelConfig, dtype: torch.dtype) -> int:
    """K and V of one token over every layer."""
    return 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * torch.tensor([], dtype=dtype).element_size()


class Segment:
    """K/V of `length` consecutive tokens (capacity allocated up front): kv [layers, 2, Hkv, cap, D]."""

    def __init__(self, kv: Tensor, length: int = 0):
        self.kv = kv
        self.length = length

    @property
    def capacity(self) -> int:
        return self.kv.shape[3]

    def k(self, layer: int) -> Tensor:
        return self.kv[layer, 0]  # [Hkv, cap, D]

    def v(self, layer: int) -> Tensor:
        return self.kv[layer, 1]  # [Hkv, cap, D]

    def write(self, layer: int, offset: int, k: Tensor, v: Tensor) -> None:
        """k/v [Hkv, c, D] -> tokens offset .. offset + c - 1."""
        c = k.shape[1]
        self.kv[layer, 0, :, offset : offset + c] = k
        self.kv[layer, 1, :, offset : offset + c] = v


def flat_index(shape: torch.Size, rows: Tensor, pos: Tensor) -> Tensor:
    """The [B*Hkv] indices of (rows[i], every head, pos[i]) in a [S, Hkv, T, D] buffer viewed as [S*Hkv*T, D]."""
    _, Hkv, T, _ = shape
    heads = torch.arange(Hkv, device=rows.device)  # [Hkv]
    return ((rows[:, None] * Hkv + heads) * T + pos[:, None]).flatten()  # [B*Hkv]


def write_at(flat: Tensor, index: Tensor, x: Tensor) -> None:
    """buf[rows[i], :, pos[i]] = x[i] for every i, as one index_copy_ into `flat`, the buffer's [S*Hkv*T, D] view
    (`SamplePool.k_flat`); index is `flat_index(buf.shape, rows, pos)` (the same for every layer's buffer of
    a step). x [B, Hkv, (1,) D]. (Advanced-index assignment costs ~10x more here.)"""
    flat.index_copy_(0, index, x.reshape(-1, flat.shape[1]))  # [B*Hkv, D] rows


class SamplePool:
    """Per-sample K/V rows, one tensor kv [2, layers, S, Hkv, T, D]; k[layer], v[layer]: [S, Hkv, T, D] views."""

    def __init__(self, kv: Tensor):
        self.kv = kv  # [2, layers, S, Hkv, T, D]
        self.k, self.v = list(kv[0].unbind(0)), list(kv[1].unbind(0))  # per layer [S, Hkv, T, D]
        # the same buffers as [S*Hkv*T, D] views, the decode step's write target (made once: a view per layer
        # and step is one more operator each)
        self.k_flat = [b.view(-1, kv.shape[-1]) for b in self.k]
        self.v_flat = [b.view(-1, kv.shape[-1]) for b in self.v]
        self.rows, self.length = kv.shape[2], kv.shape[4]

    @classmethod
    def zeros(cls, cfg: ModelConfig, rows: int, length: int, dtype: torch.dtype, device) -> SamplePool:
        return cls(torch.zeros(2, cfg.n_layers, rows, cfg.n_kv_heads, length, cfg.head_dim, dtype=dtype, device=device))

    def window(self, rows: int, width: int) -> tuple[tuple[Tensor, ...], tuple[Tensor, ...]]:
        """Rows 0..rows-1, slots 0..width-1 of every layer: per layer [rows, Hkv, width, D] views of K and of V
        (six operators for all layers, where slicing each layer's buffers is four per layer)."""
        w = self.kv[:, :, :rows, :, :width]  # [2, layers, rows, Hkv, width, D]
        return w[0].unbind(0), w[1].unbind(0)

    def reorder(self, dst: Tensor, src: Tensor) -> None:
        """Beam search: rows dst take the K/V of rows src."""
        self.kv[:, :, dst] = self.kv[:, :, src]

    def copy_in(self, rows: list[int], segment: Segment, offset: int = 0) -> None:
        """The replicated layout: a prompt's K/V copied into each of `rows` at offset."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.k[0].device)
        L = segment.length
        for layer, (k, v) in enumerate(zip(self.k, self.v)):
            k[idx, :, offset : offset + L] = segment.k(layer)[:, :L].unsqueeze(0)
            v[idx, :, offset : offset + L] = segment.v(layer)[:, :L].unsqueeze(0)

    def row_kv(self, row: int, length: int) -> Tensor:
        """One row's first `length` tokens: a view [layers, 2, Hkv, length, D] of the pool (copy what you keep)."""
        return self.kv[:, :, row, :, :length].transpose(0, 1)  # [2, layers, Hkv, length, D] -> [layers, 2, ...]


class KVStorage:
    """The sample pool plus a token budget for segments; rows handed out lowest first."""

    def __init__(self, cfg: ModelConfig, shape: CacheShape, row_length: int, budget_bytes: int,
                 dtype: torch.dtype, device):
        self.cfg, self.dtype, self.device = cfg, dtype, torch.device(device)
        self.token_bytes = bytes_per_token(cfg, dtype)
        self.segment_tokens = 0  # allocated to segments now
        self.resize(shape, row_length, budget_bytes)

    def resize(self, shape: CacheShape, row_length: int, budget_bytes: int) -> None:
        """A new sample pool (no row may be in use); segments are kept and still counted."""
        self.pool = None  # the old pool's memory goes before the new one is allocated
        self.pool = SamplePool.zeros(self.cfg, shape.max_samples, row_length, self.dtype, self.device)
        pool_tokens = shape.max_samples * row_length
        self.budget_tokens = max(0, budget_bytes // self.token_bytes - pool_tokens)  # for segments
        self._free_rows = list(range(shape.max_samples))

    # ---- segments ---------------------------------------------------------------------------------
    @property
    def free_tokens(self) -> int:
        return self.budget_tokens - self.segment_tokens

    def allocate(self, tokens: int) -> Segment | None:
        """A segment of `tokens` slots, or None when the budget does not hold it."""
        if tokens > self.free_tokens:
            return None
        cfg = self.cfg
        kv = torch.empty((cfg.n_layers, 2, cfg.n_kv_heads, tokens, cfg.head_dim), dtype=self.dtype, device=self.device)
        self.segment_tokens += tokens
        return Segment(kv)

    def adopt(self, kv: Tensor) -> Segment | None:
        """A segment around an existing kv tensor [layers, 2, Hkv, L, D] (counted), or None if over budget."""
        if kv.shape[3] > self.free_tokens:
            return None
        self.segment_tokens += kv.shape[3]
        return Segment(kv, kv.shape[3])

    def free(self, segment: Segment) -> None:
        self.segment_tokens -= segment.capacity
        segment.kv = segment.kv[:, :, :, :0]  # drop the memory now, even if a reference lingers

    # ---- sample rows ------------------------------------------------------------------------------
    @property
    def free_rows(self) -> int:
        return len(self._free_rows)

    @property
    def rows_in_use(self) -> int:
        return self.pool.rows - len(self._free_rows)

    def take_rows(self, n: int) -> list[int] | None:
        """n rows (the lowest free ones, so that live rows stay packed at the front), or None."""
        if n > len(self._free_rows):
            return None
        rows, self._free_rows = self._free_rows[:n], self._free_rows[n:]
        return rows

    def give_rows(self, rows: list[int]) -> None:
        self._free_rows = sorted(self._free_rows + list(rows))

    def nbytes_budget(self) -> int:
        """Bytes of the whole budget: the pool plus what segments may take."""
        return self.token_bytes * (self.pool.rows * self.pool.length + self.budget_tokens)

    def nbytes(self) -> int:
        """Bytes held now: the pool plus every live segment."""
        return self.token_bytes * (self.pool.rows * self.pool.length + self.segment_tokens)
