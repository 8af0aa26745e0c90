"""Per-token bookkeeping outside the device loop: detokenization, stop rules, log probs, finish
reasons, streamed deltas and the final `RequestOutput`s. Plain Python over lists, once per token."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from ..outputs import CompletionOutput, Logprob, RequestOutput, SampleDelta
from ..sampling import SamplingParams


@dataclass
class SampleState:
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


class OutputProcessor:
    def __init__(self, tokenizer, eos_token_ids: list[int]):
        self.tokenizer, self.eos_token_ids = tokenizer, eos_token_ids

    def new_samples(self, params: SamplingParams, rows: list[int], prompt_ids: list[int]) -> list[SampleState]:
        samples = [SampleState(i, row, self._detokenizer(prompt_ids)) for i, row in enumerate(rows)]
        if params.logprobs is not None:
            for s in samples:
                s.logprobs = []
        return samples

    def step_results(self, result) -> tuple[list[int], list[float], tuple | None, list[int] | None]:
        """One step's sampler result as Python lists (one host transfer per field)."""
        top = None
        if result.top_logprobs is not None:
            top = (result.top_logprobs[0].tolist(), result.top_logprobs[1].tolist())
        ranks = result.ranks.tolist() if getattr(result, "ranks", None) is not None else None
        return result.tokens.tolist(), result.logprobs.tolist(), top, ranks

    def append(self, request_id: str, p: SamplingParams, s: SampleState, tok: int, lp: float, top, ranks,
               slot: int) -> SampleDelta:
        """Add token `tok` to sample `s`; `slot` indexes the step's per-row results."""
        s.token_ids.append(tok)
        s.cumulative_logprob += lp
        entry = None
        if s.logprobs is not None:
            entry = {tok: Logprob(lp, ranks[slot] if ranks else None, self.decode_token(tok))}
            if top is not None and p.logprobs:
                for rank, (val, tid) in enumerate(zip(top[0][slot][: p.logprobs], top[1][slot][: p.logprobs]), 1):
                    entry.setdefault(tid, Logprob(val, rank, self.decode_token(tid)))
            s.logprobs.append(entry)
        hit_eos = tok in self.eos_token_ids and not p.ignore_eos
        if s.detok is not None and not (hit_eos or tok in p.stop_token_ids):
            s.text += s.detok.add(tok)
        if len(s.token_ids) >= p.min_tokens:
            if hit_eos:
                s.finish_reason = "stop"
            elif tok in p.stop_token_ids:
                s.finish_reason, s.stop_reason = "stop", tok
            elif p.stop:
                self._match_stop(s, p)
        if s.finish_reason is None and len(s.token_ids) >= p.max_tokens:
            s.finish_reason = "length"
        if s.finish_reason is not None and s.detok is not None and not isinstance(s.stop_reason, str):
            s.text += s.detok.flush()  # text held back for an incomplete character
        hold = 0 if s.finish_reason or not p.stop else max(len(x) for x in p.stop) - 1
        release_to = max(s.released, len(s.text) - hold)
        text, s.released = s.text[s.released : release_to], release_to
        return SampleDelta(request_id, s.index, [tok], text, [entry] if entry else None, s.finish_reason, s.stop_reason)

    @staticmethod
    def _match_stop(s: SampleState, p: SamplingParams) -> bool:
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

    def finish_beams(self, p: SamplingParams, samples: list[SampleState], hypotheses) -> list[SampleState]:
        """A beam search request is done: its n best hypotheses become its samples."""
        ends = set(p.stop_token_ids) | (set() if p.ignore_eos else set(self.eos_token_ids))
        samples = samples[: len(hypotheses)]
        for s, (ids, score) in zip(samples, hypotheses):
            s.token_ids, s.cumulative_logprob = ids, score
            s.finish_reason = "stop" if ids and ids[-1] in ends else "length"
            if s.detok is not None:
                s.text = self.tokenizer.decode(ids, skip_special_tokens=p.skip_special_tokens)
        return samples

    def request_output(self, req, ttft: float | None) -> RequestOutput:
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
        out = RequestOutput(req.request_id, req.prompt, req.prompt_ids, outputs, True, req.prompt_logprobs,
                            {"ttft_s": ttft})
        out.num_cached_tokens = req.num_cached_tokens
        return out

    # ---- helpers ----------------------------------------------------------------------------------
    def _detokenizer(self, prompt_ids: list[int]):
        if self.tokenizer is None:
            return None
        from ..tokenizer import IncrementalDetokenizer

        return IncrementalDetokenizer(self.tokenizer, prompt_ids=prompt_ids)

    def decode_token(self, tok: int) -> str | None:
        return None if self.tokenizer is None else self.tokenizer.decode([tok], skip_special_tokens=False)

    def bad_words_ids(self, p: SamplingParams) -> list[list[int]]:
        ids = []
        for word in p.bad_words:
            for variant in (word, " " + word.lstrip()):
                seq = self.tokenizer.encode(variant, add_special_tokens=False)
                if seq and seq not in ids:
                    ids.append(seq)
        return ids

    def prompt_logprobs(self, logits: Tensor, prompt_ids: list[int], k: int) -> list:
        """logits [L, V] -> vLLM's prompt_logprobs: None for the first token, then one dict per token."""
        lp = torch.log_softmax(logits.float(), dim=-1)[:-1]  # [L-1, V]: position i predicts token i+1
        targets = torch.tensor(prompt_ids[1:], device=lp.device)
        chosen = lp.gather(1, targets[:, None])[:, 0]  # [L-1]
        ranks = (lp > chosen[:, None]).sum(-1) + 1  # [L-1]
        top_v, top_i = lp.topk(k, dim=-1) if k > 0 else (None, None)
        out: list = [None]
        for j, tok in enumerate(prompt_ids[1:]):
            entry = {tok: Logprob(float(chosen[j]), int(ranks[j]), self.decode_token(tok))}
            if k > 0:
                for r, (v, t) in enumerate(zip(top_v[j].tolist(), top_i[j].tolist()), 1):
                    entry.setdefault(t, Logprob(v, r, self.decode_token(t)))
            out.append(entry)
        return out
