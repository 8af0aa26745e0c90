"""`forklm serve --speculative-config`: a real server process with prompt lookup answers what the
plain engine answers, over real HTTP with the openai client, and /metrics reports drafted and
accepted tokens and the acceptance rate."""

from __future__ import annotations

import httpx
import openai
import pytest

from forklm import LLM, SamplingParams
from server_fixtures import ServerProcess, make_tiny_model

PROMPT = "abcabcabcabcab"


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("spec_server"))


@pytest.fixture(scope="module")
def server(folder):
    spec = '{"method": "ngram", "num_speculative_tokens": 3, "prompt_lookup_min": 1, "adaptive": false}'
    srv = ServerProcess(folder, "--speculative-config", spec, "--max-batch", "8", "--max-prompt-len", "64",
                        "--max-tokens", "32")
    yield srv
    srv.stop()


def test_completions_equal_plain_decoding_and_metrics_count_drafts(server, folder):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
    model = client.models.list().data[0].id
    r = client.completions.create(model=model, prompt=PROMPT, max_tokens=24, temperature=0, n=2, logprobs=2)
    plain = LLM(str(folder)).generate(PROMPT, SamplingParams(max_tokens=24, temperature=0, n=2, logprobs=2),
                                      use_tqdm=False)[0]
    assert [c.text for c in r.choices] == [c.text for c in plain.outputs]
    for choice, ref in zip(r.choices, plain.outputs):
        assert len(choice.logprobs.token_logprobs) == len(ref.token_ids)
        assert all(abs(a - b[t].logprob) < 1e-4 for a, b, t in
                   zip(choice.logprobs.token_logprobs, ref.logprobs, ref.token_ids))
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt=PROMPT, max_tokens=24, temperature=0, stream=True))
    assert streamed == plain.outputs[0].text
    text = httpx.get(server.url + "/metrics").text
    values = {line.split()[0]: float(line.split()[1]) for line in text.splitlines()
              if line.startswith("forklm_spec_decode")}
    assert values["forklm_spec_decode_num_draft_tokens_total"] > 0
    assert 0 <= values["forklm_spec_decode_num_accepted_tokens_total"] <= values["forklm_spec_decode_num_draft_tokens_total"]
    rate = values["forklm_spec_decode_num_accepted_tokens_total"] / values["forklm_spec_decode_num_draft_tokens_total"]
    assert abs(values["forklm_spec_decode_acceptance_rate"] - rate) < 1e-9
    assert r.usage.completion_tokens == sum(len(c.token_ids) for c in plain.outputs)


def test_a_bad_request_is_still_a_400_and_the_server_keeps_serving(server):
    r = httpx.post(server.url + "/v1/completions", json={"model": "x", "prompt": PROMPT, "max_tokens": -1})
    assert r.status_code in (400, 404) and "error" in r.json()
    assert httpx.get(server.url + "/health").status_code == 200
