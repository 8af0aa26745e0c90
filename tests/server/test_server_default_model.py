"""Smoke test: `forklm serve` with no MODEL serves the embedded SmolLM2 (chat template from the GGUF)."""

from __future__ import annotations

import openai
import pytest
from server_fixtures import ServerProcess

from forklm.errors import ModelNotAvailableError


@pytest.fixture(scope="module")
def server():
    from forklm.default_model import default_model_path

    try:
        default_model_path()
    except ModelNotAvailableError as error:
        pytest.skip(str(error))
    srv = ServerProcess(None, "--max-batch", "4", "--max-prompts", "2", "--max-prompt-len", "128", "--max-tokens", "16")
    yield srv
    srv.stop()


def test_default_model_chat_and_completion(server):
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="unused", max_retries=0, timeout=60)
    (card,) = client.models.list().data
    assert card.id == "SmolLM2-135M-Instruct"
    chat = client.chat.completions.create(model=card.id, messages=[{"role": "user", "content": "What is 2+2?"}],
                                          max_tokens=8, n=2, temperature=0)
    assert chat.choices[0].message.content.strip()
    assert chat.choices[0].message.content == chat.choices[1].message.content  # greedy
    assert chat.usage.prompt_tokens > 20  # the template's system prompt was rendered
    text = client.completions.create(model="default", prompt="The capital of France is", max_tokens=4,
                                     temperature=0).choices[0].text
    assert "Paris" in text
