"""compile.py: the eager fallback once torch.compile hits its recompile limit."""

import torch

from forklm.compile import with_eager_fallback


def test_falls_back_to_eager_for_good_after_the_recompile_limit():
    calls = []

    def compiled(x):
        calls.append("compiled")
        raise torch._dynamo.exc.FailOnRecompileLimitHit("limit")

    def eager(x):
        calls.append("eager")
        return x + 1

    fn = with_eager_fallback(compiled, eager, "test")
    assert fn(1) == 2 and fn(2) == 3
    assert calls == ["compiled", "eager", "eager"]
