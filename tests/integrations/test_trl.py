"""The forklm rollout inside a real trl.GRPOTrainer: two optimizer steps on a tiny random Llama, one
forklm request per distinct prompt, log probs equal to the policy's own under the same processing,
and the policy's new weights synced into forklm at the next step."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from server_fixtures import make_tiny_model  # noqa: E402

import datasets  # noqa: E402  (test extras)
import trl  # noqa: E402

from forklm import LLM  # noqa: E402
from forklm.integrations.trl import ForkLMRollout  # noqa: E402

G = 4  # group size (num_generations)
PROMPTS = ["Once upon a time", "The capital of France is", "def fib(n):", "Roses are red,"]
PER_BATCH = 2  # distinct prompts per generation batch
TEMPERATURE, TOP_P, TOP_K = 0.9, 0.95, 40


def _processed_logprobs(model, prompt_ids: list[int], completion_ids: list[int]) -> torch.Tensor:
    """log p(completion token) under the policy's logits / temperature with top-k then top-p applied
    (transformers' own warpers): the distribution the rollout should have sampled from."""
    from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

    ids = torch.tensor([prompt_ids + completion_ids])
    with torch.no_grad():
        logits = model(ids).logits[0, len(prompt_ids) - 1 : -1].float()  # [T, V]: predicts each completion token
    scores = logits / TEMPERATURE
    scores = TopKLogitsWarper(TOP_K)(ids, scores)
    scores = TopPLogitsWarper(TOP_P)(ids, scores)
    return torch.log_softmax(scores, dim=-1).gather(1, torch.tensor(completion_ids)[:, None])[:, 0]


def test_grpo_trainer_with_forklm_rollout(tmp_path, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    monkeypatch.setenv("WANDB_DISABLED", "true")
    folder = make_tiny_model(tmp_path / "policy")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.eos_token
    llm = LLM(folder)
    rollout = ForkLMRollout(llm)
    requests, seen = [], []
    generate = llm.generate

    def spy_generate(*args, **kwargs):
        requests.append([p.n for p in kwargs["sampling_params"]])
        return generate(*args, **kwargs)

    llm.generate = spy_generate

    def recording_rollout(prompts, trainer):
        out = rollout(prompts, trainer)
        policy = trainer.accelerator.unwrap_model(trainer.model)
        seen.append(dict(step=trainer.state.global_step, prompts=list(prompts), out=out,
                         synced=torch.equal(llm.model.norm.weight, policy.model.norm.weight.detach())))
        return out

    def reward_length(completions, **kwargs):
        return [float(len(c)) for c in completions]

    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=PER_BATCH * G, num_generations=G,
        max_completion_length=8, max_steps=2, learning_rate=0.05, report_to="none", use_cpu=True,
        logging_steps=1, save_strategy="no", temperature=TEMPERATURE, top_p=TOP_P, top_k=TOP_K, seed=0,
        bf16=False, dataloader_num_workers=0, disable_tqdm=True)
    trainer = trl.GRPOTrainer(
        model=str(folder), reward_funcs=reward_length, args=args, processing_class=tokenizer,
        train_dataset=datasets.Dataset.from_dict({"prompt": PROMPTS}), rollout_func=recording_rollout)
    start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.train()

    assert trainer.state.global_step == 2 and [s["step"] for s in seen] == [0, 1]
    assert all(s["synced"] for s in seen)  # the rollout sampled from the policy of its step
    assert requests == [[G] * PER_BATCH] * 2  # one request per distinct prompt, n = group size
    assert not torch.equal(start["model.norm.weight"], trainer.model.state_dict()["model.norm.weight"])

    first = seen[0]
    assert len(first["out"]["completion_ids"]) == len(first["prompts"]) == PER_BATCH * G
    policy0 = AutoModelForCausalLM.from_pretrained(folder).eval()  # the step-0 policy
    assert all(torch.equal(v, policy0.state_dict()[k]) for k, v in start.items())
    worst = 0.0
    for prompt, ids, completion, lps in zip(first["prompts"], first["out"]["prompt_ids"],
                                            first["out"]["completion_ids"], first["out"]["logprobs"]):
        assert ids == tokenizer(text=prompt)["input_ids"]
        assert len(completion) == len(lps) >= 1
        want = _processed_logprobs(policy0, ids, completion)
        worst = max(worst, (torch.tensor(lps) - want).abs().max().item())
    assert worst < 1e-4, worst
    # samples of one prompt differ (each its own random stream)
    groups = [tuple(map(tuple, first["out"]["completion_ids"][i:i + G])) for i in range(0, PER_BATCH * G, G)]
    assert all(len(set(g)) > 1 for g in groups)


def test_conversational_prompts_are_tokenized_as_the_trainer_does(tmp_path, monkeypatch):
    """Chat-format prompts: the rollout renders them with the trainer's own processing class and chat
    template, so its prompt_ids are exactly TRL's (`_tokenize_prompts`)."""
    from transformers import AutoTokenizer

    monkeypatch.setenv("TRL_EXPERIMENTAL_SILENCE", "1")
    folder = make_tiny_model(tmp_path / "policy")
    tokenizer = AutoTokenizer.from_pretrained(folder)
    tokenizer.pad_token = tokenizer.eos_token
    rollout = ForkLMRollout(LLM(folder))
    seen = []

    def recording_rollout(prompts, trainer):
        out = rollout(prompts, trainer)
        seen.append((prompts, out, trainer._tokenize_prompts(prompts)[0]))
        return out

    chats = [[{"role": "user", "content": p}] for p in PROMPTS[:2]]
    args = trl.GRPOConfig(
        output_dir=str(tmp_path / "out"), per_device_train_batch_size=2 * G, num_generations=G,
        max_completion_length=6, max_steps=1, report_to="none", use_cpu=True, save_strategy="no", seed=0,
        bf16=False, disable_tqdm=True)
    trainer = trl.GRPOTrainer(
        model=str(folder), reward_funcs=lambda completions, **kw: [1.0 * len(c) for c in completions], args=args,
        processing_class=tokenizer, train_dataset=datasets.Dataset.from_dict({"prompt": chats}),
        rollout_func=recording_rollout)
    trainer.train()
    prompts, out, theirs = seen[0]
    assert [list(x) for x in theirs] == out["prompt_ids"]
    assert all("<|im_start|>assistant" in tokenizer.decode(ids) for ids in out["prompt_ids"])
    assert len(out["completion_ids"]) == len(prompts) == 2 * G
