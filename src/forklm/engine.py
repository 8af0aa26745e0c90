"""The generation engine: requests -> context slots and sample rows -> one `step()` at a time.

A request is one prompt with its SamplingParams; it gets one context slot (its prompt's K/V) and
`num_sequences` sample rows. `step()` admits waiting requests that fit (prefill at batch 1, the
LM head on the last prompt position only), runs one decode step over all sample rows (static
shapes: one compiled graph serves every step), samples every row that produced logits with the
per-row processors, and returns what each sample produced. `LLM.generate` drives it to completion;
the server drives it continuously while requests join and leave between steps.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from dataclasses import dataclass, field

import torch
from torch import Tensor

from .compile import make_decode_fn, make_sample_fn
from .errors import CapacityError, ContextLengthError, InvalidParameterError, TokenizerError
from .kv_cache import KVCache
from .model import Transformer
from .outputs import CompletionOutput, Logprob, RequestOutput, SampleDelta
from .sampling import (
    BeamSearchState,
    RowSpec,
    SamplingParams,
    SamplingTensors,
    TokenHistory,
    fresh_seed,
    process_logits,
)

log = logging.getLogger(__name__)


@dataclass
class _Sample:
    index: int
    row: int
    detok: object | None  # IncrementalDetokenizer, None without a tokenizer
    token_ids: list[int] = field(default_factory=list)
    logprobs: list | None = None
    cumulative_logprob: float = 0.0
    text: str = ""
    released: int = 0  # characters of text already handed out
    finish_reason: str | None = None
    stop_reason: int | str | None = None


@dataclass
class _Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    arrival: float
    slot: int = -1
    samples: list[_Sample] = field(default_factory=list)
    prompt_logprobs: list | None = None
    first_token_time: float | None = None
    beam: BeamSearchState | None = None  # set for beam search requests
    beam_done: bool = False

    @property
    def finished(self) -> bool:
        return bool(self.samples) and all(s.finish_reason for s in self.samples)


class Engine:
    def __init__(
        self,
        model: Transformer,
        cache: KVCache,
        tokenizer=None,
        eos_token_ids: list[int] | None = None,
        compile: bool = False,
    ):
        self.model, self.cache, self.tokenizer = model, cache, tokenizer
        self.eos_token_ids = list(eos_token_ids or [])
        self.vocab_size = model.config.vocab_size
        self.device = cache.device
        shape = cache.shape
        S = shape.max_samples
        self._decode = make_decode_fn(model, cache, compile)
        self._sample = make_sample_fn(compile)
        self._next_tokens = torch.zeros(S, dtype=torch.long, device=self.device)  # [S] token fed next step
        self._history = TokenHistory(S, shape.max_prompt_len + shape.max_new_tokens, self.vocab_size, self.device)
        self._row_specs: list[RowSpec] = [RowSpec.idle() for _ in range(S)]
        self._tensors: SamplingTensors | None = None
        self._free_slots = list(range(shape.max_prompts))
        self._free_rows = list(range(S))
        self._waiting: deque[_Request] = deque()
        self._running: dict[str, _Request] = {}
        self._done: dict[str, RequestOutput] = {}

    # ---- requests ---------------------------------------------------------------------------
    def add_request(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, prompt: str | None = None
    ) -> None:
        """Validate and queue a request; raises before any work is done."""
        shape, cfg = self.cache.shape, self.model.config
        if not prompt_ids:
            raise InvalidParameterError("prompt", "is empty")
        if min(prompt_ids) < 0 or max(prompt_ids) >= self.vocab_size:
            raise InvalidParameterError("prompt_token_ids", f"token ids must be in [0, {self.vocab_size})")
        L, T = len(prompt_ids), params.max_tokens
        if L + T > cfg.max_position_embeddings:
            raise ContextLengthError(
                "max_tokens",
                f"prompt ({L} tokens) + max_tokens ({T}) = {L + T} exceeds the model's context length "
                f"({cfg.max_position_embeddings})",
            )
        if cfg.sliding_window and L + T > cfg.sliding_window:
            raise ContextLengthError(
                "max_tokens",
                f"prompt ({L} tokens) + max_tokens ({T}) exceeds the model's sliding_window ({cfg.sliding_window}); "
                "forklm attends to the full context, so it only runs within the window",
            )
        if L > shape.max_prompt_len:
            raise ContextLengthError("prompt", f"{L} tokens exceed this engine's max_prompt_len ({shape.max_prompt_len})")
        if T > shape.max_new_tokens:
            raise ContextLengthError("max_tokens", f"{T} exceeds this engine's max_new_tokens ({shape.max_new_tokens})")
        n = params.num_sequences
        if n > min(shape.max_samples_per_prompt, shape.max_samples):
            fit = min(shape.max_samples_per_prompt, shape.max_samples)
            raise CapacityError(f"n={n}: the KV cache holds at most {fit} samples per prompt", max_n=fit)
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", list(params.logit_bias))):
            if any(not 0 <= i < self.vocab_size for i in ids):
                raise InvalidParameterError(name, f"token ids must be in [0, {self.vocab_size})")
        if (params.stop or params.bad_words) and self.tokenizer is None:
            raise TokenizerError("stop / bad_words need a tokenizer; this model has none")
        if request_id in self._running or any(r.request_id == request_id for r in self._waiting):
            raise InvalidParameterError("request_id", f"{request_id!r} is already running")
        seed = params.seed if params.seed is not None else fresh_seed()
        self._waiting.append(_Request(request_id, prompt, list(prompt_ids), params, seed, time.perf_counter()))

    def abort(self, request_id: str) -> None:
        """Drop a request; its rows stop costing work from the next step."""
        self._waiting = deque(r for r in self._waiting if r.request_id != request_id)
        req = self._running.pop(request_id, None)
        if req is not None:
            self._release(req)

    def has_unfinished(self) -> bool:
        return bool(self._waiting or self._running)

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    @property
    def num_running(self) -> int:
        return len(self._running)

    def pop_output(self, request_id: str) -> RequestOutput | None:
        """The final output of a finished request (once)."""
        return self._done.pop(request_id, None)

    # ---- one step ---------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[SampleDelta]:
        S = self.cache.shape.max_samples
        producing = torch.zeros(S, dtype=torch.bool, device=self.device)  # [S] rows sampled this step
        decoding = self.cache.live.clone()  # rows that already hold a token to feed
        if bool(decoding.any()):
            logits = self._decode(self._next_tokens)  # [S, V]
            self.cache.advance()
            producing |= decoding
        else:
            logits = torch.zeros(S, self.vocab_size, device=self.device)  # [S, V] filled by prefills
        for req in self._admit():
            rows = [s.row for s in req.samples]
            logits[rows] = self._prefill(req)  # [1, V] broadcast to the request's n rows
            producing[rows] = True
        if not bool(producing.any()):
            return []
        if self._tensors is None:
            self._tensors = SamplingTensors.build(self._row_specs, self.vocab_size, self.device)
        beams = [r for r in self._running.values() if r.beam is not None and not r.beam_done]
        for req in beams:  # beam search scores log-probabilities (then processors), as transformers does
            rows = self._rows(req)
            logits[rows] = torch.log_softmax(logits[rows], dim=-1)
        processed = process_logits(logits, self._tensors, self._history)
        result = self._sample(processed, self._tensors, self._history)
        tokens = torch.where(producing, result.tokens, self._next_tokens)  # [S]
        if beams:
            self._beam_step(beams, processed, tokens)
        self._history.append(tokens, producing)
        self._next_tokens = tokens
        return self._bookkeep(producing, tokens, result)

    def _rows(self, req: _Request) -> Tensor:
        return torch.tensor([s.row for s in req.samples], dtype=torch.long, device=self.device)

    def _beam_step(self, beams: list[_Request], processed: Tensor, tokens: Tensor) -> None:
        """Pick each beam request's next k beams; reorder the sample cache and history rows by parent."""
        S = tokens.shape[0]
        source = torch.arange(S, device=self.device)  # [S] row i continues row source[i]
        for req in beams:
            rows = self._rows(req)
            step = req.beam.step(processed[rows])  # over [k, V]
            tokens[rows] = step.next_tokens
            source[rows] = rows[step.parent_rows]
            req.beam_done = bool(step.done[0])
        moved = (source != torch.arange(S, device=self.device)).nonzero().flatten()  # [M]
        if moved.numel():
            self.cache.reorder(moved, source[moved])  # only the samples' own K/V move; the prompt stays
            self._history.index_select(source)

    def _admit(self) -> list[_Request]:
        admitted = []
        while self._waiting:
            req = self._waiting[0]
            n = req.params.num_sequences
            if not self._free_slots or len(self._free_rows) < n:
                break
            self._waiting.popleft()
            req.slot = self._free_slots.pop(0)
            rows, self._free_rows = self._free_rows[:n], self._free_rows[n:]
            req.samples = [_Sample(i, row, self._detokenizer(req)) for i, row in enumerate(rows)]
            if req.params.logprobs is not None:
                for s in req.samples:
                    s.logprobs = []
            self.cache.assign(req.slot, len(req.prompt_ids), rows)
            if req.params.use_beam_search:
                req.beam = BeamSearchState.from_params([req.params], self.eos_token_ids, self.device)
            bad_words = self._bad_words_ids(req.params)
            for s in req.samples:
                self._row_specs[s.row] = RowSpec(req.params, s.index, req.seed, self.eos_token_ids, bad_words)
                self._history.reset_row(s.row, req.prompt_ids)
            self._tensors = None
            self._running[req.request_id] = req
            admitted.append(req)
        return admitted

    def _prefill(self, req: _Request) -> Tensor:
        ids = torch.tensor([req.prompt_ids], dtype=torch.long, device=self.device)  # [1, L]
        positions = torch.arange(ids.shape[1], device=self.device).unsqueeze(0)  # [1, L]
        view = self.cache.prefill_view(req.slot, [s.row for s in req.samples])
        want_prompt_lp = req.params.prompt_logprobs is not None
        logits = self.model(ids, positions, view, last_only=not want_prompt_lp)  # [1, V] or [1, L, V]
        if want_prompt_lp:
            req.prompt_logprobs = self._prompt_logprobs(logits[0], req.prompt_ids, req.params.prompt_logprobs)
            logits = logits[:, -1]
        return logits  # [1, V]

    # ---- per-sample bookkeeping (Python, once per produced token) ----------------------------
    def _bookkeep(self, producing: Tensor, tokens: Tensor, result) -> list[SampleDelta]:
        now = time.perf_counter()
        token_list = tokens.tolist()
        chosen_lp = result.logprobs.tolist()
        top = None
        if result.top_logprobs is not None:
            top = (result.top_logprobs[0].tolist(), result.top_logprobs[1].tolist())
        ranks = result.ranks.tolist() if getattr(result, "ranks", None) is not None else None
        live_rows = producing.nonzero().flatten().tolist()
        live = set(live_rows)
        deltas = []
        for req in list(self._running.values()):
            if req.first_token_time is None:
                req.first_token_time = now
            if req.beam is not None:
                if req.beam_done:
                    self._finish_beams(req)
                continue
            for s in req.samples:
                if s.finish_reason or s.row not in live:
                    continue
                tok = token_list[s.row]
                deltas.append(self._append(req, s, tok, chosen_lp[s.row], top, ranks))
            if req.finished:
                self._finish(req)
        return deltas

    def _append(self, req: _Request, s: _Sample, tok: int, lp: float, top, ranks) -> SampleDelta:
        p = req.params
        s.token_ids.append(tok)
        s.cumulative_logprob += lp
        entry = None
        if s.logprobs is not None:
            entry = {tok: Logprob(lp, ranks[s.row] if ranks else None, self._decode_token(tok))}
            if top is not None and p.logprobs:
                for rank, (val, tid) in enumerate(zip(top[0][s.row][: p.logprobs], top[1][s.row][: p.logprobs]), 1):
                    entry.setdefault(tid, Logprob(val, rank, self._decode_token(tid)))
            s.logprobs.append(entry)
        hit_eos = tok in self.eos_token_ids and not p.ignore_eos
        if s.detok is not None and not (hit_eos or tok in p.stop_token_ids):
            s.text += s.detok.add(tok)
        if len(s.token_ids) >= p.min_tokens:
            if hit_eos:
                s.finish_reason = "stop"
            elif tok in p.stop_token_ids:
                s.finish_reason, s.stop_reason = "stop", tok
            elif p.stop and self._match_stop(s, p):
                pass
        if s.finish_reason is None and len(s.token_ids) >= p.max_tokens:
            s.finish_reason = "length"
        if s.finish_reason is not None:
            self.cache.live[s.row] = False
            if s.detok is not None and not isinstance(s.stop_reason, str):
                s.text += s.detok.flush()  # text held back for an incomplete character
        hold = 0 if s.finish_reason or not p.stop else max(len(x) for x in p.stop) - 1
        release_to = max(s.released, len(s.text) - hold)
        text, s.released = s.text[s.released : release_to], release_to
        return SampleDelta(req.request_id, s.index, [tok], text, [entry] if entry else None, s.finish_reason, s.stop_reason)

    @staticmethod
    def _match_stop(s: _Sample, p: SamplingParams) -> bool:
        """Stop strings on decoded text, across token boundaries; cut the text at the earliest match."""
        window_start = max(0, s.released - max(len(x) for x in p.stop))
        best = None
        for stop in p.stop:
            i = s.text.find(stop, window_start)
            if i >= 0 and (best is None or i < best[0]):
                best = (i, stop)
        if best is None:
            return False
        i, stop = best
        s.text = s.text[: i + len(stop)] if p.include_stop_str_in_output else s.text[:i]
        s.released = min(s.released, len(s.text))
        s.finish_reason, s.stop_reason = "stop", stop
        return True

    def _finish(self, req: _Request) -> None:
        self._running.pop(req.request_id, None)
        self._release(req)
        samples = req.samples
        n = req.params.n
        if len(samples) > n:  # best_of: keep the n most likely samples
            samples = sorted(samples, key=lambda s: s.cumulative_logprob, reverse=True)[:n]
        outputs = [
            CompletionOutput(
                index=i,
                text=s.text if s.detok is not None else None,
                token_ids=s.token_ids,
                cumulative_logprob=s.cumulative_logprob,
                logprobs=s.logprobs,
                finish_reason=s.finish_reason,
                stop_reason=s.stop_reason,
            )
            for i, s in enumerate(samples)
        ]
        ttft = None if req.first_token_time is None else req.first_token_time - req.arrival
        self._done[req.request_id] = RequestOutput(
            req.request_id, req.prompt, req.prompt_ids, outputs, True, req.prompt_logprobs, {"ttft_s": ttft}
        )

    def _finish_beams(self, req: _Request) -> None:
        """A beam search request is done: its n best hypotheses become the outputs."""
        self._running.pop(req.request_id, None)
        self._release(req)  # all k rows
        ends = set(req.params.stop_token_ids) | (set() if req.params.ignore_eos else set(self.eos_token_ids))
        hypotheses = req.beam.finalize()[0][: req.params.n]
        req.samples = req.samples[: len(hypotheses)]
        for s, (ids, score) in zip(req.samples, hypotheses):
            s.token_ids, s.cumulative_logprob = ids, score
            s.finish_reason = "stop" if ids and ids[-1] in ends else "length"
            if s.detok is not None:
                s.text = self.tokenizer.decode(ids, skip_special_tokens=req.params.skip_special_tokens)
        self._finish(req)

    def _release(self, req: _Request) -> None:
        rows = [s.row for s in req.samples]
        if req.slot >= 0:
            self.cache.release(req.slot, rows)
            self._free_slots.append(req.slot)
            self._free_rows.extend(rows)
            for r in rows:
                self._row_specs[r] = RowSpec.idle()
            self._tensors = None
            req.slot = -1

    # ---- helpers ----------------------------------------------------------------------------
    def _detokenizer(self, req: _Request):
        if self.tokenizer is None:
            return None
        from .tokenizer import IncrementalDetokenizer

        return IncrementalDetokenizer(self.tokenizer, prompt_ids=req.prompt_ids)

    def _decode_token(self, tok: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([tok], skip_special_tokens=False)

    def _bad_words_ids(self, p: SamplingParams) -> list[list[int]]:
        ids = []
        for word in p.bad_words:
            for variant in (word, " " + word.lstrip()):
                seq = self.tokenizer.encode(variant, add_special_tokens=False)
                if seq and seq not in ids:
                    ids.append(seq)
        return ids

    def _prompt_logprobs(self, logits: Tensor, prompt_ids: list[int], k: int) -> list:
        """logits [L, V] -> vLLM's prompt_logprobs: None for the first token, then one dict per token."""
        lp = torch.log_softmax(logits.float(), dim=-1)[:-1]  # [L-1, V]: position i predicts token i+1
        targets = torch.tensor(prompt_ids[1:], device=lp.device)
        chosen = lp.gather(1, targets[:, None])[:, 0]  # [L-1]
        ranks = (lp > chosen[:, None]).sum(-1) + 1  # [L-1]
        top_v, top_i = lp.topk(k, dim=-1) if k > 0 else (None, None)
        out: list = [None]
        for j, tok in enumerate(prompt_ids[1:]):
            entry = {tok: Logprob(float(chosen[j]), int(ranks[j]), self._decode_token(tok))}
            if k > 0:
                for r, (v, t) in enumerate(zip(top_v[j].tolist(), top_i[j].tolist()), 1):
                    entry.setdefault(t, Logprob(v, r, self._decode_token(t)))
            out.append(entry)
        return out
