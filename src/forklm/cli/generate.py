"""`forklm generate`: n samples for a prompt, printed as text or JSON."""

from __future__ import annotations

import argparse
import json
import sys
import time

HELP = "generate n samples for a prompt (default model: the embedded SmolLM2-135M-Instruct)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None, help="Hugging Face folder, .gguf file or hub id (default: embedded SmolLM2)")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--chat", action="store_true", help="wrap the prompt as a user message in the model's chat template")
    p.add_argument("-n", type=int, default=1, help="number of samples (default 1)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens to generate per sample (default 64)")
    p.add_argument("--temperature", type=float, default=1.0, help="0 = greedy (default 1.0)")
    p.add_argument("--top-p", type=float, default=1.0, help="nucleus sampling mass in (0, 1] (default 1.0)")
    p.add_argument("--top-k", type=int, default=0, help="keep the k most likely tokens; 0 = off")
    p.add_argument("--seed", type=int, default=None, help="seed for reproducible samples")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="auto (default): bfloat16 for a half-precision or quantized checkpoint where this CPU "
                        "multiplies it natively, float32 otherwise; the choice is printed")
    p.add_argument("--quantization", choices=["int8", "int4"], default=None,
                   help="round every linear weight to GGUF Q8_0 (int8) or Q4_1 (int4), groups of 32")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--kv-layout", choices=["bifurcated", "replicated"], default="bifurcated")
    p.add_argument("--compile", action="store_true", help="compile the decode step with torch.compile")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding, e.g. \'{"method": "ngram", "num_speculative_tokens": 4}\'')
    p.add_argument("--json", action="store_true", help="print one JSON object instead of text")
    p.add_argument("--stream", action="store_true",
                   help="print sample 0 as it is generated (the other samples when all are done)")


def run(args: argparse.Namespace) -> int:
    from ..api import LLM
    from ..errors import InvalidParameterError
    from ..sampling import SamplingParams

    if args.stream and args.json:
        raise InvalidParameterError("--stream", "cannot be combined with --json (one JSON object at the end)")
    params = SamplingParams(
        n=args.n,
        max_tokens=args.max_tokens,
        temperature=args.temperature,
        top_p=args.top_p,
        top_k=args.top_k,
        seed=args.seed,
    )
    show = not args.json and sys.stderr.isatty()  # progress on a terminal only; --json stays one object
    status = _Status(show)
    status.say(f"loading {args.model or 'the embedded SmolLM2-135M-Instruct'} ...")
    t0 = time.perf_counter()
    llm = LLM(args.model, dtype=args.dtype, device=args.device, kv_layout=args.kv_layout, compile=args.compile,
              quantization=args.quantization,
              speculative_config=args.speculative_config)
    status.say(f"loaded in {time.perf_counter() - t0:.1f} s on {args.device}; {llm.precision_summary()}"
               + ("; the first step compiles the model (tens of seconds on a small CPU)" if args.compile else ""))
    if args.stream:
        return _stream(llm, args, params)
    if args.chat:
        out = llm.chat([{"role": "user", "content": args.prompt}], params, use_tqdm=show)
    else:
        out = llm.generate([args.prompt], params, use_tqdm=show)[0]
    if args.json:
        payload = {
            "model": llm.source,
            "prompt": args.prompt,
            "prompt_tokens": len(out.prompt_token_ids),
            "samples": [
                {
                    "index": o.index,
                    "text": o.text,
                    "token_ids": o.token_ids,
                    "finish_reason": o.finish_reason,
                    "cumulative_logprob": o.cumulative_logprob,
                }
                for o in out.outputs
            ],
        }
        json.dump(payload, sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
        return 0
    for o in out.outputs:
        sys.stdout.write(f"--- sample {o.index} ({o.finish_reason}, {len(o.token_ids)} tokens) ---\n")
        sys.stdout.write((o.text if o.text is not None else " ".join(map(str, o.token_ids))) + "\n")
    return 0


def _stream(llm, args: argparse.Namespace, params) -> int:
    """Sample 0's text as the engine produces it; the others, in order, once all are done."""
    source = dict(prompt_token_ids=[llm.encode_chat([{"role": "user", "content": args.prompt}])]) if args.chat \
        else dict(prompts=[args.prompt])
    texts: dict[int, list[str]] = {}
    tokens: dict[int, int] = {}
    finish: dict[int, str | None] = {}
    sys.stdout.write("--- sample 0 (streaming) ---\n")
    sys.stdout.flush()
    for _, d in llm.stream(sampling_params=params, **source):
        tokens[d.index] = tokens.get(d.index, 0) + len(d.token_ids)
        finish[d.index] = d.finish_reason or finish.get(d.index)
        if d.index == 0:
            sys.stdout.write(d.text)
            sys.stdout.flush()
        else:
            texts.setdefault(d.index, []).append(d.text)
    sys.stdout.write(f"\n--- sample 0 ({finish.get(0)}, {tokens.get(0, 0)} tokens) ---\n")
    for i in sorted(texts):
        sys.stdout.write(f"--- sample {i} ({finish.get(i)}, {tokens[i]} tokens) ---\n{''.join(texts[i])}\n")
    return 0


class _Status:
    """One-line status messages on stderr (when `show`)."""

    def __init__(self, show: bool):
        self.show = show

    def say(self, message: str) -> None:
        if self.show:
            sys.stderr.write(f"forklm: {message}\n")
            sys.stderr.flush()
