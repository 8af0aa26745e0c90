"""Static KV caches. The cache's type decides how decode attention is computed.

Both caches have fixed capacity, allocated once:
- P context slots (one per prompt being generated), each up to Lc tokens;
- S sample rows (one per sample), each up to T decoded tokens;
- a row map: sample row -> context slot (`sample_prompt`), kept as tensors so that one compiled
  decode step serves every step and every batch composition.

`BifurcatedCache` keeps each prompt's K/V once ([P, Hkv, Lc, D]) and the samples' own K/V apart
([S, Hkv, T, D]); decode attention is a context part plus a sample part merged by log-sum-exp.
`ReplicatedCache` copies the prompt's K/V into every sample row ([S, Hkv, Lc + T, D]) and runs plain
attention: the reference for tests and the baseline for benchmarks.

The model calls `attend(layer, q, k, v)` on whatever backend it is given: `cache.prefill_view(...)`
at prefill (batch = 1 prompt, causal), the cache itself at decode (batch = S sample rows).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from . import attention
from .config import ModelConfig


@dataclass(frozen=True)
class CacheShape:
    max_prompts: int  # P: context slots
    max_samples: int  # S: sample rows
    max_samples_per_prompt: int  # n_max: the most sample rows one context slot may feed
    max_prompt_len: int  # Lc
    max_new_tokens: int  # T

    def __post_init__(self):
        for name in ("max_prompts", "max_samples", "max_samples_per_prompt", "max_prompt_len", "max_new_tokens"):
            if getattr(self, name) < 1:
                raise ValueError(f"CacheShape.{name} must be >= 1")


def write_at(buf: Tensor, pos: Tensor, x: Tensor) -> None:
    """buf[s, :, pos[s]] = x[s] for every row s, as one index_copy_ into a flat view.

    buf [S, Hkv, T, D], pos [S], x [S, Hkv, D]. (Advanced-index assignment costs ~10x more here.)
    """
    S, Hkv, T, D = buf.shape
    heads = torch.arange(Hkv, device=buf.device)  # [Hkv]
    flat = ((torch.arange(S, device=buf.device)[:, None] * Hkv + heads) * T + pos[:, None]).flatten()  # [S*Hkv]
    buf.view(S * Hkv * T, D).index_copy_(0, flat, x.reshape(S * Hkv, D))


class _PrefillView:
    """Attention backend for prefilling one prompt: causal attention, K/V written to the cache."""

    def __init__(self, write):
        self._write = write

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # q [1, H, L, D], k/v [1, Hkv, L, D]
        self._write(layer, k[0], v[0])
        return attention.causal_attention(q, k, v, scale=q.shape[-1] ** -0.5)


class KVCache:
    """Shared bookkeeping of both layouts: the row map, lengths and positions."""

    def __init__(self, cfg: ModelConfig, shape: CacheShape, dtype: torch.dtype, device):
        self.cfg, self.shape, self.dtype, self.device = cfg, shape, dtype, torch.device(device)
        P, S = shape.max_prompts, shape.max_samples
        self.prompt_len = torch.zeros(P, dtype=torch.long, device=device)  # [P] 0 = free slot
        self.sample_prompt = torch.zeros(S, dtype=torch.long, device=device)  # [S] slot of each row
        self.dec_len = torch.zeros(S, dtype=torch.long, device=device)  # [S] tokens in the sample cache
        self.live = torch.zeros(S, dtype=torch.bool, device=device)  # [S] row in use
        # rows of each slot, padded with row 0, and each row's flat index p * n_max + j into it
        self.prompt_rows = torch.zeros(P, shape.max_samples_per_prompt, dtype=torch.long, device=device)
        self.row_pos = torch.zeros(S, dtype=torch.long, device=device)
        self.window_marker: Tensor | None = None  # [w]: its size is decode attention's window

    # -- bookkeeping (between steps, Python side) ----------------------------------------------
    def assign(self, slot: int, prompt_len: int, rows: list[int]) -> None:
        """Bind sample `rows` to context `slot` holding a prompt of `prompt_len` tokens."""
        n_max = self.shape.max_samples_per_prompt
        if len(rows) > n_max:
            raise ValueError(f"{len(rows)} samples exceed max_samples_per_prompt={n_max}")
        if prompt_len > self.shape.max_prompt_len:
            raise ValueError(f"prompt of {prompt_len} tokens exceeds max_prompt_len={self.shape.max_prompt_len}")
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        self.prompt_len[slot] = prompt_len
        self.sample_prompt[idx] = slot
        self.dec_len[idx] = 0
        self.live[idx] = True
        self.prompt_rows[slot] = 0
        self.prompt_rows[slot, : len(rows)] = idx
        self.row_pos[idx] = slot * n_max + torch.arange(len(rows), device=self.device)

    def release(self, slot: int | None, rows: list[int]) -> None:
        """Free sample rows (and the context slot, when given)."""
        if rows:
            idx = torch.tensor(rows, dtype=torch.long, device=self.device)
            self.live[idx] = False
            self.dec_len[idx] = 0
        if slot is not None:
            self.prompt_len[slot] = 0

    def window(self) -> int:
        """How many leading slots of a row buffer decode attention reads: the size of `window_marker`,
        set before each step by compile.make_decode_fn to the slots written so far, so that a step
        early in a long generation skips the empty tail (the 110M model, n=64, prompt 2048, 512 slots,
        a few tokens in: 156 instead of 256 ms per step eagerly; benchmarks/results/decode_cpu_T512*.md).
        A size, not an int, so that a compiled graph takes it as a dynamic dimension. Without a marker
        (CUDA graphs keep static shapes) the whole capacity. The masks make any window exact."""
        return self.capacity() if self.window_marker is None else self.window_marker.shape[0]

    def positions(self) -> Tensor:
        """[S] the position of each row's next token: its prompt length plus tokens decoded."""
        return self.prompt_len[self.sample_prompt] + self.dec_len

    def next_window(self) -> int:
        """The window the next decode step needs: its largest write position + 1 (read eagerly)."""
        return int(self._write_pos().max()) + 1

    def _write_pos(self) -> Tensor:
        """[S] the slot each row's current token is written to in its row buffer."""
        raise NotImplementedError

    def capacity(self) -> int:
        """Slots per row buffer."""
        raise NotImplementedError

    def advance(self) -> None:
        """After a decode step: every live row holds one more token (capped at capacity)."""
        self.dec_len.add_(self.live.long()).clamp_(max=self.shape.max_new_tokens)

    def reorder(self, dst_rows: Tensor, src_rows: Tensor) -> None:
        """Beam search: sample rows dst take the decoded K/V (and lengths) of rows src."""
        self.dec_len[dst_rows] = self.dec_len[src_rows]
        for buf in self._sample_buffers():
            buf[dst_rows] = buf[src_rows]

    def _sample_buffers(self) -> list[Tensor]:
        raise NotImplementedError

    def state_tensors(self) -> list[Tensor]:
        """Every tensor the decode step reads or writes in place (for CUDA graphs: static addresses)."""
        meta = [self.prompt_len, self.sample_prompt, self.dec_len, self.live, self.prompt_rows, self.row_pos]
        return meta + self._all_buffers()

    def _all_buffers(self) -> list[Tensor]:
        raise NotImplementedError

    def nbytes(self) -> int:
        raise NotImplementedError


class BifurcatedCache(KVCache):
    """Prompt K/V once per context slot; samples' K/V per row; decode merges both by LSE."""

    def __init__(self, cfg: ModelConfig, shape: CacheShape, dtype: torch.dtype, device):
        super().__init__(cfg, shape, dtype, device)
        ctx = (shape.max_prompts, cfg.n_kv_heads, shape.max_prompt_len, cfg.head_dim)  # [P, Hkv, Lc, D]
        smp = (shape.max_samples, cfg.n_kv_heads, shape.max_new_tokens, cfg.head_dim)  # [S, Hkv, T, D]
        alloc = lambda size: [torch.zeros(size, dtype=dtype, device=device) for _ in range(cfg.n_layers)]  # noqa: E731
        self.kc, self.vc = alloc(ctx), alloc(ctx)
        self.kd, self.vd = alloc(smp), alloc(smp)

    @staticmethod
    def bytes_needed(cfg: ModelConfig, shape: CacheShape, dtype: torch.dtype) -> int:
        per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * torch.tensor([], dtype=dtype).element_size()
        return per_token * (shape.max_prompts * shape.max_prompt_len + shape.max_samples * shape.max_new_tokens)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.kc + self.vc + self.kd + self.vd)

    def _sample_buffers(self) -> list[Tensor]:
        return self.kd + self.vd

    def _all_buffers(self) -> list[Tensor]:
        return self.kc + self.vc + self.kd + self.vd

    def prefill_view(self, slot: int, rows: list[int]) -> _PrefillView:
        def write(layer: int, k: Tensor, v: Tensor) -> None:
            # k/v [Hkv, L, D] -> context slot, once for all the prompt's samples
            L = k.shape[1]
            self.kc[layer][slot, :, :L] = k
            self.vc[layer][slot, :, :L] = v

        return _PrefillView(write)

    def _write_pos(self) -> Tensor:
        return self.dec_len.clamp(max=self.shape.max_new_tokens - 1)  # [S]

    def capacity(self) -> int:
        return self.shape.max_new_tokens

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # decode: q [S, H, 1, D], k/v [S, Hkv, 1, D]
        pos = self._write_pos()  # [S]
        write_at(self.kd[layer], pos, k[:, :, 0])  # the current token, written before attending
        write_at(self.vd[layer], pos, v[:, :, 0])
        w = self.window()
        out = attention.bifurcated_decode_attention(
            q[:, :, 0],
            self.kc[layer],
            self.vc[layer],
            self.prompt_len,
            self.prompt_rows,
            self.row_pos,
            self.kd[layer][:, :, :w],  # [S, Hkv, w, D]
            self.vd[layer][:, :, :w],
            (pos + 1) * self.live,
            scale=q.shape[-1] ** -0.5,
        )  # [S, H, D]
        return out.unsqueeze(2)  # [S, H, 1, D]


class ReplicatedCache(KVCache):
    """Every sample row holds its own copy of the prompt's K/V followed by its decoded K/V."""

    def __init__(self, cfg: ModelConfig, shape: CacheShape, dtype: torch.dtype, device):
        super().__init__(cfg, shape, dtype, device)
        size = (shape.max_samples, cfg.n_kv_heads, shape.max_prompt_len + shape.max_new_tokens, cfg.head_dim)
        self.k = [torch.zeros(size, dtype=dtype, device=device) for _ in range(cfg.n_layers)]  # [S, Hkv, Lc+T, D]
        self.v = [torch.zeros(size, dtype=dtype, device=device) for _ in range(cfg.n_layers)]

    @staticmethod
    def bytes_needed(cfg: ModelConfig, shape: CacheShape, dtype: torch.dtype) -> int:
        per_token = 2 * cfg.n_layers * cfg.n_kv_heads * cfg.head_dim * torch.tensor([], dtype=dtype).element_size()
        return per_token * shape.max_samples * (shape.max_prompt_len + shape.max_new_tokens)

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.k + self.v)

    def _sample_buffers(self) -> list[Tensor]:
        return self.k + self.v

    def _all_buffers(self) -> list[Tensor]:
        return self.k + self.v

    def prefill_view(self, slot: int, rows: list[int]) -> _PrefillView:
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)

        def write(layer: int, k: Tensor, v: Tensor) -> None:
            # k/v [Hkv, L, D] -> copied into each of the prompt's sample rows
            L = k.shape[1]
            self.k[layer][idx, :, :L] = k.unsqueeze(0)
            self.v[layer][idx, :, :L] = v.unsqueeze(0)

        return _PrefillView(write)

    def _write_pos(self) -> Tensor:
        return self.positions().clamp(max=self.capacity() - 1)  # [S]

    def capacity(self) -> int:
        return self.shape.max_prompt_len + self.shape.max_new_tokens

    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        # decode: q [S, H, 1, D], k/v [S, Hkv, 1, D]
        pos = self._write_pos()  # [S] prompt_len + dec_len
        write_at(self.k[layer], pos, k[:, :, 0])
        write_at(self.v[layer], pos, v[:, :, 0])
        w = self.window()
        out = attention.replicated_decode_attention(
            q[:, :, 0], self.k[layer][:, :, :w], self.v[layer][:, :, :w], (pos + 1) * self.live,
            scale=q.shape[-1] ** -0.5,
        )  # [S, H, D]
        return out.unsqueeze(2)  # [S, H, 1, D]


KV_LAYOUTS = {"bifurcated": BifurcatedCache, "replicated": ReplicatedCache}
