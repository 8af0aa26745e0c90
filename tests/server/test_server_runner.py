"""The engine loop thread in-process: joins, aborts, the queue bound, and an engine step that raises."""

from __future__ import annotations

import asyncio

import pytest
from server_fixtures import make_tiny_model

from forklm import LLM, SamplingParams
from forklm.errors import InvalidParameterError
from forklm.kv import CacheShape
from forklm.server import EngineRunner, Metrics
from forklm.server.errors import APIError, QueueFullError


@pytest.fixture(scope="module")
def llm(tmp_path_factory):
    return LLM(make_tiny_model(tmp_path_factory.mktemp("tiny_runner")))


@pytest.fixture
def runner(llm):
    engine = llm.make_engine(CacheShape(max_prompts=2, max_samples=4, max_samples_per_prompt=4, max_prompt_len=16,
                                        max_new_tokens=64))
    r = EngineRunner(engine, Metrics("tiny"), max_queue=2)
    r.warm_up()
    r.start()
    yield r
    r.stop()
    assert not r.alive


async def drain(handle) -> list:
    events = []
    while not handle.done:
        events.append(await asyncio.wait_for(handle.next(), 30))
    return events


def test_requests_join_and_finish(runner):
    async def main():
        long = await runner.submit([[5, 6, 7]], [None], SamplingParams(n=2, max_tokens=60, ignore_eos=True, seed=1))
        short = await runner.submit([[8, 9]], [None], SamplingParams(n=2, max_tokens=3, ignore_eos=True, seed=2))
        short_events = await drain(short)
        assert not long.done  # the short one finished while the long one ran
        long_events = await drain(long)
        return short_events, long_events

    short_events, long_events = asyncio.run(main())
    assert [len(o.token_ids) for o in short_events[-1].output.outputs] == [3, 3]
    assert [len(o.token_ids) for o in long_events[-1].output.outputs] == [60, 60]
    assert runner.rows_in_use == 0 and runner.num_running == 0


def test_queue_bound_and_abort(runner):
    async def main():
        busy = await runner.submit([[5]], [None], SamplingParams(n=4, max_tokens=60, ignore_eos=True))
        await busy.next()  # running: it holds every row
        waiting = [await runner.submit([[6]], [None], SamplingParams(max_tokens=2)) for _ in range(2)]
        with pytest.raises(QueueFullError):
            await runner.submit([[7]], [None], SamplingParams(max_tokens=2))
        for handle in [busy, *waiting]:
            handle.close()
        for _ in range(200):
            if runner.metrics.requests_aborted == 3 and runner.rows_in_use == 0:
                break
            await asyncio.sleep(0.01)
        ok = await runner.submit([[7]], [None], SamplingParams(max_tokens=2))
        return await drain(ok)

    events = asyncio.run(main())
    assert events[-1].output is not None
    assert runner.metrics.requests_aborted == 3
    assert runner.metrics.requests_rejected == {"queue_full": 1}


def test_more_prompts_than_the_queue_holds_is_a_400_naming_the_limit(runner):
    async def main():
        with pytest.raises(InvalidParameterError, match="3 prompts in one request exceed the server's queue "
                           r"\(--max-queue 2\)") as e:
            await runner.submit([[5], [6], [7]], [None] * 3, SamplingParams(max_tokens=2))  # on an idle server
        assert e.value.field == "prompt"
        return await drain(await runner.submit([[5], [6]], [None] * 2, SamplingParams(max_tokens=2)))

    assert asyncio.run(main())[-1].output is not None
    assert runner.metrics.requests_rejected.get("queue_full", 0) == 0


def test_engine_error_fails_the_batch_and_serving_goes_on(runner, monkeypatch):
    real_step = runner.engine.step
    calls = {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 2:
            raise RuntimeError("boom")
        return real_step()

    monkeypatch.setattr(runner.engine, "step", flaky_step)

    async def main():
        doomed = await runner.submit([[5]], [None], SamplingParams(max_tokens=10, ignore_eos=True))
        events = await drain(doomed)
        ok = await runner.submit([[6]], [None], SamplingParams(max_tokens=2, ignore_eos=True))
        return events, await drain(ok)

    failed, ok = asyncio.run(main())
    assert isinstance(failed[-1].error, APIError) and failed[-1].error.status == 500
    assert "boom" in failed[-1].error.message
    assert [len(o.token_ids) for o in ok[-1].output.outputs] == [2]
    assert runner.metrics.engine_errors == 1 and runner.alive


def test_request_finishing_without_deltas_is_delivered(runner):
    # beam search reports nothing until its end: the runner still hands over the final output
    async def main():
        beams = await runner.submit([[5, 6]], [None], SamplingParams(n=2, beam_width=2, temperature=0.0, max_tokens=4))
        return await drain(beams)

    events = asyncio.run(main())
    assert events[-1].output is not None and len(events[-1].output.outputs) == 2
    assert not runner._live
