"""Tokenizers: the SmolLM2 GGUF vocabulary against transformers, tokenizer.json and
sentencepiece folders, chat templates, and incremental detokenization."""

from __future__ import annotations

import json

import gguf
import pytest
import sentencepiece
import tokenizers

from forklm.errors import InvalidParameterError, TokenizerError
from forklm.tokenizer import IncrementalDetokenizer, Tokenizer

TEXTS = [
    "Hello world! How are you today?",
    "def add(a, b):\n\treturn a + b\n\n\nclass  Foo:\n    x = [1, 2, 3]\t# tabs\tand  spaces   \n",
    "naïve café, Straße,日本語のテキスト, 中文字符, русский текст",
    "emoji 🤗🚀 and a family 👨‍👩‍👧 and flags 🇫🇷",
    "pi = 3.14159, 1,000,000 people, 2024-01-31, 12345678901 and 0x1F",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>assistant\n",
    "I'm sure you're right, it's WE'LL see",
    "\r\n\r\nwindows line endings\r\n",
    "   leading and trailing spaces   ",
    "",
]
CONVERSATIONS = [
    [{"role": "user", "content": "hi"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "4"},
        {"role": "user", "content": "And 3+3? 🤔"},
    ],
]


@pytest.fixture(scope="module")
def tokenizer(smollm_path):
    reader = gguf.GGUFReader(smollm_path)
    metadata = {key: field.contents() for key, field in reader.fields.items() if key.startswith("tokenizer.")}
    return Tokenizer.from_gguf_metadata(metadata)


@pytest.fixture(scope="module")
def hf_tokenizer(smollm_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm_path.parent, gguf_file=smollm_path.name)


@pytest.fixture(scope="module")
def smollm_reference(hf_tokenizer):
    """transformers' GGUF vocabulary with SmolLM2's own pre-tokenizer (its tokenizer.json on the hub):
    digits split one by one, then GPT-2's byte-level split. llama.cpp's "smollm" does the same."""
    reference = tokenizers.Tokenizer.from_str(hf_tokenizer.backend_tokenizer.to_str())
    reference.pre_tokenizer = tokenizers.pre_tokenizers.Sequence(
        [
            tokenizers.pre_tokenizers.Digits(individual_digits=True),
            tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    return reference


# ---- the SmolLM2 GGUF tokenizer -------------------------------------------------------


def test_smollm_special_ids(tokenizer):
    assert tokenizer.vocab_size == 49152
    assert tokenizer.bos_token_id == 1 and tokenizer.bos_token == "<|im_start|>"
    assert tokenizer.eos_token_ids == [2] and tokenizer.eos_token == "<|im_end|>"
    assert tokenizer.add_bos is False
    assert tokenizer.encode("hi")[0] != tokenizer.bos_token_id


@pytest.mark.parametrize("text", TEXTS)
def test_encode_matches_transformers(tokenizer, hf_tokenizer, smollm_reference, text):
    ids = tokenizer.encode(text)
    assert ids == hf_tokenizer.encode(text)
    assert ids == smollm_reference.encode(text, add_special_tokens=False).ids


@pytest.mark.parametrize("text", TEXTS)
def test_decode_matches_transformers(tokenizer, hf_tokenizer, text):
    ids = tokenizer.encode(text)
    for skip in (True, False):
        assert tokenizer.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(ids, skip_special_tokens=skip)


@pytest.mark.parametrize("text", TEXTS)
def test_round_trip(tokenizer, text):
    ids = tokenizer.encode(text)
    assert tokenizer.decode(ids, skip_special_tokens=False) == text
    if "<|" not in text:
        assert tokenizer.decode(ids) == text


def test_chat_markers_are_single_tokens(tokenizer):
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert ids[0] == 1 and ids[-1] == 2
    assert tokenizer.decode(ids) == "user\nhi"


def test_smollm_pre_tokenizer_isolates_digits(tokenizer, hf_tokenizer, smollm_reference):
    """Whitespace before a digit stays one piece, as in SmolLM2's tokenizer.json and llama.cpp.

    transformers' GGUF loader ignores tokenizer.ggml.pre "smollm" and splits with GPT-2's regex,
    which gives " " + " 1" instead; this is the one place the two differ.
    """
    text = "x  1\t\t22"
    ids = tokenizer.encode(text)
    assert ids == smollm_reference.encode(text, add_special_tokens=False).ids
    assert [hf_tokenizer.convert_ids_to_tokens(i) for i in ids] == ["x", "ĠĠ", "1", "ĉĉ", "2", "2"]
    assert ids != hf_tokenizer.encode(text)
    assert tokenizer.decode(ids) == text


# ---- chat templates --------------------------------------------------------------------


@pytest.mark.parametrize("messages", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(tokenizer, hf_tokenizer, messages, add_generation_prompt):
    ours = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt)
    theirs = hf_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs


def test_template_context_and_helpers(tokenizer):
    tokenizer = Tokenizer(
        tokenizer._backend,
        bos_token="<|im_start|>",
        eos_tokens=["<|im_end|>"],
        add_bos=False,
        chat_template="{{ bos_token }}{{ messages | tojson }}{{ eos_token }}"
        "{% if messages | length > 1 %}{{ raise_exception('only one message') }}{% endif %}",
    )
    messages = [{"role": "user", "content": "<é>"}]
    assert tokenizer.apply_chat_template(messages) == '<|im_start|>[{"role": "user", "content": "<é>"}]<|im_end|>'
    with pytest.raises(InvalidParameterError, match="only one message"):
        tokenizer.apply_chat_template(messages * 2)


def test_no_template_raises(tokenizer):
    bare = Tokenizer(tokenizer._backend, bos_token=None, eos_tokens=[], add_bos=False, chat_template=None)
    with pytest.raises(TokenizerError, match="no chat template"):
        bare.apply_chat_template([{"role": "user", "content": "hi"}])


def test_broken_template_raises(tokenizer):
    broken = Tokenizer(tokenizer._backend, bos_token=None, eos_tokens=[], add_bos=False, chat_template="{% for %}")
    with pytest.raises(TokenizerError, match="does not parse"):
        broken.apply_chat_template([{"role": "user", "content": "hi"}])


# ---- incremental detokenization --------------------------------------------------------

SPLIT_TEXT = "Unicode: 日本語 🤗🚀 漢字, naïve 👨‍👩‍👧 ok\n¿Qué tal? 🇫🇷"


def test_incremental_matches_full_decode(tokenizer):
    ids = tokenizer.encode(SPLIT_TEXT)
    assert any("\ufffd" in tokenizer.decode([i]) for i in ids), "the text should split characters across tokens"
    detokenizer = IncrementalDetokenizer(tokenizer)
    pieces = [detokenizer.add(i) for i in ids]
    assert not any("\ufffd" in piece for piece in pieces)
    assert "".join(pieces) == tokenizer.decode(ids) == SPLIT_TEXT
    assert detokenizer.text == SPLIT_TEXT
    assert detokenizer.flush() == ""


def test_incremental_with_prompt_and_special_tokens(tokenizer):
    prompt = tokenizer.encode("<|im_start|>user\nhi 🤗<|im_end|>\n<|im_start|>assistant\n")
    generated = tokenizer.encode(SPLIT_TEXT + "<|im_end|>")
    detokenizer = IncrementalDetokenizer(tokenizer, prompt_ids=prompt)
    text = "".join(detokenizer.add(i) for i in generated)
    assert text == tokenizer.decode(generated) == SPLIT_TEXT


def test_incremental_cost_is_a_window(tokenizer, monkeypatch):
    ids = tokenizer.encode(SPLIT_TEXT * 20)
    lengths = []
    decode = tokenizer.decode

    def counting_decode(window, skip_special_tokens=True):
        lengths.append(len(window))
        return decode(window, skip_special_tokens=skip_special_tokens)

    monkeypatch.setattr(tokenizer, "decode", counting_decode)
    detokenizer = IncrementalDetokenizer(tokenizer)
    for i in ids:
        detokenizer.add(i)
    monkeypatch.undo()
    assert len(ids) > 400
    assert max(lengths) <= 8
    assert detokenizer.text == tokenizer.decode(ids)


def test_flush_returns_incomplete_character(tokenizer):
    ids = tokenizer.encode("a🤗")
    partial = ids[:-1]
    detokenizer = IncrementalDetokenizer(tokenizer)
    held = "".join(detokenizer.add(i) for i in partial)
    assert "\ufffd" not in held
    assert held + detokenizer.flush() == tokenizer.decode(partial)


# ---- Hugging Face folders --------------------------------------------------------------


def test_from_dir_without_tokenizer_files(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert Tokenizer.from_dir(tmp_path) is None


def test_from_dir_tokenizer_json_saved_by_transformers(hf_tokenizer, tmp_path):
    hf_tokenizer.save_pretrained(tmp_path)
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.vocab_size == 49152
    assert loaded.bos_token_id == 1 and loaded.eos_token_ids == [2] and loaded.add_bos is False
    for text in TEXTS:
        ids = loaded.encode(text)
        assert ids == hf_tokenizer.encode(text)
        assert loaded.decode(ids, skip_special_tokens=False) == text
    messages = CONVERSATIONS[1]
    assert loaded.apply_chat_template(messages) == hf_tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )


def _tiny_bpe_folder(folder, text: str, with_bos: bool) -> tokenizers.Tokenizer:
    """A small byte-level BPE trained here, with a post-processor adding <s> when `with_bos`."""
    tokenizer = tokenizers.Tokenizer(tokenizers.models.BPE())
    tokenizer.pre_tokenizer = tokenizers.pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = tokenizers.decoders.ByteLevel()
    trainer = tokenizers.trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<s>", "</s>"],
        initial_alphabet=tokenizers.pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator([text], trainer=trainer)
    if with_bos:
        tokenizer.post_processor = tokenizers.processors.TemplateProcessing(
            single="<s> $A", special_tokens=[("<s>", 0)]
        )
    tokenizer.save(str(folder / "tokenizer.json"))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [1, 0]}))
    return tokenizer


@pytest.mark.parametrize("with_bos", [True, False])
def test_from_dir_tiny_tokenizer_json(tmp_path, with_bos):
    corpus = " ".join(TEXTS) * 5
    _tiny_bpe_folder(tmp_path, corpus, with_bos)
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.add_bos is with_bos
    assert loaded.eos_token_ids == [1, 0]  # from generation_config.json
    assert loaded.chat_template is None
    for text in TEXTS:
        ids = loaded.encode(text)
        assert (ids[:1] == [0]) is with_bos
        assert loaded.decode(ids) == text
        assert loaded.encode(text, add_special_tokens=False) == ids[int(with_bos) :]


@pytest.fixture(scope="module")
def sentencepiece_model(tmp_path_factory):
    folder = tmp_path_factory.mktemp("spm")
    corpus = folder / "corpus.txt"
    corpus.write_text("\n".join(TEXTS[:4] + TEXTS[7:]) * 20 + "\nthe quick brown fox jumps over the lazy dog\n")
    sentencepiece.SentencePieceTrainer.train(
        input=str(corpus),
        model_prefix=str(folder / "tokenizer"),
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        normalization_rule_name="identity",  # as Llama's: keep tabs and repeated spaces
        remove_extra_whitespaces=False,
        bos_id=1,
        eos_id=2,
        unk_id=0,
        minloglevel=2,
    )
    return folder / "tokenizer.model"


def test_from_dir_sentencepiece(sentencepiece_model, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(sentencepiece_model.read_bytes())
    processor = sentencepiece.SentencePieceProcessor(model_file=str(sentencepiece_model))
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.bos_token == "<s>" and loaded.bos_token_id == 1
    assert loaded.eos_token_ids == [2] and loaded.add_bos is True
    assert loaded.vocab_size == processor.get_piece_size()
    for text in ["Hello world! How are you today?", "naïve café 日本語 🤗", "the lazy dog\tand  two spaces"]:
        ids = loaded.encode(text)
        assert ids == [1] + processor.encode(text)
        assert loaded.decode(ids) == text
        detokenizer = IncrementalDetokenizer(loaded)
        assert "".join(detokenizer.add(i) for i in ids[1:]) == loaded.decode(ids[1:])
    assert loaded.encode("<s>hi</s>", add_special_tokens=False) == [1, *processor.encode("hi"), 2]
    assert loaded.decode([1, *processor.encode("hi"), 2], skip_special_tokens=False) == "<s>hi</s>"


def test_from_dir_sentencepiece_with_config(sentencepiece_model, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(sentencepiece_model.read_bytes())
    template = "{% for m in messages %}[{{ m['role'] }}] {{ m['content'] }}{{ eos_token }}{% endfor %}"
    config = {"add_bos_token": False, "eos_token": {"content": "</s>"}, "chat_template": template}
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.add_bos is False and loaded.encode("hi")[0] != 1
    rendered = loaded.apply_chat_template([{"role": "user", "content": "hi"}], add_generation_prompt=False)
    assert rendered == "[user] hi</s>"


def test_from_dir_sentencepiece_without_template_raises(sentencepiece_model, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(sentencepiece_model.read_bytes())
    with pytest.raises(TokenizerError):
        Tokenizer.from_dir(tmp_path).apply_chat_template([{"role": "user", "content": "hi"}])


def test_from_dir_chat_template_jinja_file(sentencepiece_model, tmp_path):
    (tmp_path / "tokenizer.model").write_bytes(sentencepiece_model.read_bytes())
    (tmp_path / "chat_template.jinja").write_text("{{ messages[0]['content'] }}!")
    loaded = Tokenizer.from_dir(tmp_path)
    assert loaded.apply_chat_template([{"role": "user", "content": "hey"}]) == "hey!"


def test_from_dir_corrupt_tokenizer_json(tmp_path):
    (tmp_path / "tokenizer.json").write_text("{not json")
    with pytest.raises(TokenizerError, match="tokenizer.json"):
        Tokenizer.from_dir(tmp_path)


def test_sentencepiece_incremental_with_prompt_keeps_leading_space(sentencepiece_model, tmp_path):
    """With prompt context a sentencepiece word's leading space is text the model produced;
    decode(generated ids) alone drops it. Byte-level BPE has no such difference."""
    (tmp_path / "tokenizer.model").write_bytes(sentencepiece_model.read_bytes())
    loaded = Tokenizer.from_dir(tmp_path)
    prompt = loaded.encode("the quick brown")
    generated = loaded.encode("fox jumps", add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(loaded, prompt_ids=prompt)
    text = "".join(detokenizer.add(i) for i in generated)
    assert text == " fox jumps" and loaded.decode(generated) == "fox jumps"


@pytest.mark.parametrize("messages, match", [
    ([], "non-empty list"), ("hi", "non-empty list"), (["hi"], "message 0 is a str"),
    ([{"role": "", "content": "a"}], "message 0 has role ''"), ([{"content": "a"}], "has role None"),
    ([{"role": "user", "content": "a"}, {"role": "bogus", "content": "b"}], "message 1 has role 'bogus'"),
    ([{"role": "user", "content": "a\ud800b"}], "message 0's content is not valid Unicode"),
])
def test_bad_conversations_are_typed_errors(tokenizer, messages, match):
    with pytest.raises(InvalidParameterError, match=match) as e:
        tokenizer.apply_chat_template(messages)
    assert e.value.field == "messages"


def test_encode_within_refuses_certainly_too_long_text_without_tokenizing(tokenizer, monkeypatch):
    from forklm.errors import ContextLengthError

    limit = 100
    bound = 2 * limit * tokenizer.max_token_chars
    assert tokenizer.max_token_chars >= max(len(tokenizer.decode([i], skip_special_tokens=False)) for i in range(500))
    assert tokenizer.encode_within("a" * bound, limit, "prompt") == tokenizer.encode("a" * bound)  # not refused here
    monkeypatch.setattr(tokenizer, "encode", lambda *a, **k: pytest.fail("tokenized an over-long text"))
    with pytest.raises(ContextLengthError, match="characters") as e:
        tokenizer.encode_within("a" * (bound + 1), limit, "prompt")
    assert e.value.field == "prompt"
