"""dtype="auto": float32 checkpoints stay float32; half-precision and quantized ones take bfloat16
only where this CPU multiplies it natively."""

import json

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
