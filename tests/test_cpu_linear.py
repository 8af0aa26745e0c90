"""Prepacked oneDNN linears (the float32 CPU fast path) vs `nn.Linear` and vs `transformers`."""

import copy

import pytest
import torch
from torch import nn

from forklm.cpu_linear import (LowPrecisionLinear, PackedLinear, describe_kernels, fp16_weights_available, kernel_bounds,
                               held_values, int4_available, int4_grid_bound, int8_available, int8_error_bound,
                               kernels_available, on_int4_grid, pack_int4, pack_int8, pack_linears, packing_available,
                               use_low_precision_linears, PAD_ROWS, SHARES_WEIGHTS)
from forklm.quant import quantize_values
from forklm.attention.cascade import CausalAttention
from forklm.checkpoint import load_checkpoint

from conftest import FAMILIES

pytestmark = pytest.mark.skipif(not packing_available(), reason="this torch build has no oneDNN weight packing")

# float32: the two kernels sum in different orders; observed relative error ~1e-7 .. 1e-6
REL_TOL = 1e-5


def assert_close_rel(ours, ref):
    scale = ref.abs().max().item()
    assert torch.isfinite(ours).all()
    assert (ours - ref).abs().max().item() <= REL_TOL * max(scale, 1.0), (ours - ref).abs().max().item()


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("in_f,out_f", [(7, 13), (64, 200), (768, 2048), (576, 3001)])
@pytest.mark.parametrize("rows", [(1,), (3,), (64,), (2, 5), (1, 33)])
def test_packed_linear_matches_nn_linear(in_f, out_f, bias, rows):
    torch.manual_seed(in_f * out_f + len(rows))
    lin = nn.Linear(in_f, out_f, bias=bias)
    packed = PackedLinear(lin)
    x = torch.randn(*rows, in_f)
    with torch.inference_mode():
        ours, ref = packed(x), lin(x)
    assert ours.shape == ref.shape == (*rows, out_f)
    assert_close_rel(ours, ref)


def test_packed_linear_takes_non_contiguous_input():
    torch.manual_seed(0)
    lin = nn.Linear(48, 40)
    x = torch.randn(48, 6).t()  # [6, 48], column-major
    with torch.inference_mode():
        assert_close_rel(PackedLinear(lin)(x), lin(x))


def test_pack_linears_swaps_float32_linears_only():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Sequential(nn.Linear(16, 4, bias=False)), nn.LayerNorm(4))
    half = copy.deepcopy(model).to(torch.bfloat16)
    ref = copy.deepcopy(model)
    assert pack_linears(model) == 2
    assert isinstance(model[0], PackedLinear) and isinstance(model[2][0], PackedLinear)
    # the dense weights are gone (no second copy); the packed ones are not saved in a state_dict
    assert [n for n, _ in model.named_parameters()] == ["3.weight", "3.bias"]
    assert set(model.state_dict()) == {"3.weight", "3.bias"}
    assert pack_linears(half) == 0 and isinstance(half[0], nn.Linear)
    x = torch.randn(5, 8)
    with torch.inference_mode():
        assert_close_rel(model(x), ref(x))


def test_compiled_packed_linear_equals_eager():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 96), nn.SiLU(), nn.Linear(96, 17))
    pack_linears(model)
    compiled = torch.compile(model, fullgraph=True, dynamic=False)
    x = torch.randn(4, 32)
    with torch.inference_mode():
        assert torch.equal(compiled(x), model(x))


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_model_logits_match_transformers(hf_models, family):
    """The packed model (tied LM heads included: llama_gqa, qwen2) against transformers' logits."""
    hf, folder = hf_models[family]
    ckpt = load_checkpoint(folder, torch.float32, "cpu")
    assert pack_linears(ckpt.model) > 0
    torch.manual_seed(2)
    for L in (1, 9, 33):
        ids = torch.randint(0, ckpt.config.vocab_size, (1, L))
        with torch.inference_mode():
            ref = hf(ids).logits[0]  # [L, V]
            ours = ckpt.model(ids, torch.arange(L)[None], CausalAttention(), last_only=False)[0]
        assert (ours - ref).abs().max().item() < 1e-4, (family, L)


needs_fp16 = pytest.mark.skipif(not fp16_weights_available(), reason="this torch build has no fbgemm float16 GEMM")
needs_int8 = pytest.mark.skipif(not int8_available(), reason="this torch build has no _weight_int8pack_mm")


def test_pack_int8_rounds_each_row_within_its_bound_to_values_every_format_holds():
    torch.manual_seed(0)
    w = torch.randn(37, 70) * torch.logspace(-9, 1, 37)[:, None]  # rows of very different scales
    w[3] = 0  # an all-zero row keeps a positive scale
    for dtype in (torch.bfloat16, torch.float32):
        q, s = pack_int8(w, dtype)
        assert q.dtype == torch.int8 and s.dtype == dtype and q.shape == w.shape and s.shape == (37,)
        assert q.abs().max() <= 127 and (s > 0).all()
        assert torch.equal(torch.exp2(torch.log2(s.float()).round()), s.float())  # powers of two
        held = q.float() * s.float()[:, None]
        assert ((held - w).abs().amax(dim=1) <= int8_error_bound(w)).all()
        assert torch.equal(held.bfloat16().float(), held) and torch.equal(held.half().float(), held)
        big = w.abs().amax(dim=1) > 127 * 2.0 ** -24
        assert (q.abs().amax(dim=1)[big] >= 64).all()  # at least half the range is used
    assert torch.equal(held_values(w, {"int8", "dense"}), held)
    assert torch.equal(held_values(w, {"fp16", "dense"}), w.half().float())
    assert torch.equal(held_values(w, {"dense"}), w)


def fp16_bound(x, w):
    """Each weight off by <= 2^-11 of itself (quant.LOW_PRECISION_REL_BOUND), so y by <= 2^-11 sum |x w|."""
    return 2.0 ** -11 * (x.float().abs() @ w.float().abs().t())


def int8_bound(x, w):
    """Each weight of row o off by <= int8_error_bound(w)[o], so y[o] by <= that * sum |x|."""
    return x.float().abs().sum(-1, keepdim=True) * int8_error_bound(w)


DENSE, FP16_DENSE, FP16 = ((256, "dense"),), ((4, "fp16"), (256, "dense")), ((8, "fp16"),)
INT8_FP16_DENSE = ((1, "int8"), (8, "fp16"), (256, "dense"))
PAD_DENSE, FP16_PAD_DENSE = ((2, "dense_pad"), (256, "dense")), ((1, "fp16"), (3, "dense_pad"), (256, "dense"))
KERNEL_MENUS = [(torch.float32, k) for k in (DENSE, FP16_DENSE, FP16, PAD_DENSE, FP16_PAD_DENSE)] + [
    (torch.bfloat16, k) for k in (DENSE, FP16_DENSE, FP16, INT8_FP16_DENSE, ((2, "int8"),), PAD_DENSE,
                                  FP16_PAD_DENSE, ((256, "dense_pad"),))]


def summation_slack(dtype, x, w, ref):
    """float32: sums in other orders, ~1e-6 relative; bfloat16: the output rounds (2^-8) after float32
    accumulation in any order."""
    return (1e-5 if dtype == torch.float32 else 2.0 ** -7) * (x.float().abs() @ w.abs().t() + ref.abs()) + 1e-5


@needs_fp16
@needs_int8
@pytest.mark.parametrize("dtype,kernels", KERNEL_MENUS, ids=str)
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("in_f,out_f", [(32, 13), (576, 200), (96, 3001)])
@pytest.mark.parametrize("rows", [(1,), (2,), (3,), (17,), (2, 9), (1, 64)])
def test_low_precision_linear_runs_each_row_counts_kernel_within_its_bound(dtype, kernels, bias, in_f, out_f,
                                                                             rows):
    """Each kernel against a float32 product of the values the linear holds (only the summation order
    differs), and those values against the weight: int8 within pack_int8's per-row bound, float16
    within 2^-11 of each weight, dense exact."""
    torch.manual_seed(in_f + out_f + len(rows))
    lin = nn.Linear(in_f, out_f, bias=bias).to(dtype)
    low = LowPrecisionLinear(lin, kernels)
    x = torch.randn(*rows, in_f).to(dtype)
    n_rows = x.numel() // in_f
    kernel = low.kernel_for(n_rows)
    assert kernel == next((k for r, k in kernels if n_rows <= r), kernels[-1][1])
    w, kept = lin.weight.float(), {SHARES_WEIGHTS.get(k, k) for _, k in kernels}  # the weights it holds
    b = None if lin.bias is None else lin.bias.float()
    held = held_values(lin.weight, kept)
    with torch.inference_mode():
        ours = low(x)
    assert ours.shape == (*rows, out_f) and ours.dtype == dtype and torch.isfinite(ours).all()
    on_held = nn.functional.linear(x.float(), held, b)  # [..., out]
    assert ((ours.float() - on_held).abs() <= summation_slack(dtype, x, held, on_held)).all(), kernel
    exact = nn.functional.linear(x.float(), w, b)
    bound = int8_bound(x, w) if "int8" in kept else fp16_bound(x, w) if "fp16" in kept else 0 * exact
    assert ((on_held - exact).abs() <= bound + 1e-5).all()
    assert (low.weight_fp16 is not None) == ("fp16" in kept) and (low.weight_int8 is not None) == ("int8" in kept)
    assert (low.weight is not None) == ("dense" in kept)


@needs_fp16
@needs_int8
@pytest.mark.parametrize("dtype,kernels", [(torch.float32, FP16_DENSE), (torch.bfloat16, INT8_FP16_DENSE),
                                           (torch.float32, PAD_DENSE), (torch.bfloat16, PAD_DENSE)], ids=str)
def test_a_rows_result_does_not_depend_on_the_kernel_its_row_count_picks(dtype, kernels):
    """The same row alone (the smallest kernel) and inside 64 rows (dense): equal up to summation order,
    because every kernel holds the same values."""
    torch.manual_seed(3)
    lin = nn.Linear(576, 300).to(dtype)
    low = LowPrecisionLinear(lin, kernels)
    x = torch.randn(64, 576).to(dtype)
    with torch.inference_mode():
        alone = torch.cat([low(x[i:i + 1]) for i in range(64)])  # [64, out]: rows of one
        together = low(x)  # [64, out]
    assert low.kernel_for(1) != low.kernel_for(64)
    held = held_values(lin.weight, {SHARES_WEIGHTS.get(k, k) for _, k in kernels})
    ref = nn.functional.linear(x.float(), held, lin.bias.float())
    assert ((alone.float() - together.float()).abs() <= summation_slack(dtype, x, held, ref)).all()


@needs_fp16
@needs_int8
@pytest.mark.parametrize("dtype,kernels", [(torch.bfloat16, ((256, "int8"),)), (torch.bfloat16, FP16),
                                           (torch.bfloat16, DENSE), (torch.float32, FP16), (torch.float32, DENSE)],
                         ids=str)
def test_low_precision_linear_takes_non_contiguous_input(dtype, kernels):
    torch.manual_seed(0)
    low = LowPrecisionLinear(nn.Linear(48, 40).to(dtype), kernels)
    x = torch.randn(48, 6).to(dtype).t()  # [6, 48], column-major
    with torch.inference_mode():
        assert torch.equal(low(x), low(x.contiguous()))


@needs_fp16
def test_kernel_bounds_are_the_row_counts_where_a_linear_switches_kernels():
    """What a compiled step branches on (the engine warms a batch above each): every menu's switch
    points, once each, ascending; the last entry of a menu is no switch."""
    model = nn.Sequential(LowPrecisionLinear(nn.Linear(32, 16).to(torch.bfloat16), ((4, "fp16"), (1 << 30, "dense"))),
                          LowPrecisionLinear(nn.Linear(16, 16).to(torch.bfloat16), ((2, "fp16"), (8, "dense"),
                                                                                    (1 << 30, "fp16"))),
                          LowPrecisionLinear(nn.Linear(16, 32).to(torch.bfloat16), ((4, "dense"), (1 << 30, "fp16"))),
                          nn.Linear(32, 8))
    assert kernel_bounds(model) == [2, 4, 8]
    assert kernel_bounds(nn.Sequential(nn.Linear(4, 4))) == []


@needs_fp16
@needs_int8
def test_int8_kernel_is_the_dequantized_weights_product():
    """int8 vs F.linear on exactly the weights it holds (q * scale): only summation order differs."""
    torch.manual_seed(1)
    lin = nn.Linear(96, 50).to(torch.bfloat16)
    low = LowPrecisionLinear(lin, ((256, "int8"),))
    w = low.weight_int8.float() * low.int8_scales.float()[:, None]
    for m in (1, 4, 64):
        x = torch.randn(m, 96).to(torch.bfloat16)
        with torch.inference_mode():
            ref = nn.functional.linear(x.float(), w) + lin.bias.float()
            ours = low(x).float()
        assert ((ours - ref).abs() <= 2.0 ** -7 * (ref.abs() + 1)).all()


@needs_fp16
@needs_int8
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_low_precision_linear_compiles_to_the_same_kernels(dtype):
    torch.manual_seed(0)
    lin = nn.Linear(64, 48).to(dtype)
    kernels = (((1, "int8"), (2, "dense_pad"), (4, "fp16"), (256, "dense")) if dtype == torch.bfloat16
               else ((1, "dense_pad"), (4, "fp16"), (256, "dense")))
    low = LowPrecisionLinear(lin, kernels)
    fn = torch.compile(lambda x: torch.relu(low(x)), fullgraph=True, dynamic=False)
    for rows in (1, 2, 3, 9):
        x = torch.randn(rows, 64).to(dtype)
        with torch.inference_mode():
            ours, ref = fn(x), torch.relu(low(x))
        tol = 1e-5 if dtype == torch.float32 else 2.0 ** -7
        assert ((ours.float() - ref.float()).abs() <= tol * (ref.float().abs() + 1)).all(), rows


@needs_fp16
def test_use_low_precision_linears_swaps_the_named_ones_and_repacks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8), nn.Linear(8, 8).to(torch.bfloat16))
    assert use_low_precision_linears(model, {"0", "3"}, ((4, "fp16"),), torch.float32) == 1
    assert isinstance(model[0], LowPrecisionLinear) and type(model[2]) is nn.Linear and type(model[3]) is nn.Linear
    new = torch.randn(16, 32)
    model[0].repack(new)
    x = torch.randn(3, 32)
    with torch.inference_mode():
        assert_close_rel(model[0](x), nn.functional.linear(x, new.half().float(), model[0].bias))
    big = nn.Sequential(nn.Linear(4, 4))
    with torch.no_grad():
        big[0].weight[0, 0] = 1e5  # beyond float16: keeps its own kernel
    assert use_low_precision_linears(big, {"0"}, ((4, "fp16"),)) == 0


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("shape", [(1,), (2,), (3,), (1, 2), (2, 1, 1), (4,), (9,)])
def test_dense_pad_runs_a_few_rows_as_the_dense_kernel_runs_them_among_zero_rows(dtype, shape):
    """"dense_pad" holds the dense weights only (no copy of its own) and gives a call of fewer than PAD_ROWS
    rows exactly what the dense kernel gives those rows followed by zero rows; larger calls are dense's own."""
    torch.manual_seed(len(shape) + shape[0])
    lin = nn.Linear(96, 300).to(dtype)
    pad, dense = LowPrecisionLinear(lin, ((256, "dense_pad"),)), LowPrecisionLinear(lin, DENSE)
    assert pad.weight_fp16 is None and pad.weight_int8 is None and pad.weight_int4 is None
    assert pad.weight is not None and pad.bias is not None
    x = torch.randn(*shape, 96).to(dtype)
    rows = x.reshape(-1, 96)
    r = rows.shape[0]
    with torch.inference_mode():
        ours = pad(x)
        ref = dense(torch.cat([rows, rows.new_zeros(max(0, PAD_ROWS - r), 96)]))[:r]  # [r, out]
    assert ours.shape == (*shape, 300) and ours.dtype == dtype
    assert torch.equal(ours.reshape(r, 300), ref)
    if r >= PAD_ROWS:
        assert torch.equal(ours, dense(x))


def test_describe_kernels_reads_as_a_sentence():
    assert describe_kernels(((256, "dense"),)) == "dense at every row count"
    assert (describe_kernels(((1, "int8"), (8, "fp16"), (256, "dense")))
            == "int8 weights up to 1 rows, float16 weights up to 8, dense above")
    assert describe_kernels(((2, "dense_pad"), (256, "dense"))) == f"dense on {PAD_ROWS} rows up to 2 rows, dense above"


# ---- int4: weights on a 4-bit grid (a GGUF file's Q4_1 blocks, quantization="int4") ----------------------
needs_int4 = pytest.mark.skipif(not int4_available(), reason="this torch build has no int4 CPU kernel")
INT4_DENSE = ((4, "int4"), (256, "dense"))


def q4_linear(in_f, out_f, bias, dtype, seed):
    """A linear whose weight is gguf's Q4_1 rounding of a random one (rows of different scales), held in dtype."""
    torch.manual_seed(seed)
    lin = nn.Linear(in_f, out_f, bias=bias)
    with torch.no_grad():
        lin.weight.mul_(torch.logspace(-2, 1, out_f)[:, None])
        lin.weight.copy_(quantize_values(lin.weight, "int4"))
    return lin.to(dtype)


@needs_int4
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_q4_1_weights_are_found_on_their_grid_and_others_are_not(dtype):
    """gguf's Q4_1 values (also rounded to bfloat16) pass `on_int4_grid`; Q8_0 values, plain random ones and
    shapes the kernel cannot pack do not; the grid found again is within its bound of each weight."""
    lin = q4_linear(96, 48, False, dtype, 0)
    assert on_int4_grid(lin.weight)
    _, _, held = pack_int4(lin.weight, torch.bfloat16)
    # the kernel's values: the grid (within the bound) with its scale and zero rounded to bfloat16
    w = lin.weight.float()
    bound = int4_grid_bound(lin.weight).repeat_interleave(32, dim=1)  # [out, in]
    step = (w.reshape(48, 3, 32).amax(-1) - w.reshape(48, 3, 32).amin(-1)) / 15
    rounding = 2.0 ** -8 * (8 * step + w.reshape(48, 3, 32).abs().amax(-1)).repeat_interleave(32, dim=1)
    assert ((held - w).abs() <= bound + rounding).all()
    torch.manual_seed(1)
    q8 = quantize_values(torch.randn(48, 96), "int8").to(dtype)
    assert not on_int4_grid(q8) and not on_int4_grid(torch.randn(48, 96).to(dtype))
    assert not on_int4_grid(quantize_values(torch.randn(40, 96), "int4"))  # out_features not a multiple of 16
    assert kernels_available(torch.bfloat16, int4_grid=True) == (("int4", "dense", "dense_pad") if packing_available()
                                                                else ("int4", "dense"))
    assert "int4" not in kernels_available(torch.bfloat16) + kernels_available(torch.float32, int4_grid=True)


@needs_int4
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("in_f,out_f", [(32, 16), (576, 192), (96, 3008)])
@pytest.mark.parametrize("rows", [(1,), (3,), (4,), (17,), (1, 64)])
def test_int4_kernel_is_the_product_of_the_values_it_holds(bias, in_f, out_f, rows):
    """int4 (up to 4 rows) and dense (above) against a float32 product of what each holds: int4 its
    grid values, dense those rounded to bfloat16; the output rounds to bfloat16 after float32 sums."""
    lin = q4_linear(in_f, out_f, bias, torch.bfloat16, in_f + out_f)
    low = LowPrecisionLinear(lin, INT4_DENSE)
    x = torch.randn(*rows, in_f).to(torch.bfloat16)
    kernel = low.kernel_for(x.numel() // in_f)
    held = held_values(lin.weight, {"int4", "dense"})
    if kernel == "dense":
        held = held.bfloat16().float()
    b = None if lin.bias is None else lin.bias.float()
    with torch.inference_mode():
        ours = low(x)
    ref = nn.functional.linear(x.float(), held, b)
    assert ours.shape == (*rows, out_f) and ours.dtype == torch.bfloat16
    assert ((ours.float() - ref).abs() <= summation_slack(torch.bfloat16, x, held, ref)).all(), kernel
    assert low.weight_int4 is not None and low.weight_int8 is None and low.weight_fp16 is None


@needs_int4
def test_an_int4_rows_result_moves_only_by_the_dense_kernels_rounding_inside_a_batch():
    """A row alone (int4) and inside 64 rows (dense, holding int4's values rounded to bfloat16): apart by at
    most that rounding (2^-9 of each weight) plus summation order."""
    lin = q4_linear(576, 320, True, torch.bfloat16, 3)
    low = LowPrecisionLinear(lin, INT4_DENSE)
    x = torch.randn(64, 576).to(torch.bfloat16)
    with torch.inference_mode():
        alone = torch.cat([low(x[i:i + 1]) for i in range(64)])  # [64, out]
        together = low(x)
    assert low.kernel_for(1) == "int4" and low.kernel_for(64) == "dense"
    held = held_values(lin.weight, {"int4", "dense"})
    ref = nn.functional.linear(x.float(), held, lin.bias.float())
    rounding = 2.0 ** -9 * (x.float().abs() @ held.abs().t())
    assert ((alone.float() - together.float()).abs() <= summation_slack(torch.bfloat16, x, held, ref) + rounding).all()


@needs_int4
def test_int4_linear_compiles_and_takes_non_contiguous_input():
    lin = q4_linear(64, 48, True, torch.bfloat16, 5)
    low = LowPrecisionLinear(lin, INT4_DENSE)
    fn = torch.compile(lambda x: torch.relu(low(x)), fullgraph=True, dynamic=False)
    for rows in (1, 3, 9):
        x = torch.randn(rows, 64).to(torch.bfloat16)
        with torch.inference_mode():
            ours, ref = fn(x), torch.relu(low(x))
        assert ((ours.float() - ref.float()).abs() <= 2.0 ** -7 * (ref.float().abs() + 1)).all(), rows
    x = torch.randn(64, 3).to(torch.bfloat16).t()  # [3, 64], column-major
    with torch.inference_mode():
        assert torch.equal(low(x), low(x.contiguous()))


@needs_int4
def test_an_int4_linear_runs_its_current_weights_after_a_repack_and_after_its_buffers_are_replaced():
    """Eager calls read the int4 tensors from one plain attribute (not the buffers): it follows `repack`
    and anything that replaces the buffers (`nn.Module._apply`: share_memory, to, ...)."""
    lin = q4_linear(64, 32, True, torch.bfloat16, 8)
    low = LowPrecisionLinear(lin, INT4_DENSE)
    x = torch.randn(1, 64).to(torch.bfloat16)
    new = quantize_values(torch.randn(32, 64), "int4").to(torch.bfloat16)
    fresh = LowPrecisionLinear(q4_linear(64, 32, True, torch.bfloat16, 9), INT4_DENSE)
    fresh.bias.copy_(low.bias)
    fresh.repack(new)
    low.repack(new)
    assert low.kernel_for(1) == "int4" and torch.equal(low(x), fresh(x))
    low._apply(lambda t: t.clone())
    assert low._int4[0] is low.weight_int4 and low._int4[1] is low.int4_scales_zeros and low._int4[2] is low.bias
    low.int4_scales_zeros.zero_()  # the buffer the module holds now: what eager calls must read
    assert torch.equal(low(x), low.bias.expand(1, 32))


@needs_int4
def test_new_weights_off_the_grid_make_an_int4_linear_dense_and_exact(caplog):
    lin = q4_linear(64, 32, False, torch.bfloat16, 6)
    x = torch.randn(2, 64).to(torch.bfloat16)
    with caplog.at_level("WARNING", logger="forklm.cpu_linear"):
        low = LowPrecisionLinear(lin, INT4_DENSE)
        on_grid = quantize_values(torch.randn(32, 64), "int4").to(torch.bfloat16)
        low.repack(on_grid)  # on a grid: stays int4, quietly
        assert not caplog.records and low.kernel_for(1) == "int4"
        off = torch.randn(32, 64).to(torch.bfloat16)
        low.repack(off)
    assert "not on a 4-bit grid" in caplog.text
    assert low.kernels == ((256, "dense"),) and low.weight_int4 is None
    with torch.inference_mode():
        ours = low(x).float()
    ref = nn.functional.linear(x.float(), off.float())  # no bias
    assert ((ours - ref).abs() <= summation_slack(torch.bfloat16, x, off.float(), ref)).all()


@needs_int4
def test_int4_packed_in_row_blocks_is_packed_whole():
    """Large weights (a 49152-row head) are packed a block of rows at a time; the blocks concatenate."""
    lin = q4_linear(64, 160, False, torch.bfloat16, 7)
    whole = pack_int4(lin.weight, torch.bfloat16, block_rows=160)
    blocks = pack_int4(lin.weight, torch.bfloat16, block_rows=64)
    for a, b in zip(whole, blocks):
        assert torch.equal(a, b)
