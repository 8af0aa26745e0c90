"""`forklm serve`: the OpenAI-compatible HTTP server."""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
from pathlib import Path

HELP = "serve an OpenAI-compatible HTTP API (default model: the embedded SmolLM2-135M-Instruct)"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", default=None,
                   help="Hugging Face folder, .gguf file or hub id (default: embedded SmolLM2)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default 8000)")
    p.add_argument("--api-key", default=os.environ.get("FORKLM_API_KEY"),
                   help="require 'Authorization: Bearer KEY' on /v1 routes (default: $FORKLM_API_KEY, else none)")
    p.add_argument("--served-model-name", default=None, help="the model id clients send (default: MODEL as given)")
    p.add_argument("--max-batch", type=int, default=64,
                   help="sample rows decoded together: the sum of n over running requests (default 64)")
    p.add_argument("--max-n", type=int, default=None, help="most samples per prompt (default: --max-batch)")
    p.add_argument("--max-prompts", type=int, default=64, help="requests (prompts) running at once (default 64)")
    p.add_argument("--max-prompt-len", type=int, default=None,
                   help="longest prompt in tokens (default: the model's context length less one)")
    p.add_argument("--kv-cache-memory", type=float, default=None,
                   help="GiB for K/V: the sample rows plus cached prefixes (default: 75%% of the free memory)")
    p.add_argument("--no-prefix-caching", action="store_true",
                   help="compute every prompt afresh (default: reuse the K/V of any prefix already computed)")
    p.add_argument("--prefill-chunk-tokens", type=int, default=512,
                   help="prompt tokens prefilled per engine step, between decode steps of running requests (default 512)")
    p.add_argument("--max-tokens", type=int, default=512, help="largest max_tokens a request may ask (default 512)")
    p.add_argument("--max-queue", type=int, default=256,
                   help="requests (prompts) that may wait for the batch; beyond it 429 + Retry-After (default 256)")
    p.add_argument("--enable-load-weights", action="store_true",
                   help="accept POST /v1/load_weights (new weights from a safetensors file on this machine); "
                        "off by default; give --api-key with it")
    p.add_argument("--request-timeout", type=float, default=None,
                   help="seconds a request may run from acceptance; past it, it ends with a 408 / a request_timeout "
                        "error event (default: no limit)")
    p.add_argument("--body-timeout", type=float, default=30.0,
                   help="seconds a client may take to send its request body before a 408 (default 30)")
    p.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="seconds SIGTERM / Ctrl-C leaves running requests to finish (new ones get 503); a second "
                        "signal ends them at once (default 30; 0: at once)")
    p.add_argument("--dtype", choices=["auto", "float32", "bfloat16", "float16"], default="auto",
                   help="auto (default): bfloat16 for a half-precision or quantized checkpoint where this CPU "
                        "multiplies it natively, float32 otherwise; the choice is printed")
    p.add_argument("--quantization", choices=["int8", "int4"], default=None,
                   help="round every linear weight to GGUF Q8_0 (int8) or Q4_1 (int4), groups of 32")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--kv-layout", choices=["bifurcated", "replicated"], default="bifurcated")
    p.add_argument("--compile", action="store_true", help="compile the decode step with torch.compile")
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding, vLLM\'s keys: \'{"method": "ngram", "num_speculative_tokens": 4}\' or '
                        '\'{"method": "draft_model", "model": PATH, "num_speculative_tokens": 4}\' (outputs unchanged)')


def run(args: argparse.Namespace) -> int:
    import uvicorn

    from ..api import LLM
    from ..default_model import DEFAULT_MODEL_NAME
    from ..engine.speculative import SpeculativeConfig
    from ..errors import InvalidParameterError, ServeError
    from ..kv.storage import CacheShape
    from ..server import EngineRunner, Metrics, ServerContext, build_app

    for name in ("max_batch", "max_prompts", "max_prompt_len", "max_tokens", "max_queue", "prefill_chunk_tokens"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            raise InvalidParameterError("--" + name.replace("_", "-"), "must be >= 1")
    if not 0 <= args.port <= 65535:
        raise InvalidParameterError("--port", f"must be in [0, 65535], got {args.port}")
    if args.kv_cache_memory is not None and not args.kv_cache_memory > 0:
        raise InvalidParameterError("--kv-cache-memory", "must be > 0 (GiB)")
    if args.request_timeout is not None and not args.request_timeout > 0:
        raise InvalidParameterError("--request-timeout", "must be > 0 (seconds)")
    if not args.body_timeout > 0:
        raise InvalidParameterError("--body-timeout", "must be > 0 (seconds)")
    if not args.shutdown_grace >= 0:
        raise InvalidParameterError("--shutdown-grace", "must be >= 0 (seconds)")
    if args.max_n is not None and args.max_n < 1:
        raise InvalidParameterError("--max-n", "must be >= 1")
    speculative = SpeculativeConfig.parse(args.speculative_config)  # a bad one is refused before loading
    sys.stderr.write(f"forklm serve: loading {args.model or 'the embedded SmolLM2-135M-Instruct'} ...\n")
    sys.stderr.flush()
    llm = LLM(args.model, dtype=args.dtype, device=args.device, kv_layout=args.kv_layout, compile=args.compile,
              quantization=args.quantization,
              kv_cache_memory=args.kv_cache_memory, enable_prefix_caching=not args.no_prefix_caching,
              prefill_chunk_tokens=args.prefill_chunk_tokens, speculative_config=speculative)
    sys.stderr.write(f"forklm serve: {llm.precision_summary()}\n")
    context_len = llm.config.max_position_embeddings
    shape = CacheShape(
        max_prompts=args.max_prompts,
        max_samples=args.max_batch,
        max_samples_per_prompt=min(args.max_n or args.max_batch, args.max_batch),
        max_prompt_len=min(args.max_prompt_len or context_len - 1, context_len - 1),
        max_new_tokens=min(args.max_tokens, context_len - 1),
    )
    engine = llm.make_engine(shape, resident_prompts=1)  # CapacityError (naming the largest n that fits) if not
    if args.model is None:
        name, aliases = args.served_model_name or DEFAULT_MODEL_NAME, {DEFAULT_MODEL_NAME, "default"}
    else:
        name, aliases = args.served_model_name or str(args.model), {str(args.model), Path(str(args.model)).name}
    metrics = Metrics(name)
    runner = EngineRunner(engine, metrics, max_queue=args.max_queue, request_timeout=args.request_timeout)
    sys.stderr.write("forklm serve: warming up" + (" (compiling the decode step for each batch kind and thread count "
                                                   "it will run: minutes on a small CPU the first time, seconds from "
                                                   "torch's caches after)" if args.compile else "") + " ...\n")
    sys.stderr.flush()
    runner.warm_up()
    if llm.tokenizer is not None:
        llm.tokenizer.max_token_chars  # computed now (over the vocabulary), not in the first request
    ctx = ServerContext(
        runner=runner,
        tokenizer=llm.tokenizer,
        model_name=name,
        context_len=context_len,
        vocab_size=llm.config.vocab_size,
        max_tokens=shape.max_new_tokens,
        max_prompt_len=shape.max_prompt_len,
        model_aliases=aliases,
    )
    if args.enable_load_weights and not args.api_key:
        sys.stderr.write("forklm serve: warning: --enable-load-weights without --api-key: anyone who reaches the "
                         "port can replace the weights\n")
    app = build_app(ctx, api_key=args.api_key, body_timeout_s=args.body_timeout,
                    enable_load_weights=args.enable_load_weights)
    sys.stderr.write(
        f"forklm serve: {name} on http://{args.host}:{args.port} ({shape.max_samples} sample rows, "
        f"{shape.max_prompts} prompts, n <= {shape.max_samples_per_prompt}, prompt <= {shape.max_prompt_len} tokens, "
        f"max_tokens <= {shape.max_new_tokens}, queue {args.max_queue}, KV budget {engine.storage.nbytes_budget() / 2**30:.2f} GiB, "
        f"prefix caching {'off' if args.no_prefix_caching else 'on'}{', API key required' if args.api_key else ''})\n"
    )
    sys.stderr.flush()
    server = uvicorn.Server(uvicorn.Config(
        app,
        host=args.host,
        port=args.port,
        log_level="info" if getattr(args, "verbose", False) else "warning",
        access_log=bool(getattr(args, "verbose", False)),
        timeout_graceful_shutdown=3,
    ))

    def serve_http() -> None:
        try:
            server.run()
        finally:  # stopped, or never started (a port in use): the engine loop ends too
            runner.stop()

    # The engine loop on the main thread, HTTP beside it (see EngineRunner.run). Signals reach the
    # main thread: the first SIGINT / SIGTERM stops admission and lets running requests finish for
    # --shutdown-grace seconds; a second one (or the end of the grace) ends the loop, whose waiters are
    # told (engine_stopped), then the HTTP server.
    web = threading.Thread(target=serve_http, name="forklm-http", daemon=True)
    signals = []

    def on_signal(signum, frame):
        signals.append(signum)
        if len(signals) == 1 and args.shutdown_grace > 0:
            sys.stderr.write(f"forklm serve: shutting down: running requests get up to {args.shutdown_grace:g} s "
                             "to finish, new ones a 503 (a second signal ends them now)\n")
            sys.stderr.flush()
            runner.begin_drain(args.shutdown_grace)
        else:
            raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        runner.run(on_ready=web.start)
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        web.join(10)
    if not server.started:
        raise ServeError(f"the HTTP server could not start on {args.host}:{args.port} (see the log above)")
    return 0
