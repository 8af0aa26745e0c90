"""The step plan: what one engine step computes, as plain data built once per step by the scheduler
and handed to the model runner and the attention backends as an argument (never state on a cache).

Decode: a batch of B sample rows (one query token each). Every row reads its own row of the sample
pool (the sample level) and every shared segment on its path (system prompt -> prompt -> ...), each
segment once for all the rows below it: a `LevelPass` names the segment, how many of its tokens are
valid, and the batch rows that attend to it (a slice when they are contiguous, which the scheduler
arranges by handing out a request's rows together). The passes at one depth of the tree cover
disjoint rows, so a `LevelGroup` runs them as one batched kernel call (each segment still read once)
and folds the result into its rows with one merge: the cost of a level is one call per depth, not
one per segment (4 system prompts x 8 questions: 2 calls per layer instead of 36).

A row may keep its own K/V after its prompt instead, in the prompt's segment (a `TailWrite`): a
request of one sample whose prompt it prefilled itself gets a segment with room for its new tokens,
so that its decode reads one level (prompt and own tokens in one kernel call, no merge) instead of
two. Such a row reads nothing from the pool. A request of a few samples with few new tokens keeps
them there too, interleaved (`Interleave`): slot p + t * n + j holds sample j's t-th token, and one
masked kernel call reads the prompt and every sample's own tokens (what it computes for the other
samples' slots, masked, is cheaper than a second level and its merge while n * n * max_tokens is small:
docs/architecture.md).

Prefill: chunks of prompt tokens, each attending to the cached levels above it and causally to
itself; its K/V land in `own` at `own_offset`.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from .storage import Segment


@dataclass(frozen=True)
class Interleave:
    """A segment whose keys from `start` on are its rows' own, in turn: key start + t * stride + owners[r]
    is the t-th own token of the pass's r-th row (its sample's index in the request); the keys before
    `start` (the prompt) are every row's."""

    start: int
    stride: int
    owners: tuple[int, ...]  # per row of the pass, in batch order


@dataclass
class LevelPass:
    segment: Segment
    length: int  # valid tokens of the segment
    rows: slice | Tensor  # batch rows attending to it: a slice, or an int64 index [R]
    num_rows: int
    interleave: Interleave | None = None  # rows reading only their own keys after `start` (in a group alone)


@dataclass
class LevelGroup:
    """Passes with disjoint rows (one depth of the tree), run as one batched call of P segments."""

    passes: list[LevelPass]
    rows: slice | Tensor  # every pass's rows, pass after pass: a slice, or an int64 index [U]
    lengths: Tensor  # [P] int64: valid tokens of each segment
    width: int  # the longest of them
    query_index: Tensor | None  # [P, M] int64: batch row of each (pass, slot); B (a zero row) pads
    out_index: Tensor | None  # [U] int64: where each of `rows` lands in the flat [P * M] output
    depth: int = 0  # of its passes in the tree: at depth 0 with no pool pass, a row's first part

    @classmethod
    def of(cls, passes: list[LevelPass], batch: int, device, depth: int = 0) -> "LevelGroup":
        """The group of `passes` for a batch of `batch` rows (row `batch` is the padding query)."""
        lengths = torch.tensor([lp.length for lp in passes], dtype=torch.long, device=device)  # [P]
        width = max(lp.length for lp in passes)
        if len(passes) == 1:  # one segment, read in place: no padding, no indices
            return cls(passes, passes[0].rows, lengths, width, None, None, depth)
        if any(lp.interleave is not None for lp in passes):
            raise ValueError("an interleaved pass is a group of its own")
        idx = [_as_list(lp.rows) for lp in passes]
        m = max(map(len, idx))
        query = [i + [batch] * (m - len(i)) for i in idx]
        out = [p * m + j for p, i in enumerate(idx) for j in range(len(i))]
        t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
        flat = [r for i in idx for r in i]
        rows = slice(flat[0], flat[-1] + 1) if flat == list(range(flat[0], flat[-1] + 1)) else t(flat)
        return cls(passes, rows, lengths, width, t(query), t(out), depth)


def _as_list(rows: slice | Tensor) -> list[int]:
    return list(range(rows.start, rows.stop)) if isinstance(rows, slice) else rows.tolist()


@dataclass(frozen=True)
class TailWrite:
    """A batch row whose K/V follow its prompt in the prompt's segment: this step's token goes to `slot`
    (the row's own slots after the prompt, or its turn of them when a request's samples interleave)."""

    token: int  # the query token (one per such row)
    segment: Segment
    slot: int


@dataclass
class DecodePlan:
    """One decode step over B batch rows, each feeding one query token (plain decoding) or several
    (a drafted run verified at once: the row's last drawn token, then its draft). Query tokens are
    laid out row after row, N in all (N = B with one token each); per-token fields are [N]."""

    pool_rows: Tensor  # [N] int64: the pool row of each query token, ascending (a row's tokens adjacent)
    positions: Tensor  # [N] int64: the position of each token
    write_pos: Tensor  # [N] int64: where each token's K/V go in its pool row
    pool_len: Tensor  # [R] int64: valid keys of pool rows 0..R-1 after the writes (0: not in the batch)
    window: int  # slots of the pool rows read (the longest valid length)
    dense: bool  # one token per row and the batch is exactly pool rows 0..R-1, in order
    levels: list[LevelPass] = field(default_factory=list)  # every shared segment read this step (token rows)
    groups: list[LevelGroup] = field(default_factory=list)  # the same passes, batched by depth
    query_len: Tensor | None = None  # [R, Q] int64: valid pool keys of each row's j-th token (causal
    #                                  among a row's new tokens; padding sees its row's first key); None when Q = 1
    grid_index: Tensor | None = None  # [N] int64: r * Q + j, each token's place in the [R, Q] grid
    counts: list[int] = field(default_factory=list)  # query tokens of each batch row
    rows: list[int] = field(default_factory=list)  # the pool row of each batch row (host), ascending
    tails: list[TailWrite] = field(default_factory=list)  # rows writing after their prompt, not in the pool
    pool_tokens: Tensor | None = None  # [N'] int64: the tokens written to the pool when some rows are tails
    write_slot: int | None = None  # dense, no tails, and every row writes this one slot (samples in lockstep)

    @property
    def pool_pass(self) -> bool:
        """Some row reads the pool (a row keeping its K/V in its prompt's segment reads nothing there)."""
        return self.window > 0

    @property
    def may_be_empty(self) -> bool:
        """A row's first level may have no key: the pool pass of a tail row in a mixed batch, or an empty
        segment first when no row reads the pool. The merges then take the guarded path."""
        if self.pool_pass:
            return bool(self.tails)
        return not self.groups or any(bool((g.lengths == 0).any()) for g in self.groups if g.depth == 0)

    @property
    def num_rows(self) -> int:
        return self.pool_rows.shape[0]

    @property
    def max_tokens_per_row(self) -> int:
        return 1 if self.query_len is None else self.query_len.shape[1]


def build_decode_plan(batch: list[int], counts: list[int], write: list[int], positions: list[int],
                      live: list[bool], readers: list[tuple[int, Segment, int, list[int]]], device,
                      tails: dict[int, tuple[Segment, int]] | None = None) -> DecodePlan:
    """The decode plan of pool rows `batch` (ascending). Batch row i feeds counts[i] tokens, the first
    at slot write[i] of its pool row and position positions[i]; live[i] is False for an idle row of a
    dense batch (it computes, nothing reads it). readers: (depth, segment, valid length, batch rows
    reading it) for every shared segment above the rows, and a fifth item (start, stride, {batch row:
    owner}) for a segment whose keys from `start` on interleave its rows' own (`Interleave`). tails:
    batch row -> (its prompt's segment, the slot of this step's token there) for rows that keep their
    K/V after their prompt (one token each); their own segment is among the readers, with the token
    counted in its length, and every such row reads a segment at depth 0."""
    tails = tails or {}
    if tails and max(counts) > 1:
        raise ValueError("a row keeping its K/V in its prompt's segment feeds one token per step")
    start, tok_rows, tok_pos, tok_write = [], [], [], []
    for r, c, w, p in zip(batch, counts, write, positions):
        start.append(len(tok_rows))
        tok_rows += [r] * c
        tok_pos += range(p, p + c)
        tok_write += range(w, w + c)
    R, Q = batch[-1] + 1, max(counts)
    pool_len = [0] * R
    for i, (r, c, w, alive) in enumerate(zip(batch, counts, write, live)):
        if alive and i not in tails:
            pool_len[r] = w + c
    window = max(pool_len)
    t = lambda x: torch.tensor(x, dtype=torch.long, device=device)  # noqa: E731
    query_len = grid = None
    if Q > 1:
        grid_len = [[1] * Q for _ in range(R)]  # [R][Q]
        for r, c, w in zip(batch, counts, write):
            grid_len[r] = [w + j + 1 for j in range(c)] + [max(w, 0) + 1] * (Q - c)
        query_len = t(grid_len)  # [R, Q]
        grid = t([r * Q + j for r, c in zip(batch, counts) for j in range(c)])  # [N]
    by_depth: dict[tuple[int, int], list[LevelPass]] = {}  # (depth, 0), or (depth, i) for interleaved pass i
    levels = []
    for ri, (depth, segment, length, idx, *extra) in enumerate(readers):
        toks = [k for i in sorted(idx) for k in range(start[i], start[i] + counts[i])]
        sel = slice(toks[0], toks[-1] + 1) if toks[-1] - toks[0] + 1 == len(toks) else t(toks)
        il = None
        if extra and extra[0] is not None:
            first, stride, owners = extra[0]
            il = Interleave(first, stride, tuple(owners[i] for i in sorted(idx)))
        levels.append(LevelPass(segment, length, sel, len(toks), il))
        by_depth.setdefault((depth, 0 if il is None else ri + 1), []).append(levels[-1])
    groups = [LevelGroup.of(passes, len(tok_rows), device, key[0]) for key, passes in sorted(by_depth.items())]
    dense = Q == 1 and batch == list(range(R))
    tail_writes = [TailWrite(i, seg, slot) for i, (seg, slot) in sorted(tails.items())]
    pool_tokens = t([i for i in range(len(batch)) if i not in tails]) if tails else None
    if tails and window == 0:  # no pool pass: the depth-0 levels are every row's first part
        first = sum(lp.num_rows for g in groups if g.depth == 0 for lp in g.passes)
        assert groups and first == len(tok_rows), "a tail row reads no depth-0 level"
    write_slot = write[0] if dense and not tails and len(set(write)) == 1 else None
    return DecodePlan(t(tok_rows), t(tok_pos), t(tok_write), t(pool_len), window, dense, levels, groups,
                      query_len, grid, list(counts), list(batch), tail_writes, pool_tokens, write_slot)


@dataclass
class PrefillChunk:
    request_id: str
    tokens: list[int]  # the chunk's prompt tokens
    start: int  # position of the first one
    levels: list[tuple[Segment, int]]  # cached segments above the own segment, with valid lengths
    own: Segment  # where the chunk's K/V are written (and what it attends to causally)
    own_offset: int  # the chunk's first slot in `own` (earlier slots: earlier chunks of this prompt)
    last: bool  # the chunk ends the prompt: its last position's logits start the samples
    all_logits: bool = False  # every position's logits (prompt_logprobs)


@dataclass
class StepPlan:
    decode: DecodePlan | None
    prefills: list[PrefillChunk]
    decode_request_ids: list[str] = field(default_factory=list)
