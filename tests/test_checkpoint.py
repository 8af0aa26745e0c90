"""Loading Hugging Face folders: sharded, dtypes, and every error naming its file and tensor."""

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from forklm import LLM, SamplingParams
from forklm.checkpoint import load_checkpoint
from forklm.errors import CheckpointError, ModelNotAvailableError, UnsupportedModelError

from conftest import make_hf_model


@pytest.fixture
def llama_dir(hf_models, tmp_path):
    _, folder = hf_models["llama_gqa"]
    dst = tmp_path / "model"
    shutil.copytree(folder, dst)
    return dst


def test_sharded_checkpoint_loads_identically(hf_models, tmp_path):
    hf, folder = hf_models["llama_mha"]
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    assert len(list(tmp_path.glob("model-*.safetensors"))) > 2
    a = load_checkpoint(tmp_path, torch.float32, "cpu").model.state_dict()
    b = load_checkpoint(folder, torch.float32, "cpu").model.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_bfloat16_loads_and_generates(hf_models):
    _, folder = hf_models["qwen2"]
    llm = LLM(str(folder), dtype="bfloat16")
    assert llm.model.lm_head.weight.dtype == torch.bfloat16
    out = llm.generate(prompt_token_ids=[[3, 5, 7, 11]], sampling_params=SamplingParams(max_tokens=12, temperature=0))
    assert len(out[0].outputs[0].token_ids) == 12 and out[0].outputs[0].text is None


def test_missing_config(llama_dir):
    (llama_dir / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json: missing"):
        load_checkpoint(llama_dir, torch.float32, "cpu")


def test_missing_weights_file(llama_dir):
    (llama_dir / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no model.safetensors"):
        load_checkpoint(llama_dir, torch.float32, "cpu")


def test_missing_shard(hf_models, tmp_path):
    hf, _ = hf_models["llama_mha"]
    hf.save_pretrained(tmp_path, max_shard_size="100KB")
    shard = sorted(tmp_path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CheckpointError, match=f"{shard.name}: missing checkpoint shard"):
        load_checkpoint(tmp_path, torch.float32, "cpu")


def test_truncated_safetensors(llama_dir):
    f = llama_dir / "model.safetensors"
    data = f.read_bytes()
    f.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="model.safetensors"):
        load_checkpoint(llama_dir, torch.float32, "cpu")


def test_corrupt_header(llama_dir):
    (llama_dir / "model.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(CheckpointError, match="model.safetensors: cannot read"):
        load_checkpoint(llama_dir, torch.float32, "cpu")


def test_missing_tensor(llama_dir):
    f = llama_dir / "model.safetensors"
    tensors = load_file(f)
    del tensors["model.layers.1.mlp.up_proj.weight"]
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=r"model\.layers\.1\.mlp\.up_proj\.weight"):
        load_checkpoint(llama_dir, torch.float32, "cpu")


def test_shape_mismatch(llama_dir):
    f = llama_dir / "model.safetensors"
    tensors = load_file(f)
    tensors["model.layers.0.self_attn.k_proj.weight"] = torch.randn(8, 64)
    save_file(tensors, f)
    with pytest.raises(CheckpointError, match=r"k_proj\.weight.*shape \(8, 64\)"):
        load_checkpoint(llama_dir, torch.float32, "cpu")


def test_unknown_model_type_names_supported(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    cfg["model_type"], cfg["architectures"] = "mamba", ["MambaForCausalLM"]
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedModelError, match="'mamba'.*supported.*llama.*gpt_bigcode"):
        load_checkpoint(llama_dir, torch.float32, "cpu")


def test_missing_required_config_field(llama_dir):
    cfg = json.loads((llama_dir / "config.json").read_text())
    del cfg["hidden_size"]
    (llama_dir / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="'hidden_size' is missing"):
        load_checkpoint(llama_dir, torch.float32, "cpu")


def test_hub_id_offline_is_a_clear_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotAvailableError, match="not available locally"):
        load_checkpoint("some-org/some-model-that-is-not-cached", torch.float32, "cpu")


def test_nonexistent_path():
    with pytest.raises(ModelNotAvailableError, match="no such file"):
        load_checkpoint("/definitely/not/here", torch.float32, "cpu")


def test_generation_config_eos_is_used(hf_models, tmp_path):
    hf = make_hf_model("llama_mha")
    hf.save_pretrained(tmp_path)
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": [7, 9]}))
    assert load_checkpoint(tmp_path, torch.float32, "cpu").eos_token_ids == [7, 9]
