"""The model runner: runs what a step plan asks on the model (decode rows, prefill chunks), eagerly
or through the compiled pieces of `compile.layer_fns`, with attention bound to the plan."""

from __future__ import annotations

import torch
from torch import Tensor

from ..attention.cascade import DecodeAttention, PrefillAttention
from ..compile import layer_fns
from ..kv.plan import DecodePlan, PrefillChunk
from ..kv.storage import SamplePool
from ..model import Transformer


class ModelRunner:
    def __init__(self, model: Transformer, compile: bool):
        self.model = model
        self.fns = layer_fns(compile)

    def decode(self, plan: DecodePlan, pool: SamplePool, tokens: Tensor) -> Tensor:
        """tokens [B] (one per batch row of the plan) -> logits [B, V]."""
        attn = DecodeAttention(pool, plan)
        fns, layers = self.fns, self.model.layers
        x, rope, (q, k, v) = fns.first(self.model, layers[0], tokens[:, None], plan.positions[:, None])  # [B, 1, E]
        for block, following in zip(layers[:-1], layers[1:]):
            x, (q, k, v) = fns.between(block, following, x, attn.attend(block.attn.layer, q, k, v), rope)
        return fns.last(self.model, layers[-1], x, attn.attend(layers[-1].attn.layer, q, k, v))  # [B, V]

    def prefill(self, chunk: PrefillChunk) -> Tensor:
        """One chunk of one prompt -> logits [V] of its last position, or [c, V] of every position."""
        device = chunk.own.kv.device
        ids = torch.tensor([chunk.tokens], dtype=torch.long, device=device)  # [1, c]
        positions = torch.arange(chunk.start, chunk.start + len(chunk.tokens), device=device)[None]  # [1, c]
        logits = self.model(ids, positions, PrefillAttention(chunk), last_only=not chunk.all_logits)
        return logits[0]  # [V] or [c, V]
