"""Weight-only quantization of a model's linear weights, in GGUF's own block formats.

`quantization="int8"` rounds each linear weight to GGUF Q8_0 (blocks of 32 weights along the input
dimension, one float16 scale d each: w = d * q, q in -127..127) and `"int4"` to Q4_1 (blocks of 32,
a float16 scale d and minimum m each: w = d * q + m, q in 0..15), with gguf-py's own quantizer, so a
Hugging Face checkpoint quantized here has the values llama.cpp would give it. The LM head is rounded
like the other linears; embeddings, norms and biases keep their values.

What runs these values is chosen per host and row count (`linear_choice.py`, `cpu_linear.py`): with
float32 activations PyTorch's int8 / int4 weight-only CPU kernels measured slower than float32
(benchmarks/results/cpu_linear_quantized*), so there the values are held at 16 bits, which hold every
Q8_0 / Q4_x value to within 2^-11 of itself (`LOW_PRECISION_REL_BOUND`); with bfloat16 activations the
int4 kernel runs Q4_1 values (found on their grid again: `cpu_linear.on_int4_grid`) and the int8 one
the others, at the row counts where they were measured fastest.

`int4pack_blocks` maps Q4_0 / Q4_1 blocks onto `aten._weight_int4pack_mm_for_cpu`'s groups exactly
(scale = d, zero = m + 8 d, since that kernel computes (q - 8) * scale + zero); tests check it.
"""

from __future__ import annotations

import logging

import gguf
import numpy as np
import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

QUANTIZATIONS = {"int8": gguf.GGMLQuantizationType.Q8_0, "int4": gguf.GGMLQuantizationType.Q4_1}
GROUP_SIZE = 32
# GGUF block types whose values are low-precision (<= 8-bit codes times float16 scales)
LOW_PRECISION_TYPES = frozenset({"Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K",
                                 "Q8_K", "F16"})
# |fp16(w) - w| <= 2^-11 |w| for w in float16's normal range (round to nearest, 11 significant bits)
LOW_PRECISION_REL_BOUND = 2.0 ** -11


def quantize_values(weight: Tensor, kind: str) -> Tensor:
    """`weight` [out, in] rounded to `kind`'s GGUF format and back (same shape, dtype and device)."""
    qtype = QUANTIZATIONS[kind]
    array = weight.detach().to(device="cpu", dtype=torch.float32).numpy()
    blocks = gguf.quants.quantize(array, qtype)  # [out, in / 32 * block bytes]
    values = gguf.quants.dequantize(blocks, qtype)  # [out, in]
    return torch.from_numpy(values).to(device=weight.device, dtype=weight.dtype)


def quantizable(module: nn.Module) -> bool:
    return isinstance(module, nn.Linear) and module.in_features % GROUP_SIZE == 0


def quantize_linears(model: nn.Module, kind: str) -> list[str]:
    """Round every linear weight of `model` to `kind` in place (a tied LM head gets its own rounded
    copy; the embedding keeps its values); returns the names of the rounded linears."""
    names = []
    with torch.no_grad():
        for name, module in model.named_modules():
            if not quantizable(module):
                continue
            rounded = quantize_values(module.weight, kind)
            if getattr(model, "lm_head", None) is module and _tied(model):
                module.weight = nn.Parameter(rounded, requires_grad=False)  # untie: the embedding keeps its values
            else:
                module.weight.copy_(rounded)
            names.append(name)
    log.info("quantized %d linears to %s (GGUF %s, groups of %d)", len(names), kind, QUANTIZATIONS[kind].name,
             GROUP_SIZE)
    return names


def unquantizable(model: nn.Module) -> list[str]:
    """Names of linears whose input size is not a multiple of the group size."""
    return [n for n, m in model.named_modules() if isinstance(m, nn.Linear) and not quantizable(m)]


def _tied(model: nn.Module) -> bool:
    emb = getattr(model, "tok_embeddings", None)
    return emb is not None and model.lm_head.weight is emb.weight


def int4pack_blocks(blocks: np.ndarray, qtype: gguf.GGMLQuantizationType, shape: tuple[int, int]):
    """GGUF Q4_0 / Q4_1 blocks of an [out, in] weight -> (codes [out, in] int32 in 0..15,
    scales_and_zeros [in / 32, out, 2] float32) for `aten._weight_int4pack_mm_for_cpu`."""
    out, inp = shape
    nb = inp // GROUP_SIZE
    blocks = blocks.reshape(out * nb, -1)  # [blocks, bytes per block]
    d = blocks[:, :2].copy().view(np.float16).astype(np.float32)  # [blocks, 1]
    if qtype == gguf.GGMLQuantizationType.Q4_1:
        m = blocks[:, 2:4].copy().view(np.float16).astype(np.float32)
        nibbles = blocks[:, 4:]
    elif qtype == gguf.GGMLQuantizationType.Q4_0:
        m, nibbles = -8.0 * d, blocks[:, 2:]  # w = d (q - 8)
    else:
        raise ValueError(f"{qtype.name} is not a 4-bit block format")
    # a block's 16 bytes hold elements 0..15 in their low nibbles and 16..31 in their high ones
    codes = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=1).astype(np.int32)  # [blocks, 32]
    zeros = m + 8.0 * d  # the kernel computes (q - 8) * scale + zero
    scales_zeros = np.stack([d, zeros], axis=-1).reshape(out, nb, 2).transpose(1, 0, 2)  # [in/32, out, 2]
    return torch.from_numpy(codes.reshape(out, inp)), torch.from_numpy(np.ascontiguousarray(scales_zeros))
