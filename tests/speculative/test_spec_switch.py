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


def test_request_probes_then_drafts_and_pauses_below_the_ratio():
    s = AdaptiveSwitch(enabled=True)
    r = RequestSpecState()
    r.observe(kept=1, step=1, switch=s)  # no cost measured yet: it goes on probing
    assert r.probing and r.active(2)
    s.record(0.10, verify=False)
    s.record(0.20, verify=True)  # a verify step costs 2 plain steps
    r.observe(kept=3, step=2, switch=s)  # the slowest sample kept 3 >= 2 tokens: every sample drafts
    assert not r.probing and r.active(3)
    r.observe(kept=1, step=3, switch=s)
    r.observe(kept=1, step=4, switch=s)
    assert r.active(5)
    r.observe(kept=1, step=5, switch=s)  # the average fell below 2: paused for 8 steps
    assert r.probing and not r.active(6) and not r.active(13) and r.active(14)
    r.observe(kept=1, step=14, switch=s)  # one poor probe pauses it again, twice as long
    assert not r.active(15 + 15) and r.active(15 + 16)
    for _ in range(5):  # ... up to 64 steps
        r.observe(kept=1, step=100, switch=s)
    assert not r.active(101 + 63) and r.active(101 + 64)
    good = RequestSpecState()
    for step in range(10):
        good.observe(kept=4, step=step, switch=s)
        good.count(drafted=4, accepted=3, drafts=1)
    assert good.active(11) and not good.probing
    assert (good.num_accepted_tokens, good.num_draft_tokens, good.num_drafts, good.num_verify_steps) == (30, 40, 10, 10)


def test_disabled_switch_never_turns_a_request_off():
    s = AdaptiveSwitch(enabled=False)
    s.record(0.1, verify=False)
    s.record(1.0, verify=True)
    r = RequestSpecState()
    for step in range(5):
        r.observe(kept=1, step=step, switch=s)
    assert r.active(6) and not r.probing
