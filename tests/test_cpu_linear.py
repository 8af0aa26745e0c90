"""Prepacked oneDNN linears (the float32 CPU fast path) vs `nn.Linear` and vs `transformers`."""

import copy

import pytest
import torch
from torch import nn

from forklm.cpu_linear import (LowPrecisionLinear, PackedLinear, fp16_weights_available, pack_linears,
                               packing_available, use_low_precision_linears)
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


@pytest.mark.skipif(not fp16_weights_available(), reason="this torch build has no fbgemm float16 GEMM")
@pytest.mark.parametrize("keep_fp32", [False, True])
@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("in_f,out_f", [(32, 13), (576, 200), (96, 3001)])
@pytest.mark.parametrize("rows", [(1,), (3,), (17,), (2, 9), (1, 64)])
def test_low_precision_linear_is_float16_weights_up_to_its_rows_then_float32(in_f, out_f, bias, rows, keep_fp32):
    torch.manual_seed(in_f + out_f + len(rows))
    lin = nn.Linear(in_f, out_f, bias=bias)
    low = LowPrecisionLinear(lin, fp16_max_rows=8, keep_fp32=keep_fp32)
    x = torch.randn(*rows, in_f)
    n_rows = x.numel() // in_f
    as_fp16 = nn.functional.linear(x, lin.weight.half().float(), lin.bias)  # what float16 weights compute
    with torch.inference_mode():
        ours, exact = low(x), lin(x)
    assert ours.shape == exact.shape == (*rows, out_f)
    if n_rows <= 8 or not keep_fp32:
        assert_close_rel(ours, as_fp16)
        # within the bound: each weight off by <= 2^-11 of itself, so y by <= 2^-11 sum |x w|
        bound = 2.0 ** -11 * (x.abs() @ lin.weight.abs().t()) + 1e-5
        assert ((ours - exact).abs() <= bound).all()
        assert not torch.equal(ours, exact) or out_f < 20
    else:
        assert_close_rel(ours, exact)
    assert (low.weight is None) == (not keep_fp32)


@pytest.mark.skipif(not fp16_weights_available(), reason="this torch build has no fbgemm float16 GEMM")
def test_low_precision_linear_compiles_to_the_same_kernel():
    torch.manual_seed(0)
    lin = nn.Linear(64, 48)
    low = LowPrecisionLinear(lin, fp16_max_rows=4, keep_fp32=True)
    fn = torch.compile(lambda x: torch.relu(low(x)), fullgraph=True)
    for rows in (2, 9):
        x = torch.randn(rows, 64)
        with torch.inference_mode():
            assert_close_rel(fn(x), torch.relu(low(x)))


@pytest.mark.skipif(not fp16_weights_available(), reason="this torch build has no fbgemm float16 GEMM")
def test_use_low_precision_linears_swaps_the_named_ones_and_repacks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 16), nn.ReLU(), nn.Linear(16, 8))
    assert use_low_precision_linears(model, {"0"}, fp16_max_rows=4, keep_fp32=False) == 1
    assert isinstance(model[0], LowPrecisionLinear) and type(model[2]) is nn.Linear
    new = torch.randn(16, 32)
    model[0].repack(new)
    x = torch.randn(3, 32)
    with torch.inference_mode():
        assert_close_rel(model[0](x), nn.functional.linear(x, new.half().float(), model[0].bias))
