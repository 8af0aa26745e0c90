"""dtype="auto": float32 checkpoints stay float32; half-precision and quantized ones take bfloat16
only where this CPU multiplies it natively."""

import json
import subprocess
import sys
import textwrap

import torch

from forklm import LLM
from forklm.checkpoint import config_dtype
from forklm.gguf import _open_reader, stored_dtype
from forklm.host import auto_dtype, native_bf16_flags

CPU = torch.device("cpu")


def test_auto_dtype_follows_the_checkpoint_and_the_host():
    native = bool(native_bf16_flags())
    assert auto_dtype("float32", CPU)[0] == "float32"
    assert auto_dtype(None, CPU)[0] == "float32"
    for stored in ("bfloat16", "float16", "quantized"):
        dtype, why = auto_dtype(stored, CPU)
        assert dtype == ("bfloat16" if native else "float32")
        assert ("natively" in why) == native and why
    assert auto_dtype("bfloat16", torch.device("cuda"))[0] == "bfloat16"


def test_stored_dtype_reads_config_and_gguf(hf_models, smollm_path):
    cfg = json.loads((hf_models["llama_mha"][1] / "config.json").read_text())
    assert config_dtype(cfg) == "float32"  # transformers saves torch_dtype / dtype
    cfg.pop("torch_dtype", None)
    cfg["dtype"] = "bfloat16"
    assert config_dtype(cfg) == "bfloat16"
    assert config_dtype({}) is None
    assert stored_dtype(_open_reader(smollm_path)) == "quantized"  # Q4_1 and Q8_0 blocks


def test_llm_default_dtype_is_auto(hf_models, smollm_path):
    llm = LLM(hf_models["gpt2"][1])
    assert llm.dtype == torch.float32 and "float32" in llm.dtype_reason
    assert llm.precision_summary().startswith("dtype float32 (auto: ")
    emb = LLM(smollm_path)
    assert emb.dtype == (torch.bfloat16 if native_bf16_flags() else torch.float32)
    assert LLM(hf_models["gpt2"][1], dtype="float32").precision_summary() == "dtype float32 (asked for)"


def _child(code: str, *args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_eager_llm_does_not_import_the_compiler(hf_models):
    # building the model on the meta device once imported torch._dynamo (73 MB resident, ~1 s) for an
    # embedding's random init; an eager LLM needs none of it
    out = _child(f"""
        import json, sys
        from forklm import LLM, SamplingParams
        llm = LLM({str(hf_models["llama_gqa"][1])!r}, device="cpu")
        llm.generate(prompt_token_ids=[[3, 1, 4, 1, 5]], sampling_params=SamplingParams(n=2, max_tokens=3, seed=0),
                     use_tqdm=False)
        print(json.dumps({{"dynamo": "torch._dynamo" in sys.modules}}))
    """)
    assert out == {"dynamo": False}
