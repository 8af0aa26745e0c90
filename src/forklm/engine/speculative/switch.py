"""The adaptive switch: a request speculates only while its drafts pay for their verify steps.

The cost side is measured, not assumed: the engine times every decode step (wall clock, steps with a
prefill chunk left out) and keeps an exponential average of plain steps (no row drafted) and of verify
steps; `cost_ratio` = verify / plain. The gain side is per request, and counts its slowest sample (the
one with the fewest tokens so far): a request of n samples ends when its last sample does, so drafts
that speed up the samples ahead do not shorten it (measured: n=16 at temperature 0.8 on the code
prompt kept 3.3 tokens per draft on average, yet took 85 steps instead of 96, each 1.34x the cost).
A request starts probing: only its slowest sample drafts; one verify step in which that sample kept
at least `cost_ratio` tokens turns drafting on for every sample, one below it pauses the request.
While on, the average (over 3 verify steps or more) below the ratio pauses it. A pause lasts
`backoff` steps (8, doubled at every pause, at most 64: text changes phase, a reply may start free
and then copy code), then it probes again. While every row keeps drafting, one plain step in
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
    gain: float | None = None  # average tokens its slowest sample kept per verify step
    observations: int = 0
    probing: bool = True  # only the slowest sample drafts, until one step shows that drafting pays
    off_until: int = 0  # engine step from which it drafts again
    backoff: int = _BACKOFF_MIN
    slowest: int | None = None  # pool row of the sample with the fewest tokens, at this step's proposal

    def active(self, step: int) -> bool:
        return step >= self.off_until

    def count(self, drafted: int, accepted: int, drafts: int) -> None:
        self.num_draft_tokens += drafted
        self.num_accepted_tokens += accepted
        self.num_drafts += drafts
        self.num_verify_steps += 1

    def observe(self, kept: int, step: int, switch: AdaptiveSwitch) -> None:
        """One verify step of the request: its slowest sample kept `kept` tokens (1: it had no draft)."""
        if not switch.enabled:
            self.probing = False
            return
        ratio = switch.cost_ratio
        if ratio is None:  # the cost of a verify step is not known yet: go on probing
            return
        self.gain = _ema(self.gain, kept)
        self.observations += 1
        if self.probing:
            if kept >= ratio:
                self.probing = False
            else:
                self._pause(step)
        elif self.observations >= _MIN_OBSERVATIONS and self.gain < ratio:
            self._pause(step)
        elif self.observations >= 2 * _MIN_OBSERVATIONS:
            self.backoff = _BACKOFF_MIN

    def _pause(self, step: int) -> None:
        self.off_until = step + 1 + self.backoff
        self.backoff = min(2 * self.backoff, _BACKOFF_MAX)
        self.gain, self.observations, self.probing = None, 0, True


def _ema(old: float | None, new: float) -> float:
    return new if old is None else (1 - _ALPHA) * old + _ALPHA * new
