"""The adaptive switch: a request speculates only while its drafts pay for their verify steps.

The cost side is measured, not assumed: the engine times every decode step (wall clock, steps with a
prefill chunk left out) and keeps an exponential average of plain steps (no row drafted) and of verify
steps; `cost_ratio` = verify / plain. The gain side is per request: the tokens a drafting row kept per
verify step (1 + accepted drafts), averaged over its drafting rows and over steps. A request whose
average falls below the cost ratio stops drafting for `backoff` steps (8, doubled each time it is
turned off again, at most 64: text changes phase, a reply may start free and then copy code), then
probes again. While every row keeps drafting, one plain step in
`PROBE_EVERY` keeps the plain-step time current.
"""

from __future__ import annotations

from dataclasses import dataclass

PROBE_EVERY = 64
_ALPHA = 0.25  # weight of the newest observation in the averages
_MIN_OBSERVATIONS = 3  # verify steps seen before a request may be turned off
_BACKOFF_MIN, _BACKOFF_MAX = 8, 64


class AdaptiveSwitch:
    """Engine-wide step times (seconds): plain decode steps and verify steps."""

    def __init__(self, enabled: bool):
        self.enabled = enabled
        self.plain_s: float | None = None
        self.verify_s: float | None = None
        self.since_plain = 0

    def record(self, seconds: float, verify: bool) -> None:
        if verify:
            self.verify_s = _ema(self.verify_s, seconds)
            self.since_plain += 1
        else:
            self.plain_s = _ema(self.plain_s, seconds)
            self.since_plain = 0

    @property
    def cost_ratio(self) -> float | None:
        """A verify step's time over a plain step's, once both were measured."""
        if self.plain_s is None or self.verify_s is None or self.plain_s <= 0:
            return None
        return self.verify_s / self.plain_s

    def plain_probe_due(self) -> bool:
        """This step should decode plainly, to measure (or refresh) the plain-step time."""
        return self.enabled and (self.plain_s is None or self.since_plain >= PROBE_EVERY)


@dataclass
class RequestSpecState:
    """One request's speculation: counters for its metrics, and its on/off state."""

    num_draft_tokens: int = 0
    num_accepted_tokens: int = 0
    num_drafts: int = 0  # drafts verified (one per drafting row and step): tokens kept per draft = 1 + accepted / this
    num_verify_steps: int = 0
    gain: float | None = None  # average tokens kept per drafting row and verify step
    observations: int = 0
    off_until: int = 0  # engine step from which it drafts again
    backoff: int = _BACKOFF_MIN

    def active(self, step: int) -> bool:
        return step >= self.off_until

    def count(self, drafted: int, accepted: int, drafts: int) -> None:
        self.num_draft_tokens += drafted
        self.num_accepted_tokens += accepted
        self.num_drafts += drafts
        self.num_verify_steps += 1

    def observe(self, drafted: int, accepted: int, rows: int, step: int, switch: AdaptiveSwitch) -> None:
        """One verify step: `rows` of the request drafted `drafted` tokens and `accepted` of them matched."""
        self.count(drafted, accepted, rows)
        self.gain = _ema(self.gain, 1 + accepted / rows)
        self.observations += 1
        ratio = switch.cost_ratio
        if not switch.enabled or ratio is None or self.observations < _MIN_OBSERVATIONS:
            return
        if self.gain < ratio:
            self.off_until = step + 1 + self.backoff
            self.backoff = min(2 * self.backoff, _BACKOFF_MAX)
            self.gain, self.observations = None, 0  # the probe after the pause starts afresh
        elif self.observations >= 2 * _MIN_OBSERVATIONS:
            self.backoff = _BACKOFF_MIN


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - _ALPHA) * old + _ALPHA * new
