"""Server metrics in the Prometheus text format (no client library needed).

Counters and histograms are written by the engine loop thread and by request handlers, and read
by `/metrics`; one lock guards them all. Gauges (queue length, running requests, sample rows in
use) are read at scrape time from the runner, so they are never stale.
"""

from __future__ import annotations

import bisect
import threading
from collections.abc import Callable, Sequence

TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0)


class Histogram:
    """Cumulative buckets, a sum and a count, as Prometheus expects."""

    def __init__(self, buckets: Sequence[float]):
        self.bounds = tuple(sorted(buckets))
        self.counts = [0] * (len(self.bounds) + 1)  # the last one is +Inf
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        self.counts[bisect.bisect_left(self.bounds, value)] += 1
        self.sum += value
        self.count += 1

    def lines(self, name: str) -> list[str]:
        out, running = [], 0
        for bound, c in zip((*self.bounds, float("inf")), self.counts):
            running += c
            le = "+Inf" if bound == float("inf") else repr(bound)
            out.append(f'{name}_bucket{{le="{le}"}} {running}')
        out.append(f"{name}_sum {self.sum!r}")
        out.append(f"{name}_count {self.count}")
        return out


class Metrics:
    """Everything `/metrics` reports. Thread-safe."""

    def __init__(self, model_name: str):
        self.model_name = model_name
        self._lock = threading.Lock()
        self.http_requests: dict[tuple[str, int], int] = {}  # (path, status) -> count
        self.requests_submitted = 0  # engine requests accepted (one per prompt)
        self.requests_finished = 0
        self.requests_aborted = 0  # client went away, or the request was dropped
        self.requests_rejected: dict[str, int] = {}  # reason -> count (validation, queue_full, ...)
        self.prompt_tokens = 0
        self.generation_tokens = 0
        self.engine_steps = 0
        self.engine_errors = 0
        self.weight_updates = 0
        self.ttft = Histogram(TTFT_BUCKETS)
        self.step_latency = Histogram(STEP_BUCKETS)
        self._gauges: dict[str, tuple[str, Callable[[], float]]] = {}

    # ---- writers -----------------------------------------------------------------------------
    def count_http(self, path: str, status: int) -> None:
        with self._lock:
            self.http_requests[(path, status)] = self.http_requests.get((path, status), 0) + 1

    def count_rejected(self, reason: str) -> None:
        with self._lock:
            self.requests_rejected[reason] = self.requests_rejected.get(reason, 0) + 1

    def on_submitted(self, prompt_tokens: int) -> None:
        with self._lock:
            self.requests_submitted += 1
            self.prompt_tokens += prompt_tokens

    def on_step(self, seconds: float, tokens: int) -> None:
        with self._lock:
            self.engine_steps += 1
            self.generation_tokens += tokens
            self.step_latency.observe(seconds)

    def on_first_token(self, seconds: float) -> None:
        with self._lock:
            self.ttft.observe(seconds)

    def on_finished(self) -> None:
        with self._lock:
            self.requests_finished += 1

    def on_aborted(self, count: int = 1) -> None:
        with self._lock:
            self.requests_aborted += count

    def on_weight_update(self) -> None:
        with self._lock:
            self.weight_updates += 1

    def on_engine_error(self) -> None:
        with self._lock:
            self.engine_errors += 1

    def gauge(self, name: str, help_text: str, read: Callable[[], float]) -> None:
        """Register a gauge read at scrape time."""
        self._gauges[name] = (help_text, read)

    # ---- reader ------------------------------------------------------------------------------
    def render(self) -> str:
        """The Prometheus text exposition of every metric."""
        out: list[str] = []

        def block(name: str, kind: str, help_text: str, samples: list[str]) -> None:
            out.append(f"# HELP {name} {help_text}")
            out.append(f"# TYPE {name} {kind}")
            out.extend(samples)

        with self._lock:
            http = [f'forklm_http_requests_total{{path="{p}",status="{s}"}} {c}'
                    for (p, s), c in sorted(self.http_requests.items())]
            block("forklm_http_requests_total", "counter", "HTTP responses by path and status code.", http)
            simple = [
                ("forklm_requests_submitted_total", "Engine requests accepted (one per prompt).",
                 self.requests_submitted),
                ("forklm_requests_finished_total", "Engine requests that finished.", self.requests_finished),
                ("forklm_requests_aborted_total", "Engine requests dropped before finishing (client gone).",
                 self.requests_aborted),
                ("forklm_prompt_tokens_total", "Prompt tokens of accepted requests.", self.prompt_tokens),
                ("forklm_generation_tokens_total", "Tokens generated, all samples.", self.generation_tokens),
                ("forklm_engine_steps_total", "Engine steps run.", self.engine_steps),
                ("forklm_engine_errors_total", "Engine steps that raised (their requests failed).",
                 self.engine_errors),
                ("forklm_weight_updates_total", "Weight updates applied (POST /v1/load_weights).", self.weight_updates),
            ]
            for name, help_text, value in simple:
                block(name, "counter", help_text, [f"{name} {value}"])
            rejected = [f'forklm_requests_rejected_total{{reason="{r}"}} {c}'
                        for r, c in sorted(self.requests_rejected.items())]
            block("forklm_requests_rejected_total", "counter", "Requests refused, by reason.", rejected)
            ttft, step = "forklm_time_to_first_token_seconds", "forklm_step_latency_seconds"
            block(ttft, "histogram", "From request acceptance to its first generated token.", self.ttft.lines(ttft))
            block(step, "histogram", "Wall time of one engine step (admission, prefill, decode).",
                  self.step_latency.lines(step))
        for name, (help_text, read) in self._gauges.items():
            block(name, "gauge", help_text, [f"{name} {read()}"])
        return "\n".join(out) + "\n"
