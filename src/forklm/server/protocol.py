"""The HTTP request types, as OpenAI (plus vLLM's extensions) names them.

Pydantic stops here: a request is validated for types (strict: `"2"` is not an int, `true` is not
a number), then converted once into `SamplingParams` by `to_sampling_params`, which checks the
values. The engine never sees these types. Unknown fields are ignored (clients send extras such
as `tools` or `service_tier`), `null` means "the default" for every optional field.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from ..errors import InvalidParameterError
from ..sampling import SamplingParams


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    include_usage: bool | None = None
    """Send a last chunk with the usage counts before [DONE]."""


class _GenerationRequest(BaseModel):
    """Fields shared by /v1/completions and /v1/chat/completions."""

    model_config = ConfigDict(strict=True, extra="ignore")

    model: str | None = None
    n: int | None = None
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    user: str | None = None
    logit_bias: dict[str, float] | None = None
    # vLLM extensions
    best_of: int | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    min_tokens: int | None = None
    stop_token_ids: list[int] | None = None
    ignore_eos: bool | None = None
    include_stop_str_in_output: bool | None = None
    skip_special_tokens: bool | None = None
    no_repeat_ngram_size: int | None = None

    @property
    def streaming(self) -> bool:
        return bool(self.stream)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def _num_logprobs(self) -> int | None:
        raise NotImplementedError

    def _sampling_fields(self, max_tokens: int) -> dict[str, Any]:
        values = {
            "n": self.n,
            "best_of": self.best_of,
            "max_tokens": max_tokens,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "min_p": self.min_p,
            "presence_penalty": self.presence_penalty,
            "frequency_penalty": self.frequency_penalty,
            "repetition_penalty": self.repetition_penalty,
            "min_tokens": self.min_tokens,
            "stop": self.stop,
            "stop_token_ids": self.stop_token_ids,
            "seed": self.seed,
            "logit_bias": self.logit_bias,
            "logprobs": self._num_logprobs(),
            "ignore_eos": self.ignore_eos,
            "include_stop_str_in_output": self.include_stop_str_in_output,
            "skip_special_tokens": self.skip_special_tokens,
            "no_repeat_ngram_size": self.no_repeat_ngram_size,
        }
        return {k: v for k, v in values.items() if v is not None}

    def to_sampling_params(self, default_max_tokens: int, vocab_size: int, max_sequence_len: int) -> SamplingParams:
        """The one conversion from HTTP fields to engine parameters; raises InvalidParameterError.

        default_max_tokens: max_tokens when the request has none; vocab_size: token ids must be
        below it; max_sequence_len: prompt + output tokens the engine holds (bounds n-gram sizes).
        """
        max_tokens = self.max_tokens if self.max_tokens is not None else default_max_tokens
        params = SamplingParams(**self._sampling_fields(max_tokens))
        if params.no_repeat_ngram_size > max_sequence_len:  # the engine loops over the n-gram size
            raise InvalidParameterError("no_repeat_ngram_size", f"must be <= {max_sequence_len} (prompt + max_tokens)")
        # token ids are checked against the vocabulary here: the engine checks them only when the
        # request reaches a step, where an error would fail the whole batch
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", list(params.logit_bias))):
            for i in ids:
                if i >= vocab_size:
                    raise InvalidParameterError(name, f"token id {i} is outside the vocabulary [0, {vocab_size})")
        if self.streaming and params.best_of is not None and params.best_of > params.n:
            raise InvalidParameterError("best_of", "cannot be larger than n when streaming")
        return params


class CompletionRequest(_GenerationRequest):
    """POST /v1/completions."""

    prompt: str | list[str] | list[int] | list[list[int]]
    echo: bool | None = None
    logprobs: int | None = None
    suffix: str | None = None

    def _num_logprobs(self) -> int | None:
        return self.logprobs

    def to_sampling_params(self, default_max_tokens: int, vocab_size: int, max_sequence_len: int) -> SamplingParams:
        if self.suffix:
            raise InvalidParameterError("suffix", "is not supported")
        params = super().to_sampling_params(default_max_tokens, vocab_size, max_sequence_len)
        if self.echo and self.logprobs is not None:  # echo + logprobs also scores the prompt
            params = dataclasses.replace(params, prompt_logprobs=self.logprobs)
        return params

    def prompts(self) -> list[str | list[int]]:
        """The prompt field as a list of prompts, each a text or a list of token ids."""
        p = self.prompt
        if isinstance(p, str):
            return [p]
        if not p:
            raise InvalidParameterError("prompt", "must not be empty")
        if isinstance(p[0], int):
            return [list(p)]
        return list(p)


class TextPart(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore")

    type: Literal["text"]
    text: str


class ChatMessage(BaseModel):
    """One message. Extra keys (name, tool_calls, ...) are handed to the chat template as they are."""

    model_config = ConfigDict(strict=True, extra="allow")

    role: str
    content: str | list[TextPart] | None = None

    def for_template(self) -> dict[str, Any]:
        message = self.model_dump(exclude_unset=True)  # what the client sent, nulls included
        if isinstance(self.content, list):
            message["content"] = "".join(part.text for part in self.content)
        return message


class ChatCompletionRequest(_GenerationRequest):
    """POST /v1/chat/completions."""

    messages: list[ChatMessage] = Field(min_length=1)
    logprobs: bool | None = None
    top_logprobs: int | None = None
    max_completion_tokens: int | None = None
    add_generation_prompt: bool | None = None  # vLLM extension; default true

    def _num_logprobs(self) -> int | None:
        if not self.logprobs:
            if self.top_logprobs is not None:
                raise InvalidParameterError("top_logprobs", "needs logprobs set to true")
            return None
        return self.top_logprobs if self.top_logprobs is not None else 0

    def to_sampling_params(self, default_max_tokens: int, vocab_size: int, max_sequence_len: int) -> SamplingParams:
        if self.max_tokens is None and self.max_completion_tokens is not None:
            default_max_tokens = self.max_completion_tokens
        return super().to_sampling_params(default_max_tokens, vocab_size, max_sequence_len)

    def template_messages(self) -> list[dict[str, Any]]:
        return [m.for_template() for m in self.messages]


#: engine / SamplingParams field -> the chat request's field, for error messages
CHAT_RENAME = {"logprobs": "top_logprobs", "prompt": "messages", "prompt_token_ids": "messages"}



class LoadWeightsRequest(BaseModel):
    """POST /v1/load_weights: new weights for the served model, read from the server's own disk."""

    model_config = ConfigDict(strict=True, extra="forbid")

    path: str
    """A .safetensors file, or a Hugging Face folder of them, with Hugging Face tensor names (any subset
    of the model's weights)."""
