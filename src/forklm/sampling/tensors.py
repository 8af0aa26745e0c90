"""Per-row sampling state as tensors: `RowSpec` -> `SamplingTensors`, and `TokenHistory`.

A decode step runs over S rows (samples or beams); each row belongs to a request with its own
`SamplingParams`. `SamplingTensors.build` turns the rows' parameters into one tensor per setting
(once, when the batch composition changes), and records which processors some row uses, so that a
step does no work for a processor no row asked for. `TokenHistory` holds each row's tokens and is
updated once per step with one vectorized `append`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields, replace

import torch
from torch import Tensor

from forklm.errors import ContextLengthError, InvalidParameterError
from forklm.sampling.params import SamplingParams
from forklm.sampling.random import seed_to_int64, vocab_keys32


@dataclass(frozen=True)
class RowSpec:
    """What one decode row needs to know about its request."""

    params: SamplingParams
    """The request's sampling parameters."""
    sample_index: int
    """Index of this sample (or beam) within its request, 0..num_sequences-1: a random counter."""
    seed: int
    """The request's seed (its own, or a fresh one from `fresh_seed`); shared by its samples."""
    eos_token_ids: list[int] = field(default_factory=list)
    """The model's end-of-sequence ids (banned while fewer than `min_tokens` were generated)."""
    bad_words_ids: list[list[int]] = field(default_factory=list)
    """Token sequences never generated (the engine's tokenization of `params.bad_words`)."""
    is_idle: bool = False
    """The row serves no request: its token is thrown away."""

    @classmethod
    def idle(cls) -> RowSpec:
        """A row that serves no request: greedy and without any processor, so it costs nothing extra."""
        return cls(SamplingParams(temperature=0.0), 0, 0, is_idle=True)


def _pad_2d(rows: list[list[int]], fill: int) -> tuple[Tensor, Tensor]:
    """Ragged int lists -> ([S, W] int64 padded with `fill`, [S, W] bool valid). W >= 1."""
    width = max(1, max(len(r) for r in rows))
    values = torch.full((len(rows), width), fill, dtype=torch.int64)
    valid = torch.zeros((len(rows), width), dtype=torch.bool)
    for i, r in enumerate(rows):
        values[i, : len(r)] = torch.tensor(r, dtype=torch.int64)
        valid[i, : len(r)] = True
    return values, valid


def _col(values: list[float], device: torch.device | str) -> Tensor:
    """A per-row float column: [S] list -> [S, 1] float32 on `device`."""
    return torch.tensor(values, dtype=torch.float32).view(-1, 1).to(device)  # [S, 1]


@dataclass
class SamplingTensors:
    """Every row's sampling settings as tensors, plus which processors any row uses.

    Shapes: S rows, V vocabulary. Greedy rows (temperature 0) carry neutral values for
    temperature, top_k, top_p and min_p, so those warpers leave them alone. Optional tensors are
    None when no row uses the setting (and the matching `use_*` flag is False).
    """

    num_rows: int
    """S, the number of rows."""
    vocab_size: int
    """V, the vocabulary size the logits have."""
    greedy: Tensor
    """[S] bool: the row takes the argmax (temperature 0)."""
    temperature: Tensor
    """[S, 1] float32: divides the logits (1 for greedy rows)."""
    top_k: Tensor
    """[S] int64: keep the k largest logits; 0 = off (also when k >= V or the row is greedy)."""
    max_top_k: int
    """Largest top_k of any row (0 when no row uses top-k)."""
    top_p: Tensor
    """[S, 1] float32 in (0, 1]; 1 = off."""
    min_p: Tensor
    """[S, 1] float32 in [0, 1]; 0 = off."""
    repetition_penalty: Tensor
    """[S, 1] float32 > 0; 1 = off."""
    presence_penalty: Tensor
    """[S, 1] float32."""
    frequency_penalty: Tensor
    """[S, 1] float32."""
    min_tokens: Tensor
    """[S] int64: stop tokens are banned while fewer tokens than this were generated."""
    stop_ids: Tensor | None
    """[S, E] int64: ids banned before `min_tokens` (EOS unless ignore_eos, and stop_token_ids),
    padded with 0; None when no row has min_tokens > 0."""
    stop_ids_valid: Tensor | None
    """[S, E] bool: which entries of `stop_ids` are real."""
    logit_bias_ids: Tensor | None
    """[S, B] int64: token ids biased by each row, padded with 0; None when no row has a bias."""
    logit_bias_values: Tensor | None
    """[S, B] float32: the biases, 0 at padding."""
    ngram_size: Tensor
    """[S] int64: no_repeat_ngram_size; 0 = off."""
    max_ngram_size: int
    """Largest no_repeat_ngram_size of any row (0 = no row uses it)."""
    bad_words: Tensor | None
    """[S, W, M] int64: each row's banned sequences, right-aligned (last token at M-1), padded with
    -1 on the left; None when no row has bad words."""
    bad_words_len: Tensor | None
    """[S, W] int64: length of each banned sequence; 0 = padding."""
    seeds: Tensor
    """[S] int64: each row's request seed."""
    sample_index: Tensor
    """[S] int64: each row's sample index within its request."""
    token_keys: Tensor
    """[1, V] int32: the uniforms' per-token keys (`random.vocab_keys32`), made with the batch, not per draw."""
    num_logprobs: Tensor
    """[S] int64: top alternatives asked per token; -1 = logprobs not asked."""
    max_logprobs: int | None
    """Largest number of alternatives any row asked for; None when no row asked for logprobs."""
    use_repetition_penalty: bool
    """Some row has repetition_penalty != 1."""
    use_presence_frequency: bool
    """Some row has a presence or frequency penalty."""
    use_logit_bias: bool
    """Some row has a logit_bias."""
    use_no_repeat_ngram: bool
    """Some row has no_repeat_ngram_size > 0."""
    use_bad_words: bool
    """Some row has bad words."""
    use_min_tokens: bool
    """Some row has min_tokens > 0 and a stop id to ban."""
    use_temperature: bool
    """Some sampled row has a temperature other than 1."""
    use_top_k: bool
    """Some sampled row uses top-k."""
    use_top_p: bool
    """Some sampled row has top_p < 1."""
    use_min_p: bool
    """Some sampled row has min_p > 0."""
    all_greedy: bool
    """Every row is greedy: no random numbers are drawn."""
    any_greedy: bool
    """Some row serving a request is greedy (idle rows do not count)."""

    @classmethod
    def build(cls, rows: list[RowSpec], vocab_size: int, device: torch.device | str) -> SamplingTensors:
        """One tensor per setting from the rows' specs (a Python loop here, none in the step)."""
        if not rows:
            raise InvalidParameterError("rows", "at least one row is needed")
        V = vocab_size
        params = [r.params for r in rows]
        greedy = [p.temperature == 0.0 for p in params]
        temperature = [1.0 if g else p.temperature for p, g in zip(params, greedy)]
        top_k = [0 if (g or p.top_k <= 0 or p.top_k >= V) else p.top_k for p, g in zip(params, greedy)]
        top_p = [1.0 if g else p.top_p for p, g in zip(params, greedy)]
        min_p = [0.0 if g else p.min_p for p, g in zip(params, greedy)]

        stop_lists = []
        for r in rows:
            ids = ([] if r.params.ignore_eos else list(r.eos_token_ids)) + list(r.params.stop_token_ids)
            _check_ids("stop_token_ids", ids, V)
            stop_lists.append(sorted(set(ids)) if r.params.min_tokens > 0 else [])
        use_min_tokens = any(stop_lists)
        stop_ids = stop_valid = None
        if use_min_tokens:
            stop_ids, stop_valid = _pad_2d(stop_lists, 0)  # [S, E]

        use_logit_bias = any(p.logit_bias for p in params)
        bias_ids = bias_values = None
        if use_logit_bias:
            for p in params:
                _check_ids("logit_bias", list(p.logit_bias), V)
            bias_ids, bias_valid = _pad_2d([list(p.logit_bias) for p in params], 0)  # [S, B]
            bias_values = torch.zeros(bias_ids.shape, dtype=torch.float32)  # [S, B]
            for i, p in enumerate(params):
                bias_values[i, : len(p.logit_bias)] = torch.tensor(list(p.logit_bias.values()))

        bad = [_bad_word_sequences(r, V) for r in rows]
        use_bad_words = any(bad)
        bad_words = bad_len = None
        if use_bad_words:
            W = max(len(b) for b in bad)
            M = max(len(s) for b in bad for s in b)
            bad_words = torch.full((len(rows), W, M), -1, dtype=torch.int64)  # [S, W, M]
            bad_len = torch.zeros((len(rows), W), dtype=torch.int64)  # [S, W]
            for i, b in enumerate(bad):
                for j, s in enumerate(b):
                    bad_words[i, j, M - len(s) :] = torch.tensor(s, dtype=torch.int64)
                    bad_len[i, j] = len(s)

        ngram = [p.no_repeat_ngram_size for p in params]
        asked = [-1 if p.logprobs is None else p.logprobs for p in params]
        sampled = [not g for g in greedy]

        def to(x: Tensor | None) -> Tensor | None:
            return None if x is None else x.to(device)

        return cls(
            num_rows=len(rows),
            vocab_size=V,
            greedy=torch.tensor(greedy, dtype=torch.bool).to(device),
            temperature=_col(temperature, device),
            top_k=torch.tensor(top_k, dtype=torch.int64).to(device),
            max_top_k=max(top_k),
            top_p=_col(top_p, device),
            min_p=_col(min_p, device),
            repetition_penalty=_col([p.repetition_penalty for p in params], device),
            presence_penalty=_col([p.presence_penalty for p in params], device),
            frequency_penalty=_col([p.frequency_penalty for p in params], device),
            min_tokens=torch.tensor([p.min_tokens for p in params], dtype=torch.int64).to(device),
            stop_ids=to(stop_ids),
            stop_ids_valid=to(stop_valid),
            logit_bias_ids=to(bias_ids),
            logit_bias_values=to(bias_values),
            ngram_size=torch.tensor(ngram, dtype=torch.int64).to(device),
            max_ngram_size=max(ngram),
            bad_words=to(bad_words),
            bad_words_len=to(bad_len),
            seeds=torch.tensor([seed_to_int64(r.seed) for r in rows], dtype=torch.int64).to(device),
            sample_index=torch.tensor([r.sample_index for r in rows], dtype=torch.int64).to(device),
            token_keys=vocab_keys32(V, device),
            num_logprobs=torch.tensor(asked, dtype=torch.int64).to(device),
            max_logprobs=max(asked) if max(asked) >= 0 else None,
            use_repetition_penalty=any(p.repetition_penalty != 1.0 for p in params),
            use_presence_frequency=any(p.presence_penalty != 0.0 or p.frequency_penalty != 0.0 for p in params),
            use_logit_bias=use_logit_bias,
            use_no_repeat_ngram=max(ngram) > 0,
            use_bad_words=use_bad_words,
            use_min_tokens=use_min_tokens,
            use_temperature=any(s and t != 1.0 for s, t in zip(sampled, temperature)),
            use_top_k=max(top_k) > 0,
            use_top_p=any(p < 1.0 for p in top_p),
            use_min_p=any(p > 0.0 for p in min_p),
            all_greedy=all(greedy),
            # idle rows do not count: their token is thrown away, and a batch with spare rows then
            # takes the same (compiled) sampling path as a full one
            any_greedy=any(g for g, r in zip(greedy, rows) if not r.is_idle),
        )

    def select(self, rows: Tensor) -> SamplingTensors:
        """The settings of `rows [r]` (int64 indices), in that order. Every tensor field but `token_keys`
        (the vocabulary's) is per row; the `use_*` / `max_*` summaries stay those of the whole batch (a
        processor then may run on rows that do not use it, which leaves them unchanged)."""
        picked = {f.name: getattr(self, f.name)[rows] for f in fields(self)
                  if isinstance(getattr(self, f.name), Tensor) and f.name != "token_keys"}
        return replace(self, num_rows=len(rows), **picked)


def _check_ids(name: str, ids: list[int], vocab_size: int) -> None:
    for i in ids:
        if not 0 <= i < vocab_size:
            raise InvalidParameterError(name, f"token id {i} is outside the vocabulary [0, {vocab_size})")


def _bad_word_sequences(row: RowSpec, vocab_size: int) -> list[list[int]]:
    """The row's banned sequences, without empty ones and (as transformers does) without a
    single-token sequence that is an EOS id."""
    out = []
    for seq in row.bad_words_ids:
        seq = list(seq)
        if not seq or (len(seq) == 1 and seq[0] in row.eos_token_ids):
            continue
        _check_ids("bad_words", seq, vocab_size)
        out.append(seq)
    return out


class TokenHistory:
    """Each row's tokens (prompt, then generated) as tensors, for penalties and bans.

    `tokens [S, L_max]` holds the prompt then the generated tokens, padded with 0; `prompt_len [S]`
    and `length [S]` delimit them. `counts [S, V]` (generated tokens, for presence/frequency) and
    `seen [S, V]` (prompt and generated, for the repetition penalty) are built from `tokens` the
    first time they are read and kept up to date by `append` from then on, so a batch in which no
    row uses a penalty never allocates them. The engine sizes `L_max` to the longest prompt plus
    max_tokens; appending past it raises an index error rather than overwriting.
    """

    def __init__(self, num_rows: int, max_len: int, vocab_size: int, device: torch.device | str = "cpu"):
        self.vocab_size = vocab_size
        self.tokens = torch.zeros((num_rows, max_len), dtype=torch.int64, device=device)  # [S, L_max]
        self.prompt_len = torch.zeros(num_rows, dtype=torch.int64, device=device)  # [S]
        self.length = torch.zeros(num_rows, dtype=torch.int64, device=device)  # [S]
        self._counts: Tensor | None = None  # [S, V] float32, once read
        self._seen: Tensor | None = None  # [S, V] bool, once read

    @classmethod
    def from_prompts(
        cls, prompts: list[list[int]], max_len: int, vocab_size: int, device: torch.device | str = "cpu"
    ) -> TokenHistory:
        """A history with one row per prompt."""
        history = cls(len(prompts), max_len, vocab_size, device)
        for row, prompt in enumerate(prompts):
            history.reset_row(row, prompt)
        return history

    @property
    def num_rows(self) -> int:
        return self.tokens.shape[0]

    @property
    def max_len(self) -> int:
        return self.tokens.shape[1]

    @property
    def generated(self) -> Tensor:
        """[S] int64: tokens generated so far per row (the step counter of its random draws)."""
        return self.length - self.prompt_len

    def _positions(self) -> Tensor:
        return torch.arange(self.max_len, device=self.tokens.device)  # [L_max]

    @property
    def counts(self) -> Tensor:
        """[S, V] float32: how often each token was generated (the prompt does not count)."""
        if self._counts is None:
            pos = self._positions()[None, :]  # [1, L_max]
            generated = (pos >= self.prompt_len[:, None]) & (pos < self.length[:, None])  # [S, L_max]
            counts = torch.zeros((self.num_rows, self.vocab_size), device=self.tokens.device)  # [S, V]
            self._counts = counts.scatter_add_(1, self.tokens, generated.float())
        return self._counts

    @property
    def seen(self) -> Tensor:
        """[S, V] bool: the token occurs in the row's prompt or output."""
        if self._seen is None:
            present = (self._positions()[None, :] < self.length[:, None]).float()  # [S, L_max]
            hits = torch.zeros((self.num_rows, self.vocab_size), device=self.tokens.device)  # [S, V]
            self._seen = hits.scatter_add_(1, self.tokens, present) > 0
        return self._seen

    def head(self, rows: int) -> TokenHistory:
        """The first `rows` rows as a history sharing this one's storage: appending to it appends
        here. Its counts / seen are rebuilt from the tokens when read (this history's are not kept)."""
        view = TokenHistory.__new__(TokenHistory)
        view.vocab_size = self.vocab_size
        view.tokens, view.prompt_len, view.length = self.tokens[:rows], self.prompt_len[:rows], self.length[:rows]
        view._counts = view._seen = None
        return view

    def select(self, rows: Tensor) -> TokenHistory:
        """A copy of `rows [r]` (int64 indices), in that order: appending to it leaves this history
        unchanged."""
        view = TokenHistory.__new__(TokenHistory)
        view.vocab_size = self.vocab_size
        view.tokens, view.prompt_len, view.length = self.tokens[rows], self.prompt_len[rows], self.length[rows]
        view._counts = None if self._counts is None else self._counts[rows]
        view._seen = None if self._seen is None else self._seen[rows]
        return view

    def reset_row(self, row: int, prompt_ids: list[int]) -> None:
        """Give slot `row` a new prompt and no generated tokens (the engine reuses slots)."""
        n = len(prompt_ids)
        if n > self.max_len:
            raise ContextLengthError("prompt", f"{n} tokens exceed the history length {self.max_len}")
        prompt = torch.tensor(prompt_ids, dtype=torch.int64, device=self.tokens.device)  # [n]
        self.tokens[row].zero_()
        self.tokens[row, :n] = prompt
        self.prompt_len[row] = n
        self.length[row] = n
        if self._counts is not None:
            self._counts[row].zero_()
        if self._seen is not None:
            self._seen[row].zero_()
            self._seen[row, prompt] = True

    def append(self, next_tokens: Tensor, active: Tensor | None = None) -> None:
        """Append one token per row: next_tokens [S] int64; rows where `active [S]` is False are
        left unchanged."""
        next_tokens = next_tokens.long()
        write_at = self.length if active is None else torch.where(active, self.length, 0)  # [S]
        index = write_at[:, None]  # [S, 1]
        value = next_tokens[:, None]  # [S, 1]
        if active is not None:
            value = torch.where(active[:, None], value, self.tokens.gather(1, index))  # [S, 1]
        self.tokens.scatter_(1, index, value)
        step = torch.ones_like(self.length) if active is None else active.long()  # [S]
        if self._counts is not None:
            self._counts.scatter_add_(1, value, step[:, None].float())
        if self._seen is not None:
            already = self._seen.gather(1, value)  # [S, 1]
            self._seen.scatter_(1, value, already | (step[:, None] > 0))
        self.length += step

    def index_select(self, rows: Tensor) -> None:
        """Reorder rows in place: row i takes the content of old row `rows[i]` (beam search)."""
        rows = rows.long()
        self.tokens.copy_(self.tokens.index_select(0, rows))  # [S, L_max]
        self.prompt_len.copy_(self.prompt_len.index_select(0, rows))  # [S]
        self.length.copy_(self.length.index_select(0, rows))  # [S]
        if self._counts is not None:
            self._counts.copy_(self._counts.index_select(0, rows))  # [S, V]
        if self._seen is not None:
            self._seen.copy_(self._seen.index_select(0, rows))  # [S, V]
