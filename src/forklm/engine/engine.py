"""The generation engine: one `step()` = schedule -> run the model -> sample -> process outputs.

A request is one prompt with its SamplingParams. The scheduler (scheduler.py) admits it when rows
and K/V budget allow, reusing the longest cached prefix of its prompt; the runner (runner.py)
prefills the rest in chunks and decodes every live row against the shared levels above it and its
own pool row; sampling runs per row with the per-row processors; the output processor (output.py)
turns each drawn token into text, stops and deltas. `LLM.generate` drives the engine to completion;
the server drives it continuously while requests join and leave between steps.
"""

from __future__ import annotations

import logging
import time

import torch
from torch import Tensor

from ..checkpoint import apply_weight_updates
from ..compile import graphs_compiled, make_sample_fn
from ..cpu_linear import kernel_bounds
from ..errors import CapacityError, ContextLengthError, InvalidParameterError, TokenizerError
from ..kv.prefix_cache import PrefixCache
from ..kv.storage import CacheShape, KVStorage
from ..model import Transformer
from ..outputs import RequestOutput, SampleDelta
from ..sampling import (
    BeamSearchState,
    RowSpec,
    SamplingParams,
    SamplingTensors,
    TokenHistory,
    fresh_seed,
    process_logits,
    verify_draws,
)
from .output import OutputProcessor
from .runner import ModelRunner
from .scheduler import DECODE, PREFILL, Request, Scheduler
from .speculative import AdaptiveSwitch, DraftModelProposer, NgramProposer, RequestSpecState, SpeculativeConfig
from .threads import FIRST_PROBE, PROBE_EVERY, StepKind, ThreadGovernor

log = logging.getLogger(__name__)


class Engine:
    def __init__(
        self,
        model: Transformer,
        storage: KVStorage,
        shape: CacheShape,
        tokenizer=None,
        eos_token_ids: list[int] | None = None,
        compile: bool = False,
        replicated: bool = False,
        enable_prefix_caching: bool = True,
        prefill_chunk_tokens: int | None = None,
        speculative: SpeculativeConfig | None = None,
        draft_model: Transformer | None = None,
        adaptive_threads: bool = True,
    ):
        self.model, self.storage, self.shape, self.tokenizer = model, storage, shape, tokenizer
        self.eos_token_ids = list(eos_token_ids or [])
        self.vocab_size = model.config.vocab_size
        self.device = storage.device
        self.replicated = replicated
        self.prefix_cache = PrefixCache(storage, enabled=enable_prefix_caching and not replicated)
        self._chunk_tokens = prefill_chunk_tokens
        self.runner = ModelRunner(model, compile)
        self.output = OutputProcessor(tokenizer, self.eos_token_ids)
        self._sample = make_sample_fn(compile)
        self._done: dict[str, RequestOutput] = {}
        self.speculative = speculative
        self._proposer = None
        if speculative is not None:
            k = speculative.num_speculative_tokens
            if speculative.method == "ngram":
                self._proposer = NgramProposer(k, speculative.prompt_lookup_min, speculative.prompt_lookup_max,
                                               speculative.sibling_lookup)
            else:
                if draft_model is None:
                    raise InvalidParameterError("speculative_config.model", "the draft model was not given")
                self._proposer = DraftModelProposer(draft_model, k, storage.dtype, storage.device)
        self.switch = AdaptiveSwitch(speculative is not None and speculative.adaptive)
        # CPU threads per step, measured (threads.py); CUDA steps do not depend on them
        # (compiled: each thread count is another set of graphs, so the first probe waits longer)
        self.compile = compile
        self.threads = ThreadGovernor(torch.get_num_threads(), adaptive_threads and self.device.type == "cpu",
                                      first_probe=PROBE_EVERY if compile else FIRST_PROBE)
        self._spec: dict[str, RequestSpecState] = {}  # request id -> its speculation state
        self.spec_totals = RequestSpecState()  # the counters over every request (server metrics)
        self._step_count = 0
        self._size(shape)

    def resize(self, shape: CacheShape, budget_bytes: int) -> None:
        """New sizes for an idle engine (LLM grows its one engine between calls); the prefix cache stays."""
        if self.has_unfinished():
            raise RuntimeError("an engine is resized only when idle")
        row_len = shape.max_new_tokens + (shape.max_prompt_len if self.replicated else 0)
        self.storage.resize(shape, row_len, budget_bytes)
        self._size(shape)

    def _size(self, shape: CacheShape) -> None:
        self.shape = shape
        self.scheduler = Scheduler(self.storage, self.prefix_cache, shape, self.replicated, self._chunk_tokens,
                                   tails=self.speculative is None)
        S = shape.max_samples
        self._next_tokens = torch.zeros(S, dtype=torch.long, device=self.device)  # [S] token fed next step
        self._history = TokenHistory(S, shape.max_prompt_len + shape.max_new_tokens, self.vocab_size, self.device)
        self._row_specs: list[RowSpec] = [RowSpec.idle() for _ in range(S)]
        self._tensors: SamplingTensors | None = None
        if isinstance(self._proposer, DraftModelProposer):
            self._proposer.size(shape)

    def update_weights(self, updates: dict[str, Tensor]) -> None:
        """New weights (from checkpoint.weight_updates), from the next step on; every cached prefix is
        forgotten. Running requests go on over the K/V they already have."""
        try:
            apply_weight_updates(self.model, updates)
        finally:  # even a copy that failed part-way changed some weights: no cached K/V is trusted after it
            self.prefix_cache.invalidate()

    def set_eos_token_ids(self, ids: list[int]) -> None:
        """The tokens that end a sample (requests admitted from now on)."""
        self.eos_token_ids = list(ids)
        self.output.eos_token_ids = self.eos_token_ids

    # ---- requests ---------------------------------------------------------------------------------
    def check_request(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """Raise the typed error a request would get, before any work (cheap, certain limits first)."""
        shape = self.shape
        check_context(prompt_ids, params, self.model.config)
        L, T = len(prompt_ids), params.max_tokens
        if L > shape.max_prompt_len:
            raise ContextLengthError("prompt", f"{L} tokens exceed this engine's max_prompt_len ({shape.max_prompt_len})")
        if T > shape.max_new_tokens:
            raise ContextLengthError("max_tokens", f"{T} exceeds this engine's max_new_tokens ({shape.max_new_tokens})")
        n = params.num_sequences
        if n > min(shape.max_samples_per_prompt, shape.max_samples):
            fit = min(shape.max_samples_per_prompt, shape.max_samples)
            raise CapacityError(f"n={n}: the KV cache holds at most {fit} samples per prompt", max_n=fit)
        if L > self.storage.budget_tokens:
            raise CapacityError(
                f"the prompt's K/V ({L} tokens) exceeds the KV budget ({self.storage.budget_tokens} tokens "
                f"beside {shape.max_samples} sample rows)", max_n=None)
        for name, ids in (("stop_token_ids", params.stop_token_ids), ("logit_bias", list(params.logit_bias))):
            if any(not 0 <= i < self.vocab_size for i in ids):
                raise InvalidParameterError(name, f"token ids must be in [0, {self.vocab_size})")
        if (params.stop or params.bad_words) and self.tokenizer is None:
            raise TokenizerError("stop / bad_words need a tokenizer; this model has none")
        if isinstance(self._proposer, DraftModelProposer):
            ctx = self._proposer.model.config.max_position_embeddings
            if L + T > ctx:
                raise ContextLengthError("speculative_config.model", f"prompt ({L} tokens) + max_tokens ({T}) "
                                         f"exceeds the draft model's context length ({ctx})")

    def add_request(
        self, request_id: str, prompt_ids: list[int], params: SamplingParams, prompt: str | None = None
    ) -> None:
        """Validate and queue a request; raises before any work is done."""
        self.check_request(prompt_ids, params)
        sch = self.scheduler
        if request_id in sch.running or any(r.request_id == request_id for r in sch.waiting):
            raise InvalidParameterError("request_id", f"{request_id!r} is already running")
        seed = params.seed if params.seed is not None else fresh_seed()
        if self.speculative is not None:
            self._spec[request_id] = RequestSpecState()
        sch.waiting.append(Request(request_id, prompt, list(prompt_ids), params, seed, time.perf_counter()))

    def abort(self, request_id: str) -> None:
        """Drop a request; its rows stop costing work from the next step."""
        sch = self.scheduler
        sch.waiting = type(sch.waiting)(r for r in sch.waiting if r.request_id != request_id)
        req = sch.running.get(request_id)
        if req is not None:
            self._release(req, cache_samples=False)
        self._spec.pop(request_id, None)

    def has_unfinished(self) -> bool:
        return bool(self.scheduler.waiting or self.scheduler.running)

    @property
    def num_waiting(self) -> int:
        return len(self.scheduler.waiting)

    @property
    def num_running(self) -> int:
        return len(self.scheduler.running)

    @property
    def rows_in_use(self) -> int:
        return self.storage.rows_in_use

    def kv_usage(self) -> float:
        """The fraction of the K/V budget in use: rows taken by requests plus all segments."""
        st = self.storage
        total = st.pool.rows * st.pool.length + st.budget_tokens
        return (st.rows_in_use * st.pool.length + st.segment_tokens) / max(total, 1)

    def pop_output(self, request_id: str) -> RequestOutput | None:
        """The final output of a finished request (once)."""
        return self._done.pop(request_id, None)

    def warm_up(self) -> None:
        """Run, before any request, what a first request would otherwise wait for: the first step of
        each kind and, compiled, every graph the steps use (`_warm_up_batches`) at the thread count the
        steps run at and at the one the thread governor probes first: each count is another set of
        graphs, and a probe that compiled them mid-serve would stall every running request for
        seconds. For a fresh engine (the server's, before serving): the prefix cache is cleared after
        it, and its hit count left as it was."""
        if self.has_unfinished():
            raise RuntimeError("warm_up runs on an idle engine")
        counts = [self.threads.current]
        if self.compile and self.threads.enabled and self.threads.current > 1:
            counts.append(self.threads.current - 1)
        adaptive, hits = self.threads.enabled, self.prefix_cache.hit_tokens
        self.threads.enabled = False  # the counts are set here, and nothing is measured
        prompt = [0, 1, 2][: self.shape.max_prompt_len]
        try:
            for threads in counts:
                torch.set_num_threads(threads)
                for b, batch in enumerate(self._warm_up_batches()):
                    ids = [f"__warmup_{threads}_{b}_{i}__" for i in range(len(batch))]
                    for rid, params in zip(ids, batch):
                        self.add_request(rid, prompt, params)
                    while self.has_unfinished():
                        self.step()
                    for rid in ids:
                        self.pop_output(rid)
        finally:
            self.threads.enabled = adaptive
            torch.set_num_threads(self.threads.current)
            self.prefix_cache.clear()
            self.prefix_cache.hit_tokens = hits

    def _warm_up_batches(self) -> list[list[SamplingParams]]:
        """Requests decoded together, batch after batch: one greedy row (the first step of each kind) and,
        compiled, what the graphs branch on: several rows (the compiled pieces are dynamic in the batch
        from the second row, `compile.layer_fns`) and a batch above each row count where a linear
        switches kernels. (The compiled draw has one graph for greedy, sampled and mixed rows.)"""
        tokens = min(4, self.shape.max_new_tokens)
        batches = [[SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True)]]
        if not self.compile:
            return batches
        S, per = self.shape.max_samples, self.shape.max_samples_per_prompt

        def sampled(rows: int) -> list[SamplingParams]:  # `rows` rows in requests of at most `per` samples
            return [SamplingParams(n=min(per, rows - a), max_tokens=tokens, temperature=1.0, seed=0, ignore_eos=True)
                    for a in range(0, rows, per)]

        sizes = ([2] if S >= 2 else []) + [b + 1 for b in kernel_bounds(self.model) if 2 < b + 1 <= S]
        return batches + [sampled(rows) for rows in sizes]

    # ---- one step ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def step(self) -> list[SampleDelta]:
        threads = self.threads.begin_step()
        if self.threads.enabled and threads != torch.get_num_threads():
            torch.set_num_threads(threads)
        start, graphs = time.perf_counter(), graphs_compiled(self.compile)
        deltas, kind = self._step()
        if graphs_compiled(self.compile) != graphs:  # its time was mostly compiling: not a measure of the step
            self.threads.discard()
        elif kind is not None:
            self.threads.end_step(kind, time.perf_counter() - start)
        if self.threads.enabled and not self.has_unfinished() and torch.get_num_threads() != self.threads.max_threads:
            # idle: torch's count back as found, so that an engine built next (make_engine, another LLM) sees
            # the process's count, not this one's choice (it took that count as its maximum, stuck there)
            torch.set_num_threads(self.threads.max_threads)
        return deltas

    def _step(self) -> tuple[list[SampleDelta], StepKind | None]:
        """One step; returns its deltas and its kind (decode tokens, prefill tokens), None when idle."""
        start = time.perf_counter()
        sch = self.scheduler
        self._step_count += 1
        drafts = self._propose() if self._proposer is not None else {}  # pool row -> drafted tokens
        plan, admitted = sch.schedule({r: len(t) for r, t in drafts.items()} or None)
        for req in admitted:
            self._on_admit(req)
        dec_logits, dec_rows = None, []
        if plan.decode is not None:
            d = plan.decode
            dec_rows = [r for r in d.rows if sch.live[r]]
            feed = self._next_tokens[d.pool_rows]  # [N]: each row's last drawn token, then its draft
            if drafts:
                feed = feed.clone()
                feed[d.grid_index % d.max_tokens_per_row != 0] = torch.tensor(
                    [t for r in sorted(drafts) for t in drafts[r]], dtype=torch.long, device=self.device)
            dec_logits = self.runner.decode(d, self.storage.pool, feed)  # [N, V]
            if not drafts:
                sch.advance(d)
        for chunk in plan.prefills:
            req = sch.running[chunk.request_id]
            sch.chunk_done(req, chunk, self.runner.prefill(chunk))
        ready = [r for r in sch.running.values() if r.state == PREFILL and r.first_logits is not None]
        rows_out = dec_rows + [row for r in ready for row in r.rows]
        if not rows_out:
            if not plan.prefills and not sch.running and sch.waiting:  # nothing runs, nothing can start
                req = sch.waiting.popleft()
                raise CapacityError(f"request {req.request_id!r} cannot be admitted: {len(req.prompt_ids)} prompt "
                                    f"tokens and n={req.params.num_sequences} exceed what the KV budget holds "
                                    f"({self.storage.free_tokens} free tokens, {self.storage.free_rows} free rows)")
            return [], None
        # Sampling runs over pool rows 0..R-1 only (live rows are packed at the front), so its cost follows
        # the load, compiled or not (the compiled graphs are dynamic in the batch).
        R = max(rows_out) + 1
        producing = torch.zeros(R, dtype=torch.bool, device=self.device)  # [R] rows sampled this step
        producing[rows_out] = True
        grid = None
        if dec_logits is not None and drafts:  # the rows' logits position by position: [R, Q, V]
            nq = plan.decode.max_tokens_per_row
            grid = dec_logits.new_zeros(R * nq, self.vocab_size).index_copy_(0, plan.decode.grid_index, dec_logits)
            grid = grid.view(R, nq, self.vocab_size)  # [R, Q, V]
            logits = grid[:, 0].clone()  # [R, V]
        elif dec_logits is not None and plan.decode.dense and dec_logits.shape[0] == R:
            logits = dec_logits  # [R, V]: already pool rows 0..R-1 in order (a fresh tensor; no copy)
        else:
            logits = torch.zeros(R, self.vocab_size, device=self.device)  # [R, V]
            if dec_logits is not None:  # every decoded row is below R (rows_out holds them all)
                logits[plan.decode.pool_rows] = dec_logits
        for req in ready:
            logits[req.rows] = req.first_logits  # [V] broadcast to the request's n rows
            if req.params.prompt_logprobs is not None:
                req.prompt_logprobs = self.output.prompt_logprobs(
                    torch.cat(req.prompt_logits), req.prompt_ids, req.params.prompt_logprobs)
                req.prompt_logits = []
            sch.start_decoding(req)
        if self._tensors is None or self._tensors.num_rows != R:
            self._tensors = SamplingTensors.build(self._row_specs[:R], self.vocab_size, self.device)
        history = self._history.head(R)
        beams = [r for r in sch.running.values() if r.beam is not None and not r.beam_done and r.state == DECODE]
        for req in beams:  # beam search scores log-probabilities (then processors), as transformers does
            rows = self._rows(req)
            logits[rows] = torch.log_softmax(logits[rows], dim=-1)
        processed = process_logits(logits, self._tensors, history, owned=True)  # this step's own tensor
        result = self._sample(processed, self._tensors, history)
        tokens = torch.where(producing, result.tokens, self._next_tokens[:R])  # [R]
        if beams:
            self._beam_step(beams, processed, tokens)
        history.append(tokens, producing)
        self._next_tokens[:R] = tokens
        if not drafts:
            deltas = self._bookkeep(producing, [result], [])
        else:
            draft_t = torch.full((R, grid.shape[1] - 1), -1, dtype=torch.long)  # [R, Q-1]
            for r, t in drafts.items():
                draft_t[r, : len(t)] = torch.tensor(t, dtype=torch.long)
            more, kept = verify_draws(tokens, grid[:, 1:], draft_t.to(self.device), producing, self._tensors,
                                      history, self._sample)
            for req in beams:  # beams draft nothing: one token each, as in a plain step
                for row in req.rows:
                    if sch.live[row] and row in dec_rows:
                        sch.add_decoded(row, 1)
            deltas = self._bookkeep(producing, [result] + more, kept, drafts, set(dec_rows))
        if plan.decode is not None and not plan.prefills:
            self.switch.record(time.perf_counter() - start, verify=bool(drafts))
        kind = (0 if plan.decode is None else len(plan.decode.pool_rows), sum(len(c.tokens) for c in plan.prefills))
        return deltas, kind

    def _propose(self) -> dict[int, list[int]]:
        """Drafts for this step's decoding rows: {pool row: tokens}. A row drafts at most
        num_speculative_tokens, and no more than its max_tokens leaves room for after the token it
        draws anyway; beam requests and requests the adaptive switch turned off draft nothing."""
        if self.switch.plain_probe_due():
            return {}
        sch, k = self.scheduler, self.speculative.num_speculative_tokens
        wanted = []
        for req in sch.running.values():
            state = self._spec[req.request_id]
            if req.state != DECODE or req.beam is not None or not state.active(self._step_count):
                continue
            rows = [(s, min(k, req.params.max_tokens - len(s.token_ids) - 1)) for s in req.samples
                    if s.finish_reason is None and sch.live[s.row]]
            rows = [(s, n) for s, n in rows if n > 0]
            if not rows:
                continue
            slowest = min(rows, key=lambda x: len(x[0].token_ids))
            state.slowest = slowest[0].row
            wanted.append((req, [slowest] if state.probing else rows))
        if not wanted:
            return {}
        if isinstance(self._proposer, NgramProposer):
            return self._proposer.propose(
                self._history, [([(s.row, n) for s, n in rows], [s.row for s in req.samples if sch.live[s.row]])
                                for req, rows in wanted])
        drafts = self._proposer.propose([(req.request_id, req.prompt_ids, [(s.row, s.token_ids, n) for s, n in rows])
                                         for req, rows in wanted])
        return {r: t for r, t in drafts.items() if t}

    def _rows(self, req: Request) -> Tensor:
        return torch.tensor(req.rows, dtype=torch.long, device=self.device)

    def _on_admit(self, req: Request) -> None:
        req.samples = self.output.new_samples(req.params, req.rows, req.prompt_ids)
        if req.params.use_beam_search:
            req.beam = BeamSearchState.from_params([req.params], self.eos_token_ids, self.device)
        bad_words = self.output.bad_words_ids(req.params) if req.params.bad_words else []
        for s in req.samples:
            self._row_specs[s.row] = RowSpec(req.params, s.index, req.seed, self.eos_token_ids, bad_words)
            self._history.reset_row(s.row, req.prompt_ids)
        self._tensors = None

    def _beam_step(self, beams: list[Request], processed: Tensor, tokens: Tensor) -> None:
        """Pick each beam request's next k beams; reorder the sample pool and history rows by parent."""
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
            self.storage.pool.reorder(moved, source[moved])  # only the samples' own K/V move; the prompt stays
            full = torch.arange(self.shape.max_samples, device=self.device)  # [S_pool]
            full[:S] = source
            self._history.index_select(full)

    # ---- per-sample bookkeeping (Python, once per produced token) ---------------------------------
    def _bookkeep(self, producing: Tensor, results: list, kept: list[Tensor],
                  drafts: dict[int, list[int]] | None = None, verified: set[int] | None = None) -> list[SampleDelta]:
        """results[0]: the step's draws of every producing row; results[j], kept[j - 1] (verify steps):
        the draws at draft position j and the rows whose drafts matched up to there; `verified`: the
        rows the verify step decoded (their lengths grow by what they keep)."""
        now = time.perf_counter()
        steps = [self.output.step_results(r) for r in results]
        kept_rows = [k.tolist() for k in kept]
        live = set(producing.nonzero().flatten().tolist())
        deltas = []
        for req in list(self.scheduler.running.values()):
            if req.state != DECODE:
                continue
            if req.first_token_time is None:
                req.first_token_time = now
            if req.beam is not None:
                if req.beam_done:
                    hypotheses = req.beam.finalize()[0][: req.params.n]
                    req.samples = self.output.finish_beams(req.params, req.samples, hypotheses)
                    self._finish(req)
                continue
            drafted = accepted = drafting = 0
            spec = self._spec.get(req.request_id)
            slowest_kept = 1
            for s in req.samples:
                if s.finish_reason or s.row not in live:
                    continue
                row = s.row
                parts = []
                for j, (token_list, chosen_lp, top, ranks) in enumerate(steps):
                    if j > 0 and not kept_rows[j - 1][row]:
                        break
                    parts.append(self.output.append(req.request_id, req.params, s, token_list[row], chosen_lp[row],
                                                    top, ranks, row))
                    if s.finish_reason is not None:
                        break
                if verified is not None and row in verified:  # a verify step: the row keeps what it produced
                    self.scheduler.add_decoded(row, len(parts))
                if len(parts) > 1:
                    self._next_tokens[row] = parts[-1].token_ids[0]
                deltas.append(parts[0] if len(parts) == 1 else _merge(parts))
                if spec is not None and row == spec.slowest:
                    slowest_kept = len(parts)
                if drafts and row in drafts:
                    drafting += 1
                    drafted += len(drafts[row])
                    accepted += sum(1 for k in kept_rows if k[row])
                if s.finish_reason is not None:
                    self.scheduler.live[s.row] = False
            if drafting:
                spec.count(drafted, accepted, drafting)
                spec.observe(slowest_kept, self._step_count, self.switch)
                self.spec_totals.count(drafted, accepted, drafting)
            if req.finished:
                self._finish(req)
        return deltas

    def _finish(self, req: Request) -> None:
        self._release(req)
        ttft = None if req.first_token_time is None else req.first_token_time - req.arrival
        out = self.output.request_output(req, ttft)
        spec = self._spec.pop(req.request_id, None)
        if spec is not None:
            out.metrics.update(num_draft_tokens=spec.num_draft_tokens, num_accepted_tokens=spec.num_accepted_tokens,
                               num_drafts=spec.num_drafts, num_verify_steps=spec.num_verify_steps)
        self._done[req.request_id] = out

    def _release(self, req: Request, cache_samples: bool = True) -> None:
        for r in req.rows:
            self._row_specs[r] = RowSpec.idle()
        self._tensors = None
        if isinstance(self._proposer, DraftModelProposer):
            self._proposer.release(req.request_id, req.rows)
        self.scheduler.release(req, cache_samples)


def _merge(parts: list[SampleDelta]) -> SampleDelta:
    """One sample's deltas of one step (several tokens kept from a draft) as one delta."""
    last = parts[-1]
    logprobs = None if parts[0].logprobs is None else [e for p in parts for e in p.logprobs]
    return SampleDelta(last.request_id, last.index, [t for p in parts for t in p.token_ids],
                       "".join(p.text for p in parts), logprobs, last.finish_reason, last.stop_reason)


def check_context(prompt_ids: list[int], params: SamplingParams, cfg) -> None:
    """The limits that hold whatever the engine's size: a non-empty prompt of valid token ids that,
    with max_tokens, fits the model's context (and sliding window)."""
    if not prompt_ids:
        raise InvalidParameterError("prompt", "is empty")
    if min(prompt_ids) < 0 or max(prompt_ids) >= cfg.vocab_size:
        raise InvalidParameterError("prompt_token_ids", f"token ids must be in [0, {cfg.vocab_size})")
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
