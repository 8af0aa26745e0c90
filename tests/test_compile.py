"""compile.py: the eager fallback once torch.compile hits its recompile limit."""

import torch

from forklm.compile import with_eager_fallback


def test_falls_back_to_eager_for_good_after_the_recompile_limit():
    calls = []

    def compiled(x):
        calls.append("compiled")
        raise torch._dynamo.exc.FailOnRecompileLimitHit("limit")

    def eager(x):
        calls.append("eager")
        return x + 1

    fn = with_eager_fallback(compiled, eager, "test")
    assert fn(1) == 2 and fn(2) == 3
    assert calls == ["compiled", "eager", "eager"]


CHILD = r"""
import json, sys
import torch
from torch._dynamo.utils import counters
from forklm import LLM, SamplingParams
llm = LLM(sys.argv[1], compile=True)
out = llm.generate(prompt_token_ids=[[5, 17, 33, 2, 90]], sampling_params=SamplingParams(
    n=2, max_tokens=9, temperature=0.8, seed=1, ignore_eos=True), use_tqdm=False)[0]
print(json.dumps({"hits": counters["inductor"]["fxgraph_cache_hit"], "misses": counters["inductor"]["fxgraph_cache_miss"],
                  "graphs": counters["stats"]["unique_graphs"], "probes": llm._engine.threads.probes,
                  "tokens": [o.token_ids for o in out.outputs]}))
"""


def test_a_fresh_process_reuses_the_compiled_artifacts_on_disk(tmp_path, hf_models):
    """torch's FX-graph cache, shared through TORCHINDUCTOR_CACHE_DIR: the second process compiles
    nothing new (every graph is a cache hit) and samples the same tokens. A short first call builds one
    set of graphs (the sampler, the first layer, a layer, the last layer): no thread-count probe, which
    would compile them all again for its count."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "inductor")}
    env.pop("TORCHINDUCTOR_FORCE_DISABLE_CACHES", None)
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", CHILD, str(hf_models["llama_gqa"][1])], env=env,
                              capture_output=True, text=True, timeout=600)
        assert done.returncode == 0, done.stderr[-2000:]
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    cold, warm = runs
    assert cold["misses"] > 0 and cold["hits"] == 0
    assert warm["misses"] == 0 and warm["hits"] == cold["misses"]
    assert warm["tokens"] == cold["tokens"]
    assert cold["graphs"] == warm["graphs"] == 4 and cold["probes"] == warm["probes"] == 0


def test_only_the_cpu_vec_isa_inductor_would_pick_is_checked_and_its_verdict_is_kept(monkeypatch, tmp_path):
    """inductor would build a test library for every SIMD instruction set the CPU names, then use the first
    that passed (or the one `ATEN_CPU_CAPABILITY` names). forklm checks only that one, through inductor's
    own check; when it passed, inductor's `vec_isa_ok` makes inductor pick the very instruction set its
    full probe picks. The verdict is kept: a later process checks nothing."""
    import json
    import platform

    import pytest
    from torch._inductor import config as inductor_config
    from torch._inductor import cpu_vec_isa

    from forklm.compile import settle_cpu_vec_isa

    if platform.machine() not in ("x86_64", "AMD64"):
        pytest.skip("inductor's instruction-set probe is settled on x86 only")
    built = []
    check_build = cpu_vec_isa.VecISA.check_build
    monkeypatch.setattr(cpu_vec_isa.VecISA, "check_build", lambda isa, code: built.append(str(isa)) or check_build(isa, code))
    monkeypatch.setenv("FORKLM_CACHE_DIR", str(tmp_path))

    def fresh_process():
        monkeypatch.setattr(inductor_config.cpp, "vec_isa_ok", None)
        for cls in (cpu_vec_isa.VecISA, *{type(isa) for isa in cpu_vec_isa.supported_vec_isa_list}):
            for name in ("__bool__", "_VecISA__bool__impl"):
                getattr(vars(cls).get(name), "cache_clear", lambda: None)()  # inductor keeps each answer
        cpu_vec_isa.valid_vec_isa_list.cache_clear()
        built.clear()

    for capability in (None, "avx2"):
        if capability is None:
            monkeypatch.delenv("ATEN_CPU_CAPABILITY", raising=False)
        else:
            monkeypatch.setenv("ATEN_CPU_CAPABILITY", capability)
        fresh_process()
        full_probe_pick = str(cpu_vec_isa.pick_vec_isa())  # what inductor picks on its own
        fresh_process()
        settle_cpu_vec_isa()
        (path,) = [p for p in tmp_path.glob("inductor-vec-isa-*.json")
                   if json.loads(p.read_text())["key"]["capability"] == capability]
        entry = json.loads(path.read_text())
        assert built and set(built) == {entry["key"]["chosen"]}  # its test builds only, none for the others
        assert len(entry["key"]["candidates"]) >= 1 and entry["key"]["chosen"] in entry["key"]["candidates"]
        if capability == "avx2":
            assert entry["key"]["chosen"] == "avx2"
        assert inductor_config.cpp.vec_isa_ok is (True if entry["ok"] else None)
        if entry["ok"]:
            assert str(cpu_vec_isa.pick_vec_isa()) == full_probe_pick == entry["key"]["chosen"]
        fresh_process()  # a later process
        settle_cpu_vec_isa()
        assert built == [] and inductor_config.cpp.vec_isa_ok is (True if entry["ok"] else None)
    fresh_process()


def test_the_compiled_sampler_builds_no_graph_for_another_number_of_log_probs():
    """Each request may ask for its own K top log probs; the compiled draw does not depend on K (the
    alternatives are taken eagerly after it), so K = 1, 3, 6, ... build no graph after the first call,
    and every result equals the eager sampler's."""
    from torch._dynamo.utils import counters

    from forklm.compile import make_sample_fn
    from forklm.sampling import RowSpec, SamplingParams, SamplingTensors, TokenHistory, process_logits, sample

    compiled = make_sample_fn(True)
    logits = torch.randn(3, 40, generator=torch.Generator().manual_seed(3)) * 2
    h = TokenHistory.from_prompts([[1, 2], [3], [4, 4]], 8, 40)
    graphs = []
    for k in (None, 1, 3, 6, 2, 9, 4, 7, 5, 8, 10):
        params = [SamplingParams(temperature=0.0, logprobs=k), SamplingParams(temperature=0.9, logprobs=k),
                  SamplingParams(top_k=5, logprobs=0 if k is None else k - 1)]
        t = SamplingTensors.build([RowSpec(p, i, 7 + i) for i, p in enumerate(params)], 40, "cpu")
        processed = process_logits(logits, t, h)
        ours, ref = compiled(processed, t, h), sample(processed, t, h)
        assert torch.equal(ours.tokens, ref.tokens) and torch.allclose(ours.logprobs, ref.logprobs)
        assert torch.equal(ours.top_logprobs[1], ref.top_logprobs[1]) and torch.equal(ours.ranks, ref.ranks)
        assert torch.allclose(ours.top_logprobs[0], ref.top_logprobs[0])
        graphs.append(counters["stats"]["unique_graphs"])
    assert graphs[0] >= 1 and graphs[-1] == graphs[0], graphs
    assert counters["stats"].get("recompile_limit", 0) == 0
