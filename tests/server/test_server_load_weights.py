"""POST /v1/load_weights on a real server process: new weights from a safetensors file, answered once
they are in use; the API key guards it; a bad file is a 400 that changes nothing."""

from __future__ import annotations

import httpx
import openai
import pytest
import torch
from safetensors.torch import save_file

from conftest import make_hf_model
from forklm import LLM, SamplingParams
from forklm.checkpoint import load_checkpoint
from server_fixtures import ServerProcess, make_tiny_model

KEY = "s3cret"
PROMPT = "The quick brown fox jumps over"


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    a = make_tiny_model(tmp_path_factory.mktemp("weights_a"))
    b = make_tiny_model(tmp_path_factory.mktemp("weights_b"))
    make_hf_model("llama_mha", seed=1).save_pretrained(b)  # same tokenizer, other weights
    return a, b


@pytest.fixture(scope="module")
def server(folders):
    srv = ServerProcess(folders[0], "--api-key", KEY, "--enable-load-weights", "--max-batch", "4", "--max-prompt-len", "64",
                        "--max-tokens", "16")
    yield srv
    srv.stop()


def _complete(client: openai.OpenAI):
    r = client.completions.create(model=client.models.list().data[0].id, prompt=PROMPT, max_tokens=8, temperature=0)
    return r.choices[0].text, r.usage.prompt_tokens_details.cached_tokens


def _post(server, body, key=KEY):
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.post(server.url + "/v1/load_weights", json=body, headers=headers, timeout=60)


def _greedy(folder) -> str:
    out = LLM(folder).generate([PROMPT], SamplingParams(max_tokens=8, temperature=0))
    return out[0].outputs[0].text


def test_load_weights(server, folders, tmp_path):
    a, b = folders
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=KEY, max_retries=0, timeout=60)
    text_a, _ = _complete(client)
    _, cached = _complete(client)
    assert text_a == _greedy(a) and cached > 0

    refused = _post(server, {"path": str(b / "model.safetensors")}, key=None)
    assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
    assert _complete(client)[0] == text_a

    r = _post(server, {"path": str(b / "model.safetensors")})
    assert r.status_code == 200, r.text
    # all of them: every forklm parameter (q/k/v and gate/up are one each there)
    assert r.json()["updated_tensors"] == len(dict(load_checkpoint(b, torch.float32, "cpu").model.named_parameters()))
    text_b, cached = _complete(client)
    assert text_b == _greedy(b) != text_a
    assert cached == 0  # the prefix computed with A's weights is not reused

    # bad files: 400 naming path, the weights stay B's
    sd = make_hf_model("llama_mha", seed=2).state_dict()
    wrong = {"model.layers.0.mlp.up_proj.weight": sd["model.layers.0.mlp.gate_proj.weight"][:, :50].contiguous(),
             "model.norm.weight": sd["model.norm.weight"]}
    save_file(wrong, tmp_path / "wrong.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    for body, status, words in [({"path": str(tmp_path / "wrong.safetensors")}, 400, "shape"),
                                ({"path": str(tmp_path / "junk.safetensors")}, 400, "cannot read"),
                                ({"path": str(tmp_path / "missing.safetensors")}, 400, "no such file"),
                                ({"path": 3}, 400, "path"),
                                ({}, 400, "path")]:
        r = _post(server, body)
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert words in err["message"] and err["param"] == "path", err
    assert _complete(client)[0] == text_b

    metrics = httpx.get(server.url + "/metrics").text
    assert "forklm_weight_updates_total 1" in metrics


def test_load_weights_is_off_unless_enabled(folders):
    srv = ServerProcess(folders[0], "--max-batch", "2", "--max-prompt-len", "64", "--max-tokens", "8")
    try:
        r = httpx.post(srv.url + "/v1/load_weights", json={"path": str(folders[1] / "model.safetensors")}, timeout=30)
        assert r.status_code == 403 and r.json()["error"]["code"] == "load_weights_disabled", r.text
        assert "--enable-load-weights" in r.json()["error"]["message"]
    finally:
        srv.stop()
