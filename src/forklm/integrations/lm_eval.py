"""forklm as a model of EleutherAI's lm-evaluation-harness (written against lm-eval 0.4.13).

Importing this module registers the model name "forklm" in the harness's registry:

    import lm_eval, forklm.integrations.lm_eval
    lm_eval.simple_evaluate(model="forklm", model_args="pretrained=PATH,dtype=float32", tasks=[...])

The harness discovers models only among its own modules, so on the command line run it through
`forklm-lm-eval`, the harness's own CLI with this module imported first:

    forklm-lm-eval --model forklm --model_args pretrained=PATH --tasks TASK

What each request type does:
- loglikelihood: context + continuation tokenized as the harness's HF model does (`_encode_pair`),
  scored with prompt log probs (no sampling), batched by total tokens; is_greedy when every
  continuation token is the most likely one. Over-long pairs are cut from the left to max_length + 1
  tokens, as the harness's HF model cuts them; max_length is at most the model's context - 2 (forklm
  scores the sequence and generates one token after it).
- loglikelihood_rolling: the harness's disjoint rolling windows of the model's context, each scored
  the same way, summed.
- generate_until: the harness's `until` strings become stop strings; identical requests (a task's
  `repeats`, for pass@k) become one forklm request with n = their count, prefilled once and decoded
  over one shared copy of the context. do_sample=False (the default) is greedy.

Not supported yet: several ranks (data parallel), multimodal tasks, loglikelihood through
a chat template's assistant prefix beyond what the harness itself renders.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence

import torch

import lm_eval.models  # noqa: F401  (the harness's own models first: it loads them only into an empty registry)
from lm_eval import utils as lm_utils
from lm_eval.api.model import TemplateLM
from lm_eval.api.registry import register_model
from lm_eval.models.utils import normalize_gen_kwargs

from ..api import LLM
from ..errors import InvalidParameterError
from ..sampling import SamplingParams

log = logging.getLogger(__name__)

#: The harness's generation arguments forklm takes (beyond until / max_gen_toks / do_sample / temperature).
_GEN_KWARGS = {"top_p": float, "top_k": int, "min_p": float, "repetition_penalty": float,
               "presence_penalty": float, "frequency_penalty": float}
#: Bytes of prompt logits (float32 [tokens, vocab]) one scoring batch may hold.
SCORING_LOGITS_BYTES = 512 * 2**20


def _flag(value) -> bool:
    return value if isinstance(value, bool) else str(value).lower() in ("1", "true", "yes")


@register_model("forklm")
class ForkLMEval(TemplateLM):
    """pretrained: a Hugging Face folder, a .gguf file or None (the embedded model); dtype / device /
    kv_cache_memory / enable_prefix_caching as for `forklm.LLM`; max_length: the context used for
    scoring and truncation (default: the model's); max_gen_toks: the default generation length;
    add_bos_token: prepend BOS when encoding (default: as the tokenizer does); seed: of sampled
    generations."""

    def __init__(self, pretrained: str | None = None, dtype: str = "float32", device: str = "cpu",
                 max_length: int | None = None, max_gen_toks: int = 256, add_bos_token: bool | None = None,
                 seed: int = 1234, kv_cache_memory: float | None = None, enable_prefix_caching: bool = True,
                 batch_size=None, max_batch_size=None, **unused):
        super().__init__()
        if unused:
            log.warning("forklm lm-eval model: ignoring arguments %s", sorted(unused))
        device = device or "cpu"
        if str(device).startswith("cuda") and not torch.cuda.is_available():  # the harness CLI's default is cuda
            log.warning("forklm lm-eval model: CUDA is not available, running on the CPU")
            device = "cpu"
        self.llm = LLM(pretrained, dtype=dtype, device=device, kv_cache_memory=None if kv_cache_memory is None
                       else float(kv_cache_memory), enable_prefix_caching=_flag(enable_prefix_caching))
        if self.llm.tokenizer is None:
            raise InvalidParameterError("pretrained", f"{self.llm.source} has no tokenizer; lm-eval needs one")
        self._tok = self.llm.tokenizer
        # a scored sequence is max_length + 1 tokens (the harness's window: max_length of context for the
        # last token), and forklm generates one token after it: so at most the model's context - 2
        longest = self.llm.config.max_position_embeddings - 2
        self._max_length = min(int(max_length), longest) if max_length is not None else longest
        if max_length is not None and int(max_length) > longest:
            log.warning("forklm lm-eval model: max_length %s lowered to %d (the model's context - 2)", max_length, longest)
        self.max_gen_toks, self.seed = int(max_gen_toks), int(seed)
        self.add_bos_token = None if add_bos_token is None else _flag(add_bos_token)
        self._pretrained = str(pretrained) if pretrained is not None else self.llm.source

    # ---- what the harness asks of a model -----------------------------------------------------------
    @property
    def eot_token_id(self) -> int:
        return self.llm.eos_token_ids[0] if self.llm.eos_token_ids else self._tok.eos_token_ids[0]

    @property
    def prefix_token_id(self) -> int:
        return self._tok.bos_token_id if self._tok.bos_token_id is not None else self.eot_token_id

    @property
    def max_length(self) -> int:
        return self._max_length

    @property
    def tokenizer_name(self) -> str:
        return self._pretrained.replace("/", "__")

    def chat_template(self, chat_template: bool | str = False) -> str | None:
        if chat_template is False or chat_template is None:
            return None
        return chat_template if isinstance(chat_template, str) else self._tok.chat_template

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return self._tok.apply_chat_template(chat_history, add_generation_prompt=add_generation_prompt)

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs) -> list[int]:
        if add_special_tokens is None:
            add_special_tokens = self.add_bos_token if self.add_bos_token is not None else True
            if self._tok.bos_token and string.startswith(self._tok.bos_token):
                add_special_tokens = False  # already there
        return self._tok.encode(string, add_special_tokens=add_special_tokens)

    def tok_decode(self, tokens: Sequence[int]) -> str:
        return self._tok.decode(list(tokens))

    # ---- scoring ------------------------------------------------------------------------------------
    def _score(self, pairs: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        """(context ids, continuation ids) -> (sum of the continuation's log probs, all greedy)."""
        seqs = []
        for ctx, cont in pairs:
            # the last max_length + 1 tokens: each continuation token scored after at most max_length others
            seqs.append((ctx + cont)[-(self.max_length + 1):])
        empty = [i for i, (_, cont) in enumerate(pairs) if not cont]  # nothing to score: log p = 0, greedy
        if empty:
            keep = [i for i in range(len(pairs)) if pairs[i][1]]
            scored = dict(zip(keep, self._score([pairs[i] for i in keep]))) if keep else {}
            return [scored.get(i, (0.0, True)) for i in range(len(pairs))]
        budget = max(1, SCORING_LOGITS_BYTES // (4 * self.llm.config.vocab_size))
        results: list[tuple[float, bool]] = []
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0)
        start = 0
        while start < len(seqs):
            stop, tokens = start, 0
            while stop < len(seqs) and (stop == start or tokens + len(seqs[stop]) <= budget):
                tokens += len(seqs[stop])
                stop += 1
            outs = self.llm.generate(prompt_token_ids=seqs[start:stop], sampling_params=params, use_tqdm=False)
            for (ctx, cont), seq, out in zip(pairs[start:stop], seqs[start:stop], outs):
                n = min(len(cont), len(seq) - 1)  # the continuation's tokens that have a position to score
                picked = [entry[tok] for entry, tok in zip(out.prompt_logprobs[len(seq) - n:], seq[len(seq) - n:])]
                results.append((sum(p.logprob for p in picked), all(p.rank == 1 for p in picked)))
            start = stop
        return results

    def _loglikelihood_tokens(self, requests, disable_tqdm: bool = False, **kwargs) -> list[tuple[float, bool]]:
        results = self._score([(list(ctx), list(cont)) for _, ctx, cont in requests])
        for (key, _, _), res in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", key, res)
        return results

    def loglikelihood_rolling(self, requests, disable_tqdm: bool = False) -> list[float]:
        windows, owner = [], []
        for i, req in enumerate(requests):
            (string,) = req.args
            rolling = lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(string), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1)
            for window in map(lm_utils.make_disjoint_window, rolling):
                windows.append(window)
                owner.append(i)
        totals = [0.0] * len(requests)
        for i, (logprob, _) in zip(owner, self._score(windows)):
            totals[i] += logprob
        for req, total in zip(requests, totals):
            self.cache_hook.add_partial("loglikelihood_rolling", req.args, total)
        return totals

    # ---- generation ---------------------------------------------------------------------------------
    def _sampling_params(self, gen_kwargs: dict, n: int) -> SamplingParams:
        """The harness's generation arguments, read as its own backends read them (`normalize_gen_kwargs`:
        the max-token aliases, do_sample / temperature), then mapped onto SamplingParams."""
        kw = dict(normalize_gen_kwargs(gen_kwargs, default_max_gen_toks=self.max_gen_toks))
        eos_text = self._tok.decode([self.eot_token_id], skip_special_tokens=False)
        stop = [s for s in kw.pop("until") if s and s != eos_text]
        max_tokens = max(1, min(int(kw.pop("max_gen_toks")), self.max_length))
        do_sample = bool(kw.pop("do_sample"))
        temperature = float(kw.pop("temperature", 0.0))
        values = dict(n=n, max_tokens=max_tokens, stop=stop, temperature=temperature if do_sample else 0.0,
                      seed=self.seed)
        for name, cast in _GEN_KWARGS.items():
            if name in kw:
                values[name] = cast(kw.pop(name))
        if kw:
            log.warning("forklm lm-eval model: ignoring generation arguments %s", sorted(kw))
        return SamplingParams(**values)

    def generate_until(self, requests, disable_tqdm: bool = False) -> list[str]:
        groups: dict[tuple, list[int]] = {}  # (context, gen_kwargs) -> positions, in order
        for i, req in enumerate(requests):
            context, gen_kwargs = req.args
            groups.setdefault((context, repr(sorted(gen_kwargs.items()))), []).append(i)
        prompts, params = [], []
        for at in groups.values():
            context, gen_kwargs = requests[at[0]].args
            p = self._sampling_params(gen_kwargs, len(at))
            ids = self.tok_encode(context)
            prompts.append(ids[-max(1, self.max_length - p.max_tokens):])  # left-truncated to leave room
            params.append(p)
        outs = self.llm.generate(prompt_token_ids=prompts, sampling_params=params, use_tqdm=False)
        texts: list[str] = [""] * len(requests)
        for at, out in zip(groups.values(), outs):
            for i, sample in zip(at, out.outputs):
                texts[i] = sample.text
                self.cache_hook.add_partial("generate_until", requests[i].args, sample.text)
        return texts


def main() -> None:
    """`forklm-lm-eval`: the harness's command line with the "forklm" model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
