"""BeamSearchState against transformers' generate(num_beams=k, do_sample=False) on a tiny random
Llama: forklm's state is driven by the same model's logits (each beam's full prefix recomputed at
every step, as transformers does with use_cache=False), and the returned sequences and scores must
match."""

from __future__ import annotations

import pytest
import torch

from forklm.errors import InvalidParameterError
from forklm.sampling import BeamSearchState, SamplingParams

PROMPTS = [[5, 17, 99, 3, 42, 8], [77, 1, 64, 64, 12, 30]]
PAD = 3  # nonzero: transformers fills with the EOS when pad_token_id is 0 (falsy)
MAX_NEW = 12
# Token 97 occurs in the middle of both requests' best beams (found by a run whose EOS, 127, never
# occurs), so with EOS = 97 hypotheses finish at different lengths.
EOS_HIT, EOS_UNUSED = 97, 127
EOS_NEVER_DIFFERS = 109


@pytest.fixture(scope="module")
def model():
    import transformers as tf

    torch.manual_seed(0)
    config = tf.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                            num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=128,
                            bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = tf.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        model.lm_head.weight.mul_(8.0)  # distinct beams, few near-ties
    return model


def transformers_beams(model, k, n, eos, early_stopping, length_penalty):
    ids = torch.tensor(PROMPTS)
    with torch.no_grad():
        out = model.generate(ids, attention_mask=torch.ones_like(ids), num_beams=k, num_return_sequences=n,
                             do_sample=False, max_new_tokens=MAX_NEW, eos_token_id=eos, pad_token_id=PAD,
                             early_stopping=early_stopping, length_penalty=length_penalty, use_cache=False,
                             output_scores=True, return_dict_in_generate=True)
    generated = out.sequences[:, len(PROMPTS[0]) :]  # [R*n, T]
    return generated.view(len(PROMPTS), n, -1), out.sequences_scores.view(len(PROMPTS), n)


def forklm_beams(model, k, n, eos, early_stopping, length_penalty):
    R = len(PROMPTS)
    state = BeamSearchState(R, k, MAX_NEW, [eos], length_penalty, early_stopping, n)
    seqs = torch.tensor(PROMPTS).repeat_interleave(k, dim=0)  # [R*k, L]: request r's beams are rows r*k..
    steps = 0
    with torch.no_grad():
        while True:
            logits = model(seqs).logits[:, -1].float()  # [R*k, V]
            out = state.step(torch.log_softmax(logits, dim=-1))
            seqs = torch.cat([seqs[out.parent_rows], out.next_tokens[:, None]], dim=1)  # [R*k, L+t+1]
            steps += 1
            if bool(out.done.all()):
                break
    return state.finalize(), steps


CASES = [
    (k, n, eos, early, lp)
    for k, n in [(2, 2), (4, 3)]
    for eos in [EOS_HIT, EOS_UNUSED]
    for early in [True, False, "never"]
    for lp in [1.0]
] + [
    (4, 4, EOS_HIT, "never", 2.0),
    (4, 2, EOS_HIT, False, -1.0),
    (2, 1, EOS_HIT, True, 0.0),
    # with EOS = 109, k = 4, "never" returns other hypotheses than False (its bound uses max_tokens)
    (4, 4, EOS_NEVER_DIFFERS, False, 1.0),
    (4, 4, EOS_NEVER_DIFFERS, "never", 1.0),
]


@pytest.mark.parametrize("k,n,eos,early,lp", CASES, ids=[f"k{c[0]}-n{c[1]}-eos{c[2]}-{c[3]}-lp{c[4]}" for c in CASES])
def test_matches_transformers(model, k, n, eos, early, lp):
    theirs, their_scores = transformers_beams(model, k, n, eos, early, lp)
    ours, steps = forklm_beams(model, k, n, eos, early, lp)
    assert steps <= MAX_NEW
    width = theirs.shape[-1]
    for r in range(len(PROMPTS)):
        assert len(ours[r]) == n
        for j, (tokens, score) in enumerate(ours[r]):
            padded = tokens + [PAD] * (width - len(tokens))
            assert padded == theirs[r, j].tolist(), (r, j, tokens, theirs[r, j].tolist())
            assert score == pytest.approx(float(their_scores[r, j]), abs=1e-5)
            if len(tokens) < MAX_NEW:
                assert tokens[-1] == eos  # a shorter hypothesis ended with the EOS, which it keeps


def test_eos_actually_ends_hypotheses(model):
    """The EOS_HIT cases really finish hypotheses early (so the comparison covers EOS handling)."""
    ours, _ = forklm_beams(model, 4, 4, EOS_HIT, False, 1.0)
    assert any(len(tokens) < MAX_NEW for hyps in ours for tokens, _ in hyps)


def test_done_requests_are_frozen_and_parents_are_identity():
    R, k, V = 2, 2, 6
    state = BeamSearchState(R, k, max_tokens=[1, 3], eos_token_ids=[[5], [5]], num_return=[1, 2])
    logprobs = torch.log_softmax(torch.randn(R * k, V, generator=torch.Generator().manual_seed(0)), -1)
    first = state.step(logprobs)
    assert first.done.tolist() == [True, False]  # request 0 reached its max_tokens=1
    frozen = state.finished_tokens[0].clone(), state.finished_scores[0].clone()
    second = state.step(logprobs)
    assert second.parent_rows[:k].tolist() == [0, 1]  # a done request keeps its rows in place
    assert torch.equal(state.finished_tokens[0], frozen[0]) and torch.equal(state.finished_scores[0], frozen[1])
    result = state.finalize()
    assert len(result[0]) == 1 and len(result[0][0][0]) == 1 and len(result[1]) == 2


def test_from_params():
    params = [SamplingParams(beam_width=3, temperature=0.0, n=2, max_tokens=5, early_stopping="never",
                             stop_token_ids=[9]),
              SamplingParams(beam_width=3, temperature=0.0, max_tokens=7, ignore_eos=True, length_penalty=0.5)]
    state = BeamSearchState.from_params(params, eos_token_ids=[2])
    assert state.num_return == [2, 1] and state.max_tokens.tolist() == [5, 7]
    assert state.eos[0][state.eos_valid[0]].tolist() == [2, 9] and not state.eos_valid[1].any()
    with pytest.raises(InvalidParameterError) as e:
        BeamSearchState.from_params([params[0], SamplingParams(beam_width=2, temperature=0.0)], [2])
    assert e.value.field == "beam_width"
