"""Prompt lookup ("ngram") drafts: the tokens that followed the latest earlier occurrence of the
sample's last few tokens, in its own prompt and output, else in its sibling samples' outputs (they
share the prompt and often its phrasing). No model runs: a draft costs a few array compares."""

from __future__ import annotations

import numpy as np

from ...sampling import TokenHistory


def lookup_draft(seq: np.ndarray, k: int, n_min: int, n_max: int, corpus: np.ndarray | None = None) -> list[int]:
    """Up to k tokens that followed the best earlier match of seq's suffix n-gram (n_min <= n <= n_max):
    the longest match, the latest among equals. Matches are looked up in `corpus` (default: seq itself,
    where a match must end before seq's last token). seq, corpus: 1-D int64 arrays."""
    L = len(seq)
    src = seq if corpus is None else corpus
    if L < n_min or len(src) < 2:
        return []
    cand = np.flatnonzero(src[: len(src) - 1] == seq[-1])  # [C] positions matching the last token, with a next one
    if corpus is None:
        cand = cand[cand < L - 1]
    if cand.size == 0:
        return []
    length = np.ones(cand.size, dtype=np.int64)  # [C] matched suffix length ending at each candidate
    alive = np.ones(cand.size, dtype=bool)
    for back in range(1, min(n_max, L)):
        idx = cand - back
        ok = alive & (idx >= 0) & (src[np.maximum(idx, 0)] == seq[L - 1 - back])
        if not ok.any():
            break
        length += ok
        alive = ok
    best = np.flatnonzero(length == length.max())
    if length.max() < n_min:
        return []
    p = int(cand[best[-1]])
    return src[p + 1 : p + 1 + k].tolist()


class NgramProposer:
    def __init__(self, k: int, n_min: int, n_max: int, sibling_lookup: bool):
        self.k, self.n_min, self.n_max, self.sibling_lookup = k, n_min, n_max, sibling_lookup

    def propose(self, history: TokenHistory, requests: list[tuple[list[tuple[int, int]], list[int]]]) -> dict[int, list[int]]:
        """requests: (rows to draft for with the most tokens each may take, every live row of the request)
        -> {pool row: draft}. Reads each row's prompt and drawn tokens from `history`."""
        tokens = history.tokens.cpu().numpy()  # [S, L_max]
        length = history.length.tolist()
        prompt_len = history.prompt_len.tolist()
        drafts = {}
        for rows, siblings in requests:
            for row, k in rows:
                seq = tokens[row, : length[row]]
                draft = lookup_draft(seq, k, self.n_min, self.n_max)
                if not draft and self.sibling_lookup:
                    for sib in siblings:
                        if sib != row and length[sib] > prompt_len[sib]:
                            draft = lookup_draft(seq, k, self.n_min, self.n_max, tokens[sib, prompt_len[sib] : length[sib]])
                            if draft:
                                break
                if draft:
                    drafts[row] = draft
        return drafts
