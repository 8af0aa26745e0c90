"""lm-evaluation-harness with forklm: a local task (YAML + JSONL written here) with loglikelihood,
loglikelihood_rolling and generate_until metrics, run through lm_eval.simple_evaluate (a) with the
native "forklm" model and (b) with the harness's own local-completions / local-chat-completions
models against a real `forklm serve`; log likelihoods equal transformers' within 1e-4."""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "server"))
from server_fixtures import ServerProcess, make_tiny_model  # noqa: E402

import lm_eval  # noqa: E402  (test extras)

import forklm.integrations.lm_eval  # noqa: E402,F401  (registers "forklm")

SCORED = [  # context, continuation (the second shares the first's context, as multiple choice does)
    {"context": "Question: what is two plus two?\nAnswer:", "continuation": " four"},
    {"context": "Question: what is two plus two?\nAnswer:", "continuation": " five"},
    {"context": "The cat sat on the", "continuation": " mat."},
    {"context": "x", "continuation": "yz"},
]
ROLLING = [{"text": "In the beginning was the word, and the word was with the model."}, {"text": "ab"}]
ASKED = [{"question": "Say hi:", "answer": "hi"}, {"question": "Count: 1 2 3", "answer": "4"}]
REPEATS = 3


def _write_tasks(folder: Path) -> Path:
    data = {"scored": SCORED, "rolling": ROLLING, "asked": ASKED}
    for name, rows in data.items():
        (folder / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))

    def task(name: str, body: str) -> None:
        (folder / f"{name}.yaml").write_text(
            f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n"
            f"    test: {folder / (name.removeprefix('forklm_tiny_') + '.jsonl')}\ntest_split: test\n{body}")

    task("forklm_tiny_scored", 'output_type: loglikelihood\ndoc_to_text: "{{context}}"\n'
         'doc_to_target: "{{continuation}}"\ntarget_delimiter: ""\n'
         "metric_list:\n  - metric: perplexity\n    aggregation: perplexity\n    higher_is_better: false\n"
         "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    task("forklm_tiny_rolling", 'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
         "metric_list:\n  - metric: word_perplexity\n  - metric: bits_per_byte\n")
    task("forklm_tiny_asked", 'output_type: generate_until\ndoc_to_text: "{{question}}"\ndoc_to_target: "{{answer}}"\n'
         f"repeats: {REPEATS}\n"
         'generation_kwargs:\n  until: ["\\n", "."]\n  max_gen_toks: 6\n  do_sample: false\n'
         "metric_list:\n  - metric: exact_match\n    aggregation: mean\n    higher_is_better: true\n")
    return folder


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    model_dir = make_tiny_model(tmp_path_factory.mktemp("lm_eval_model"))
    tasks = _write_tasks(tmp_path_factory.mktemp("lm_eval_tasks"))
    return model_dir, tasks


def _evaluate(tasks: Path, model: str, model_args: dict, names: list[str], **kw) -> dict:
    from lm_eval.tasks import TaskManager

    return lm_eval.simple_evaluate(model=model, model_args=model_args, tasks=names,
                                   task_manager=TaskManager(include_path=str(tasks)), log_samples=True,
                                   bootstrap_iters=0, **kw)


def _per_doc(results: dict, task: str) -> list:
    rows = sorted(results["samples"][task], key=lambda s: s["doc_id"])
    return [[r[0] if isinstance(r, list) else r for r in s["resps"]] for s in rows]


def _generations(results: dict, task: str) -> list[list[str]]:
    """Per doc, its `repeats` generated texts."""
    return [s["resps"][0] for s in sorted(results["samples"][task], key=lambda s: s["doc_id"])]


def _hf_reference(model_dir: Path):
    """(context, continuation) -> transformers' sum of log probs and is_greedy, on the same ids."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()
    tok = AutoTokenizer.from_pretrained(model_dir)

    def score(ctx_ids: list[int], cont_ids: list[int]) -> tuple[float, bool]:
        ids = torch.tensor([ctx_ids + cont_ids])
        with torch.no_grad():
            lp = torch.log_softmax(model(ids).logits[0].float(), -1)[len(ctx_ids) - 1 : -1]  # [C, V]
        picked = lp.gather(1, torch.tensor(cont_ids)[:, None])[:, 0]
        return picked.sum().item(), bool((lp.argmax(-1) == torch.tensor(cont_ids)).all())

    def encode(text: str) -> list[int]:
        return tok.encode(text, add_special_tokens=False)

    return score, encode, tok.bos_token_id


def test_native_model(setup):
    model_dir, tasks = setup
    names = ["forklm_tiny_scored", "forklm_tiny_rolling", "forklm_tiny_asked"]
    results = _evaluate(tasks, "forklm", f"pretrained={model_dir},dtype=float32", names)
    score, encode, bos = _hf_reference(model_dir)

    for row, got in zip(SCORED, _per_doc(results, "forklm_tiny_scored")):
        want_lp, want_greedy = score(encode(row["context"]), encode(row["continuation"]))
        (lp, greedy), = got
        assert abs(lp - want_lp) < 1e-4 and greedy == want_greedy, (row, lp, want_lp)
    for row, got in zip(ROLLING, _per_doc(results, "forklm_tiny_rolling")):
        want_lp, _ = score([bos], encode(row["text"]))  # one window: the whole text after BOS
        assert abs(got[0] - want_lp) < 1e-4, (row, got, want_lp)
    gens = _generations(results, "forklm_tiny_asked")
    assert all(len(g) == REPEATS for g in gens)
    assert all(len(set(g)) == 1 for g in gens)  # greedy: every repeat the same
    assert all("\n" not in g[0] and "." not in g[0] for g in gens)  # until strings cut the text
    assert math.isfinite(results["results"]["forklm_tiny_scored"]["perplexity,none"])
    assert 0.0 <= results["results"]["forklm_tiny_asked"]["exact_match,none"] <= 1.0


def test_repeats_become_one_request_with_n(setup, monkeypatch):
    """pass@k-style repeats: k identical requests -> one forklm request with n = k, sampled."""
    from forklm.integrations.lm_eval import ForkLMEval
    from lm_eval.api.instance import Instance

    model_dir, _ = setup
    lm = ForkLMEval(pretrained=str(model_dir))
    calls = []
    generate = lm.llm.generate
    monkeypatch.setattr(lm.llm, "generate", lambda **kw: (calls.append([p.n for p in kw["sampling_params"]]),
                                                          generate(**kw))[1])
    gen = {"until": ["\n"], "max_gen_toks": 6, "do_sample": True, "temperature": 1.0}
    reqs = [Instance("generate_until", {}, ("Tell me:", gen), i) for i in range(4)]
    reqs += [Instance("generate_until", {}, ("Other:", gen), 0)]
    texts = lm.generate_until(reqs)
    assert calls == [[4, 1]] and len(texts) == 5
    assert len(set(texts[:4])) > 1  # the 4 samples differ


def test_through_the_server(setup):
    model_dir, tasks = setup
    srv = ServerProcess(model_dir, "--max-batch", "16", "--max-prompt-len", "200", "--max-tokens", "16",
                        "--served-model-name", "tiny")
    try:
        common = f"model=tiny,tokenizer_backend=huggingface,tokenizer={model_dir},max_length=256,num_concurrent=1"
        results = _evaluate(tasks, "local-completions", f"base_url={srv.url}/v1/completions,{common}",
                            ["forklm_tiny_scored", "forklm_tiny_asked"])
        chat = _evaluate(tasks, "local-chat-completions", f"base_url={srv.url}/v1/chat/completions,{common}",
                         ["forklm_tiny_asked"], apply_chat_template=True)
    finally:
        srv.stop()
    native = _evaluate(tasks, "forklm", f"pretrained={model_dir}", ["forklm_tiny_scored", "forklm_tiny_asked"])
    score, encode, _ = _hf_reference(model_dir)
    for row, got in zip(SCORED, _per_doc(results, "forklm_tiny_scored")):
        want_lp, want_greedy = score(encode(row["context"]), encode(row["continuation"]))
        assert abs(got[0][0] - want_lp) < 1e-4 and got[0][1] == want_greedy, (row, got, want_lp)
    assert _generations(results, "forklm_tiny_asked") == _generations(native, "forklm_tiny_asked")
    chat_gens = _generations(chat, "forklm_tiny_asked")
    assert len(chat_gens) == len(ASKED) and all(len(g) == REPEATS for g in chat_gens)


def test_forklm_lm_eval_command(setup, tmp_path):
    """`forklm-lm-eval`: the harness's own CLI, with the forklm model registered."""
    model_dir, tasks = setup
    script = Path(sys.executable).parent / "forklm-lm-eval"
    script = script if script.exists() else Path(shutil.which("forklm-lm-eval") or "forklm-lm-eval")
    r = subprocess.run([str(script), "--model", "forklm", "--model_args", f"pretrained={model_dir}",
                        "--tasks", "forklm_tiny_scored", "--include_path", str(tasks), "--output_path",
                        str(tmp_path / "out")], capture_output=True, text=True, timeout=300,
                       env=dict(os.environ, OMP_NUM_THREADS="2"))
    assert r.returncode == 0, r.stderr[-3000:]
    assert "forklm_tiny_scored" in r.stdout and "perplexity" in r.stdout
    results = list((tmp_path / "out").rglob("results_*.json"))
    assert results and "forklm_tiny_scored" in json.loads(results[0].read_text())["results"]


def test_long_inputs_are_cut_as_the_harness_cuts_them(setup):
    """Longer than the context: rolling windows and a left-truncated pair, at the default max_length,
    equal transformers on the same windows."""
    from lm_eval.api.instance import Instance
    from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

    from forklm.integrations.lm_eval import ForkLMEval

    model_dir, _ = setup
    lm = ForkLMEval(pretrained=str(model_dir))
    assert lm.max_length == 256 - 2  # the tiny model's context, less the scored-then-generated token
    score, encode, bos = _hf_reference(model_dir)
    text = "".join(chr(ord("a") + (i * 7) % 26) + (" " if i % 5 == 4 else "") for i in range(700))
    (got,) = lm.loglikelihood_rolling([Instance("loglikelihood_rolling", {}, (text,), 0)])
    windows = list(map(make_disjoint_window, get_rolling_token_windows(
        token_list=encode(text), prefix_token=bos, max_seq_len=lm.max_length, context_len=1)))
    assert len(windows) >= 3
    want = sum(score(ctx, cont)[0] for ctx, cont in windows)
    assert abs(got - want) < 1e-3, (got, want)

    context, continuation = text[:400], " xyz"
    ((lp, greedy),) = lm.loglikelihood([Instance("loglikelihood", {}, (context, continuation), 0)])
    seq = (encode(context) + encode(continuation))[-(lm.max_length + 1):]
    want_lp, want_greedy = score(seq[:-4], seq[-4:])
    assert abs(lp - want_lp) < 1e-4 and greedy == want_greedy


def test_generation_arguments_are_read_as_the_harness_reads_them(setup):
    from forklm.integrations.lm_eval import ForkLMEval

    model_dir, _ = setup
    lm = ForkLMEval(pretrained=str(model_dir))
    p = lm._sampling_params({"temperature": 0.7, "until": "\n", "max_tokens": 5}, n=2)
    assert (p.temperature, p.max_tokens, p.stop, p.n) == (0.7, 5, ["\n"], 2)  # no do_sample: sampled at 0.7
    p = lm._sampling_params({"do_sample": False, "temperature": 0.7, "max_gen_toks": 10**6}, n=1)
    assert p.temperature == 0.0 and p.max_tokens == lm.max_length  # clamped to what the context holds
