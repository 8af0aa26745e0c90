"""The two generation endpoints: request -> prompts + SamplingParams -> engine -> JSON or SSE.

A completions request with k prompts and n samples becomes k engine requests; its choices are
numbered prompt_index * n + sample_index, as OpenAI numbers them. Streams interleave the chunks of
all choices as the engine produces them, with each choice's index.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from ..errors import ContextLengthError, ForklmError, InvalidParameterError, TokenizerError
from ..outputs import RequestOutput
from ..sampling import SamplingParams
from ..tokenizer import check_unicode
from . import format as fmt
from .errors import APIError, from_forklm
from .protocol import CHAT_RENAME, ChatCompletionRequest, CompletionRequest, LoadWeightsRequest
from .runner import EngineRunner, RequestHandle

#: Texts at least this long are tokenized off the event loop (a few ms of work and more).
ASYNC_ENCODE_CHARS = 20_000
#: How often a non-streaming request checks that its client is still connected.
DISCONNECT_POLL_S = 0.1
#: Status logged for a request whose client went away (nginx's convention).
CLIENT_CLOSED = 499

SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


@dataclass
class ServerContext:
    """What the endpoints need from the loaded model and the engine."""

    runner: EngineRunner
    tokenizer: object | None  # forklm.tokenizer.Tokenizer
    model_name: str
    context_len: int  # the model's max_position_embeddings
    vocab_size: int
    max_tokens: int  # the engine's max_new_tokens
    max_prompt_len: int  # the engine's max_prompt_len
    model_aliases: set[str] = field(default_factory=set)

    def check_model(self, model: str | None) -> None:
        if model is not None and model != self.model_name and model not in self.model_aliases:
            raise APIError(404, f"the model {model!r} does not exist; this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def encode(self, text: str, field: str = "prompt", add_special_tokens: bool = True) -> list[int]:
        if self.tokenizer is None:
            raise TokenizerError("this model has no tokenizer: send the prompt as token ids")
        check_unicode(text, field)  # JSON may carry lone surrogates ("\ud800"); tokenizers refuse them
        return self.tokenizer.encode_within(text, self.context_len, field, add_special_tokens=add_special_tokens)

    async def encode_async(self, text: str, field: str = "prompt", add_special_tokens: bool = True) -> list[int]:
        """`encode`; a long text is tokenized in a worker thread, so the event loop keeps streaming."""
        if len(text) < ASYNC_ENCODE_CHARS:
            return self.encode(text, field, add_special_tokens)
        return await asyncio.to_thread(self.encode, text, field, add_special_tokens)

    def decode_token(self, token_id: int) -> str:
        if self.tokenizer is None:
            return f"token_id:{token_id}"
        return self.tokenizer.decode([token_id], skip_special_tokens=False)

    def decode(self, ids: list[int]) -> str:
        return "" if self.tokenizer is None else self.tokenizer.decode(ids, skip_special_tokens=False)


async def _collect(handle: RequestHandle, http: Request) -> list[RequestOutput] | None:
    """Every prompt's final output; None when the client went away (its samples are dropped)."""
    outputs: list[RequestOutput | None] = [None] * len(handle.request_ids)
    loop = asyncio.get_running_loop()
    checked = loop.time()
    try:
        while not handle.done:
            try:
                event = await handle.next(timeout=DISCONNECT_POLL_S)
            except asyncio.TimeoutError:
                event = None
            if loop.time() - checked >= DISCONNECT_POLL_S:  # events may come every step: check by the clock
                checked = loop.time()
                if await http.is_disconnected():
                    return None
            if event is None:
                continue
            if event.error is not None:
                raise event.error
            if event.output is not None:
                outputs[event.prompt_index] = event.output
    finally:
        handle.close()
    return outputs  # type: ignore[return-value]


def _entries(token_ids: list[int], logprobs: list | None) -> fmt.TokenEntries:
    return list(zip(token_ids, logprobs or [None] * len(token_ids)))


# ---- /v1/completions ------------------------------------------------------------------------------
async def create_completion(req: CompletionRequest, http: Request, ctx: ServerContext) -> Response:
    ctx.check_model(req.model)
    prompts, texts = [], []
    for p in req.prompts():
        prompts.append(await ctx.encode_async(p) if isinstance(p, str) else list(p))
        texts.append(p if isinstance(p, str) else None)
    params = req.to_sampling_params(16, ctx.vocab_size, ctx.max_prompt_len + ctx.max_tokens)
    handle = await ctx.runner.submit(prompts, texts, params)
    request_id = f"cmpl-{uuid.uuid4().hex}"
    echo_texts = [t if t is not None else ctx.decode(ids) for t, ids in zip(texts, prompts)] if req.echo else None
    if req.streaming:
        stream = _completion_stream(handle, req, params, ctx, request_id, echo_texts, sum(map(len, prompts)))
        return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)
    outputs = await _collect(handle, http)
    if outputs is None:
        return Response(status_code=CLIENT_CLOSED)
    choices, completion_tokens = [], 0
    for p_index, out in enumerate(outputs):
        for o in out.outputs:
            completion_tokens += len(o.token_ids)
            text = o.text or ""
            token_entries = _entries(o.token_ids, o.logprobs)
            if echo_texts is not None:
                text = echo_texts[p_index] + text
                prompt_lp = out.prompt_logprobs or [None] * len(out.prompt_token_ids)
                token_entries = list(zip(out.prompt_token_ids, prompt_lp)) + token_entries
            logprobs = None
            if params.logprobs is not None:
                logprobs = fmt.completion_logprobs(token_entries, params.logprobs, ctx.decode_token)
            choices.append(fmt.completion_choice(p_index * params.n + o.index, text, logprobs, o.finish_reason,
                                                 o.stop_reason))
    usage = fmt.usage(sum(len(p) for p in prompts), completion_tokens, sum(o.num_cached_tokens for o in outputs))
    return JSONResponse(fmt.completion_body(request_id, ctx.model_name, choices, usage))


async def _completion_stream(
    handle: RequestHandle, req: CompletionRequest, params: SamplingParams, ctx: ServerContext,
    request_id: str, echo_texts: list[str] | None, prompt_tokens: int,
) -> AsyncIterator[str]:
    created, n, with_usage = fmt.now(), params.n, req.include_usage
    offsets: dict[int, int] = {}  # choice index -> text offset of its next token (logprobs)
    completion_tokens = cached_tokens = 0
    try:
        while not handle.done:
            event = await handle.next()
            if event.error is not None:
                yield event.error.sse()
                yield fmt.DONE
                return
            if event.output is not None:
                cached_tokens += event.output.num_cached_tokens
            chunks = []
            for d in event.deltas:
                index = event.prompt_index * n + d.index
                completion_tokens += len(d.token_ids)
                text = d.text
                if echo_texts is not None and index not in offsets:
                    text = echo_texts[event.prompt_index] + text
                    offsets[index] = len(echo_texts[event.prompt_index])
                logprobs = None
                if params.logprobs is not None:
                    offset = offsets.get(index, 0)
                    logprobs = fmt.completion_logprobs(_entries(d.token_ids, d.logprobs), params.logprobs,
                                                       ctx.decode_token, offset)
                    offsets[index] = offset + sum(len(t) for t in logprobs["tokens"])
                elif not text and d.finish_reason is None:
                    continue  # text held back (a stop string may be starting): nothing to say yet
                choice = fmt.completion_choice(index, text, logprobs, d.finish_reason, d.stop_reason)
                chunks.append(fmt.sse(fmt.completion_chunk(request_id, ctx.model_name, created, [choice], with_usage)))
            if chunks:
                yield "".join(chunks)
        if with_usage:
            yield fmt.sse(fmt.usage_chunk(request_id, ctx.model_name, created, "text_completion",
                                          fmt.usage(prompt_tokens, completion_tokens, cached_tokens)))
        yield fmt.DONE
    finally:
        handle.close()


# ---- /v1/chat/completions -------------------------------------------------------------------------
async def create_chat_completion(req: ChatCompletionRequest, http: Request, ctx: ServerContext) -> Response:
    ctx.check_model(req.model)
    add_generation_prompt = req.add_generation_prompt is not False
    try:
        text = _render_chat(ctx, req.template_messages(), add_generation_prompt)
        prompt = await ctx.encode_async(text, "messages", add_special_tokens=False)
        room = ctx.context_len - len(prompt)
        if room < 1:
            raise ContextLengthError("messages", f"the conversation ({len(prompt)} tokens) fills the model's "
                                                 f"context length ({ctx.context_len})")
        params = req.to_sampling_params(min(ctx.max_tokens, room), ctx.vocab_size, ctx.max_prompt_len + ctx.max_tokens)
        handle = await ctx.runner.submit([prompt], [text], params)
    except ForklmError as error:
        raise from_forklm(error, CHAT_RENAME) from None
    request_id = f"chatcmpl-{uuid.uuid4().hex}"
    if req.streaming:
        stream = _chat_stream(handle, req, params, ctx, request_id, len(prompt))
        return StreamingResponse(stream, media_type="text/event-stream", headers=SSE_HEADERS)
    outputs = await _collect(handle, http)
    if outputs is None:
        return Response(status_code=CLIENT_CLOSED)
    out = outputs[0]
    choices = []
    for o in out.outputs:
        logprobs = None
        if params.logprobs is not None:
            logprobs = fmt.chat_logprobs(_entries(o.token_ids, o.logprobs), params.logprobs, ctx.decode_token)
        choices.append(fmt.chat_choice(o.index, o.text or "", logprobs, o.finish_reason, o.stop_reason))
    usage = fmt.usage(len(prompt), sum(len(o.token_ids) for o in out.outputs), out.num_cached_tokens)
    return JSONResponse(fmt.chat_body(request_id, ctx.model_name, choices, usage))


def _render_chat(ctx: ServerContext, messages: list[dict], add_generation_prompt: bool) -> str:
    if ctx.tokenizer is None or ctx.tokenizer.chat_template is None:
        raise TokenizerError("this model has no chat template (none in its tokenizer_config.json or GGUF "
                             "metadata): use /v1/completions with a prompt")
    try:
        return ctx.tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    except InvalidParameterError:
        raise
    except Exception as error:  # TokenizerError, or e.g. a TypeError of a template concatenating a null content
        raise InvalidParameterError("messages", f"the chat template failed on these messages: "
                                                f"{type(error).__name__}: {error}") from None


async def _chat_stream(
    handle: RequestHandle, req: ChatCompletionRequest, params: SamplingParams, ctx: ServerContext,
    request_id: str, prompt_tokens: int,
) -> AsyncIterator[str]:
    created, with_usage = fmt.now(), req.include_usage
    completion_tokens = cached_tokens = 0

    def chunk(choice: dict) -> str:
        return fmt.sse(fmt.chat_chunk(request_id, ctx.model_name, created, [choice], with_usage))

    try:
        yield "".join(chunk(fmt.chat_delta_choice(i, {"role": "assistant", "content": ""})) for i in range(params.n))
        while not handle.done:
            event = await handle.next()
            if event.error is not None:
                yield event.error.sse()
                yield fmt.DONE
                return
            if event.output is not None:
                cached_tokens += event.output.num_cached_tokens
            parts = []
            for d in event.deltas:
                completion_tokens += len(d.token_ids)
                logprobs = None
                if params.logprobs is not None:
                    logprobs = fmt.chat_logprobs(_entries(d.token_ids, d.logprobs), params.logprobs, ctx.decode_token)
                elif not d.text and d.finish_reason is None:
                    continue
                delta = {"content": d.text} if d.text or d.finish_reason is None else {}
                parts.append(chunk(fmt.chat_delta_choice(d.index, delta, logprobs, d.finish_reason)))
            if parts:
                yield "".join(parts)
        if with_usage:
            yield fmt.sse(fmt.usage_chunk(request_id, ctx.model_name, created, "chat.completion.chunk",
                                          fmt.usage(prompt_tokens, completion_tokens, cached_tokens)))
        yield fmt.DONE
    finally:
        handle.close()


async def load_weights(req: LoadWeightsRequest, ctx: ServerContext) -> Response:
    """Read and check the file off the event loop (the engine keeps stepping), then swap the weights in
    at the engine's next step boundary; answers once they are in use."""
    from ..checkpoint import read_weights, weight_updates

    model = ctx.runner.engine.model

    def read_and_check() -> dict:
        return weight_updates(model, read_weights(req.path))

    try:
        updates = await asyncio.to_thread(read_and_check)
    except ForklmError as error:
        raise APIError(400, str(error), param="path", code="invalid_weights") from None
    await ctx.runner.update_weights(updates)
    return JSONResponse({"status": "ok", "updated_tensors": len(updates)})
