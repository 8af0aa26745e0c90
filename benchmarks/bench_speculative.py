"""Speculative decoding on the embedded model (issue 13): `LLM.generate` end to end, plain vs
speculative, in one process, on (a) a code-editing chat prompt whose reply repeats most of its input
and (b) a free-text chat prompt, n in {1, 4, 16}, greedy and temperature 0.8.

    python benchmarks/bench_speculative.py --out benchmarks/results/speculative_cpu

Modes (each an LLM of its own, warmed by one call first; every cell's tokens are checked equal to
plain decoding's):
  plain            no speculation (the baseline of every ratio);
  ngram            prompt lookup, k=4, the adaptive switch on (what a user gets from the flag);
  ngram-always     the same with the switch off (every row drafts whenever a match exists);
  ngram-sib        ngram with sibling lookup (a sample with no match in its own text looks in its siblings' outputs);
  draft-truncated  a draft model: the embedded model cut to its first --draft-layers layers (no
                   smaller model with SmolLM2's tokenizer is available offline, so this is not a
                   real draft: it measures what a poor draft costs with the switch on);
  draft-self       the target as its own draft, switch off: every greedy draft is kept, the
                   ceiling of acceptance and the cost of drafting with a full-size model.

Each cell is the median of --reps calls; the 1-minute load average is recorded beside it. Writes
OUT.json, OUT.md and OUT.png (speedup over plain per cell).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import report

CODE = '''def parse_config(path):
    with open(path) as f:
        lines = f.read().splitlines()
    config = {}
    for line in lines:
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        key, value = line.split("=", 1)
        config[key.strip()] = value.strip()
    return config


def merge_configs(base, override):
    merged = dict(base)
    for key, value in override.items():
        if value is None:
            merged.pop(key, None)
        else:
            merged[key] = value
    return merged


def write_config(path, config):
    with open(path, "w") as f:
        for key in sorted(config):
            f.write(key + " = " + str(config[key]) + "\\n")
'''
PROMPTS = {
    "code-edit": "Add type hints to every function in this Python code. Reply with the full code only.\n\n" + CODE,
    "free-text": "Write a short story about a lighthouse keeper who finds a message in a bottle.",
}


def make_truncated_draft(folder: Path, layers: int) -> Path:
    """The embedded model's first `layers` layers, final norm and head, saved as a Hugging Face folder."""
    import torch
    import transformers as tf
    from safetensors.torch import save_file

    from forklm.default_model import default_model_path

    if (folder / "model.safetensors").exists():
        return folder
    gguf = Path(default_model_path())
    model = tf.AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tok = tf.AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model.model.layers = model.model.layers[:layers]
    model.config.num_hidden_layers = layers
    model.config.layer_types = None
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().clone().contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    config = model.config.to_dict()
    config.pop("quantization_config", None)  # the GGUF was dequantized: the folder holds float32 weights
    (folder / "config.json").write_text(json.dumps(config, indent=1))
    tok.save_pretrained(folder)
    return folder


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, nargs="+", default=[1, 4, 16])
    ap.add_argument("--temperatures", type=float, nargs="+", default=[0.0, 0.8])
    ap.add_argument("--prompts", nargs="+", default=list(PROMPTS), choices=list(PROMPTS))
    ap.add_argument("--modes", nargs="+", default=["ngram", "ngram-always", "ngram-sib", "draft-truncated", "draft-self"])
    ap.add_argument("--max-tokens", type=int, default=96)
    ap.add_argument("--dtype", default="float32", help="LLM dtype of every mode: float32 (the default) makes "
                    "`same` an exactness check; auto is what users get (bfloat16 on some hosts: `same` then "
                    "also reflects bfloat16 rounding between step shapes)")
    ap.add_argument("--k", type=int, default=4, help="num_speculative_tokens")
    ap.add_argument("--draft-layers", type=int, default=8)
    ap.add_argument("--reps", type=int, default=2)
    ap.add_argument("--out", type=Path, default=Path("benchmarks/results/speculative_cpu"))
    args = ap.parse_args()

    from forklm import LLM, SamplingParams
    from forklm.default_model import default_model_path

    k = args.k
    configs = {
        "ngram": {"method": "ngram", "num_speculative_tokens": k},
        "ngram-always": {"method": "ngram", "num_speculative_tokens": k, "adaptive": False},
        "ngram-sib": {"method": "ngram", "num_speculative_tokens": k, "sibling_lookup": True},
        "draft-truncated": {"method": "draft_model", "num_speculative_tokens": k,
                            "model": str(make_truncated_draft(Path("/tmp/forklm-draft") / f"first{args.draft_layers}",
                                                              args.draft_layers))}
        if "draft-truncated" in args.modes else None,
        "draft-self": {"method": "draft_model", "num_speculative_tokens": k, "model": default_model_path(),
                       "adaptive": False},
    }
    llms = {"plain": LLM(dtype=args.dtype)}
    for mode in args.modes:
        llms[mode] = LLM(dtype=args.dtype, speculative_config=configs[mode])
    ids = {name: llms["plain"].encode_chat([{"role": "user", "content": text}]) for name, text in PROMPTS.items()}
    for llm in llms.values():  # warm: first-call costs and the prompts' K/V in each LLM's prefix cache
        llm.generate(prompt_token_ids=list(ids.values()), sampling_params=SamplingParams(max_tokens=4), use_tqdm=False)

    rows = []
    for prompt in args.prompts:
        for temp in args.temperatures:
            for n in args.n:
                params = SamplingParams(n=n, temperature=temp, max_tokens=args.max_tokens, seed=1234)
                times: dict[str, list[float]] = {m: [] for m in llms}
                outs, loads = {}, []
                for _ in range(args.reps):  # modes interleaved, so drift hits them alike
                    for mode, llm in llms.items():
                        loads.append(os.getloadavg()[0])
                        t0 = time.perf_counter()
                        outs[mode] = llm.generate(prompt_token_ids=[ids[prompt]], sampling_params=params,
                                                  use_tqdm=False)[0]
                        times[mode].append(time.perf_counter() - t0)
                ref = [c.token_ids for c in outs["plain"].outputs]
                plain_rate = sum(map(len, ref)) / statistics.median(times["plain"])
                for mode in llms:
                    m = outs[mode].metrics
                    s = statistics.median(times[mode])
                    # a mode's own tokens: where its text differs from plain's (bfloat16 rounding), so can its length
                    tokens = sum(len(c.token_ids) for c in outs[mode].outputs)
                    drafted, accepted, drafts = (m.get(x, 0) for x in
                                                 ("num_draft_tokens", "num_accepted_tokens", "num_drafts"))
                    rows.append(dict(
                        prompt=prompt, temperature=temp, n=n, mode=mode, seconds=s, tokens=tokens,
                        tokens_per_s=tokens / s, speedup=tokens / s / plain_rate,
                        same_tokens=[c.token_ids for c in outs[mode].outputs] == ref,
                        drafted=drafted, accepted=accepted, acceptance=accepted / drafted if drafted else 0.0,
                        tokens_per_draft=1 + accepted / drafts if drafts else 1.0,
                        verify_steps=m.get("num_verify_steps", 0), load=max(loads),
                        cost_ratio=_cost_ratio(llms[mode]),
                        times=times[mode]))
                    r = rows[-1]
                    print(f"{prompt:9s} T={temp:<3} n={n:<3} {mode:16s} {s:7.2f}s  x{r['speedup']:.2f}  "
                          f"acc {r['acceptance']:.2f}  tok/draft {r['tokens_per_draft']:.2f}  "
                          f"same {r['same_tokens']}  load {r['load']:.2f}", flush=True)

    res = {"host": report.host(), "command": report.command(), "max_tokens": args.max_tokens, "k": k,
           "dtype": args.dtype, "precision": llms["plain"].precision_summary(),
           "draft_layers": args.draft_layers, "rows": rows}
    note = (f"`LLM.generate` end to end (seconds: median of {args.reps} calls, modes interleaved), "
            f"max_tokens={args.max_tokens}, k={k}, dtype {args.dtype}, the prompt's K/V cached in each LLM (warm). "
            "speedup = mode tokens/s / plain tokens/s in the same cell, each counting its own tokens (= the ratio of "
            "seconds where the texts are equal; where bfloat16 rounding makes them differ, so can their lengths); "
            "acceptance = accepted / drafted tokens; "
            "tokens/draft = 1 + accepted / drafts verified; verify/plain step = the adaptive switch's measured cost "
            "ratio in that LLM after the cell (0: not measured); same = token ids equal to plain decoding's; "
            "load = the highest 1-minute load average seen during the cell. draft-truncated is the embedded model's "
            f"first {args.draft_layers} layers (not a real draft); draft-self is the target as its own draft.")
    cols = [("prompt", "prompt", "{}"), ("T", "temperature", "{}"), ("n", "n", "{}"), ("mode", "mode", "{}"),
            ("s", "seconds", "{:.2f}"), ("tokens", "tokens", "{}"), ("tok/s", "tokens_per_s", "{:.1f}"), ("speedup", "speedup", "{:.2f}"),
            ("acceptance", "acceptance", "{:.2f}"), ("tokens/draft", "tokens_per_draft", "{:.2f}"),
            ("verify steps", "verify_steps", "{}"), ("verify/plain step", "cost_ratio", "{:.2f}"),
            ("same", "same_tokens", "{}"), ("load", "load", "{:.2f}")]
    report.write(args.out, res, "Speculative decoding, embedded SmolLM2-135M", note, cols, rows)
    plot(args.out.with_suffix(".png"), rows, [m for m in llms if m != "plain"])
    print(f"wrote {args.out}.json / .md / .png")


def _cost_ratio(llm) -> float:
    engine = llm._engine
    ratio = None if engine is None else engine.switch.cost_ratio
    return 0.0 if ratio is None else ratio


def plot(path: Path, rows: list[dict], modes: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cells = sorted({(r["prompt"], r["temperature"], r["n"]) for r in rows})
    fig, ax = plt.subplots(figsize=(max(6, len(cells) * 0.7), 4))
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        ys = [next(r["speedup"] for r in rows if (r["prompt"], r["temperature"], r["n"]) == c and r["mode"] == mode)
              for c in cells]
        ax.bar([j + i * width for j in range(len(cells))], ys, width, label=mode)
    ax.axhline(1.0, color="k", lw=0.8)
    ax.axhline(0.95, color="k", lw=0.5, ls=":")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(cells))])
    ax.set_xticklabels([f"{p}\nT={t} n={n}" for p, t, n in cells], fontsize=6)
    ax.set(ylabel="speedup over plain (same run)", title="speculative decoding, LLM.generate end to end")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
