"""How many CPU threads the engine's steps use, chosen by timing the steps themselves.

torch's OpenMP threads wait for each other at every parallel region of a step. When another
process takes a core, a step at the full thread count keeps waiting for the thread that lost its
core: with one of the two cores of the AVX2 host busy, an n=1 decode step at 2 threads took 3.6x its
quiet time, at 1 thread about its quiet time (benchmarks/results/hog_threads*). Which count is faster
depends on the host, the load and the step, so `ThreadGovernor` measures it:

- after FIRST_PROBE steps, then every PROBE_EVERY steps, it runs one step at another count (one fewer, or one more while below
  the maximum, in turn) and compares it with the last step of the same kind at the current count
  (the same decode rows and prefill tokens: nearly the same work, a step apart);
- it moves to the probed count when that step was faster by MARGIN;
- a step slower than SLOW x its kind's average (a neighbour arrived) brings the next probe forward;
- a probe with nothing to compare with (no step of its kind at the current count yet) decides
  nothing: one step at the current count follows (it records its kind), then the probe again; after
  RETRIES such misses in a row it waits the full interval. (Retrying on the very next step, as it
  once did, probed every step of a call whose kind was new: a whole n=4 call ran at one thread,
  1.45x slower on a quiet host.)

The maximum is torch's thread count when the engine is built; the governor never goes above it.

A compiled step bakes the thread count into its kernels: a step at a count not run before compiles
its graphs again (~9 s for the embedded model's four graphs on the 2-core AVX-512 host). So a compiled
engine probes first after PROBE_EVERY steps, not FIRST_PROBE (a short first call compiles one set of
graphs, not two), and a step that compiled anything is `discard`ed: it neither counts as a sample nor
brings a probe forward, and a probe that compiled runs again on the next step, its graphs ready.
"""

from __future__ import annotations

import logging

log = logging.getLogger(__name__)

PROBE_EVERY = 32
FIRST_PROBE = 4  # steps before the first probe: a neighbour already there slows every step alike
MARGIN = 0.1
SLOW = 2.0
RETRIES = 2
_EMA = 0.3

StepKind = tuple[int, int]  # (decode tokens, prefill tokens) of a step


class ThreadGovernor:
    def __init__(self, max_threads: int, enabled: bool, first_probe: int = FIRST_PROBE):
        self.max_threads = max(1, max_threads)
        self.first_probe = first_probe
        self.current = self.max_threads
        self.enabled = enabled and self.max_threads > 1
        self.switches = 0
        self.probes = 0
        self._since_probe = 0
        self._probe_due = False
        self._probing: int | None = None
        self._retry = False  # a probe missed: probe again after the next step at the current count
        self._misses = 0  # probes in a row that found nothing to compare with
        self._down_next = True  # the direction of the next probe
        self._last: dict[StepKind, float] = {}  # kind -> seconds of its last step at `current`
        self._avg: dict[StepKind, float] = {}  # kind -> average seconds at `current`

    def begin_step(self) -> int:
        """The thread count the next step runs at."""
        self._probing = self._alternative() if self.enabled and self._probe_due else None
        self.probes += self._probing is not None
        return self.current if self._probing is None else self._probing

    def end_step(self, kind: StepKind, seconds: float) -> None:
        """Record the step just run (its kind and wall time)."""
        if not self.enabled:
            return
        if self._probing is None:
            avg = self._avg.get(kind)
            self._last[kind] = seconds
            self._avg[kind] = seconds if avg is None else (1 - _EMA) * avg + _EMA * seconds
            self._since_probe += 1
            due = self.first_probe if self.probes == 0 else PROBE_EVERY
            if self._retry or self._since_probe >= due or (avg is not None and seconds > SLOW * avg):
                self._probe_due, self._retry = True, False
            return
        probed, self._probing = self._probing, None
        self._probe_due, self._since_probe = False, 0
        ref = self._last.get(kind)
        if ref is None:  # nothing comparable at the current count: see the module docstring
            self._misses += 1
            self._retry = self._misses < RETRIES
            self._misses = self._misses if self._retry else 0
            return
        self._misses = 0
        self._down_next = not self._down_next
        if seconds < (1 - MARGIN) * ref:
            log.info("CPU threads %d -> %d (a step took %.1f ms instead of %.1f)", self.current, probed,
                     1e3 * seconds, 1e3 * ref)
            self.current = probed
            self.switches += 1
            self._last.clear()
            self._avg.clear()

    def discard(self) -> None:
        """The step just run measured something else (it compiled): no record, no decision. A probe
        stays due and runs on the next step."""
        self._probing = None

    def _alternative(self) -> int | None:
        down = self.current - 1 if self.current > 1 else None
        up = self.current + 1 if self.current < self.max_threads else None
        if self._down_next:
            return down if down is not None else up
        return up if up is not None else down
