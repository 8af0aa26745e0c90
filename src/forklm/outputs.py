"""What generation returns, in vLLM's shapes so that code written for it works."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Logprob:
    logprob: float
    rank: int | None = None  # 1 = most likely
    decoded_token: str | None = None


# one entry per generated (or prompt) token: {token_id: Logprob} with the chosen token and the top-k
SampleLogprobs = list[dict[int, Logprob]]


@dataclass
class CompletionOutput:
    index: int  # sample index within the request
    text: str | None  # None when the model has no tokenizer
    token_ids: list[int]
    cumulative_logprob: float
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None  # "stop" | "length" | None while running
    stop_reason: int | str | None = None  # the stop string or stop token id that ended it

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool = False
    prompt_logprobs: list[dict[int, Logprob] | None] | None = None
    metrics: dict = field(default_factory=dict)  # ttft_s, and the like
    num_cached_tokens: int = 0  # prompt tokens whose K/V came from the prefix cache (vLLM's name)


@dataclass
class SampleDelta:
    """What one sample produced in one engine step (for streaming)."""

    request_id: str
    index: int
    token_ids: list[int]
    text: str  # newly released text (held back while it could still be the start of a stop string)
    logprobs: SampleLogprobs | None = None
    finish_reason: str | None = None
    stop_reason: int | str | None = None
