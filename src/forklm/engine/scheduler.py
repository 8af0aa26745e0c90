"""The scheduler: queues, admission with reference-counted storage, and one `StepPlan` per step.

Each step it (1) continues the prompts being prefilled, a chunk each, within the step's token
budget, (2) admits waiting requests in arrival order while sample rows, running slots and K/V
budget allow: the longest cached prefix of the prompt is reused (a prefix still being prefilled
makes the request wait for it), the rest gets a new pending node, (3) describes the decode step of
every decoding row: its pool slot, position, and the shared segments above it, each listed once
with the batch rows that read it. Finished requests release their rows and unpin their nodes; a
finished sample's tokens are offered to the prefix cache as a continuation of its prompt.

A request of one sequence that prefills its own prompt node gets that node's segment with room for
its new tokens after the prompt (when the budget holds them): its row then decodes over one level
(prompt and own tokens in one attention call, no merge) instead of the pool plus the prompt. At the
end the tokens go to the prefix cache as a continuation, as from a pool row, and the room stays with the
prompt's node: the next such request on that prompt uses it again, with no copy of the prompt's K/V
(the prefix cache gives idle room back before it evicts anything). A request of a few samples with few
new tokens (n * n * max_tokens <= `INTERLEAVE_MAX_WORK`, on CPU) gets room for all of them,
interleaved: sample j's t-th token at slot p + t * n + j, read by one call masked per sample.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from torch import Tensor

from ..kv.plan import DecodePlan, PrefillChunk, StepPlan, build_decode_plan
from ..kv.prefix_cache import Node, PrefixCache, store_logits
from ..kv.storage import CacheShape, KVStorage, Segment
from ..sampling import BeamSearchState, SamplingParams
from .output import SampleState

WAITING, PREFILL, DECODE = "waiting", "prefill", "decode"
# n > 1 samples interleave after their prompt while n * n * max_tokens is at most this: the masked call
# computes every sample's slots for each one, n times the own-token work of the pool's pass, and beat
# the pool's pass plus its merge below it (benchmarks/results/tail_attention_avx512bf16.md)
INTERLEAVE_MAX_WORK = 4096
ADMITTED, BLOCKED, FULL = "admitted", "blocked", "full"


@dataclass
class Request:
    request_id: str
    prompt: str | None
    prompt_ids: list[int]
    params: SamplingParams
    seed: int
    arrival: float
    state: str = WAITING
    samples: list[SampleState] = field(default_factory=list)
    rows: list[int] = field(default_factory=list)
    node: Node | None = None  # the last node of the prompt's path (pinned while running)
    own: Node | None = None  # the node this request prefills (None when the prompt was all cached)
    scratch: Segment | None = None  # K/V of a logits-only recompute of the last prompt token
    tail: bool = False  # its rows keep their K/V after the prompt in `node`'s segment (interleaved), not in the pool
    prefilled: int = 0  # prompt tokens whose K/V exist
    first_logits: Tensor | None = None  # [V] next-token logits at the prompt's end, once known
    num_cached_tokens: int = 0
    prompt_logprobs: list | None = None
    prompt_logits: list[Tensor] = field(default_factory=list)  # [c, V] per chunk, for prompt_logprobs
    first_token_time: float | None = None
    beam: BeamSearchState | None = None
    beam_done: bool = False

    @property
    def finished(self) -> bool:
        return bool(self.samples) and all(s.finish_reason for s in self.samples)

    @property
    def cacheable(self) -> bool:
        return self.params.prompt_logprobs is None  # those need every position's logits: computed afresh


class Scheduler:
    def __init__(self, storage: KVStorage, cache: PrefixCache, shape: CacheShape, replicated: bool,
                 chunk_tokens: int | None, tails: bool = True):
        self.storage, self.cache, self.shape = storage, cache, shape
        self.replicated = replicated
        # one-sequence requests may keep their K/V after their prompt (not with a replicated pool, nor
        # when steps feed several tokens per row: speculative decoding verifies drafts in the pool)
        self.tails = tails and not replicated
        self.chunk_tokens = chunk_tokens  # prompt tokens prefilled per step (None: whole prompts)
        S = shape.max_samples
        self.dec_len = [0] * S  # tokens each pool row holds in its own slots (decoded so far)
        self.prompt_len = [0] * S
        self.live = [False] * S  # the row decodes next step
        self.waiting: deque[Request] = deque()
        self.running: dict[str, Request] = {}
        self.rooms_taken: set[Node] = set()  # prompt nodes whose room a running request's samples fill

    # ---- admission --------------------------------------------------------------------------------
    def _try_admit(self, req: Request, retry: bool = True) -> str:
        n = req.params.num_sequences
        if len(self.running) >= self.shape.max_prompts or self.storage.free_rows < n:
            return FULL
        prompt, L = req.prompt_ids, len(req.prompt_ids)
        use_cache = self.cache.enabled and req.cacheable and not self.replicated
        m = self.cache.match(prompt) if use_cache else None
        if m is not None and m.blocked:
            return BLOCKED  # a prefix of this prompt is being prefilled: wait for it
        matched = 0 if m is None else m.length + (m.partial[1] if m.partial else 0)
        need = L - matched if matched < L else (1 if self._needs_logits(m) else 0)
        if need > self.storage.free_tokens:
            protect = None if m is None else (m.partial[0] if m.partial else m.node)
            self.cache.evict(need - self.storage.free_tokens, protect=protect)
            if need > self.storage.free_tokens:
                if not retry:
                    return FULL
                # evicting the matched prefix itself may make room for the whole prompt
                self.cache.evict(need - self.storage.free_tokens)
                return self._try_admit(req, retry=False)
        parent = self.cache.root
        if m is not None:
            parent = self.cache.split(*m.partial) if m.partial else m.node
        wants_tail = self._wants_tail(req.params)
        room = n * req.params.max_tokens
        if matched < L:
            seg = None
            if wants_tail:  # room for its new tokens, if free
                seg = self.storage.allocate(L - matched + room)
                req.tail = seg is not None
                if seg is not None and n > 1:  # a sample's unwritten turns are read, masked: finite values
                    seg.kv[:, :, :, L - matched:].zero_()
            seg = seg or self.storage.allocate(L - matched)
            req.own = self.cache.insert(parent, prompt[matched:], seg, pending=True, private=not use_cache)
            req.node = req.own
        else:  # the whole prompt is cached
            req.node = parent
            req.tail = wants_tail and self._room_after(parent, n, room)
            if parent.logits is not None:
                req.first_logits = parent.logits
            else:
                req.scratch = self.storage.allocate(1)
        if req.tail:
            self.rooms_taken.add(req.node)
        req.prefilled = matched
        req.num_cached_tokens = matched
        self.cache.hit_tokens += matched
        self.cache.lock(req.node)
        req.rows = self.storage.take_rows(n)
        for row in req.rows:
            self.prompt_len[row], self.dec_len[row], self.live[row] = L, 0, False
        req.state = PREFILL
        self.running[req.request_id] = req
        return ADMITTED

    def _wants_tail(self, params: SamplingParams) -> bool:
        """Whether a request's samples should keep their K/V after its prompt: one sample, or a few with few
        new tokens on CPU (where the masked call was measured; the pool's pass serves the rest)."""
        n = params.num_sequences
        if not self.tails or params.beam_width != 1 or params.max_tokens <= 1:
            return False
        return n == 1 or (self.storage.device.type == "cpu" and n * n * params.max_tokens <= INTERLEAVE_MAX_WORK)

    def _room_after(self, node: Node, n: int, tokens: int) -> bool:
        """Room for n samples' `tokens` after a cached prompt node's K/V: the room an earlier request left
        there, or else a new segment with the room and a copy of the K/V. No room when a running request's
        samples follow the prompt there already, or when the budget lacks it."""
        p, old = len(node.tokens), node.segment
        if node.private or node.pending or node in self.rooms_taken:
            return False
        if old.capacity < p + tokens:
            if p + tokens > self.storage.free_tokens:
                return False
            seg = self.storage.allocate(p + tokens)
            seg.kv[:, :, :, :p] = old.kv[:, :, :, :p]  # [layers, 2, Hkv, p, D]
            seg.length = p
            self.storage.free(old)
            node.segment = seg
        if n > 1:  # a sample's unwritten turns are read, masked: finite values, not what the room held before
            node.segment.kv[:, :, :, p : p + tokens].zero_()
        return True

    @staticmethod
    def _needs_logits(m) -> bool:
        """The whole prompt matched: a model call is needed unless its end node kept its logits."""
        if m is None:
            return True
        if m.partial is not None:
            return True
        return m.node.logits is None

    # ---- the step ---------------------------------------------------------------------------------
    def schedule(self, extra: dict[int, int] | None = None) -> tuple[StepPlan, list[Request]]:
        """This step's plan, and the requests admitted in it. Admission comes first: matching a prompt
        may split a cached node, which replaces its segment, and every plan reads segments.
        extra: drafted tokens per decoding pool row (speculative decoding)."""
        budget = self.chunk_tokens if self.chunk_tokens is not None else 1 << 62
        admitted = []
        for req in list(self.waiting):
            if budget <= 0:
                break
            verdict = self._try_admit(req)
            if verdict == FULL:
                break
            if verdict == BLOCKED:  # waits for a prefix being prefilled; later requests may go ahead
                continue
            self.waiting.remove(req)
            admitted.append(req)
            budget -= self._next_chunk_size(req, budget)
        budget = self.chunk_tokens if self.chunk_tokens is not None else 1 << 62
        prefills: list[PrefillChunk] = []
        prefilling = [r for r in self.running.values() if r.state == PREFILL]
        for req in sorted(prefilling, key=lambda r: len(r.prompt_ids) - r.prefilled):  # shortest rest first
            if budget <= 0:
                break
            budget -= self._chunk(req, budget, prefills)
        return StepPlan(self._decode_plan(extra), prefills), admitted

    def _next_chunk_size(self, req: Request, budget: int) -> int:
        if req.first_logits is not None:
            return 0
        if req.scratch is not None:
            return 1
        return min(len(req.prompt_ids) - req.prefilled, max(budget, 0))

    def _chunk(self, req: Request, budget: int, out: list[PrefillChunk]) -> int:
        """Plan the next chunk of `req`'s prompt (at most `budget` tokens); returns its size."""
        L = len(req.prompt_ids)
        if req.first_logits is not None:
            return 0
        if req.scratch is not None:  # everything cached but the last position's logits
            path = req.node.path()
            levels = [(n.segment, len(n.tokens)) for n in path[:-1]]
            if len(path[-1].tokens) > 1:
                levels.append((path[-1].segment, len(path[-1].tokens) - 1))
            out.append(PrefillChunk(req.request_id, req.prompt_ids[-1:], L - 1, levels, req.scratch, 0, True))
            return 1
        c = min(L - req.prefilled, budget)
        own = req.own
        levels = [(n.segment, len(n.tokens)) for n in own.path()[:-1]]
        start = req.prefilled
        out.append(PrefillChunk(req.request_id, req.prompt_ids[start : start + c], start, levels, own.segment,
                                start - own.start, start + c == L, all_logits=not req.cacheable))
        return c

    def chunk_done(self, req: Request, chunk: PrefillChunk, logits: Tensor) -> bool:
        """A chunk ran (logits [V] of its last position, or [c, V]); True when the prompt is complete."""
        if req.scratch is not None:
            self.storage.free(req.scratch)
            req.scratch = None
            req.first_logits = logits
            if req.cacheable and not req.node.private:
                store_logits(req.node, logits)
            return True
        if chunk.all_logits:
            req.prompt_logits.append(logits)
            logits = logits[-1]
        req.prefilled += len(chunk.tokens)
        req.own.segment.length = req.prefilled - req.own.start
        if not chunk.last:
            return False
        req.own.pending = False
        req.first_logits = logits
        if req.cacheable and not req.own.private:
            store_logits(req.own, logits)
        return True

    def start_decoding(self, req: Request) -> None:
        """The request's first tokens were drawn: its rows decode from the next step."""
        req.state = DECODE
        if self.replicated:
            self.storage.pool.copy_in(req.rows, req.own.segment)
        for s in req.samples:
            self.live[s.row] = s.finish_reason is None

    def decode_rows(self) -> list[int]:
        """The pool rows that decode this step (every live row of a decoding request), ascending."""
        return sorted(row for r in self.running.values() if r.state == DECODE for row in r.rows if self.live[row])

    def _decode_plan(self, extra: dict[int, int] | None = None) -> DecodePlan | None:
        """extra: drafted tokens fed after the last drawn one, per pool row (speculative decoding)."""
        reqs = [r for r in self.running.values() if r.state == DECODE]
        batch = sorted(row for r in reqs for row in r.rows if self.live[row])
        if not batch:
            return None
        index = {row: i for i, row in enumerate(batch)}
        counts = [1 + (extra or {}).get(r, 0) for r in batch]
        write = [self.dec_len[r] + (self.prompt_len[r] if self.replicated else 0) for r in batch]
        positions = [self.prompt_len[r] + self.dec_len[r] for r in batch]
        readers, tails = [], {}
        if not self.replicated:
            users: dict[int, tuple[Node, int, list[int]]] = {}  # node -> (node, depth, batch rows)
            tail_rows = []
            for req in reqs:
                idx = [index[row] for row in req.rows if self.live[row]]
                if not idx:
                    continue
                for depth, node in enumerate(req.node.path()):
                    users.setdefault(id(node), (node, depth, []))[2].extend(idx)
                if req.tail:  # (batch row, sample j, own tokens so far) of each live row
                    live = [(index[row], j, self.dec_len[row]) for j, row in enumerate(req.rows) if self.live[row]]
                    tail_rows.append((req.node, len(req.rows), live))
            for node, n, live in tail_rows:  # rows whose own tokens follow their prompt in its segment
                p = len(node.tokens)
                for i, j, t in live:
                    tails[i] = (node.segment, p + t * n + j)  # sample j's turn of this step's slots
                end = max(t * n + j for _, j, t in live) + 1  # own slots read, this step's included
                owners = {i: j for i, j, _ in live}
                mine = sorted(owners)
                _, depth, idx = users[id(node)]
                if sorted(idx) == mine:  # no other row reads the prompt: one pass over it and the rows' tokens
                    del users[id(node)]
                    readers.append((depth, node.segment, p + end, mine, (p, n, owners) if n > 1 else None))
                else:  # the others read the prompt; these rows' own tokens are a level below it
                    own = Segment(node.segment.kv[:, :, :, p:], end)
                    readers.append((depth + 1, own, end, mine, (0, n, owners) if n > 1 else None))
            readers += [(depth, node.segment, len(node.tokens), idx) for node, depth, idx in users.values()]
        return build_decode_plan(batch, counts, write, positions, [self.live[r] for r in batch], readers,
                                 self.storage.device, tails)

    def advance(self, plan: DecodePlan) -> None:
        """After a plain decode step: every live row of the batch holds one more token."""
        for r in plan.pool_rows.tolist():
            if self.live[r]:
                self.dec_len[r] += 1

    def add_decoded(self, row: int, n: int) -> None:
        """After a verify step: `row` keeps the K/V of its first n fed tokens (the last drawn one and the
        accepted drafts); the rejected tail's K/V lie past its length, unread, and are overwritten later."""
        self.dec_len[row] += n

    # ---- release ----------------------------------------------------------------------------------
    def release(self, req: Request, cache_samples: bool = True) -> None:
        """Free a finished or aborted request's rows; unpin its path (caching its samples' tokens)."""
        self.running.pop(req.request_id, None)
        if req.node is None:
            return
        if cache_samples and req.state == DECODE and not self.replicated and req.beam is None:
            for s in req.samples:
                t = self.dec_len[s.row]  # decoded tokens with K/V in the row (the last one drawn has none)
                if t > 0 and self.cache.enabled and not req.node.private:
                    # views: extend copies only the part of them that the tree lacks
                    if req.tail:  # they follow the prompt in its segment, sample j at every n-th slot from p + j
                        p, n, j = len(req.node.tokens), len(req.rows), req.rows.index(s.row)
                        kv = req.node.segment.kv[:, :, :, p + j : p + j + n * (t - 1) + 1 : n]  # [layers, 2, Hkv, t, D]
                    else:
                        kv = self.storage.pool.row_kv(s.row, t)  # [layers, 2, Hkv, t, D]
                    self.cache.extend(req.node, s.token_ids[:t], kv)
        self.rooms_taken.discard(req.node)  # its room stays with the node, free for the next request
        for row in req.rows:
            self.live[row], self.dec_len[row] = False, 0
        self.storage.give_rows(req.rows)
        if req.scratch is not None:
            self.storage.free(req.scratch)
            req.scratch = None
        self.cache.unlock(req.node)
        req.node = req.own = None
        req.rows = []
