"""Drafts from a smaller model that shares the target's vocabulary, with a bifurcated cache of its own:
each request's prompt is one segment, read once per step for all its samples, and each sample's own
tokens sit in the draft pool row of the same index as its target row. Drafts are greedy (the draft
model's argmax); whether a draft is kept is decided by the target alone, so they only change speed.

Rollback is by length: the draft row remembers which tokens its K/V hold, and each step keeps the
longest prefix that the sample's real tokens still agree with; the rest is overwritten.
"""

from __future__ import annotations

import torch

from ...kv.plan import PrefillChunk, build_decode_plan
from ...kv.storage import CacheShape, KVStorage, Segment, bytes_per_token
from ...model import Transformer
from ..runner import ModelRunner


class DraftModelProposer:
    def __init__(self, model: Transformer, k: int, dtype: torch.dtype, device):
        self.model, self.k, self.dtype, self.device = model, k, dtype, torch.device(device)
        self.runner = ModelRunner(model, compile=False)
        self.storage: KVStorage | None = None
        self._prompts: dict[str, Segment] = {}  # request id -> the draft K/V of its prompt
        self._kv: list[list[int]] = []  # per pool row: the sample tokens whose draft K/V the row holds
        self._ok: list[int] = []  # per pool row: how many of them are known to agree with the sample

    def size(self, shape: CacheShape) -> None:
        """Storage for `shape` (an idle engine): every prompt resident at once, rows with room for k drafts."""
        cfg = self.model.config
        row_len = shape.max_new_tokens + self.k + 1
        budget = bytes_per_token(cfg, self.dtype) * (shape.max_samples * row_len
                                                     + shape.max_prompts * shape.max_prompt_len)
        for seg in self._prompts.values():
            self.storage.free(seg)
        self._prompts = {}
        self.storage = KVStorage(cfg, shape, row_len, budget, self.dtype, self.device)
        self._kv = [[] for _ in range(shape.max_samples)]
        self._ok = [0] * shape.max_samples

    def release(self, request_id: str, rows: list[int]) -> None:
        seg = self._prompts.pop(request_id, None)
        if seg is not None:
            self.storage.free(seg)
        for r in rows:
            self._kv[r], self._ok[r] = [], 0

    @torch.inference_mode()
    def propose(self, requests: list[tuple[str, list[int], list[tuple[int, list[int], int]]]]) -> dict[int, list[int]]:
        """requests: (request id, prompt ids, [(pool row, the sample's drawn tokens, most tokens to draft)])
        -> {pool row: draft}. The first pass feeds each row the tokens its draft K/V lack (the last one
        drawn, and the last draft when the target kept them all), each later pass the token just drafted."""
        entries = []  # (pool row, most tokens to draft, request index), ascending by row
        counts, write, positions, feed = {}, {}, {}, {}
        for q, (rid, prompt, samples) in enumerate(requests):
            if rid not in self._prompts:
                self._prefill(rid, prompt)
            for row, drawn, k in samples:
                kv, ok = self._kv[row], self._ok[row]
                while ok < len(kv) and ok < len(drawn) and kv[ok] == drawn[ok]:
                    ok += 1
                pending = list(drawn[ok:])  # never empty: the last drawn token has no K/V
                del kv[ok:]
                kv += pending
                self._ok[row] = len(kv)
                counts[row], write[row], positions[row], feed[row] = len(pending), ok, len(prompt) + ok, pending
                entries.append((row, k, q))
        entries.sort()
        drafts: dict[int, list[int]] = {row: [] for row, _, _ in entries}
        for i in range(max((k for _, k, _ in entries), default=0)):
            batch = [row for row, _, _ in entries]
            readers = []
            for q, (rid, prompt, _) in enumerate(requests):
                idx = [b for b, (_, _, rq) in enumerate(entries) if rq == q]
                if idx:
                    readers.append((0, self._prompts[rid], len(prompt), idx))
            c = [counts[r] for r in batch]
            plan = build_decode_plan(batch, c, [write[r] for r in batch], [positions[r] for r in batch],
                                     [True] * len(batch), readers, self.device)
            tokens = torch.tensor([t for r in batch for t in feed[r]], dtype=torch.long, device=self.device)  # [N]
            logits = self.runner.decode(plan, self.storage.pool, tokens)  # [N, V]
            last = torch.tensor(c, device=self.device).cumsum(0) - 1  # [B] each row's last fed token
            best = logits[last].argmax(dim=-1).tolist()  # [B] the draft model's next token per row
            for row, t in zip(batch, best):
                drafts[row].append(t)
            entries = [e for e in entries if e[1] > i + 1]  # rows that draft one more token
            for row, _, _ in entries:  # the token just drafted is fed next, and gets its K/V
                write[row] += counts[row]
                positions[row] += counts[row]
                counts[row], feed[row] = 1, [drafts[row][-1]]
                self._kv[row].append(drafts[row][-1])
            if not entries:
                break
        return drafts

    def _prefill(self, request_id: str, prompt: list[int]) -> None:
        seg = self.storage.allocate(len(prompt))
        self.runner.prefill(PrefillChunk(request_id, list(prompt), 0, [], seg, 0, True))
        seg.length = len(prompt)
        self._prompts[request_id] = seg
