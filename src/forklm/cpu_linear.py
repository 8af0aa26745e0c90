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
can run other kernels (`LowPrecisionLinear`): fbgemm's GEMM on float16 weights (half the bytes of
float32; exact to 2^-11 of each value) and, with bfloat16 activations, `aten._weight_int8pack_mm` on
int8 weights with a scale per output row (a quarter of the bytes; a requantization with a stated
bound, `pack_int8`) and, for weights on a 4-bit grid (Q4_1 blocks), `aten._weight_int4pack_mm_for_cpu`
on the grid's codes (an eighth of the bytes; the grid kept, its scales and zeros rounded to bfloat16:
`pack_int4`). Which is fastest depends on the host and the call's row count: on the 2-core AVX2 host
float16 won at few rows and lost at many (benchmarks/results/cpu_linear_fp16*); on an AVX512-BF16 host
int8, and int4 ahead of it, won at few rows. `linear_choice.py` measures them once per host; each
`LowPrecisionLinear` then picks by the row count of the call, every kernel holding the same values (with
int4, up to the dense copy's bfloat16 rounding of them).
"""

from __future__ import annotations

import functools
import logging

import torch
from torch import Tensor, nn

from .host import release_free_heap

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

    def dense_weight(self) -> Tensor:
        """The weight it holds, [out, in] float32 in the plain layout (a copy)."""
        return self.weight.to_dense()

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


def is_cpu_linear(linear: nn.Module) -> bool:
    return type(linear) is nn.Linear and linear.weight.device.type == "cpu"


def should_pack(linear: nn.Module) -> bool:
    return is_cpu_linear(linear) and linear.weight.dtype == torch.float32


def pack_linears(model: nn.Module) -> int:
    """Swap the float32 CPU `nn.Linear`s of `model` for `PackedLinear`s, in place; returns how many."""
    if not packing_available():
        log.info("oneDNN weight packing is not available in this torch build: linears stay as they are")
        return 0
    targets = [name for name, m in model.named_modules() if should_pack(m)]  # names: old weights freed one by one
    for name in targets:
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, PackedLinear(getattr(parent, attr)))
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


# The kernels a low-precision linear can run, by activation dtype (what `linear_choice` measures):
#   "int4":  aten._weight_int4pack_mm_for_cpu on 4-bit codes in groups of 32 along the input, a scale and
#            a zero per group (`pack_int4`); offered only for weights already on such a grid (a GGUF
#            file's Q4_1 blocks, quantization="int4": `on_int4_grid`), bfloat16 activations only. It reads
#            half int8's bytes: one pass over SmolLM2's linears at one row took 5.3 ms against int8's 10.3
#            (weights streamed from memory; benchmarks/results/linear_choice_avx512bf16_int4.md);
#   "int8":  aten._weight_int8pack_mm on int8 weights with one scale per output row (requantized:
#            see `pack_int8`); bfloat16 activations only (in float32 it was 10x slower, measured);
#   "fp16":  fbgemm's GEMM on float16 weights, float32 activations (bfloat16 ones converted around it);
#   "dense": the held values in the model's dtype, prepacked for oneDNN (bfloat16 too: 1.1-1.5x
#            `F.linear` at 1-256 rows on the AVX512-BF16 host, a scratch run); `F.linear` in bfloat16
#            where this torch cannot pack;
#   "dense_pad": the same packed weight, a call of fewer than PAD_ROWS rows padded with zero rows to
#            PAD_ROWS (oneDNN's packed kernels can take longer for one or two rows than for four:
#            benchmarks/results/linear_choice_*.md); no weights of its own.
KERNELS = {torch.float32: ("fp16", "dense", "dense_pad"), torch.bfloat16: ("int8", "fp16", "dense", "dense_pad")}
# a weight on a 4-bit grid (`on_int4_grid`) is offered these instead: int4 holds it as it is, int8 would
# round it again (and one linear's kernels must hold the same values, see `held_values`)
INT4_KERNELS = {torch.bfloat16: ("int4", "dense", "dense_pad")}
# kernels that run another kernel's weights (they hold no copy of their own)
SHARES_WEIGHTS = {"dense_pad": "dense"}
PAD_ROWS = 4  # "dense_pad" runs a call of fewer rows as one of this many
# Swapping linears frees each old weight as its packed ones come, in sizes glibc keeps in its heap; handing
# the free pages back every this many swaps held the embedded model's load peak at 684-689 MiB (760-780
# without, `benchmarks/results/memory_n1_L256_trim*.md`), for ~0.2 ms a call
TRIM_EVERY = 16
PACK_BLOCK_ROWS = 4096  # int8 packing works through a weight this many rows at a time (peak memory)
INT4_GROUP = 32  # the int4 kernel's group along the input dimension: GGUF's block size
_INT4_OUT_MULTIPLE = 16  # the int4 packing wants out_features divisible by this
# on_int4_grid's slack, of a group's largest |w|: a 4-bit grid's values held in bfloat16 are each within
# 2^-9 of themselves, and so are the minimum and maximum the grid is found again from; a weight with more
# levels (e.g. Q8_0's 255) is up to its range / 30 away from the nearest 4-bit grid
_INT4_GRID_TOL = 2.0 ** -7


def int8_available() -> bool:
    return hasattr(torch.ops.aten, "_weight_int8pack_mm")


def int4_available() -> bool:
    return (hasattr(torch, "_weight_int4pack_mm_for_cpu")
            and hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"))


def kernels_available(dtype: torch.dtype, int4_grid: bool = False) -> tuple[str, ...]:
    """The kernels offered for a low-precision linear of `dtype` (whose weight is on a 4-bit grid)."""
    ok = {"int4": int4_available(), "int8": int8_available(), "fp16": fp16_weights_available(),
          "dense": dtype != torch.float32 or packing_available(), "dense_pad": packing_available()}
    menu = INT4_KERNELS.get(dtype) if int4_grid and dtype in INT4_KERNELS else KERNELS.get(dtype, ("dense",))
    return tuple(k for k in menu if ok[k])


def _grid(w: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """w [out, in / 32, 32] float32 (groups of 32 inputs) on the nearest grid of GGUF Q4_1's form:
    w ~= low + q * step with q in 0..15, low the group's minimum and step its range / 15. Returns
    (q float32 [out, in / 32, 32], step, low [out, in / 32]). A Q4_1 block (where gguf's quantizer puts
    the minimum at q = 0 and the maximum at q = 15) is found again exactly, up to float32 rounding of the
    step (and the rounding of the weight's own dtype)."""
    low, high = w.amin(dim=-1), w.amax(dim=-1)  # [out, in / 32]
    step = (high - low) / 15
    safe = torch.where(step > 0, step, torch.ones_like(step))
    q = (w - low[..., None]).div_(safe[..., None]).round_().clamp_(0, 15)  # a flat group: all 0
    return q, step, low


def _groups(weight: Tensor) -> Tensor:
    """weight [out, in] -> float32 [out, in / 32, 32]."""
    out_f, in_f = weight.shape
    return weight.detach().to(device="cpu", dtype=torch.float32).reshape(out_f, in_f // INT4_GROUP, INT4_GROUP)


def on_int4_grid(weight: Tensor) -> bool:
    """Whether every group of 32 inputs of `weight` [out, in] holds 16 or fewer evenly spaced values from
    its minimum to its maximum (a 4-bit grid, such as a GGUF file's Q4_1 blocks), up to the rounding of
    the weight's dtype (`int4_grid_bound`), so that the int4 kernel holds it without a coarser rounding;
    and the shape suits that kernel."""
    out_f, in_f = weight.shape
    if in_f % INT4_GROUP or out_f % _INT4_OUT_MULTIPLE or not int4_available():
        return False
    return all(on for *_, on in _grid_blocks(weight))


def _grid_blocks(weight: Tensor, block_rows: int = PACK_BLOCK_ROWS):
    """`_grid` a block of rows at a time (a few float32 temporaries of a block, not of a 49152-row head):
    yields (q float32 [rows, in / 32, 32], step, low [rows, in / 32], whether the block is on its grid)."""
    for a in range(0, weight.shape[0], block_rows):
        w = _groups(weight[a:a + block_rows])
        q, step, low = _grid(w)
        bound = _INT4_GRID_TOL * torch.maximum(low.abs(), (low + 15 * step).abs())  # [rows, in / 32]: max |w|
        off = (q * step[..., None]).add_(low[..., None]).sub_(w).abs_()  # [rows, in / 32, 32]
        yield q, step, low, bool((off <= bound[..., None]).all())


def int4_grid_bound(weight: Tensor) -> Tensor:
    """[out, in / 32]: how far from its 4-bit grid `on_int4_grid` lets a group's weights be."""
    return _INT4_GRID_TOL * _groups(weight).abs().amax(dim=-1)


def pack_int4(weight: Tensor, dtype: torch.dtype = torch.bfloat16,
              block_rows: int = PACK_BLOCK_ROWS) -> tuple[Tensor, Tensor, Tensor]:
    """(packed codes, scales_and_zeros [in / 32, out, 2] in `dtype`, held values [out, in] float32) for
    `aten._weight_int4pack_mm_for_cpu`, which computes each weight as (q - 8) * scale + zero with its
    group's scale and zero in the activations' dtype: scale = step, zero = low + 8 * step (`_grid`),
    each rounded to `dtype`. The held values are what the kernel multiplies by; for a weight on a 4-bit
    grid they are within one `dtype` rounding of the scale and zero of it (bfloat16: 2^-9 of each)."""
    parts = list(_pack_int4_blocks(weight, dtype, block_rows))
    return (torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts], dim=1),
            torch.cat([p[2] for p in parts]))


def _pack_int4_blocks(weight: Tensor, dtype: torch.dtype, block_rows: int = PACK_BLOCK_ROWS):
    """`pack_int4` a block of rows at a time (the float32 temporaries of one block, not of a 49152-row
    head): yields (packed [rows, in / 2], scales_and_zeros [in / 32, rows, 2], held [rows, in] float32,
    whether the block's weights were on their grid). The kernel's packing works in blocks of rows that
    divide block_rows, so the packed blocks concatenate."""
    for q, step, low, on in _grid_blocks(weight, block_rows):
        scale, zero = step.to(dtype), (low + 8 * step).to(dtype)  # [rows, in / 32] each
        held = (q - 8).mul_(scale.float()[..., None]).add_(zero.float()[..., None]).flatten(1)  # [rows, in]
        scales_zeros = torch.stack([scale, zero], dim=-1).transpose(0, 1).contiguous()  # [in / 32, rows, 2]
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.to(torch.int32).flatten(1), 1)  # [rows, in / 2]
        yield packed, scales_zeros, held, on


def pack_int8(weight: Tensor, dtype: torch.dtype = torch.bfloat16) -> tuple[Tensor, Tensor]:
    """(q int8 [out, in], scales [out] in `dtype`) with weight ~= q * scales[:, None]: symmetric, one
    scale per output row, a power of two (at least 2^-24) no smaller than max|row| / 127, so |q| <= 127.
    Each weight is then within scale / 2 <= max(max|row| / 127, 2^-25) of itself (`int8_error_bound`),
    and every q * scale is exact in bfloat16 and float16 (at most 8 significant bits, exponent >= -24): the
    other kernels can hold the very same values."""
    w = weight.detach().to(device="cpu", dtype=torch.float32)
    need = w.abs().amax(dim=1) / 127  # [out]: the smallest scale that keeps |q| <= 127
    s = torch.exp2(torch.ceil(torch.log2(need.clamp_min(2.0 ** -24))))
    s = torch.where(s < need, s * 2, s)  # log2 rounding: never below what is needed
    s = torch.where((s / 2 >= need) & (s > 2.0 ** -24), s / 2, s)  # nor twice it
    q = torch.round(w / s[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), s.to(dtype).contiguous()


def int8_error_bound(weight: Tensor) -> Tensor:
    """[out]: the most any weight of a row moves under `pack_int8` (2^-25 for rows below 2^-24 * 127)."""
    return (weight.detach().float().abs().amax(dim=1) / 127).clamp_min(2.0 ** -25)


def held_values(weight: Tensor, kernels: set[str]) -> Tensor:
    """The float32 values [out, in] a low-precision linear running `kernels` holds, the same for every
    kernel so that the kernel a call's row count picks changes only the order of the sums, never the
    weights: int8's q * scale where int8 is one of them, else float16's rounding where float16 is,
    else the weight itself. With int4 the other kernel ("dense") holds int4's values rounded to the
    model's dtype (`LowPrecisionLinear.repack`): there the kernels differ by that rounding too (bfloat16:
    2^-9 of each weight), since int4's values, (q - 8) * scale + zero in float32, need more bits."""
    w = weight.detach().to(device="cpu", dtype=torch.float32)
    if "int4" in kernels:
        return pack_int4(w)[2]
    if "int8" in kernels:
        q, s = pack_int8(w, torch.float32)
        return q.float() * s[:, None]
    if "fp16" in kernels:
        return w.half().float()
    return w.contiguous()


def _run_fp16(x: Tensor, weight: Tensor, bias: Tensor | None, out_features: int, op=None) -> Tensor:
    """fbgemm on float16 weights: through the custom op `op` when given (under compile), else directly."""
    x32 = x.contiguous() if x.dtype == torch.float32 else x.float()
    y = op(x32, weight, bias, out_features) if op is not None else _fbgemm_fp16(x32, weight, bias)  # [..., out]
    return y.to(x.dtype)


class LowPrecisionLinear(nn.Module):
    """y = x W^T + b on CPU for a weight whose values are low precision (a GGUF file's blocks or
    `quantization=`, see quant.py): each call runs the kernel measured fastest on this host for its row
    count (`linear_choice.py`). `kernels`: ((max_rows, name), ...) ascending; a call of r rows runs the
    first entry with r <= max_rows, the last entry also every larger call. Only the weights of the
    kernels named are kept.

    Every kernel holds the same values (`held_values`): with "int8" in the menu each weight is within
    max|row| / 127 of itself (`pack_int8`), else with "fp16" within 2^-11 of itself
    (quant.LOW_PRECISION_REL_BOUND), else exact. So the kernels differ only in summation order, as a
    dense kernel does between row counts, and a sample's result does not hinge on how many rows its
    step had. The exception is "int4" (weights on a 4-bit grid only, `on_int4_grid`): its dense partner
    holds int4's values rounded to the model's dtype, so there the kernels also differ by that rounding
    (bfloat16: 2^-9 of each weight); new weights off the grid (`repack`) make the linear dense-only.
    Inference only."""

    def __init__(self, linear: nn.Linear, kernels: tuple[tuple[int, str], ...]):
        super().__init__()
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.dtype = linear.weight.dtype
        offered = KERNELS[self.dtype] + INT4_KERNELS.get(self.dtype, ())
        assert kernels and all(k in offered for _, k in kernels), kernels
        assert not {"int4", "int8"} <= {k for _, k in kernels}, kernels  # they would hold different values
        self.kernels = tuple(kernels)
        bias = None if linear.bias is None else linear.bias.detach().to(self.dtype).clone()
        self.register_buffer("bias", bias, persistent=False)
        names = self._held()
        # the custom ops compiled code calls (defined here, outside any trace)
        self._fp16_op = fp16_linear_op() if "fp16" in names else None
        self._dense_packed = "dense" in names and packing_available()
        self._packed_op = packed_linear_op() if self._dense_packed else None
        self.repack(linear.weight)

    def _held(self) -> set[str]:
        """The kernels whose weights this linear keeps: those it runs, or whose weights they run."""
        return {SHARES_WEIGHTS.get(k, k) for _, k in self.kernels}

    def repack(self, weight: Tensor) -> None:
        """Replace the weight with `weight` [out, in] (packed again for each kernel kept)."""
        assert tuple(weight.shape) == (self.out_features, self.in_features)
        names = self._held()
        q = s = dense = w = packed4 = sz4 = None
        if "int4" in names:
            packed, sz4, on_grid = [], [], True
            if "dense" in names:
                dense = torch.empty((self.out_features, self.in_features), dtype=self.dtype)  # [out, in]
            a = 0
            for p, sz, held, on in _pack_int4_blocks(weight, self.dtype):  # blocks: no float32 copy of it all
                packed.append(p)
                sz4.append(sz)
                on_grid &= on
                if dense is not None:
                    dense[a:a + len(held)] = held.to(self.dtype)
                a += len(held)
            packed4, sz4 = torch.cat(packed), torch.cat(sz4, dim=1)  # [out, in / 2], [in / 32, out, 2]
            if not on_grid:  # e.g. update_weights: int4 would round them coarsely
                log.warning("int4 linear [%d, %d]: new weights not on a 4-bit grid; they run dense from now on, "
                            "exact", self.out_features, self.in_features)
                self.kernels, names = ((self.kernels[-1][0], "dense"),), {"dense"}
                packed4 = sz4 = dense = None
        if "int8" in names:  # row blocks, so that no float32 copy of a large weight (the LM head) is made
            q = torch.empty((self.out_features, self.in_features), dtype=torch.int8)  # [out, in]
            s = torch.empty(self.out_features, dtype=self.dtype)  # [out]
            if "dense" in names:
                dense = torch.empty((self.out_features, self.in_features), dtype=self.dtype)  # [out, in]
            for a in range(0, self.out_features, PACK_BLOCK_ROWS):
                qa, sa = pack_int8(weight[a:a + PACK_BLOCK_ROWS], self.dtype)
                q[a:a + len(qa)], s[a:a + len(qa)] = qa, sa
                if dense is not None:
                    dense[a:a + len(qa)] = (qa.float() * sa.float()[:, None]).to(self.dtype)  # exact: pack_int8
        if "fp16" in names:  # fbgemm rounds to float16 as it packs (float16's held values); from a float32 copy
            w = pack_fp16(weight)  # that lives only while packing (peak memory)
        if "dense" in names and dense is None:  # held values: float16's where fp16 is kept, else the weight's
            src = weight.detach().to(device="cpu")
            dense = (src.half() if "fp16" in names else src).to(self.dtype).contiguous()  # [out, in]
        if self._dense_packed:  # the opaque mkldnn layout [out, in]
            dense = torch.ops.mkldnn._reorder_linear_weight(dense, PACK_ROWS_HINT)
        # packed weights: opaque fbgemm handles / mkldnn tensors, int8 [out, in] + scales [out]; none saved
        # with state_dict
        self.register_buffer("weight_fp16", w, persistent=False)
        self.register_buffer("weight_int4", packed4, persistent=False)
        self.register_buffer("int4_scales_zeros", sz4, persistent=False)
        self.register_buffer("weight_int8", q, persistent=False)
        self.register_buffer("int8_scales", s, persistent=False)
        self.register_buffer("weight", dense, persistent=False)
        self._keep_int4_args()

    def _keep_int4_args(self) -> None:
        # the int4 kernel's tensors in one plain attribute for eager calls: buffers are read through
        # nn.Module.__getattr__, a Python call each, and an n=1 step makes ~200 calls of this linear
        self._int4 = (self.weight_int4, self.int4_scales_zeros, self.bias)

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self._keep_int4_args()  # the buffers were replaced
        return out

    def kernel_for(self, rows: int) -> str:
        for max_rows, name in self.kernels:
            if rows <= max_rows:
                return name
        return self.kernels[-1][1]

    def forward(self, x: Tensor) -> Tensor:
        kernel = self.kernel_for(x.numel() // self.in_features)
        compiling = torch.compiler.is_compiling()  # custom ops under compile: opaque to inductor
        if kernel in ("int4", "int8"):  # 2-D kernels: rows [rows, in] -> [rows, out]
            rows = x.contiguous() if x.dim() == 2 else x.reshape(-1, self.in_features).contiguous()  # the model's are 2-D
            if kernel == "int4":
                # compiled: the buffers, graph inputs that one graph shares across layers
                w, sz, bias = (self.weight_int4, self.int4_scales_zeros, self.bias) if compiling else self._int4
                # torch's Python binding of the op: 1-2 us less a call than torch.ops' (120 calls an n=1 step)
                y = torch._weight_int4pack_mm_for_cpu(rows, w, INT4_GROUP, sz)
            else:
                y, bias = torch.ops.aten._weight_int8pack_mm(rows, self.weight_int8, self.int8_scales), self.bias
            if x.dim() != 2:
                y = y.view(*x.shape[:-1], self.out_features)  # [..., out]
            return y if bias is None else y + bias
        if kernel == "fp16":
            return _run_fp16(x, self.weight_fp16, self.bias, self.out_features, self._fp16_op if compiling else None)
        if kernel == "dense_pad" and x.numel() < PAD_ROWS * self.in_features:
            rows = x.reshape(-1, self.in_features)  # [r, in]
            r = rows.shape[0]
            padded = torch.constant_pad_nd(rows, (0, 0, 0, PAD_ROWS - r))  # [PAD_ROWS, in]: zero rows after
            return self._dense(padded, compiling)[:r].view(*x.shape[:-1], self.out_features)  # [..., out]
        return self._dense(x, compiling)

    def _dense(self, x: Tensor, compiling: bool) -> Tensor:
        if not self._dense_packed:
            return nn.functional.linear(x, self.weight, self.bias)
        if compiling:
            return self._packed_op(x, self.weight, self.bias)  # [..., in] -> [..., out]
        # eager: the op's body directly (the custom-op wrapper adds Python work to each of ~200 calls a step)
        return _linear_pointwise(x.contiguous(), self.weight, self.bias, "none", [], "")

    def describe(self) -> str:
        return describe_kernels(self.kernels)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, "
                f"dtype={self.dtype}, kernels={self.kernels}")


def kernel_bounds(model: nn.Module) -> list[int]:
    """The row counts after which some linear of `model` switches to another kernel, ascending (a
    compiled step branches there: one more graph above each)."""
    return sorted({rows for m in model.modules() if isinstance(m, LowPrecisionLinear) for rows, _ in m.kernels[:-1]})


KERNEL_WORDS = {"int4": "int4 weights", "int8": "int8 weights", "fp16": "float16 weights", "dense": "dense",
                "dense_pad": f"dense on {PAD_ROWS} rows"}


def describe_kernels(kernels: tuple[tuple[int, str], ...]) -> str:
    """e.g. "int8 weights up to 2 rows, float16 weights up to 8, dense above"."""
    parts = [f"{KERNEL_WORDS[k]} up to {r} rows" if i == 0 else f"{KERNEL_WORDS[k]} up to {r}"
             for i, (r, k) in enumerate(kernels[:-1])]
    last = KERNEL_WORDS[kernels[-1][1]]
    return ", ".join(parts + [f"{last} above" if parts else f"{last} at every row count"])


def use_low_precision_linears(model: nn.Module, names: set[str], kernels: tuple[tuple[int, str], ...],
                              dtype: torch.dtype | None = None) -> int:
    """Swap the CPU linears named in `names` (of `dtype`, default: any float32 or bfloat16 one) for
    `LowPrecisionLinear`s running `kernels`, in place; returns how many. A linear whose weight float16
    cannot hold (|w| > 65504) is left as it is when `kernels` name "fp16"."""
    count = 0
    for name in [n for n, _ in model.named_modules() if n in names]:  # names only: each old weight is freed
        module = model.get_submodule(name)                            # as soon as its module is swapped
        if not is_cpu_linear(module) or module.weight.dtype not in KERNELS:
            continue
        if dtype is not None and module.weight.dtype != dtype:
            continue
        if (any(k == "fp16" for _, k in kernels)
                and module.weight.detach().abs().max().item() > torch.finfo(torch.float16).max):
            log.warning("%s: weights beyond float16's range; it keeps its own kernel", name)
            continue
        parent_name, _, attr = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, attr, LowPrecisionLinear(module, kernels))
        count += 1
        if count % TRIM_EVERY == 0:  # the old weights and the packing's copies, handed back as they go
            release_free_heap()
    if count:
        log.info("%d low-precision linears: %s", count, describe_kernels(kernels))
    return count
