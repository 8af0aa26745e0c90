"""Beam search over R requests x k beams, vectorized, with transformers' `num_beams` semantics.

The engine runs the model on R*k rows (request r's beams are rows r*k .. r*k+k-1), turns the
logits into per-beam log probs (log_softmax of the logits, then optionally `process_logits` on
them, which is what transformers does), and calls `step`. `step` returns the next token of each
row and the row each new beam continues (`parent_rows`): the engine reorders its sample cache and
`TokenHistory` by it before the next step.

Rules (those of transformers' beam search, `do_sample=False`):
- Candidates are the best (1 + #eos) * k (at least 2k) continuations of all beams of a request by
  accumulated log prob. The best k candidates that do not end the sequence become the new beams.
- A candidate ends the sequence when its token is an EOS / stop id or the request reaches
  max_tokens. Only candidates among the best k can enter the request's k finished hypotheses,
  scored sum(log probs) / generated_length ** length_penalty (EOS counted in the length).
- early_stopping=True: a request is done once it has k finished hypotheses. False: done when the
  best running beam, scored at its current length, cannot beat the worst finished one. "never":
  the same, scored at max_tokens when length_penalty > 0 (the best it could still reach).
A request that is done is frozen: later steps leave its state alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from forklm.errors import InvalidParameterError
from forklm.sampling.params import SamplingParams

# Score that keeps a candidate out (transformers' convention: finite, so that sums stay ordered).
_EXCLUDED = -1.0e9
_EARLY_FALSE, _EARLY_TRUE, _EARLY_NEVER = 0, 1, 2


@dataclass
class BeamStep:
    """What one beam search step decided, for R requests x k beams."""

    next_tokens: Tensor
    """[R*k] int64: the token appended to each row."""
    parent_rows: Tensor
    """[R*k] int64: the row each new beam continues (reorder caches by it before appending)."""
    done: Tensor
    """[R] bool: the request needs no more steps (its rows' outputs can be ignored)."""


def _per_request(name: str, value, count: int) -> list:
    values = list(value) if isinstance(value, (list, tuple)) else [value] * count
    if len(values) != count:
        raise InvalidParameterError(name, f"expected {count} values (one per request), got {len(values)}")
    return values


class BeamSearchState:
    """The running beams and finished hypotheses of R requests, each with k beams.

    All requests of one state start together (the step counter is shared); per request they may
    differ in max_tokens, EOS ids, length_penalty, early_stopping and the number returned.
    """

    def __init__(
        self,
        num_requests: int,
        beam_width: int,
        max_tokens: int | list[int],
        eos_token_ids: list[int] | list[list[int]],
        length_penalty: float | list[float] = 1.0,
        early_stopping: bool | str | list[bool | str] = False,
        num_return: int | list[int] = 1,
        device: torch.device | str = "cpu",
    ):
        R, k = num_requests, beam_width
        if R < 1:
            raise InvalidParameterError("num_requests", f"must be >= 1, got {R}")
        if k < 1:
            raise InvalidParameterError("beam_width", f"must be >= 1, got {k}")
        if eos_token_ids and isinstance(eos_token_ids[0], int):
            eos_token_ids = [list(eos_token_ids)] * R
        eos_lists = _per_request("eos_token_ids", eos_token_ids or [[]] * R, R)
        max_tokens = _per_request("max_tokens", max_tokens, R)
        modes = []
        for mode in _per_request("early_stopping", early_stopping, R):
            if mode is True:
                modes.append(_EARLY_TRUE)
            elif mode is False:
                modes.append(_EARLY_FALSE)
            elif mode == "never":
                modes.append(_EARLY_NEVER)
            else:
                raise InvalidParameterError("early_stopping", f'must be true, false or "never", got {mode!r}')
        self.num_return = [min(n, k) for n in _per_request("num_return", num_return, R)]
        self.num_requests, self.beam_width, self.device = R, k, torch.device(device)
        self.max_new = max(max_tokens)
        E = max(1, max(len(e) for e in eos_lists))
        self.num_candidates = max(2, 1 + max(len(e) for e in eos_lists)) * k

        eos = torch.zeros((R, E), dtype=torch.int64)  # [R, E]
        eos_valid = torch.zeros((R, E), dtype=torch.bool)  # [R, E]
        for r, ids in enumerate(eos_lists):
            eos[r, : len(ids)] = torch.tensor(ids, dtype=torch.int64)
            eos_valid[r, : len(ids)] = True
        self.eos, self.eos_valid = eos.to(device), eos_valid.to(device)
        self.max_tokens = torch.tensor(max_tokens, dtype=torch.int64, device=device)  # [R]
        self.length_penalty = torch.tensor(_per_request("length_penalty", length_penalty, R), dtype=torch.float64,
                                           device=device)  # [R]
        self.early = torch.tensor(modes, dtype=torch.int64, device=device)  # [R]

        self.step_count = 0  # tokens generated so far by every running beam
        T = self.max_new
        self.running_tokens = torch.zeros((R, k, T), dtype=torch.int64, device=device)  # [R, k, T]
        self.running_scores = torch.full((R, k), _EXCLUDED, device=device)  # [R, k] sum of log probs
        self.running_scores[:, 0] = 0.0  # only beam 0 expands at the first step (the beams are equal)
        self.finished_tokens = torch.zeros((R, k, T), dtype=torch.int64, device=device)  # [R, k, T]
        self.finished_len = torch.zeros((R, k), dtype=torch.int64, device=device)  # [R, k]
        self.finished_scores = torch.full((R, k), _EXCLUDED, device=device)  # [R, k] length-penalised
        self.finished_flag = torch.zeros((R, k), dtype=torch.bool, device=device)  # [R, k]
        self.improvable = torch.ones(R, dtype=torch.bool, device=device)  # [R] early-stop heuristic
        self.done = torch.zeros(R, dtype=torch.bool, device=device)  # [R]

    @classmethod
    def from_params(
        cls, params: list[SamplingParams], eos_token_ids: list[int], device: torch.device | str = "cpu"
    ) -> BeamSearchState:
        """One request per `SamplingParams` (all with the same beam_width). The sequence-ending ids
        are the model's EOS (unless ignore_eos) and each request's stop_token_ids."""
        widths = {p.beam_width for p in params}
        if len(widths) != 1:
            raise InvalidParameterError("beam_width", f"requests of one beam state need one width, got {widths}")
        ends = [sorted(set(([] if p.ignore_eos else list(eos_token_ids)) + list(p.stop_token_ids))) for p in params]
        return cls(
            num_requests=len(params),
            beam_width=widths.pop(),
            max_tokens=[p.max_tokens for p in params],
            eos_token_ids=ends,
            length_penalty=[p.length_penalty for p in params],
            early_stopping=[p.early_stopping for p in params],
            num_return=[p.n for p in params],
            device=device,
        )

    def _length_divisor(self, length: Tensor | int) -> Tensor:
        """length ** length_penalty per request, [R] float32 (computed in float64, then rounded)."""
        return (torch.as_tensor(length, dtype=torch.float64, device=self.device) ** self.length_penalty).float()

    def step(self, logprobs: Tensor) -> BeamStep:
        """Advance every request that is not done by one token. logprobs [R*k, V] float32."""
        R, k, t = self.num_requests, self.beam_width, self.step_count
        if t >= self.max_new:
            raise InvalidParameterError("step", "every request already reached max_tokens")
        V = logprobs.shape[-1]
        C = min(self.num_candidates, k * V)
        rows = torch.arange(R, device=self.device)[:, None]  # [R, 1]

        # 1. The best C continuations of each request over all its beams.
        total = logprobs.float().view(R, k, V) + self.running_scores[:, :, None]  # [R, k, V]
        total = total.view(R, k * V)  # [R, k*V]: candidate j*V + v is token v after beam j
        cand_scores, flat = torch.topk(total, C, dim=-1)  # [R, C] each, descending
        cand_beam, cand_token = flat // V, flat % V  # [R, C] each
        ends_eos = ((cand_token[:, :, None] == self.eos[:, None, :]) & self.eos_valid[:, None, :]).any(-1)  # [R, C]
        ends = ends_eos | (t + 1 >= self.max_tokens)[:, None]  # [R, C]

        # 2. New running beams: the best k candidates that do not end.
        running_pick = cand_scores + ends.float() * _EXCLUDED  # [R, C]
        new_scores, pick = torch.topk(running_pick, k, dim=-1)  # [R, k] each
        parent = cand_beam.gather(1, pick)  # [R, k]
        token = cand_token.gather(1, pick)  # [R, k]
        new_running = self.running_tokens[rows, parent]  # [R, k, T]
        new_running[:, :, t] = token

        # 3. Finished hypotheses: merge the ending candidates among the best k with the kept ones.
        top_ends = ends[:, :k]  # [R, k]
        length = t + 1
        fin_scores = cand_scores[:, :k] / self._length_divisor(length)[:, None]  # [R, k]
        full_and_early = self.finished_flag.all(-1) & (self.early == _EARLY_TRUE)  # [R]
        fin_scores = fin_scores + full_and_early[:, None].float() * _EXCLUDED
        fin_scores = fin_scores + (~self.improvable)[:, None].float() * _EXCLUDED
        fin_scores = fin_scores + (~top_ends).float() * _EXCLUDED
        fin_tokens = self.running_tokens[rows, cand_beam[:, :k]]  # [R, k, T]
        fin_tokens[:, :, t] = cand_token[:, :k]
        merged_scores = torch.cat([self.finished_scores, fin_scores], dim=1)  # [R, 2k]
        keep = torch.topk(merged_scores, k, dim=-1).indices  # [R, k]
        new_fin_scores = merged_scores.gather(1, keep)  # [R, k]
        new_fin_tokens = torch.cat([self.finished_tokens, fin_tokens], dim=1)[rows, keep]  # [R, k, T]
        new_fin_len = torch.cat([self.finished_len, torch.full_like(self.finished_len, length)], 1).gather(1, keep)
        new_fin_flag = torch.cat([self.finished_flag, top_ends], dim=1).gather(1, keep)  # [R, k]

        # 4. Can a running beam still beat the worst finished hypothesis?
        never = (self.early == _EARLY_NEVER) & (self.length_penalty > 0)  # [R]
        best_length = torch.where(never, self.max_tokens, torch.full_like(self.max_tokens, length))  # [R]
        best_running = new_scores[:, 0] / self._length_divisor(best_length)  # [R]
        worst = torch.where(new_fin_flag, new_fin_scores.min(-1, keepdim=True).values, _EXCLUDED)  # [R, k]
        improvable = self.improvable & (best_running[:, None] > worst).any(-1)  # [R]
        all_finished = new_fin_flag.all(-1) & (self.early == _EARLY_TRUE)  # [R]
        done_now = ~improvable | all_finished | ends.all(-1)  # [R]

        # 5. Commit, leaving requests that were already done untouched.
        live = ~self.done  # [R]
        live2, live3 = live[:, None], live[:, None, None]  # [R, 1], [R, 1, 1]
        self.running_tokens = torch.where(live3, new_running, self.running_tokens)
        self.running_scores = torch.where(live2, new_scores, self.running_scores)
        self.finished_tokens = torch.where(live3, new_fin_tokens, self.finished_tokens)
        self.finished_scores = torch.where(live2, new_fin_scores, self.finished_scores)
        self.finished_len = torch.where(live2, new_fin_len, self.finished_len)
        self.finished_flag = torch.where(live2, new_fin_flag, self.finished_flag)
        self.improvable = torch.where(live, improvable, self.improvable)
        self.done = self.done | done_now
        self.step_count = length

        beams = torch.arange(k, device=self.device)[None, :]  # [1, k]
        parent = torch.where(live2, parent, beams)  # [R, k]
        token = torch.where(live2, token, 0)  # [R, k]
        parent_rows = (rows * k + parent).reshape(R * k)  # [R*k]
        return BeamStep(token.reshape(R * k), parent_rows, self.done.clone())  # tokens [R*k]

    def finalize(self) -> list[list[tuple[list[int], float]]]:
        """Per request, its `n` best hypotheses as (token ids, score), best first.

        Token ids end with the EOS / stop id when that ended the hypothesis. If a request stopped
        before it had n finished hypotheses (e.g. aborted), its best running beams fill the rest,
        scored at their current length.
        """
        scores = self.finished_scores.tolist()
        flags = self.finished_flag.tolist()
        lengths = self.finished_len.tolist()
        tokens = self.finished_tokens.tolist()
        running = self.running_scores.tolist()
        running_tokens = self.running_tokens.tolist()
        divisor = self._length_divisor(max(self.step_count, 1)).tolist()
        out = []
        for r in range(self.num_requests):
            hyps = [(tokens[r][j][: lengths[r][j]], scores[r][j]) for j in range(self.beam_width) if flags[r][j]]
            hyps.sort(key=lambda h: h[1], reverse=True)
            if len(hyps) < self.num_return[r]:
                extra = [
                    (running_tokens[r][j][: self.step_count], running[r][j] / divisor[r])
                    for j in range(self.beam_width)
                    if running[r][j] > _EXCLUDED / 2
                ]
                hyps += sorted(extra, key=lambda h: h[1], reverse=True)
            out.append(hyps[: self.num_return[r]])
        return out
