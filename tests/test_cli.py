"""The `forklm` command line, run as a real subprocess."""

import json
import subprocess
import sys

import pytest


def forklm(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "forklm", *args], capture_output=True, text=True, timeout=timeout)


def test_help():
    r = forklm("--help")
    assert r.returncode == 0 and "generate" in r.stdout and "serve" in r.stdout
    r = forklm("generate", "--help")
    assert r.returncode == 0 and "--max-tokens" in r.stdout and "--seed" in r.stdout


def test_generate_json_on_default_model():
    r = forklm("generate", "--prompt", "The sky is", "-n", "2", "--max-tokens", "6", "--seed", "1", "--json")
    assert r.returncode == 0, r.stderr
    payload = json.loads(r.stdout)
    assert len(payload["samples"]) == 2
    assert all(len(s["token_ids"]) <= 6 and isinstance(s["text"], str) for s in payload["samples"])


def test_generate_quantized_json_on_a_tiny_model_and_a_bad_one(hf_models, tmp_path):
    from test_quant import _llama

    _llama(False, 0).save_pretrained(tmp_path)
    r = forklm("generate", str(tmp_path), "--prompt", "x", "--max-tokens", "3", "--quantization", "int4", "--json")
    assert r.returncode == 2 and "no tokenizer" in r.stderr  # it loaded and quantized; the prompt needs a tokenizer
    r = forklm("generate", str(hf_models["llama_mha"][1]), "--prompt", "x", "--quantization", "int8")
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and "quantization" in lines[0] and "multiple of 32" in lines[0]


def test_generate_text_on_tiny_model(hf_models):
    _, folder = hf_models["gpt2"]  # no tokenizer: token ids are printed
    r = forklm("generate", str(folder), "--prompt", "hi", "--max-tokens", "4")
    assert r.returncode == 2 and "no tokenizer" in r.stderr and "Traceback" not in r.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["generate", "--prompt", "x", "-n", "zero"], "invalid int value"),
        (["generate", "--prompt", "x", "--temperature", "-1"], "temperature"),
        (["generate", "--prompt", "x", "--top-p", "1.5"], "top_p"),
        (["generate", "--prompt", "x", "-n", "0"], "n"),
        (["generate"], "--prompt"),
        (["generate", "/no/such/model", "--prompt", "x"], "/no/such/model"),
        (["frobnicate"], "invalid choice"),
        (["generate", "/no/such/model", "--prompt", "x", "-v"], "/no/such/model"),  # -v after the subcommand
        (["-v", "generate", "/no/such/model", "--prompt", "x"], "/no/such/model"),
        (["generate", "--prompt", "x", "--speculative-config", "{bad"], "speculative_config: is not valid JSON"),
        (["generate", "--prompt", "x", "--speculative-config", '{"method": "ngram"}'],
         "speculative_config.num_speculative_tokens"),
        (["serve", "--speculative-config", '{"method": "x", "num_speculative_tokens": 2}'], "speculative_config.method"),
        (["generate", "--prompt", "x", "--quantization", "int3"], "invalid choice"),
        (["generate", "--prompt", "x", "--dtype", "float8"], "invalid choice"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(args, message):
    r = forklm(*args)
    assert r.returncode == 2
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0] and "Traceback" not in r.stderr


def test_a_prompt_that_is_not_utf8_is_one_line(hf_models):
    _, folder = hf_models["llama_mha"]
    r = subprocess.run([sys.executable, "-m", "forklm", "generate", str(folder), "--prompt", b"\xff", "--max-tokens", "2"],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "not valid Unicode" in lines[0], r.stderr
