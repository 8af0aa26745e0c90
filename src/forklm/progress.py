"""A progress bar over a `generate` call (tqdm, on stderr): requests done, and tokens per second.

Shown only when stderr is a terminal (tqdm's own check), so logs, pipes and `--json` output stay
clean; `use_tqdm=False` turns it off everywhere.
"""

from __future__ import annotations

import sys
import time


class GenerationProgress:
    """`update(tokens, done)` after each engine step; `close()` at the end."""

    def __init__(self, total_requests: int, enabled: bool = True, desc: str = "generating"):
        self.bar = None
        if enabled:
            from tqdm import tqdm

            self.bar = tqdm(total=total_requests, desc=desc, unit="req", file=sys.stderr, disable=None,
                            dynamic_ncols=True, leave=True)
            if self.bar.disable:  # not a terminal
                self.bar = None
        self.tokens, self.done, self.start = 0, 0, time.perf_counter()

    def update(self, tokens: int, done: int) -> None:
        if self.bar is None:
            return
        self.tokens += tokens
        elapsed = max(time.perf_counter() - self.start, 1e-9)
        self.bar.set_postfix_str(f"{self.tokens} tokens, {self.tokens / elapsed:.1f} tok/s", refresh=False)
        self.bar.update(done - self.done)
        self.done = done

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
