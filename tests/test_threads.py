"""The thread governor (engine/threads.py): its rule on given step times, and that the thread count
a step runs at never changes what it computes."""

import pytest
import torch

from forklm import LLM, SamplingParams
from forklm.engine import threads as threads_mod
from forklm.engine.threads import FIRST_PROBE, MARGIN, PROBE_EVERY, RETRIES, ThreadGovernor

DECODE = (4, 0)


def _run(gov, kind, seconds_at):
    """One step: the count the governor picks, and the time `seconds_at(count)` says it took."""
    n = gov.begin_step()
    gov.end_step(kind, seconds_at(n))
    return n


def test_a_busy_core_moves_it_down_and_a_quiet_host_back_up():
    gov = ThreadGovernor(2, enabled=True)
    quiet = {2: 0.050, 1: 0.060}
    counts = [_run(gov, DECODE, quiet.get) for _ in range(2 * PROBE_EVERY + FIRST_PROBE + 2)]
    assert counts.count(1) == 2 and counts[FIRST_PROBE] == 1 and gov.current == 2  # probed 1 thread, kept 2
    busy = {2: 0.190, 1: 0.055}  # a neighbour takes a core: 2 threads wait at every barrier
    for _ in range(5):  # the first slow step brings the next probe forward
        _run(gov, DECODE, busy.get)
    assert gov.current == 1 and gov.switches == 1
    gone = {2: 0.040, 1: 0.058}  # the neighbour left: 2 threads faster by more than the margin
    for _ in range(PROBE_EVERY + 2):
        _run(gov, DECODE, gone.get)
    assert gov.current == 2 and gov.switches == 2


def test_it_stays_within_its_margin_and_compares_like_with_like():
    gov = ThreadGovernor(4, enabled=True)
    near = {4: 0.100, 3: 0.100 * (1 - MARGIN / 2)}  # faster, but within the margin
    for _ in range(2 * PROBE_EVERY + 2):
        _run(gov, DECODE, near.get)
    assert gov.current == 4 and gov.switches == 0
    # a probe landing on a step of another kind (a prefill) decides nothing and is retried
    gov = ThreadGovernor(2, enabled=True)
    for _ in range(FIRST_PROBE + 1 + PROBE_EVERY):  # the first probe finds no gain; the next is due
        _run(gov, DECODE, {2: 0.1, 1: 0.1}.get)
    assert gov.begin_step() == 1
    gov.end_step((0, 500), 0.01)
    assert gov.current == 2 and gov.begin_step() == 2  # one step at the current count first
    gov.end_step(DECODE, 0.1)
    assert gov.begin_step() == 1  # then the probe again
    gov.end_step(DECODE, 0.01)
    assert gov.current == 1


def test_a_new_kind_of_step_is_not_probed_at_every_step():
    """A call whose steps are of a kind never seen at the current count (a warm-up of another
    batch size left a probe due) once ran every step as a probe, at one thread: 1.45x slower."""
    gov = ThreadGovernor(2, enabled=True)
    for _ in range(FIRST_PROBE):  # a short warm-up call: n=1 steps; a probe is now due
        _run(gov, (1, 0), {2: 0.03, 1: 0.04}.get)
    counts = [_run(gov, DECODE, {2: 0.05, 1: 0.06}.get) for _ in range(96)]
    # a miss, one step at 2 threads (its reference), the probe compared; then one probe per interval
    assert [i for i, c in enumerate(counts) if c == 1] == [0, 2, 3 + PROBE_EVERY, 4 + 2 * PROBE_EVERY]
    assert gov.current == 2
    churn = ThreadGovernor(2, enabled=True)  # every step of a kind of its own: at most RETRIES probes an interval
    counts = [_run(churn, (i, 0), {2: 0.05, 1: 0.06}.get) for i in range(3 * PROBE_EVERY)]
    assert counts.count(1) <= RETRIES * (len(counts) // PROBE_EVERY + 1) and churn.current == 2


def test_a_step_that_compiled_is_discarded_and_a_compiled_engine_probes_later():
    """Compiled graphs bake the thread count in: a step that compiled (its time mostly compiling) records
    nothing and brings no probe forward; a probe that compiled runs again on the next step; the first
    probe comes after PROBE_EVERY steps."""
    gov = ThreadGovernor(2, enabled=True, first_probe=PROBE_EVERY)
    quiet = {2: 0.050, 1: 0.060}
    assert gov.begin_step() == 2
    gov.discard()  # the first step compiled: 100x slower, not recorded
    counts = [_run(gov, DECODE, quiet.get) for _ in range(PROBE_EVERY)]
    assert counts == [2] * PROBE_EVERY and gov.probes == 0  # no probe brought forward, none before PROBE_EVERY
    assert gov.begin_step() == 1
    gov.discard()  # the probe compiled the 1-thread graphs
    assert gov.begin_step() == 1  # so it runs again
    gov.end_step(DECODE, 0.030)
    assert gov.current == 1 and gov.switches == 1


def test_disabled_or_single_thread_never_probes():
    for gov in (ThreadGovernor(8, enabled=False), ThreadGovernor(1, enabled=True)):
        assert not gov.enabled
        assert all(_run(gov, DECODE, lambda n: 1.0 / n) == gov.max_threads for _ in range(3 * PROBE_EVERY))


def test_thread_count_changes_no_result(hf_models, monkeypatch):
    """Probing at every step (1 and 2 threads in turn) gives the same tokens and log probs as a
    fixed thread count."""
    folder = hf_models["llama_gqa"][1]
    prompts = [[5, 9, 13, 2, 77, 31], [5, 9, 13, 2, 4]]
    params = SamplingParams(n=4, max_tokens=12, temperature=0.9, top_p=0.9, seed=3, logprobs=2, ignore_eos=True)
    start = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        fixed = LLM(folder, adaptive_threads=False).generate(prompt_token_ids=prompts, sampling_params=params)
        monkeypatch.setattr(threads_mod, "PROBE_EVERY", 1)
        llm = LLM(folder)
        out = llm.generate(prompt_token_ids=prompts, sampling_params=params)
        probes = llm._engine.threads.probes
    finally:
        torch.set_num_threads(start)
    assert probes >= 5  # about every other step ran at 1 thread
    for a, b in zip(fixed, out):
        for x, y in zip(a.outputs, b.outputs):
            assert x.token_ids == y.token_ids
            assert all(abs(p[t].logprob - q[t].logprob) < 1e-5 for t, p, q in zip(x.token_ids, x.logprobs, y.logprobs))


def test_an_idle_engine_leaves_torchs_thread_count_as_it_found_it(hf_models):
    """An engine stepped directly (`LLM.make_engine`, as the benchmarks do) whose governor moved to 1
    thread steps at 1 thread, and once it has no work left puts torch's count back. The next engine
    takes torch's count as its maximum: it once took the last engine's choice, and stayed at 1 thread
    with nothing to probe."""
    from forklm.kv.storage import CacheShape

    folder = hf_models["llama_gqa"][1]
    params = SamplingParams(n=2, max_tokens=5, temperature=0.9, seed=3, ignore_eos=True)
    start = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        llm = LLM(folder)
        engines, seen = [], []
        for i in range(2):
            engine = llm.make_engine(CacheShape(1, 2, 2, 3, 5))
            engines.append(engine)
            if i == 0:
                engine.threads.current = 1  # as after a probe at 1 thread won
            engine.add_request("r", [5, 9, 13], params)
            while engine.has_unfinished():
                seen.append((i, torch.get_num_threads()))
                engine.step()
            assert len(engine.pop_output("r").outputs) == 2
            seen.append((i, torch.get_num_threads()))
    finally:
        torch.set_num_threads(start)
    assert engines[1].threads.max_threads == 2 and engines[1].threads.enabled
    assert [t for i, t in seen if i == 0][1:-1] == [1] * (len([t for i, t in seen if i == 0]) - 2)  # its choice
    assert seen[-1] == (1, 2) and [t for i, t in seen if i == 0][-1] == 2  # idle: the count it found
