"""A pure-PyTorch decoder-only transformer for the Llama and GPT-2 families.

The model does not own a KV cache and does not choose an attention algorithm:
every layer hands its q/k/v to `attn.attend(layer, q, k, v)`, where `attn` is the
object the caller passes in (a backend from attention/cascade.py bound to the step's plan).
What the plan and the storage hold decides how attention is computed.

Letters in shape comments: N rows (prompts at prefill, samples at decode),
L tokens per row, E model dim, H query heads, Hkv kv heads, D head dim, V vocab.
"""

from __future__ import annotations

import math
from typing import Protocol

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig, RopeScaling


class AttentionBackend(Protocol):
    def attend(self, layer: int, q: Tensor, k: Tensor, v: Tensor) -> Tensor:
        """q [N, H, L, D], k/v [N, Hkv, L, D] (positions already applied) -> [N, H, L, D]."""


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: Tensor) -> Tensor:
        """x * rsqrt(mean(x^2) + eps) in float32, rounded to x's dtype, times the weight (Hugging Face's
        LlamaRMSNorm), through torch's native layer norm: [x, -x] has mean 0 and x's mean square. One
        kernel instead of F.rms_norm's chain of operators (decomposed on CPU; docs/architecture.md).
        Equal up to float32 rounding and |mean| * rstd (the mean of [x, -x] is 0 only up to rounding):
        bf16 outputs are nearly always bitwise Hugging Face's (tests/test_model.py states the bound)."""
        d = x.shape[-1]
        both = torch.cat((x, x.neg()), dim=-1)  # [..., 2E]
        return self.weight * F.layer_norm(both, (2 * d,), eps=self.eps)[..., :d]  # [..., E]


def rope_inv_freq(head_dim: int, theta: float, scaling: RopeScaling | None) -> Tensor:
    """Inverse frequencies [D/2]; Llama-3 scaling stretches the low frequencies."""
    # on the CPU whatever device the model is built on: on the meta device this would import torch._dynamo
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64, device="cpu") / head_dim)
    if scaling is None:
        return inv_freq
    low_wavelen = scaling.original_max_position_embeddings / scaling.low_freq_factor
    high_wavelen = scaling.original_max_position_embeddings / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = torch.where(wavelen > low_wavelen, inv_freq / scaling.factor, inv_freq)
    smooth = (scaling.original_max_position_embeddings / wavelen - scaling.low_freq_factor) / (
        scaling.high_freq_factor - scaling.low_freq_factor
    )
    smoothed = (1 - smooth) * scaled / scaling.factor + smooth * scaled
    medium = (wavelen >= high_wavelen) & (wavelen <= low_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_tables(angles: Tensor, dtype: torch.dtype = torch.float32) -> tuple[Tensor, Tensor]:
    """angles [..., D/2] float32 -> (cos, sin) [..., D] in `dtype` for `apply_rope`: cos of both halves, and
    the sine signed for the rotation (-sin on the first half, sin on the second). In the activations' dtype,
    as Hugging Face's rotary embedding returns them."""
    cos, sin = angles.cos(), angles.sin()
    return torch.cat((cos, cos), dim=-1).to(dtype), torch.cat((-sin, sin), dim=-1).to(dtype)  # [..., D] each


def apply_rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """x [N, h, L, D]; cos/sin [N, 1, L, D] from `rope_tables` in x's dtype. Rotates the two halves of D
    (HF's layout): (x1 cos - x2 sin, x2 cos + x1 sin), computed as x * cos + roll(x) * sin in x's dtype,
    bitwise Hugging Face's `q * cos + rotate_half(q) * sin` (4 operators instead of 11, once per layer for
    q and for k)."""
    return x * cos + x.roll(x.shape[-1] // 2, dims=-1) * sin


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        self.layer = layer
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        bias = cfg.qkv_bias or cfg.family == "gpt2"
        # q, k and v in one linear: rows [H*D | Hkv*D | Hkv*D] (checkpoint.weight_rules stacks HF's three)
        self.wqkv = nn.Linear(cfg.dim, (cfg.n_heads + 2 * cfg.n_kv_heads) * cfg.head_dim, bias=bias)
        self.wo = nn.Linear(cfg.n_heads * cfg.head_dim, cfg.dim, bias=cfg.family == "gpt2")

    def qkv(self, x: Tensor, rope: tuple[Tensor, Tensor] | None) -> tuple[Tensor, Tensor, Tensor]:
        """x [N, L, E] -> q [N, H, L, D], k/v [N, Hkv, L, D] with positions applied."""
        N, L, E = x.shape
        h, hkv = self.n_heads, self.n_kv_heads
        qkv = self.wqkv(x.reshape(N * L, E))  # [N*L, E] -> [N*L, (H+2Hkv)*D]
        if L == 1:  # a decode step: heads first as a view, no transpose (one operator a layer fewer)
            qkv = qkv.view(N, h + 2 * hkv, 1, self.head_dim)  # [N, H+2Hkv, 1, D]
        else:
            qkv = qkv.view(N, L, h + 2 * hkv, self.head_dim).transpose(1, 2)  # [N, L, H+2Hkv, D] -> [N, H+2Hkv, L, D]
        if rope is None:
            return qkv.split((h, hkv, hkv), dim=1)  # views [N, H, L, D], [N, Hkv, L, D] x2
        qk = apply_rope(qkv[:, : h + hkv], *rope)  # q's and k's heads rotated at once: [N, H+Hkv, L, D]
        q, k = qk.split((h, hkv), dim=1)  # [N, H, L, D], [N, Hkv, L, D]
        return q, k, qkv[:, h + hkv:]  # v [N, Hkv, L, D]

    def out(self, o: Tensor) -> Tensor:
        """o [N, H, L, D] -> [N, L, E]."""
        N, _, L, _ = o.shape
        rows = o.reshape(N, -1) if L == 1 else o.transpose(1, 2).reshape(N * L, -1)  # [N*L, H*D] (L = 1: no transpose)
        y = self.wo(rows)  # [N*L, E]
        return y.view(N, L, -1)  # [N, L, E]


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.activation = cfg.activation
        if cfg.activation == "silu":  # SwiGLU; gate and up in one linear: rows [I gate | I up]
            self.w_gate_up = nn.Linear(cfg.dim, 2 * cfg.intermediate_size, bias=False)
            self.w_down = nn.Linear(cfg.intermediate_size, cfg.dim, bias=False)
        else:
            self.fc = nn.Linear(cfg.dim, cfg.intermediate_size)
            self.proj = nn.Linear(cfg.intermediate_size, cfg.dim)

    def forward(self, x: Tensor) -> Tensor:
        """x [..., E] -> [..., E], the linears on its rows [T, E] (2-D: no reshape around each kernel)."""
        rows = x.reshape(-1, x.shape[-1])  # [T, E]
        if self.activation == "silu":
            gate, up = self.w_gate_up(rows).chunk(2, dim=-1)  # [T, 2I] -> [T, I] each
            y = self.w_down(F.silu(gate) * up)  # [T, E]
        else:
            approximate = "tanh" if self.activation == "gelu_tanh" else "none"
            y = self.proj(F.gelu(self.fc(rows), approximate=approximate))  # [T, E]
        return y.view(x.shape)


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer: int):
        super().__init__()
        norm = (lambda: RMSNorm(cfg.dim, cfg.norm_eps)) if cfg.family == "llama" else (
            lambda: nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        )
        self.attn_norm, self.mlp_norm = norm(), norm()
        self.attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)

    def attention_inputs(self, x: Tensor, rope) -> tuple[Tensor, Tensor, Tensor]:
        """The layer up to attention: x [N, L, E] -> q, k, v."""
        return self.attn.qkv(self.attn_norm(x), rope)

    def finish(self, x: Tensor, o: Tensor) -> Tensor:
        """The layer after attention: residual, MLP. x [N, L, E], o [N, H, L, D] -> [N, L, E]."""
        x = x + self.attn.out(o)
        return x + self.mlp(self.mlp_norm(x))

    def forward(self, x: Tensor, rope, attn: AttentionBackend) -> Tensor:
        q, k, v = self.attention_inputs(x, rope)
        return self.finish(x, attn.attend(self.attn.layer, q, k, v))


def _embedding(rows: int, dim: int) -> nn.Embedding:
    """An embedding left uninitialized: its weights come from a checkpoint. (Its random init on the meta
    device, where checkpoint.build_model builds, runs a Python decomposition that imports torch._dynamo:
    73 MB of resident memory and a second of import that an eager run never needs.)"""
    return nn.Embedding(rows, dim, _weight=torch.empty(rows, dim))


class Transformer(nn.Module):
    """The model's layers; build it on the meta device and fill it from a checkpoint
    (checkpoint.build_model)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.config = cfg
        self.tok_embeddings = _embedding(cfg.vocab_size, cfg.dim)
        if cfg.family == "gpt2":
            self.pos_embeddings = _embedding(cfg.max_position_embeddings, cfg.dim)
            self.norm = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        else:
            self.norm = RMSNorm(cfg.dim, cfg.norm_eps)
            inv_freq = rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
            self.register_buffer("inv_freq", inv_freq.float(), persistent=False)
        self.layers = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.lm_head = nn.Linear(cfg.dim, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.tok_embeddings.weight

    def _rope(self, positions: Tensor, dtype: torch.dtype) -> tuple[Tensor, Tensor] | None:
        if self.config.family != "llama":
            return None
        angles = positions.unsqueeze(-1).float() * self.inv_freq  # [N, L, D/2]
        return rope_tables(angles.unsqueeze(1), dtype)  # [N, 1, L, D/2] -> cos, sin [N, 1, L, D]

    def embed(self, tokens: Tensor, positions: Tensor) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        """tokens/positions [N, L] -> x [N, L, E] and the rotary tables (None without RoPE)."""
        x = self.tok_embeddings(tokens)  # [N, L, E]
        if self.config.family == "gpt2":
            x = x + self.pos_embeddings(positions)
        return x, self._rope(positions, x.dtype)

    def head(self, x: Tensor) -> Tensor:
        """x [N, E] or [N, L, E] -> float32 logits [N, V] / [N, L, V]."""
        return self.lm_head(self.norm(x)).float()

    def forward(self, tokens: Tensor, positions: Tensor, attn: AttentionBackend, last_only: bool = True) -> Tensor:
        """tokens/positions [N, L] -> logits [N, V] (last position) or [N, L, V] (all positions)."""
        x, rope = self.embed(tokens, positions)  # [N, L, E]
        for block in self.layers:
            x = block(x, rope, attn)
        if last_only:
            x = x[:, -1]  # [N, E]: the LM head runs on the last position only
        return self.head(x)
