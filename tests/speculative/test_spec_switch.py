"""The adaptive switch (engine/speculative/switch.py): off when the kept tokens per verify step fall
below the measured cost ratio, back on (probing) after a backoff that doubles."""

from __future__ import annotations

from forklm.engine.speculative import AdaptiveSwitch, RequestSpecState
from forklm.engine.speculative.switch import PROBE_EVERY


def test_cost_ratio_from_measured_steps_and_plain_probes():
    s = AdaptiveSwitch(enabled=True)
    assert s.plain_probe_due() and s.cost_ratio is None
    s.record(0.10, verify=False)
    assert not s.plain_probe_due()
    s.record(0.15, verify=True)
    assert abs(s.cost_ratio - 1.5) < 1e-9
    for _ in range(PROBE_EVERY - 1):
        s.record(0.15, verify=True)
    assert s.plain_probe_due()  # a plain step keeps the plain time current
    assert not AdaptiveSwitch(enabled=False).plain_probe_due()


def test_request_turns_off_below_the_ratio_and_probes_again():
    s = AdaptiveSwitch(enabled=True)
    s.record(0.10, verify=False)
    s.record(0.20, verify=True)  # a verify step costs 2 plain steps
    r = RequestSpecState()
    r.observe(drafted=4, accepted=0, rows=1, step=1, switch=s)
    r.observe(drafted=4, accepted=2, rows=1, step=2, switch=s)
    assert r.active(3)  # two observations are not enough
    r.observe(drafted=4, accepted=1, rows=1, step=3, switch=s)  # 1 + (0, 2, 1) / 1 averaged: < 2
    assert not r.active(4) and not r.active(11) and r.active(12)
    for step in (12, 13, 14):
        r.observe(drafted=4, accepted=0, rows=1, step=step, switch=s)
    assert not r.active(15 + 15) and r.active(15 + 16)  # the backoff doubled
    for _ in range(5):  # ... up to 64 steps
        for step in (100, 101, 102):
            r.observe(drafted=4, accepted=0, rows=1, step=step, switch=s)
    assert not r.active(103 + 63) and r.active(103 + 64)
    good = RequestSpecState()
    for step in range(10):
        good.observe(drafted=4, accepted=3, rows=1, step=step, switch=s)  # 4 tokens per step > 2
    assert good.active(11) and (good.num_accepted_tokens, good.num_draft_tokens, good.num_drafts) == (30, 40, 10)


def test_disabled_switch_never_turns_a_request_off():
    s = AdaptiveSwitch(enabled=False)
    s.record(0.1, verify=False)
    s.record(1.0, verify=True)
    r = RequestSpecState()
    for step in range(5):
        r.observe(drafted=4, accepted=0, rows=2, step=step, switch=s)
    assert r.active(6)
