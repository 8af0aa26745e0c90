"""The Python API, shaped like vLLM's: `LLM(model).generate(prompts, SamplingParams(...))`."""

from __future__ import annotations

import functools
import logging
import numbers
import os
from collections.abc import Iterator, Sequence

import torch

from .checkpoint import PartialUpdate, apply_weight_updates, load_checkpoint, weight_updates
from .gguf import q8_0_blocks
from .host import auto_dtype, release_free_heap
from .int8_embedding import Int8BlockEmbedding, use_q8_0_embedding
from .linear_choice import prepare_cpu_linears
from .quant import QUANTIZATIONS, quantize_linears, quantize_values, unquantizable
from .engine import Engine, check_context
from .engine.speculative import SpeculativeConfig
from .errors import (
    BusyError,
    CapacityError,
    CheckpointError,
    InvalidParameterError,
    ModelNotAvailableError,
    TokenizerError,
    UnsupportedModelError,
)
from .kv.storage import CacheShape, KVStorage, bytes_per_token
from .outputs import RequestOutput, SampleDelta
from .progress import GenerationProgress
from .sampling import SamplingParams
from .tokenizer import check_unicode

log = logging.getLogger(__name__)

KV_LAYOUTS = ("bifurcated", "replicated")
_SHAPE_FIELDS = ("max_prompts", "max_samples", "max_samples_per_prompt", "max_prompt_len", "max_new_tokens")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def available_memory_bytes(device: torch.device) -> int:
    """Free memory the KV cache may use: free GPU memory on CUDA, available RAM on CPU."""
    if device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")


class LLM:
    """A model ready to generate.

    model: a Hugging Face folder, a .gguf file, a hub id (downloaded when online), or None for the
        embedded default model (SmolLM2-135M-Instruct).
    dtype: "auto" (default: float32 for a float32 checkpoint; for a half-precision or quantized one,
        bfloat16 where the device multiplies it natively, float32 elsewhere; `dtype_reason` says why)
        | "float32" | "bfloat16" | "float16".
        Under "auto", weights whose values are low precision (a GGUF file's Q8_0 / Q4_x blocks, or
        `quantization`) may run float16-weight kernels where this host measured them faster
        (linear_choice.py; within 2^-11 of each value); an explicit dtype holds them at that dtype.
    adaptive_threads: on CPU, time the steps and run them with fewer threads while that is faster (a
        busy neighbour; engine/threads.py), never more than torch's thread count at start.
    quantization: None (weights as the checkpoint stores them) | "int8" (every linear weight rounded
        to GGUF Q8_0: groups of 32, one scale) | "int4" (GGUF Q4_1: groups of 32, scale and minimum);
        see quant.py. A GGUF file's own quantized blocks are used as they are either way.
    device: "cpu" | "cuda" | "cuda:N".
    kv_layout: "bifurcated" (the prompt's K/V stored once for all its samples; default) or
        "replicated" (copied per sample; the reference and baseline).
    compile: compile the decode step with torch.compile.
    memory_fraction: the share of free memory the KV cache may take (when kv_cache_memory is None).
    kv_cache_memory: the KV cache's budget in GiB (sample rows + cached prefixes), or None.
    enable_prefix_caching: reuse the K/V of any prompt prefix (and finished samples) already computed,
        across prompts and calls; off, each prompt is computed afresh and freed when it finishes.
    prefill_chunk_tokens: prompt tokens prefilled per engine step (None: whole prompts at once).
    speculative_config: speculative decoding, vLLM's keys (engine/speculative/config.py), e.g.
        {"method": "ngram", "num_speculative_tokens": 4} or
        {"method": "draft_model", "model": PATH, "num_speculative_tokens": 4}; outputs are the same
        tokens and log probs as without it.
    """

    def __init__(
        self,
        model: str | os.PathLike | None = None,
        dtype: str = "auto",
        device: str = "cpu",
        kv_layout: str = "bifurcated",
        compile: bool = False,
        memory_fraction: float = 0.75,
        kv_cache_memory: float | None = None,
        enable_prefix_caching: bool = True,
        prefill_chunk_tokens: int | None = None,
        speculative_config: dict | str | SpeculativeConfig | None = None,
        quantization: str | None = None,
        adaptive_threads: bool = True,
    ):
        speculative = SpeculativeConfig.parse(speculative_config)
        if speculative is not None and compile:
            raise InvalidParameterError("speculative_config", "is not supported with compile=True yet (compiled "
                                        "verify steps are not tested)")
        if dtype not in (*DTYPES, "auto"):
            raise InvalidParameterError("dtype", f"{dtype!r} is not one of {['auto', *sorted(DTYPES)]}")
        if quantization is not None and quantization not in QUANTIZATIONS:
            raise InvalidParameterError("quantization", f"{quantization!r} is not one of {sorted(QUANTIZATIONS)} or None")
        if kv_layout not in KV_LAYOUTS:
            raise InvalidParameterError("kv_layout", f"{kv_layout!r} is not one of {sorted(KV_LAYOUTS)}")
        if kv_cache_memory is not None and not kv_cache_memory > 0:
            raise InvalidParameterError("kv_cache_memory", "must be > 0 (GiB)")
        if prefill_chunk_tokens is not None and prefill_chunk_tokens < 1:
            raise InvalidParameterError("prefill_chunk_tokens", "must be >= 1")
        try:
            self.device = torch.device(device)
        except RuntimeError:
            raise InvalidParameterError("device", f"{device!r} is not a torch device") from None
        if self.device.type == "cuda" and not torch.cuda.is_available():
            raise InvalidParameterError("device", "CUDA is not available on this machine")
        if not 0 < memory_fraction <= 1:
            raise InvalidParameterError("memory_fraction", "must be in (0, 1]")
        if model is None:
            from .default_model import default_model_path

            model = default_model_path()
        self.dtype_reason = "asked for"
        # under "auto", low-precision weight values may be held at float16 (quant.py's bound); an
        # explicit dtype runs every weight at that dtype exactly
        self._low_precision_kernels = dtype == "auto"
        self.quantization = quantization
        self.adaptive_threads = adaptive_threads
        self.kv_layout, self.compile, self.memory_fraction = kv_layout, compile, memory_fraction
        self.kv_cache_memory = kv_cache_memory
        self.enable_prefix_caching, self.prefill_chunk_tokens = enable_prefix_caching, prefill_chunk_tokens
        self._engine: Engine | None = None
        ckpt = load_checkpoint(model, self._auto_dtype if dtype == "auto" else DTYPES[dtype], self.device)
        self.dtype = ckpt.dtype
        self.model, self.config, self.tokenizer = ckpt.model, ckpt.config, ckpt.tokenizer
        release_free_heap()  # the reader's transient copies, before the kernels' packing makes its own
        self._prepare_linears(self.model, ckpt.low_precision_linears, ckpt.source)
        self.eos_token_ids = ckpt.eos_token_ids
        self.source = ckpt.source
        self._request_counter = 0
        self.speculative = speculative
        self.draft_model = None
        if speculative is not None and speculative.method == "draft_model":
            self.draft_model = self._load_draft(speculative.model)
        del ckpt
        release_free_heap()  # the loader's transient copies

    def _load_draft(self, path: str):
        """The draft model, checked to share this model's vocabulary."""
        field = "speculative_config.model"
        try:
            draft = load_checkpoint(path, self.dtype, self.device)
        except (CheckpointError, UnsupportedModelError, ModelNotAvailableError, OSError) as e:
            raise InvalidParameterError(field, f"the draft model {path!r} could not be loaded: {e}") from None
        cfg = draft.config
        if cfg.vocab_size != self.config.vocab_size:
            raise InvalidParameterError(field, f"the draft model's vocabulary ({cfg.vocab_size} tokens) differs from "
                                        f"the target's ({self.config.vocab_size})")
        if not _same_tokenizer(draft.tokenizer, self.tokenizer, cfg.vocab_size):
            raise InvalidParameterError(field, "the draft model's tokenizer differs from the target's: drafts would "
                                        "be other tokens")
        self._prepare_linears(draft.model, draft.low_precision_linears, draft.source)
        log.info("draft model %s: %d layers", draft.source, cfg.n_layers)
        return draft.model

    def _auto_dtype(self, stored: str | None) -> torch.dtype:
        """dtype="auto" once the checkpoint says how its weights are stored (host.auto_dtype)."""
        name, self.dtype_reason = auto_dtype("quantized" if self.quantization else stored, self.device)
        log.info("dtype auto: %s (%s)", name, self.dtype_reason)
        return DTYPES[name]

    def precision_summary(self) -> str:
        """One line: the dtype and why, the quantization, and the kernels of the low-precision linears."""
        from .cpu_linear import LowPrecisionLinear

        dtype = str(self.dtype).removeprefix("torch.")
        line = f"dtype {dtype} ({'auto: ' if self._low_precision_kernels else ''}{self.dtype_reason})"
        if self.quantization:
            line += f"; quantization {self.quantization}"
        menus: dict[str, int] = {}  # kernels described -> linears running them
        for m in self.model.modules():
            if isinstance(m, LowPrecisionLinear):
                menus[m.describe()] = menus.get(m.describe(), 0) + 1
        if menus:
            line += "; " + ", ".join(f"{n} low-precision linear{'s' * (n > 1)} run {d}" for d, n in menus.items())
            line += " (measured fastest on this CPU)"
        if isinstance(self.model.tok_embeddings, Int8BlockEmbedding) and self.model.tok_embeddings.dense is None:
            line += "; the token embedding held as its Q8_0 blocks"
        return line

    def _prepare_linears(self, model, low_precision: frozenset[str], source: str) -> None:
        """Quantize if asked, then give every linear its kernel for this host (linear_choice.py); under
        dtype="auto" a GGUF file's Q8_0 token embedding is then held as its blocks (int8_embedding.py)."""
        if self.quantization is not None:
            bad = unquantizable(model)
            if bad:
                raise InvalidParameterError("quantization", f"{self.quantization} needs every linear's input size to "
                                            f"be a multiple of 32; {bad[0]} is not")
            low_precision = frozenset(quantize_linears(model, self.quantization))
        if self.device.type == "cpu":
            prepare_cpu_linears(model, set(low_precision) if self._low_precision_kernels else set())
            release_free_heap()  # the old weights and the packing's copies: glibc keeps them otherwise
        if self._low_precision_kernels and str(source).endswith(".gguf"):
            blocks = q8_0_blocks(source, "token_embd.weight")
            if blocks is not None:
                use_q8_0_embedding(model, *blocks)

    # ---- engines --------------------------------------------------------------------------
    def cache_bytes(self, shape: CacheShape) -> int:
        """Bytes of the sample rows plus every prompt resident at once."""
        per_token = bytes_per_token(self.config, self.dtype)
        if self.kv_layout == "replicated":
            return per_token * shape.max_samples * (shape.max_prompt_len + shape.max_new_tokens)
        return per_token * (shape.max_prompts * shape.max_prompt_len + shape.max_samples * shape.max_new_tokens)

    def memory_budget(self) -> int:
        """The KV cache's budget in bytes: kv_cache_memory, else memory_fraction of what is free now
        (plus what this LLM's engine already holds)."""
        if self.kv_cache_memory is not None:
            return int(self.kv_cache_memory * 2**30)
        held = self._engine.storage.nbytes() if self._engine is not None else 0
        return int((available_memory_bytes(self.device) + held) * self.memory_fraction)

    def _check_fits(self, shape: CacheShape, budget: int, resident_prompts: int | None = None) -> None:
        need = self.cache_bytes(shape if resident_prompts is None else CacheShape(
            resident_prompts, shape.max_samples, shape.max_samples_per_prompt, shape.max_prompt_len,
            shape.max_new_tokens))
        if need > budget:
            fit = self.max_n_that_fits(shape, budget)
            raise CapacityError(
                f"the KV cache for {shape.max_samples} samples ({need / 2**30:.2f} GiB, {self.kv_layout}) exceeds "
                f"the memory budget ({budget / 2**30:.2f} GiB); at most n={fit} fits",
                max_n=fit,
            )

    def make_engine(self, shape: CacheShape, resident_prompts: int | None = None, **engine_args) -> Engine:
        """A new engine with `shape`'s sample rows and limits, checked against the memory budget with
        `resident_prompts` longest prompts held at once (default: max_prompts of them)."""
        budget = self.memory_budget()
        self._check_fits(shape, budget, resident_prompts)
        row_len = shape.max_new_tokens + (shape.max_prompt_len if self.kv_layout == "replicated" else 0)
        storage = KVStorage(self.config, shape, row_len, budget, self.dtype, self.device)
        args = dict(compile=self.compile, replicated=self.kv_layout == "replicated",
                    enable_prefix_caching=self.enable_prefix_caching, prefill_chunk_tokens=self.prefill_chunk_tokens,
                    speculative=self.speculative, draft_model=self.draft_model, adaptive_threads=self.adaptive_threads)
        args.update(engine_args)
        return Engine(self.model, storage, shape, self.tokenizer, self.eos_token_ids, **args)

    def engine(self, shape: CacheShape) -> Engine:
        """This LLM's one engine, grown (between calls) to at least `shape`; its prefix cache is kept."""
        old = self._engine
        if old is not None:
            s = old.shape
            shape = CacheShape(*(max(getattr(s, f), getattr(shape, f)) for f in _SHAPE_FIELDS))
            if shape == s:
                return old
        if old is None:
            self._engine = self.make_engine(shape)
        else:
            budget = self.memory_budget()
            self._check_fits(shape, budget)
            old.resize(shape, budget)
        return self._engine

    def max_n_that_fits(self, shape: CacheShape, budget: int) -> int:
        """The largest samples-per-prompt count whose cache fits `budget`, other sizes fixed."""
        lo, hi = 0, 1
        grow = lambda n: CacheShape(shape.max_prompts, n * shape.max_prompts, n, shape.max_prompt_len, shape.max_new_tokens)  # noqa: E731
        while self.cache_bytes(grow(hi)) <= budget and hi < 1 << 24:
            lo, hi = hi, hi * 2
        while hi - lo > 1:
            mid = (lo + hi) // 2
            lo, hi = (mid, hi) if self.cache_bytes(grow(mid)) <= budget else (lo, mid)
        return lo

    # ---- weights --------------------------------------------------------------------------------
    def update_weights(self, named_tensors) -> int:
        """Replace weights in place from (Hugging Face name, tensor) pairs (`state_dict().items()` works;
        any subset of the weights may be given). Names and shapes are checked as strictly as at load
        time before anything changes (CheckpointError naming the tensor); tensors are converted to
        this LLM's dtype and device, packed linears packed again, and every cached prefix forgotten,
        so no later request reuses K/V computed with the old weights. Call it between `generate`
        calls. Returns the number of forklm parameters replaced."""
        if isinstance(named_tensors, dict):
            named_tensors = named_tensors.items()
        if isinstance(named_tensors, (str, bytes)) or not hasattr(named_tensors, "__iter__"):
            raise CheckpointError(f"update_weights: expected (name, tensor) pairs or a state_dict, got "
                                  f"{type(named_tensors).__name__}")
        updates = weight_updates(self.model, named_tensors)
        if self.quantization is not None:  # rounded as at load; a tied head gets its own rounded copy
            head = updates.get("tok_embeddings.weight") if self.config.tie_word_embeddings else None
            rounded = functools.partial(quantize_values, kind=self.quantization)  # row by row: parts alike
            updates = {n: (t.map(rounded) if isinstance(t, PartialUpdate) else rounded(t))
                       if self._is_linear_weight(n) else t for n, t in updates.items()}
            if head is not None:
                updates["lm_head.weight"] = quantize_values(head, self.quantization)
        if self._engine is not None:
            self._engine.update_weights(updates)
        else:
            apply_weight_updates(self.model, updates)
        log.info("updated %d weight tensors; cached prefixes dropped", len(updates))
        return len(updates)

    def _is_linear_weight(self, name: str) -> bool:
        module_name, _, attr = name.rpartition(".")
        return attr == "weight" and module_name != "tok_embeddings" and hasattr(self.model.get_submodule(module_name),
                                                                                "in_features")

    # ---- generation -----------------------------------------------------------------------
    def encode(self, text: str, field: str = "prompts") -> list[int]:
        """Token ids of `text`; a text certainly longer than the model's context is refused untokenized."""
        if self.tokenizer is None:
            raise TokenizerError(f"{self.source} has no tokenizer: pass prompt_token_ids instead of text")
        return self.tokenizer.encode_within(text, self.config.max_position_embeddings, field)

    def generate(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
        use_tqdm: bool = True,
    ) -> list[RequestOutput]:
        """Generate for each prompt (text, or token ids) its n samples; one output per prompt, in order.
        use_tqdm: a progress bar (requests done, tokens/s) on stderr while it is a terminal."""
        engine, request_ids = self._queue(prompts, sampling_params, prompt_token_ids)
        for _ in self._steps(engine, request_ids, use_tqdm):
            pass
        return [engine.pop_output(rid) for rid in request_ids]

    def stream(
        self,
        prompts: str | Sequence[str] | None = None,
        sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
        prompt_token_ids: Sequence[Sequence[int]] | None = None,
    ) -> Iterator[tuple[int, SampleDelta]]:
        """`generate`, yielding (prompt index, SampleDelta) as each engine step produces them (text is
        released as the server streams it: held back only while it could begin a stop string).
        Stopping the iteration early aborts what is left."""
        engine, request_ids = self._queue(prompts, sampling_params, prompt_token_ids)
        index = {rid: i for i, rid in enumerate(request_ids)}
        try:
            for deltas in self._steps(engine, request_ids, use_tqdm=False):
                for d in deltas:
                    yield index[d.request_id], d
        finally:
            for rid in request_ids:
                engine.abort(rid)
                engine.pop_output(rid)

    def _queue(self, prompts, sampling_params, prompt_token_ids) -> tuple[Engine, list[str]]:
        """Check every prompt and its parameters, size the engine, queue one request per prompt."""
        if self._engine is not None and self._engine.has_unfinished():
            raise BusyError("this LLM is still running a stream: iterate it to its end or close() it first "
                            "(one LLM runs one call at a time)")
        if (prompts is None) == (prompt_token_ids is None):
            raise InvalidParameterError("prompts", "give exactly one of prompts or prompt_token_ids")
        if isinstance(prompts, str):
            prompts = [prompts]
        if prompts is not None:
            _check_texts(prompts)
        else:
            _check_token_ids(prompt_token_ids)
        texts = list(prompts) if prompts is not None else [None] * len(prompt_token_ids)
        ids = [self.encode(t) for t in prompts] if prompts is not None else [[int(t) for t in p] for p in prompt_token_ids]
        if not ids:
            return self._engine, []
        params = sampling_params if sampling_params is not None else SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(ids)
        if len(params) != len(ids):
            raise InvalidParameterError("sampling_params", f"{len(params)} given for {len(ids)} prompts")
        for p in params:
            if not isinstance(p, SamplingParams):
                raise InvalidParameterError("sampling_params", f"expected SamplingParams, got {type(p).__name__}")
        for prompt_ids, p in zip(ids, params):  # the limits that hold whatever the engine's size, first
            check_context(prompt_ids, p, self.config)
        shape = CacheShape(
            max_prompts=len(ids),
            max_samples=sum(p.num_sequences for p in params),
            max_samples_per_prompt=max(p.num_sequences for p in params),
            max_prompt_len=max(1, max(len(i) for i in ids)),
            max_new_tokens=max(p.max_tokens for p in params),
        )
        engine = self.engine(shape)
        engine.set_eos_token_ids(self.eos_token_ids)
        for prompt_ids, p in zip(ids, params):  # every prompt checked before any is queued
            engine.check_request(prompt_ids, p)
        request_ids = []
        for text, prompt_ids, p in zip(texts, ids, params):
            self._request_counter += 1
            rid = str(self._request_counter)
            engine.add_request(rid, prompt_ids, p, prompt=text)
            request_ids.append(rid)
        return engine, request_ids

    @staticmethod
    def _steps(engine: Engine, request_ids: list[str], use_tqdm: bool) -> Iterator[list[SampleDelta]]:
        """Step the engine until these requests finished, yielding each step's deltas; on an error or
        an interrupt the requests are dropped, so the engine is empty for the next call."""
        progress = GenerationProgress(len(request_ids), enabled=bool(use_tqdm) and bool(request_ids))
        threads = torch.get_num_threads()  # the engine may step with fewer (threads.py): restored after
        try:
            while request_ids and engine.has_unfinished():
                deltas = engine.step()
                progress.update(sum(len(d.token_ids) for d in deltas),
                                len(request_ids) - engine.num_running - engine.num_waiting)
                yield deltas
        except BaseException:
            for rid in request_ids:
                engine.abort(rid)
                engine.pop_output(rid)
            raise
        finally:
            progress.close()
            torch.set_num_threads(threads)

    def chat(self, messages: list[dict], sampling_params: SamplingParams | None = None,
             use_tqdm: bool = True) -> RequestOutput:
        """Render `messages` with the model's chat template and generate."""
        return self.generate(prompt_token_ids=[self.encode_chat(messages)], sampling_params=sampling_params,
                             use_tqdm=use_tqdm)[0]

    def encode_chat(self, messages: list[dict]) -> list[int]:
        """The prompt token ids of a conversation, rendered by the model's chat template."""
        if self.tokenizer is None:
            raise TokenizerError(f"{self.source} has no tokenizer")
        prompt = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True)
        return self.tokenizer.encode_within(prompt, self.config.max_position_embeddings, "messages",
                                            add_special_tokens=False)


_PROBE_TEXT = "def speculative(x):\n    return [x ** 2 for _ in range(10)]  # Grüße, 東京, 🙂 naïve café"


def _same_tokenizer(a, b, vocab_size: int) -> bool:
    """Two tokenizers give the same ids: same size, same ids for a probe text, same text for spaced ids
    (a cheap check, not a proof); two models without tokenizers only have their sizes compared."""
    if a is None or b is None:
        return a is None and b is None
    if a.vocab_size != b.vocab_size or a.encode(_PROBE_TEXT) != b.encode(_PROBE_TEXT):
        return False
    ids = list(range(0, min(vocab_size, a.vocab_size), max(1, vocab_size // 512)))
    return all(a.decode([i], skip_special_tokens=False) == b.decode([i], skip_special_tokens=False) for i in ids)


def _check_texts(prompts) -> None:
    if not isinstance(prompts, Sequence):
        raise InvalidParameterError("prompts", f"expected a string or a list of strings, got {type(prompts).__name__}")
    for i, t in enumerate(prompts):
        if not isinstance(t, str):
            raise InvalidParameterError("prompts", f"prompt {i} is a {type(t).__name__}, not a string")
        check_unicode(t, "prompts", f"prompt {i}")


def _check_token_ids(prompt_token_ids) -> None:
    if isinstance(prompt_token_ids, (str, bytes)) or not isinstance(prompt_token_ids, Sequence):
        raise InvalidParameterError("prompt_token_ids", "expected a list of lists of token ids")
    for i, p in enumerate(prompt_token_ids):
        if isinstance(p, (str, bytes)) or not isinstance(p, Sequence):
            raise InvalidParameterError(
                "prompt_token_ids", f"prompt {i} is a {type(p).__name__}, not a list of token ids "
                "(one prompt is [[1, 2, 3]], not [1, 2, 3])")
        for t in p:
            if isinstance(t, bool) or not isinstance(t, numbers.Integral):
                raise InvalidParameterError("prompt_token_ids", f"prompt {i} holds {t!r}, not an int token id")
