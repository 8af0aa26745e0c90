"""The per-host choice of low-precision linear kernels: the crossover rule, the disk cache, and what
`prepare_cpu_linears` and `LLM` do with it."""

import json
import subprocess
import sys
import time

import pytest
import torch
from torch import nn

from forklm.cpu_linear import LowPrecisionLinear, PackedLinear, fp16_weights_available, kernels_available
import forklm.linear_choice as linear_choice
from forklm.host import OthersMeter
from forklm.linear_choice import MARGIN, PROBE_ROWS, SHARED_MARGIN, choose_kernels, kernels_from, prepare_cpu_linears

pytestmark = pytest.mark.skipif(not fp16_weights_available(), reason="this torch build has no fbgemm float16 GEMM")

N = len(PROBE_ROWS)


@pytest.fixture
def quiet(monkeypatch):
    """Cache whatever was measured (a shared CI host may be busy: that is tested on its own below)."""
    monkeypatch.setattr(linear_choice, "BUSY_CORES", float("inf"))


def spinner():
    return subprocess.Popen([sys.executable, "-c", "while True: pass"])


def test_others_meter_sees_a_busy_neighbour():
    spin = spinner()
    try:
        time.sleep(0.3)  # started
        meter = OthersMeter().start()
        time.sleep(1.0)
        assert meter.cores() > 0.5
    finally:
        spin.kill()
        spin.wait()


def test_a_probe_taken_while_another_process_is_busy_is_used_but_not_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(linear_choice, "spare_cores", lambda: 0)  # as on a host whose cores the threads fill
    spin = spinner()
    try:
        time.sleep(0.3)
        choice = choose_kernels({(40, 24): 2, (24, 40): 1}, torch.float32, tmp_path)
    finally:
        spin.kill()
        spin.wait()
    assert choice.kernels and not list(tmp_path.glob("linear-choice-*.json"))


def test_spare_cores_are_the_cores_left_beside_torchs_threads():
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = linear_choice.spare_cores()
        torch.set_num_threads(2)
        assert linear_choice.spare_cores() == max(0, one - 1)
    finally:
        torch.set_num_threads(threads)


def test_each_row_count_takes_its_fastest_kernel_and_neighbours_merge():
    assert kernels_from({"fp16": [1.0] * N, "dense": [2.0] * N}) == ((PROBE_ROWS[-1], "fp16"),)
    assert kernels_from({"fp16": [3.0] * N, "dense": [2.0] * N}) == ((PROBE_ROWS[-1], "dense"),)
    fp16 = [1, 1, 1, 1, 5, 5, 5, 5]
    assert kernels_from({"fp16": fp16, "dense": [2] * N}) == ((PROBE_ROWS[3], "fp16"), (PROBE_ROWS[-1], "dense"))
    int8 = [0.5, 0.5, 9, 9, 9, 9, 9, 9]
    assert kernels_from({"int8": int8, "fp16": fp16, "dense": [2] * N}) == (
        (PROBE_ROWS[1], "int8"), (PROBE_ROWS[3], "fp16"), (PROBE_ROWS[-1], "dense"))
    # within MARGIN of dense: dense (one copy fewer to keep)
    near = [2 * (1 - MARGIN / 2)] * N
    assert kernels_from({"fp16": near, "dense": [2] * N}) == ((PROBE_ROWS[-1], "dense"),)
    # a kernel that is never MARGIN ahead of the other kept ones is dropped (one copy fewer)
    assert kernels_from({"int8": int8, "fp16": [0.6, 0.5 * (1 - MARGIN / 2), 9, 9, 9, 9, 9, 9],
                         "dense": [2] * N}) == ((PROBE_ROWS[1], "int8"), (PROBE_ROWS[-1], "dense"))
    # a kernel ahead again after losing: its own entry (every row count gets its fastest)
    assert kernels_from({"fp16": [1, 3, 1, 3, 3, 3, 3, 3], "dense": [2] * N}) == (
        (1, "fp16"), (2, "dense"), (4, "fp16"), (PROBE_ROWS[-1], "dense"))


def test_dense_pad_replaces_dense_where_faster_and_holds_no_copy_of_its_own():
    """dense_pad runs dense's weights: it replaces dense wherever it is SHARED_MARGIN faster and is never
    dropped for its memory; a kernel with weights of its own must be MARGIN ahead of it to be kept."""
    dense, pad = [2.0] * N, [1.5, 1.5] + [2.0] * (N - 2)
    assert kernels_from({"dense": dense, "dense_pad": pad}) == ((2, "dense_pad"), (PROBE_ROWS[-1], "dense"))
    near = [2 * (1 - SHARED_MARGIN / 2)] * 2 + [2.0] * (N - 2)  # within the shared margin: dense
    assert kernels_from({"dense": dense, "dense_pad": near}) == ((PROBE_ROWS[-1], "dense"),)
    # fp16 MARGIN ahead of dense but not of dense_pad: dropped (a copy of the weights for nothing)
    fp16 = [1.6, 1.6] + [9.0] * (N - 2)
    assert kernels_from({"fp16": fp16, "dense": dense}) == ((2, "fp16"), (PROBE_ROWS[-1], "dense"))
    assert kernels_from({"fp16": fp16, "dense": dense, "dense_pad": pad}) == ((2, "dense_pad"), (PROBE_ROWS[-1], "dense"))
    # MARGIN ahead of both: kept where it is
    fast = [1.0, 1.0] + [9.0] * (N - 2)
    assert kernels_from({"fp16": fast, "dense": dense, "dense_pad": pad}) == ((2, "fp16"), (PROBE_ROWS[-1], "dense"))
    # int4 ahead at few rows, dense_pad between it and dense
    int4 = [0.5, 9, 9, 9, 9, 9, 9, 9]
    assert kernels_from({"int4": int4, "dense": dense, "dense_pad": pad}) == (
        (1, "int4"), (2, "dense_pad"), (PROBE_ROWS[-1], "dense"))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_choice_is_measured_once_then_read_from_the_cache(tmp_path, dtype, quiet):
    shapes = {(48, 32): 3, (32, 96): 2}
    first = choose_kernels(shapes, dtype, tmp_path)
    files = list(tmp_path.glob("linear-choice-*.json"))
    assert len(files) == 1
    assert set(first.ms) == set(kernels_available(dtype)) and "dense" in first.ms
    assert all(len(v) == N and min(v) > 0 for v in first.ms.values())
    assert first.kernels == kernels_from(first.ms) and first.kernels[-1][0] == PROBE_ROWS[-1]
    again = choose_kernels(shapes, dtype, tmp_path)
    assert again == first  # measured times are never equal twice: this is the cached record
    other = choose_kernels({(48, 32): 4}, dtype, tmp_path)  # other shapes: another entry
    assert len(list(tmp_path.glob("linear-choice-*.json"))) == 2 and other.ms != first.ms
    files[0].write_text("{ not json")
    remeasured = choose_kernels(shapes, dtype, tmp_path)
    assert remeasured.ms != first.ms
    assert json.loads(files[0].read_text())["choice"]["ms"] == {k: list(v) for k, v in remeasured.ms.items()}


def test_bfloat16_and_float32_are_measured_apart(tmp_path, quiet):
    a = choose_kernels({(40, 32): 1}, torch.float32, tmp_path)
    b = choose_kernels({(40, 32): 1}, torch.bfloat16, tmp_path)
    assert len(list(tmp_path.glob("linear-choice-*.json"))) == 2
    assert "int8" not in a.ms and ("int8" in b.ms) == ("int8" in kernels_available(torch.bfloat16))


def test_a_4_bit_grid_group_is_measured_and_cached_apart(tmp_path, monkeypatch):
    """The same shapes on and off a 4-bit grid are offered different kernels: two measurements, two files."""
    seen = []
    monkeypatch.setattr(linear_choice, "measure", lambda shapes, dtype, names: seen.append(names) or
                        linear_choice.LinearChoice(((256, "dense"),), {}, 0.0))
    monkeypatch.setattr(linear_choice, "BUSY_CORES", 1e9)  # cache it whatever the host is doing
    for grid in (True, False, True, False):
        choose_kernels({(48, 64): 2}, torch.bfloat16, tmp_path, int4_grid=grid)
    assert len(seen) == 2 and len(list(tmp_path.glob("linear-choice-*.json"))) == 2
    assert seen == [kernels_available(torch.bfloat16, int4_grid=True), kernels_available(torch.bfloat16)]


def test_prepare_cpu_linears_gives_named_low_precision_linears_the_measured_kernels(tmp_path, quiet):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 32), nn.Linear(32, 8).to(torch.bfloat16),
                          nn.Linear(8, 8).to(torch.bfloat16))
    prepare_cpu_linears(model, {"0", "3"}, tmp_path)
    for i, dtype, shapes in ((0, torch.float32, {(64, 32): 1}), (3, torch.bfloat16, {(8, 32): 1})):
        choice = choose_kernels(shapes, dtype, tmp_path)  # cached by the call above
        if choice.only_dense and dtype == torch.float32:
            assert type(model[i]) is PackedLinear
        else:  # bfloat16 "dense" is LowPrecisionLinear's packed dense kernel: the one that was measured
            assert isinstance(model[i], LowPrecisionLinear) and model[i].kernels == choice.kernels
    assert isinstance(model[2], PackedLinear)  # exact float32 values: always the exact kernel
    assert type(model[4]) is nn.Linear  # exact bfloat16 values: as it is


def test_embedded_model_runs_its_quantized_blocks_at_low_precision_only_under_auto(smollm_path):
    """Auto's kernels against the same dtype asked for explicitly (every weight as loaded, dense)."""
    from forklm import LLM, SamplingParams

    auto = LLM(smollm_path)
    exact = LLM(smollm_path, dtype=str(auto.dtype).removeprefix("torch."))
    lows = [m for m in auto.model.modules() if isinstance(m, LowPrecisionLinear)]
    assert not any(isinstance(m, LowPrecisionLinear) for m in exact.model.modules())
    # every linear of the file is a Q4_1 / Q8_0 block tensor, the tied head (Q8_0 embedding) included: the
    # Q4_1 block linears (on int4's grid) share one measured menu, the head has its own; a float32 group
    # whose measurement said "dense at every row count" keeps its linears (oneDNN-packed)
    blocks = [m for n, m in auto.model.named_modules() if isinstance(m, LowPrecisionLinear) and n != "lm_head"]
    assert len(blocks) in (0, 4 * auto.config.n_layers)  # q/k/v, o, gate/up, down
    assert len({m.kernels for m in blocks}) <= 1 and all(m.describe() in auto.precision_summary() for m in lows)
    if blocks:
        assert {k for _, k in blocks[0].kernels} <= set(kernels_available(auto.dtype, int4_grid=True))
    if isinstance(auto.model.lm_head, LowPrecisionLinear):
        assert "int4" not in {k for _, k in auto.model.lm_head.kernels}
    int8 = any(k in ("int8", "int4") for m in lows for _, k in m.kernels)  # not float16's 2^-11 per weight
    prompt = auto.encode("The capital of France is")
    params = SamplingParams(max_tokens=8, temperature=0, logprobs=1, ignore_eos=True)
    a, e = (llm.generate(prompt_token_ids=[prompt], sampling_params=params, use_tqdm=False)[0].outputs[0]
            for llm in (auto, exact))
    n = next((i for i, (x, y) in enumerate(zip(a.token_ids, e.token_ids)) if x != y), len(a.token_ids))
    assert n >= 4  # greedy text agrees
    if not int8:  # float16-held weights move log probs by ~1e-3
        for i in range(n):
            assert abs(a.logprobs[i][a.token_ids[i]].logprob - e.logprobs[i][e.token_ids[i]].logprob) < 0.05
    # the model's fit to a text, teacher-forced: int8-held rows move single tokens' log probs (up to ~0.5
    # measured) but not the mean (3.9070 vs 3.9079 nats over 1,499 tokens on the AVX512-BF16 host); int4's
    # scales and zeros rounded to bfloat16 moved one by 0.088 here
    text = ("Once upon a time, there was a little girl who lived in a village near the forest. Whenever she went "
            "out, the little girl wore a red riding cloak, so everyone in the village called her Little Red Riding "
            "Hood. One morning, she asked her mother if she could go to visit her grandmother. ") * 2
    ids = auto.encode(text)
    nll = []
    for llm in (auto, exact):
        out = llm.generate(prompt_token_ids=[ids], sampling_params=SamplingParams(max_tokens=1, prompt_logprobs=0),
                           use_tqdm=False)[0]
        nll.append(-sum(d[t].logprob for d, t in zip(out.prompt_logprobs[1:], ids[1:])) / (len(ids) - 1))
    assert abs(nll[0] - nll[1]) <= 0.01 * nll[1], nll
