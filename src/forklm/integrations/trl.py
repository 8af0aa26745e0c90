"""A `rollout_func` for TRL's `GRPOTrainer` (written against TRL 1.16.0's contract).

TRL hands the rollout function the prompts of one generation batch, each repeated
`num_generations` times (its RepeatSampler), and the trainer; it wants back, per prompt in that
list, `prompt_ids`, `completion_ids` and `logprobs` (one float per completion token). forklm
groups identical prompts into one request with n = their count, so each prompt is prefilled once
and its samples decode over one shared copy of its K/V. The log probs are those of the processed
distribution the tokens were drawn from (penalties, temperature, top-k, top-p, min-p applied),
as vLLM's `logprobs_mode="processed_logprobs"` reports them. TRL 1.16 applies its importance-
sampling correction only with `use_vllm=True`; with a rollout_func it keeps them (for your reward
functions and logs) but does not correct by them, which is exact here only because the rollout
samples from the policy's current weights (synced every step) in float32. When the trainer's global step has moved since the last
call, the policy's weights are copied into forklm first (`LLM.update_weights`), so every rollout
is sampled from the current policy.

    from forklm import LLM
    from forklm.integrations.trl import ForkLMRollout

    trainer = GRPOTrainer(model=path, args=GRPOConfig(...), reward_funcs=..., train_dataset=...,
                          rollout_func=ForkLMRollout(LLM(path)))

Not supported yet: PEFT adapters (merge them first), multimodal prompts, tool calling inside the
rollout, and several training processes (each process would need its own forklm).
"""

from __future__ import annotations

import dataclasses
import logging
import random

from ..api import LLM
from ..errors import InvalidParameterError
from ..sampling import SamplingParams

log = logging.getLogger(__name__)

_FIELDS = {f.name for f in dataclasses.fields(SamplingParams)}


class ForkLMRollout:
    """Call it as TRL calls a rollout function: `rollout(prompts, trainer) -> dict`.

    llm: the forklm model to sample from (loaded from the same checkpoint as the policy).
    sync_weights: copy the policy's weights into `llm` whenever the trainer's step changed.
    seed: base of the per-call seeds (default: the trainer's `args.seed`), so runs repeat exactly.
    """

    def __init__(self, llm: LLM, sync_weights: bool = True, seed: int | None = None):
        if not isinstance(llm, LLM):
            raise InvalidParameterError("llm", f"expected a forklm.LLM, got {type(llm).__name__}")
        self.llm, self.sync_weights, self.seed = llm, sync_weights, seed
        self.synced_step: int | None = None  # the trainer step whose weights llm holds
        self.calls = 0

    # ---- the rollout -------------------------------------------------------------------------------
    def __call__(self, prompts: list, trainer) -> dict:
        if self.sync_weights and trainer.state.global_step != self.synced_step:
            self.sync(trainer)
        prompt_ids = self.tokenize(prompts, trainer)
        groups: dict[tuple[int, ...], list[int]] = {}  # prompt ids -> positions in `prompts`, in order
        for i, ids in enumerate(prompt_ids):
            groups.setdefault(tuple(ids), []).append(i)
        params = self.sampling_params(trainer)
        rng = random.Random((self.seed if self.seed is not None else trainer.args.seed) * 1_000_003 + self.calls)
        self.calls += 1
        outputs = self.llm.generate(
            prompt_token_ids=[list(key) for key in groups],
            sampling_params=[dataclasses.replace(params, n=len(at), seed=rng.randrange(2**31)) for at in groups.values()],
            use_tqdm=False,
        )
        completion_ids: list[list[int]] = [[] for _ in prompts]
        logprobs: list[list[float]] = [[] for _ in prompts]
        for at, out in zip(groups.values(), outputs):
            for i, sample in zip(at, out.outputs):
                completion_ids[i] = list(sample.token_ids)
                logprobs[i] = [entry[tok].logprob for entry, tok in zip(sample.logprobs, sample.token_ids)]
        return {"prompt_ids": prompt_ids, "completion_ids": completion_ids, "logprobs": logprobs}

    # ---- its parts ---------------------------------------------------------------------------------
    def sync(self, trainer) -> None:
        """Copy the trainer's policy weights into the forklm model."""
        policy = trainer.accelerator.unwrap_model(trainer.model)
        if hasattr(policy, "peft_config"):
            raise InvalidParameterError("model", "PEFT adapters are not supported by the forklm rollout yet; "
                                        "merge them into the model first")
        n = self.llm.update_weights(policy.state_dict().items())
        self.synced_step = trainer.state.global_step
        log.info("forklm rollout: %d weights synced at step %d", n, self.synced_step)

    def tokenize(self, prompts: list, trainer) -> list[list[int]]:
        """Prompt token ids exactly as the trainer itself would make them (its processing class and
        chat template), so the ids it trains on are the ones forklm sampled from."""
        tok = trainer.processing_class
        if isinstance(prompts[0], str):
            return [list(ids) for ids in tok(text=prompts)["input_ids"]]
        rendered = tok.apply_chat_template(
            conversation=prompts, chat_template=getattr(trainer, "chat_template", None), add_generation_prompt=True,
            tokenize=True, return_dict=True, **(getattr(trainer, "chat_template_kwargs", None) or {}))
        return [list(ids) for ids in rendered["input_ids"]]

    def sampling_params(self, trainer) -> SamplingParams:
        """The trainer's sampling settings (plus any of its generation_kwargs that forklm knows)."""
        args = trainer.args
        extra = args.generation_kwargs if isinstance(getattr(args, "generation_kwargs", None), dict) else {}
        unknown = sorted(set(extra) - _FIELDS)
        if unknown:
            log.warning("forklm rollout ignores generation_kwargs it does not know: %s", unknown)
        values = dict(
            temperature=trainer.temperature,
            top_p=trainer.top_p if trainer.top_p is not None else 1.0,
            top_k=trainer.top_k or 0,
            min_p=trainer.min_p or 0.0,
            repetition_penalty=trainer.repetition_penalty if trainer.repetition_penalty is not None else 1.0,
            max_tokens=trainer.max_completion_length,
            logprobs=0,
        )
        values.update({k: v for k, v in extra.items() if k in _FIELDS and k not in ("n", "seed", "logprobs")})
        return SamplingParams(**values)
