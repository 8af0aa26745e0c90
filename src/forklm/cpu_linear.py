"""Float32 linears on CPU through oneDNN, with each weight reordered once into oneDNN's blocked layout.

`F.linear` in float32 on CPU runs MKL's sgemm on the row-major weight at every call. oneDNN with the
weight prepacked ran one pass over the 110M-parameter Llama's decode linears 1.8x faster at 64 rows
and 1.9-2.9x at 1-8 rows on a 2-core AVX-512 host (`benchmarks/bench_cpu_linear.py`, results in
benchmarks/results/cpu_linear.md). In bfloat16, `F.linear` already runs oneDNN; packing sped up
that pass too (1.3x at 64 rows) but not the whole decode step (130 vs 124-128 ms at n=64, prompt
2048, measured twice each), so only float32 weights are packed.

`pack_linears(model)` swaps every float32 `nn.Linear` of a CPU model for a `PackedLinear` holding the
packed weight instead of the dense one (same memory; a weight tied to the embedding stays dense there
too, so the LM head then costs one more copy). The kernel is called through the custom op
`forklm::packed_linear`: inductor cannot lower oneDNN's linear on a weight that is a graph input, and
a custom op is opaque to it, so compiled and eager decode run the same kernel.

Weights whose values are already low precision (a GGUF file's Q8_0 / Q4_x blocks, or `quantization=`)
can also run through fbgemm's GEMM on float16 weights with float32 activations (`Fp16Linear`, via
`forklm::fp16_linear`): half the bytes of float32 and, on the 2-core AVX2 host, faster than the
packed float32 linear at few rows but slower at many (benchmarks/results/cpu_linear_fp16*). `LowPrecisionLinear` holds both
and picks by the call's row count, at the crossover measured for this host (`linear_choice.py`).
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor, nn

log = logging.getLogger(__name__)

# The row count oneDNN chooses its weight layout for: measured best-or-equal from 1 to 2048 rows.
PACK_ROWS_HINT = 64


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


def _linear_pointwise(*args):
    return torch.ops.mkldnn._linear_pointwise.default(*args)


def _fbgemm_fp16(*args):
    return torch.ops.aten.fbgemm_linear_fp16_weight.default(*args)


@functools.cache
def packed_linear_op():
    """The custom op `forklm::packed_linear(x, packed_weight, bias)`, defined on first use."""

    @torch.library.custom_op("forklm::packed_linear", mutates_args=())
    def packed_linear(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return torch.ops.mkldnn._linear_pointwise(x.contiguous(), weight, bias, "none", [], "")

    @packed_linear.register_fake
    def _(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return x.new_empty(*x.shape[:-1], weight.shape[0])

    return packed_linear


class PackedLinear(nn.Module):
    """y = x W^T + b with W held in oneDNN's packed layout (float32, CPU). Inference only."""

    def __init__(self, linear: nn.Linear):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        w = linear.weight.detach()  # [out, in]
        # the packed weight is an opaque mkldnn tensor [out, in]; not saved with state_dict
        self.register_buffer("weight", torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS_HINT), persistent=False)
        bias = None if linear.bias is None else linear.bias.detach().clone()
        self.register_buffer("bias", bias, persistent=False)
        self._op = packed_linear_op()

    def repack(self, weight: Tensor) -> None:
        """Replace the weight with `weight` [out, in] (any float dtype; packed again)."""
        assert tuple(weight.shape) == (self.out_features, self.in_features)
        w = weight.detach().to(device="cpu", dtype=torch.float32).contiguous()
        self.weight = torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS_HINT)

    def forward(self, x: Tensor) -> Tensor:
        if torch.compiler.is_compiling():
            return self._op(x, self.weight, self.bias)  # [..., in] -> [..., out]
        return _linear_pointwise(x.contiguous(), self.weight, self.bias, "none", [], "")  # the op's body, directly

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"


def should_pack(linear: nn.Module) -> bool:
    return (
        type(linear) is nn.Linear and linear.weight.device.type == "cpu" and linear.weight.dtype == torch.float32
    )


def pack_linears(model: nn.Module) -> int:
    """Swap the float32 CPU `nn.Linear`s of `model` for `PackedLinear`s, in place; returns how many."""
    if not packing_available():
        log.info("oneDNN weight packing is not available in this torch build: linears stay as they are")
        return 0
    targets = [(name, m) for name, m in model.named_modules() if should_pack(m)]
    for name, linear in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, PackedLinear(linear))
    if targets:
        log.info("packed %d float32 linears for oneDNN", len(targets))
    return len(targets)



def fp16_weights_available() -> bool:
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.aten,
                                                                                "fbgemm_pack_gemm_matrix_fp16")


@functools.cache
def fp16_linear_op():
    """The custom op `forklm::fp16_linear(x, packed_weight, bias, out_features)`, defined on first use.
    `packed_weight` is fbgemm's opaque handle (a small uint8 tensor), so inductor must not look inside."""
    _silence_fp16_deprecation()

    @torch.library.custom_op("forklm::fp16_linear", mutates_args=())
    def fp16_linear(x: Tensor, weight: Tensor, bias: Tensor | None, out_features: int) -> Tensor:
        return torch.ops.aten.fbgemm_linear_fp16_weight(x.contiguous(), weight, bias)

    @fp16_linear.register_fake
    def _(x: Tensor, weight: Tensor, bias: Tensor | None, out_features: int) -> Tensor:
        return x.new_empty(*x.shape[:-1], out_features)

    return fp16_linear


def _silence_fp16_deprecation() -> None:
    """torch 2.13 prints a C++ deprecation line (straight to fd 2, once per process) on the first use
    of each fbgemm float16 op. Make those first uses here, on a dummy weight, with fd 2 pointed at
    /dev/null, so that `forklm generate --json` and `serve` keep a clean stderr. The ops are
    feature-detected (`fp16_weights_available`): when torch drops them, the float32 kernels run."""
    import os
    import sys

    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as null:
            os.dup2(null.fileno(), 2)
            torch.ops.aten.fbgemm_linear_fp16_weight(torch.zeros(1, 16), pack_fp16(torch.zeros(16, 16)), None)
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def pack_fp16(weight: Tensor) -> Tensor:
    """fbgemm's packed float16 copy of a float32 weight [out, in] (an opaque handle tensor)."""
    return torch.ops.aten.fbgemm_pack_gemm_matrix_fp16(weight.detach().to(device="cpu", dtype=torch.float32)
                                                       .contiguous())


class LowPrecisionLinear(nn.Module):
    """y = x W^T + b for a weight whose values are low precision (see quant.py), float32 activations
    on CPU: fbgemm on float16 weights for calls of at most `fp16_max_rows` rows, the oneDNN-packed float32
    weight above (kept only when some row count needs it: `fp16_max_rows` < the largest call). Float16
    holds every such value within 2^-11 of itself (quant.LOW_PRECISION_REL_BOUND). Inference only."""

    def __init__(self, linear: nn.Linear, fp16_max_rows: int, keep_fp32: bool):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.fp16_max_rows, self.keep_fp32 = fp16_max_rows, keep_fp32
        bias = None if linear.bias is None else linear.bias.detach().to(torch.float32).clone()
        self.register_buffer("bias", bias, persistent=False)
        self._fp16_op, self._packed_op = fp16_linear_op(), packed_linear_op()
        self.repack(linear.weight)

    def repack(self, weight: Tensor) -> None:
        """Replace the weight with `weight` [out, in] (packed again in each kept format)."""
        assert tuple(weight.shape) == (self.out_features, self.in_features)
        w = weight.detach().to(device="cpu", dtype=torch.float32).contiguous()
        # the packed weights are opaque handles [8] / mkldnn tensors; not saved with state_dict
        self.register_buffer("weight_fp16", pack_fp16(w), persistent=False)
        fp32 = torch.ops.mkldnn._reorder_linear_weight(w, PACK_ROWS_HINT) if self.keep_fp32 else None
        self.register_buffer("weight", fp32, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        rows = x.numel() // self.in_features
        if torch.compiler.is_compiling():  # custom ops: opaque to inductor
            if rows <= self.fp16_max_rows or self.weight is None:
                return self._fp16_op(x, self.weight_fp16, self.bias, self.out_features)  # [..., in] -> [..., out]
            return self._packed_op(x, self.weight, self.bias)  # [..., in] -> [..., out]
        # eager: the ops' bodies directly (the custom-op wrapper adds Python work to each of ~200 calls a step)
        if rows <= self.fp16_max_rows or self.weight is None:
            return _fbgemm_fp16(x.contiguous(), self.weight_fp16, self.bias)
        return _linear_pointwise(x.contiguous(), self.weight, self.bias, "none", [], "")

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"fp16_max_rows={self.fp16_max_rows}, keep_fp32={self.keep_fp32}")


def use_low_precision_linears(model: nn.Module, names: set[str], fp16_max_rows: int, keep_fp32: bool) -> int:
    """Swap the float32 CPU linears named in `names` for `LowPrecisionLinear`s, in place; returns how many.
    A linear whose weight float16 cannot hold (|w| > 65504) keeps its float32 kernel."""
    count = 0
    for name, module in list(model.named_modules()):
        if name not in names or not should_pack(module):
            continue
        if module.weight.detach().abs().max().item() > torch.finfo(torch.float16).max:
            log.warning("%s: weights beyond float16's range; it keeps the float32 kernel", name)
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, LowPrecisionLinear(module, fp16_max_rows, keep_fp32))
        count += 1
    if count:
        log.info("%d low-precision linears: float16 weights up to %d rows%s", count, fp16_max_rows,
                 ", packed float32 above" if keep_fp32 else "")
    return count
