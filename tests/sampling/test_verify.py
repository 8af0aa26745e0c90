"""verify_draws (sampling/speculative.py) vs drawing the same positions one step at a time."""

from __future__ import annotations

import pytest
import torch

from forklm.sampling import RowSpec, SamplingParams, SamplingTensors, TokenHistory, process_logits, sample, verify_draws

V, Q = 37, 5
PARAMS = [SamplingParams(temperature=0.0), SamplingParams(temperature=0.8, top_p=0.9, repetition_penalty=1.3, seed=1),
          SamplingParams(temperature=1.2, top_k=7, presence_penalty=0.5, frequency_penalty=0.3, min_tokens=3),
          SamplingParams(temperature=0.7, no_repeat_ngram_size=2, min_p=0.05)]


def _setup(seed):
    torch.manual_seed(seed)
    rows = [RowSpec(p, i, 1000 + i, eos_token_ids=[0]) for i, p in enumerate(PARAMS)]
    t = SamplingTensors.build(rows, V, "cpu")
    prompts = [torch.randint(0, V, (int(torch.randint(3, 9, ()).item()),)).tolist() for _ in rows]
    logits = torch.randn(len(rows), Q, V) * 3  # [R, Q, V]
    return t, prompts, logits


def _plain(t, prompts, logits):
    """Position after position, each drawn with the history of the draws before it."""
    h = TokenHistory.from_prompts(prompts, 30, V)
    out = []
    for j in range(Q):
        res = sample(process_logits(logits[:, j], t, h), t, h)
        h.append(res.tokens)
        out.append(res)
    return torch.stack([r.tokens for r in out], 1), torch.stack([r.logprobs for r in out], 1)  # [R, Q]


@pytest.mark.parametrize("seed", range(6))
def test_kept_draws_equal_step_by_step_draws(seed):
    t, prompts, logits = _setup(seed)
    plain_tokens, plain_lp = _plain(t, prompts, logits)
    R = len(PARAMS)
    # row 0 drafts the plain tokens (all kept), row 1 breaks at draft 2, row 2 at draft 0, row 3 drafts 2 tokens
    drafts = plain_tokens[:, : Q - 1].clone()  # [R, Q-1]: draft j is fed at position j + 1
    drafts[1, 2] = (drafts[1, 2] + 1) % V
    drafts[2, 0] = (drafts[2, 0] + 1) % V
    drafts[3, 2:] = -1
    h = TokenHistory.from_prompts(prompts, 30, V)
    first = sample(process_logits(logits[:, 0], t, h), t, h)
    h.append(first.tokens)
    producing = torch.ones(R, dtype=torch.bool)
    results, kept = verify_draws(first.tokens, logits[:, 1:], drafts, producing, t, h, sample)
    kept = torch.stack(kept, 1) if kept else torch.zeros(R, 0, dtype=torch.bool)  # [R, J]
    assert kept[0].all() and len(results) == Q - 1
    assert kept[1].tolist()[:2] == [True, True] and not kept[1, 2:].any()
    assert not kept[2].any()
    assert kept[3].tolist()[:2] == [True, True] and not kept[3, 2:].any()
    for r in range(R):
        produced = [first.tokens[r].item()] + [results[j].tokens[r].item() for j in range(kept.shape[1]) if kept[r, j]]
        lps = [first.logprobs[r].item()] + [results[j].logprobs[r].item() for j in range(kept.shape[1]) if kept[r, j]]
        m = len(produced)
        assert produced == plain_tokens[r, :m].tolist()  # the draws are plain decoding's, mismatch included
        assert torch.allclose(torch.tensor(lps), plain_lp[r, :m])
        assert h.length[r].item() == len(prompts[r]) + m  # exactly the produced tokens were appended


def test_rows_not_producing_draw_nothing():
    t, prompts, logits = _setup(0)
    h = TokenHistory.from_prompts(prompts, 30, V)
    drafts = torch.zeros(len(PARAMS), Q - 1, dtype=torch.long)
    results, kept = verify_draws(torch.zeros(len(PARAMS), dtype=torch.long), logits[:, 1:], drafts,
                                 torch.zeros(len(PARAMS), dtype=torch.bool), t, h, sample)
    assert results == [] and kept == [] and h.length.tolist() == [len(p) for p in prompts]
