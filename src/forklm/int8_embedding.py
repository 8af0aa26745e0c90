"""An embedding held as a GGUF file's Q8_0 blocks: int8 codes and a float16 scale per 32 values.

The embedded SmolLM2's token embedding is stored as Q8_0; loaded into bfloat16 it is 54 MiB, its codes
and scales 29 MiB. A lookup gathers the rows' codes and scales and multiplies them in float32, as gguf's
dequantizer does, then rounds to the model's dtype: the very values the dense embedding held, bitwise
(tested). A tied LM head keeps its own packed copy (cpu_linear.py), so only the lookup reads these.
"""

from __future__ import annotations

import logging

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

BLOCK = 32  # Q8_0's values per scale
CHECK_ROWS = 1024  # rows compared at a time at load (float32 temporaries of a few MB, not of the table)


class Int8BlockEmbedding(nn.Module):
    """`nn.Embedding` over Q8_0 blocks: codes int8 [V, E], scales float16 [V, E / 32]; values
    codes * scale computed in float32, in `dtype`. New values (`repack`, a weight update) are held
    dense from then on, exact."""

    def __init__(self, codes: Tensor, scales: Tensor, dtype: torch.dtype):
        super().__init__()
        v, e = codes.shape
        assert codes.dtype == torch.int8 and e % BLOCK == 0 and tuple(scales.shape) == (v, e // BLOCK)
        self.num_embeddings, self.embedding_dim, self.dtype = v, e, dtype
        self.register_buffer("codes", codes.contiguous(), persistent=False)
        self.register_buffer("scales", scales.to(torch.float16).contiguous(), persistent=False)
        self.register_buffer("dense", None, persistent=False)

    def _values(self, codes: Tensor, scales: Tensor) -> Tensor:
        """codes int8 [..., E], scales [..., E / 32] -> values [..., E] in the model's dtype."""
        blocks = codes.unflatten(-1, (-1, BLOCK)).float()  # [..., E / 32, 32]
        return (blocks * scales.float()[..., None]).flatten(-2).to(self.dtype)  # [..., E]

    def forward(self, tokens: Tensor) -> Tensor:
        """tokens [...] -> [..., E]."""
        if self.dense is not None:
            return nn.functional.embedding(tokens, self.dense)
        return self._values(self.codes[tokens], self.scales[tokens])

    @property
    def weight(self) -> Tensor:
        """The values it holds, [V, E] in the model's dtype (made from the blocks: a copy)."""
        return self.dense if self.dense is not None else self._values(self.codes, self.scales)

    def repack(self, weight: Tensor) -> None:
        """Hold `weight` [V, E] instead, dense and exact (a weight update; it is not on a Q8_0 grid)."""
        assert tuple(weight.shape) == (self.num_embeddings, self.embedding_dim)
        device = (self.dense if self.dense is not None else self.codes).device
        self.dense = weight.detach().to(device=device, dtype=self.dtype).contiguous()
        self.codes = self.scales = None

    def extra_repr(self) -> str:
        held = "dense" if self.dense is not None else "Q8_0 blocks"
        return f"{self.num_embeddings}, {self.embedding_dim}, {held}, dtype={self.dtype}"


def use_q8_0_embedding(model: nn.Module, codes: Tensor, scales: Tensor) -> bool:
    """Swap `model.tok_embeddings` for an `Int8BlockEmbedding` of the file's blocks, in place, when they
    give exactly the values it holds and nothing else (a tied LM head) shares its weight; returns
    whether it did."""
    emb = model.tok_embeddings
    if type(emb) is not nn.Embedding or getattr(model.lm_head, "weight", None) is emb.weight:
        return False
    if tuple(codes.shape) != tuple(emb.weight.shape):
        return False
    new = Int8BlockEmbedding(codes, scales, emb.weight.dtype).to(emb.weight.device)
    for a in range(0, codes.shape[0], CHECK_ROWS):  # compared in blocks of rows: no second copy of the table
        b = a + CHECK_ROWS
        if not torch.equal(new._values(new.codes[a:b], new.scales[a:b]), emb.weight[a:b]):
            log.warning("the embedding's values are not its file's Q8_0 blocks: it stays dense")
            return False
    model.tok_embeddings = new
    log.info("token embedding held as Q8_0 blocks (%.1f MiB instead of %.1f)",
             (codes.numel() + 2 * scales.numel()) / 2**20, emb.weight.numel() * emb.weight.element_size() / 2**20)
    return True
