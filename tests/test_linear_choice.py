"""The per-host choice of low-precision linear kernels: the crossover rule, the disk cache, and what
`prepare_cpu_linears` and `LLM` do with it."""

import json

import pytest
import torch
from torch import nn

from forklm.cpu_linear import LowPrecisionLinear, PackedLinear, fp16_weights_available
from forklm.linear_choice import PROBE_ROWS, choose_fp16_max_rows, fp16_max_rows_from, prepare_cpu_linears

pytestmark = pytest.mark.skipif(not fp16_weights_available(), reason="this torch build has no fbgemm float16 GEMM")


def test_crossover_is_the_last_row_count_before_float32_first_wins():
    n = len(PROBE_ROWS)
    assert fp16_max_rows_from([1.0] * n, [2.0] * n) == (PROBE_ROWS[-1], False)
    assert fp16_max_rows_from([3.0] * n, [2.0] * n) == (0, True)
    fp16 = [1, 1, 1, 1, 5, 5, 5, 5][:n]
    assert fp16_max_rows_from(fp16, [2] * n) == (PROBE_ROWS[3], True)
    # float16 ahead again after losing once: the first loss decides (no islands)
    assert fp16_max_rows_from([1, 3, 1, 1, 1, 1, 1, 1][:n], [2] * n) == (PROBE_ROWS[0], True)


def test_choice_is_measured_once_then_read_from_the_cache(tmp_path):
    shapes = {(48, 32): 3, (32, 96): 2}
    first = choose_fp16_max_rows(shapes, tmp_path)
    files = list(tmp_path.glob("linear-choice-*.json"))
    assert len(files) == 1
    assert len(first.fp16_ms) == len(first.fp32_ms) == len(PROBE_ROWS) and min(first.fp16_ms) > 0
    assert first.fp16_max_rows in (0, *PROBE_ROWS)
    again = choose_fp16_max_rows(shapes, tmp_path)
    assert again == first  # measured times are never equal twice: this is the cached record
    other = choose_fp16_max_rows({(48, 32): 4}, tmp_path)  # other shapes: another entry
    assert len(list(tmp_path.glob("linear-choice-*.json"))) == 2 and other.fp16_ms != first.fp16_ms
    files[0].write_text("{ not json")
    remeasured = choose_fp16_max_rows(shapes, tmp_path)
    assert remeasured.fp16_ms != first.fp16_ms
    assert json.loads(files[0].read_text())["choice"]["fp16_ms"] == list(remeasured.fp16_ms)


def test_prepare_cpu_linears_gives_named_low_precision_linears_the_measured_kernel(tmp_path):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.Linear(32, 8).to(torch.bfloat16))
    prepare_cpu_linears(model, {"0", "3"}, tmp_path)
    choice = choose_fp16_max_rows({(64, 32): 1}, tmp_path)  # cached by the call above
    if choice.fp16_max_rows > 0:
        assert isinstance(model[0], LowPrecisionLinear) and model[0].fp16_max_rows == choice.fp16_max_rows
        assert (model[0].weight is not None) == choice.keep_fp32
    else:
        assert isinstance(model[0], PackedLinear)
    assert isinstance(model[2], PackedLinear)  # exact float32 values: always the exact kernel
    assert type(model[3]) is nn.Linear  # bfloat16: as it is


def test_embedded_model_runs_its_quantized_blocks_at_low_precision_only_under_auto(smollm_path):
    from forklm import LLM, SamplingParams

    auto = LLM(smollm_path)
    exact = LLM(smollm_path, dtype="float32")
    lows = [m for m in auto.model.modules() if isinstance(m, LowPrecisionLinear)]
    assert not any(isinstance(m, LowPrecisionLinear) for m in exact.model.modules())
    if auto.dtype == torch.float32 and lows:
        # every linear of the file is a Q4_1 / Q8_0 block tensor, the tied head (Q8_0 embedding) included
        assert len(lows) == 7 * auto.config.n_layers + 1 and isinstance(auto.model.lm_head, LowPrecisionLinear)
    prompt = auto.encode("The capital of France is")
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=1, ignore_eos=True)
    a, e = (llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)[0].outputs[0]
            for llm in (auto, exact))
    n = next((i for i, (x, y) in enumerate(zip(a.token_ids, e.token_ids)) if x != y), len(a.token_ids))
    assert n >= 4  # greedy text agrees (float16-held weights move logits by ~1e-3)
    for i in range(n):
        assert abs(a.logprobs[i][a.token_ids[i]].logprob - e.logprobs[i][e.token_ids[i]].logprob) < 0.05
