"""Tokenizers: one interface over the `tokenizers` package and sentencepiece.

A model's tokenizer comes from one of three places:

- a Hugging Face folder with `tokenizer.json` (read by `tokenizers`),
- a Hugging Face folder with only `tokenizer.model` (read by sentencepiece),
- a GGUF file's `tokenizer.ggml.*` metadata, from which a byte-level BPE
  `tokenizers.Tokenizer` is built (`Tokenizer.from_gguf_metadata`).

`Tokenizer` adds what the backends do not agree on: whether BOS is prepended,
which ids end generation, and the chat template. `IncrementalDetokenizer` turns
a stream of generated ids into a stream of text.
"""

from __future__ import annotations

import datetime
import functools
import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any, Protocol

import jinja2
import jinja2.ext
import jinja2.sandbox
import sentencepiece
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from forklm.errors import ContextLengthError, InvalidParameterError, TokenizerError

logger = logging.getLogger(__name__)

# `tokenizer.ggml.model` values from_gguf_metadata builds: byte-level BPE.
GGUF_TOKENIZER_MODELS = ("gpt2",)

# llama.cpp's token types (`tokenizer.ggml.token_type`).
_GGUF_CONTROL = 3
_GGUF_USER_DEFINED = 4

# Pre-tokenizer split patterns, by `tokenizer.ggml.pre`. Each cuts text into the
# pieces the vocabulary's merges were learned on: contractions, letter runs
# with one leading non-letter, digit runs (up to three, or one), punctuation
# runs, newlines, and whitespace not followed by a word.
_LLAMA3_PATTERN = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_PATTERN = _LLAMA3_PATTERN.replace(r"\p{N}{1,3}", r"\p{N}")
_SPLIT_PATTERNS = {
    "llama-bpe": _LLAMA3_PATTERN,
    "llama3": _LLAMA3_PATTERN,
    "llama-v3": _LLAMA3_PATTERN,
    "qwen2": _QWEN2_PATTERN,
    "deepseek-r1-qwen": _QWEN2_PATTERN,
}
# Pre-tokenizers whose BPE takes a whole piece that is itself in the vocabulary
# before trying merges (llama.cpp's `ignore_merges`).
_IGNORE_MERGES = {"llama-bpe", "llama3", "llama-v3"}


class _Backend(Protocol):
    """What `Tokenizer` needs from a tokenization library."""

    def encode(self, text: str) -> list[int]:
        """Ids for `text`, special tokens in it matched whole, nothing added."""

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        """Text for `ids`."""

    def token_to_id(self, token: str) -> int | None:
        """The id of a token spelled exactly `token`, or None."""

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included."""


class _TokenizersBackend:
    """A `tokenizers.Tokenizer` (tokenizer.json, or built from GGUF metadata)."""

    def __init__(self, tokenizer: tokenizers.Tokenizer):
        self.tokenizer = tokenizer

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self.tokenizer.token_to_id(token)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)


class _SentencePieceBackend:
    """A sentencepiece model, plus added tokens matched whole before it runs.

    sentencepiece itself never produces a control id such as `<s>` from text,
    so text is first cut at every special token (control pieces and the
    folder's added tokens) and only the pieces between go to sentencepiece.
    """

    def __init__(self, processor: sentencepiece.SentencePieceProcessor, added: Mapping[str, int]):
        self.processor = processor
        self.special = {
            processor.id_to_piece(i): i
            for i in range(processor.get_piece_size())
            if processor.is_control(i)
        }
        self.special.update(added)
        self.special_text = {i: token for token, i in self.special.items()}
        alternatives = sorted(self.special, key=len, reverse=True)
        self.splitter = re.compile("|".join(map(re.escape, alternatives))) if alternatives else None

    def encode(self, text: str) -> list[int]:
        if self.splitter is None:
            return self.processor.encode(text, out_type=int)
        ids: list[int] = []
        start = 0
        for match in self.splitter.finditer(text):
            if match.start() > start:
                ids += self.processor.encode(text[start : match.start()], out_type=int)
            ids.append(self.special[match.group()])
            start = match.end()
        if start < len(text):
            ids += self.processor.encode(text[start:], out_type=int)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool) -> str:
        parts: list[str] = []
        run: list[int] = []
        for token_id in ids:
            if token_id not in self.special_text:
                run.append(token_id)
                continue
            if run:
                parts.append(self.processor.decode(run))
                run = []
            if not skip_special_tokens:
                parts.append(self.special_text[token_id])
        if run:
            parts.append(self.processor.decode(run))
        return "".join(parts)

    def token_to_id(self, token: str) -> int | None:
        if token in self.special:
            return self.special[token]
        token_id = self.processor.piece_to_id(token)  # the unknown id when absent
        return token_id if self.processor.id_to_piece(token_id) == token else None

    @property
    def vocab_size(self) -> int:
        return max([self.processor.get_piece_size(), *(i + 1 for i in self.special.values())])


class Tokenizer:
    """Text to ids and back, end-of-sequence ids, and the chat template.

    Build one with `from_dir` or `from_gguf_metadata`.
    """

    def __init__(
        self,
        backend: _Backend,
        *,
        bos_token: str | None,
        eos_tokens: Sequence[str],
        add_bos: bool,
        chat_template: str | None,
        extra_eos_token_ids: Iterable[int] = (),
    ):
        self._backend = backend
        self.bos_token = bos_token
        # The first end token is the one templates call `eos_token`.
        self.eos_token = eos_tokens[0] if eos_tokens else None
        self.bos_token_id = self._known_id(bos_token)
        ids = [self._known_id(token) for token in eos_tokens] + list(extra_eos_token_ids)
        self.eos_token_ids: list[int] = list(dict.fromkeys(i for i in ids if i is not None))
        # Whether encode(..., add_special_tokens=True) prepends BOS.
        self.add_bos = add_bos and self.bos_token_id is not None
        self.chat_template = chat_template
        self._compiled_template: jinja2.Template | None = None

    def _known_id(self, token: str | None) -> int | None:
        if token is None:
            return None
        token_id = self._backend.token_to_id(token)
        if token_id is None:
            logger.warning("special token %r is not in the vocabulary; ignored", token)
        return token_id

    # ---- construction -------------------------------------------------------

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer | None:
        """The tokenizer of a Hugging Face folder, or None if it has none.

        `tokenizer.json` is preferred; `tokenizer.model` (sentencepiece) is
        the fallback. `tokenizer_config.json` supplies the chat template,
        BOS/EOS tokens and `add_bos_token`; `generation_config.json` may add
        end-of-sequence ids.
        """
        folder = Path(path)
        config = _read_json(folder / "tokenizer_config.json")
        found = _backend_from_dir(folder, config)
        if found is None:
            return None
        backend, own_bos, own_eos, own_add_bos = found
        eos_token = _token_content(config.get("eos_token")) or own_eos
        return cls(
            backend,
            bos_token=_token_content(config.get("bos_token")) or own_bos,
            eos_tokens=[eos_token] if eos_token else [],
            add_bos=bool(config.get("add_bos_token", own_add_bos)),
            chat_template=_chat_template_from_dir(folder, config),
            extra_eos_token_ids=_generation_eos_ids(folder),
        )

    @classmethod
    def from_gguf_metadata(cls, metadata: Mapping[str, Any]) -> Tokenizer:
        """The tokenizer a GGUF file describes, from its `tokenizer.*` keys.

        Only byte-level BPE vocabularies (`tokenizer.ggml.model == "gpt2"`) are
        built. Tokens typed CONTROL become special tokens and USER_DEFINED ones
        plain added tokens, so both are matched whole in text (`<|im_start|>`
        is one id).
        """
        model = metadata.get("tokenizer.ggml.model")
        if model not in GGUF_TOKENIZER_MODELS:
            raise TokenizerError(
                f"GGUF tokenizer model {model!r} is not supported; supported: {', '.join(GGUF_TOKENIZER_MODELS)}"
            )
        if "tokenizer.ggml.tokens" not in metadata:
            raise TokenizerError("GGUF metadata has no tokenizer.ggml.tokens")
        tokens: list[str] = list(metadata["tokenizer.ggml.tokens"])
        pre = metadata.get("tokenizer.ggml.pre", "default")
        backend = _TokenizersBackend(
            _byte_level_bpe(
                tokens,
                merges=metadata.get("tokenizer.ggml.merges", []),
                token_types=metadata.get("tokenizer.ggml.token_type", []),
                pre=pre,
            )
        )

        def token(key: str) -> str | None:
            token_id = metadata.get(f"tokenizer.ggml.{key}")
            return tokens[token_id] if token_id is not None and 0 <= token_id < len(tokens) else None

        end_tokens = [token(key) for key in ("eos_token_id", "eot_token_id", "eom_token_id")]
        return cls(
            backend,
            bos_token=token("bos_token_id"),
            eos_tokens=[t for t in end_tokens if t is not None],
            add_bos=bool(metadata.get("tokenizer.ggml.add_bos_token", False)),
            chat_template=metadata.get("tokenizer.chat_template"),
        )

    # ---- encoding -----------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included."""
        return self._backend.vocab_size

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids for `text`; BOS is prepended only when the model adds it.

        Special tokens written in `text` (e.g. `<|im_start|>`) become their
        ids. Encode a rendered chat template with add_special_tokens=False
        when the template writes BOS itself.
        """
        ids = self._backend.encode(text)
        if add_special_tokens and self.add_bos:
            ids.insert(0, self.bos_token_id)
        return ids

    @functools.cached_property
    def max_token_chars(self) -> int:
        """The most characters any one token decodes to (so a text of c characters has at least
        c / max_token_chars tokens). Computed once over the vocabulary (~0.1 s for 49k tokens)."""
        return max((len(self.decode([i], skip_special_tokens=False)) for i in range(self.vocab_size)), default=1) or 1

    def encode_within(self, text: str, max_tokens: int, field: str, add_special_tokens: bool = True) -> list[int]:
        """`encode`, refusing at once a text that certainly has more than `max_tokens` tokens (its length
        over twice what max_tokens tokens can spell), so an over-long prompt costs no tokenization."""
        if len(text) > 2 * max_tokens * self.max_token_chars:
            raise ContextLengthError(
                field, f"{len(text)} characters: more than the model's context of {max_tokens} tokens can hold")
        return self.encode(text, add_special_tokens=add_special_tokens)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text for `ids`; special tokens are left out unless asked for."""
        return self._backend.decode(ids, skip_special_tokens)

    # ---- chat ---------------------------------------------------------------

    def apply_chat_template(
        self, messages: list[dict], add_generation_prompt: bool = True, **context: Any
    ) -> str:
        """The prompt text for a conversation, rendered by the chat template.

        Extra keyword arguments (e.g. `tools`) are passed to the template.
        Raises TokenizerError when the model has no template or it does not
        render, InvalidParameterError when the template rejects the messages.
        """
        _check_messages(messages)
        template = self._template()
        try:
            return template.render(
                messages=messages,
                add_generation_prompt=add_generation_prompt,
                bos_token=self.bos_token or "",
                eos_token=self.eos_token or "",
                **context,
            )
        except (InvalidParameterError, TokenizerError):
            raise
        except (jinja2.TemplateError, TypeError, ValueError) as error:  # e.g. "+" on a null content
            raise InvalidParameterError("messages", f"the chat template cannot render these messages: {error}") from error

    def _template(self) -> jinja2.Template:
        if self.chat_template is None:
            raise TokenizerError("this model has no chat template; send a prompt instead of messages")
        if self._compiled_template is None:
            try:
                self._compiled_template = _chat_environment().from_string(self.chat_template)
            except jinja2.TemplateError as error:
                raise TokenizerError(f"chat template does not parse: {error}") from error
        return self._compiled_template


class IncrementalDetokenizer:
    """Text for generated ids, one id at a time.

    Each `add` decodes only a small window: the ids of the last emitted piece
    (context, so a leading space or a byte-level merge decodes as it would in
    the full text) plus the ids not yet emitted. Text ending in U+FFFD is an
    incomplete UTF-8 character split across tokens: it is held back until the
    next token completes it. Without `prompt_ids`, the concatenation of all
    `add` results (plus `flush()`) equals `tokenizer.decode(generated ids)`.
    With `prompt_ids`, the window starts in the prompt; for byte-level BPE the
    text is the same, for sentencepiece a leading space of the first generated
    token is kept (decode of the generated ids alone drops it).
    """

    # Ids of the prompt's tail used as context for the first generated ids.
    PROMPT_CONTEXT = 5

    def __init__(
        self,
        tokenizer: Tokenizer,
        prompt_ids: Sequence[int] | None = None,
        skip_special_tokens: bool = True,
    ):
        self._tokenizer = tokenizer
        self._skip_special_tokens = skip_special_tokens
        self._ids: list[int] = list(prompt_ids or ())
        self._read_offset = len(self._ids)
        self._prefix_offset = max(self._read_offset - self.PROMPT_CONTEXT, 0)
        self._pieces: list[str] = []

    @property
    def text(self) -> str:
        """All text emitted so far."""
        return "".join(self._pieces)

    def add(self, token_id: int) -> str:
        """Append one generated id; return the text it completes (maybe "")."""
        self._ids.append(token_id)
        return self._emit(final=False)

    def flush(self) -> str:
        """Return any held-back text, even an incomplete character, at the end."""
        return self._emit(final=True)

    def _emit(self, final: bool) -> str:
        known = self._decode(self._prefix_offset, self._read_offset)
        full = self._decode(self._prefix_offset, len(self._ids))
        if len(full) <= len(known) or (full.endswith("\ufffd") and not final):
            return ""
        piece = full[len(known) :]
        self._prefix_offset, self._read_offset = self._read_offset, len(self._ids)
        self._pieces.append(piece)
        return piece

    def _decode(self, start: int, end: int) -> str:
        return self._tokenizer.decode(self._ids[start:end], skip_special_tokens=self._skip_special_tokens)


# ---- byte-level BPE from GGUF metadata --------------------------------------


def _byte_level_bpe(
    tokens: list[str], merges: Sequence[str], token_types: Sequence[int], pre: str
) -> tokenizers.Tokenizer:
    """A `tokenizers.Tokenizer` for a GGUF byte-level BPE vocabulary.

    GGUF stores tokens already spelled in the GPT-2 byte alphabet ("Ġ" for a
    space), and merges as "left right" strings.
    """
    vocab = {token: index for index, token in enumerate(tokens)}
    if len(vocab) != len(tokens):
        logger.warning("GGUF vocabulary repeats %d token spellings", len(tokens) - len(vocab))
    pairs = [tuple(merge.split(" ", 1)) for merge in merges]
    try:
        bpe = models.BPE(vocab=vocab, merges=pairs, ignore_merges=pre in _IGNORE_MERGES)
    except Exception as error:  # the Rust side raises plain Exception, e.g. a merge of unknown tokens
        raise TokenizerError(f"GGUF vocabulary is inconsistent: {error}") from None
    tokenizer = tokenizers.Tokenizer(bpe)
    tokenizer.pre_tokenizer = _pre_tokenizer(pre)
    tokenizer.decoder = decoders.ByteLevel()
    _add_typed_tokens(tokenizer, tokens, token_types)
    return tokenizer


def _pre_tokenizer(pre: str) -> pre_tokenizers.PreTokenizer:
    """The pre-tokenizer llama.cpp uses for `tokenizer.ggml.pre`."""
    if pre == "smollm":
        # SmolLM's own tokenizer.json: every digit alone, then GPT-2's split.
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ]
        )
    if pre in _SPLIT_PATTERNS:
        return pre_tokenizers.Sequence(
            [
                pre_tokenizers.Split(tokenizers.Regex(_SPLIT_PATTERNS[pre]), behavior="isolated"),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
            ]
        )
    if pre not in ("gpt2", "default"):
        logger.warning("GGUF pre-tokenizer %r is not known; using GPT-2's split", pre)
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _add_typed_tokens(tokenizer: tokenizers.Tokenizer, tokens: list[str], token_types: Sequence[int]) -> None:
    """Register CONTROL tokens as special and USER_DEFINED ones as added."""
    special, added = [], []
    for token, token_type in zip(tokens, token_types):
        if token_type == _GGUF_CONTROL:
            special.append(tokenizers.AddedToken(token, special=True, normalized=False))
        elif token_type == _GGUF_USER_DEFINED:
            added.append(tokenizers.AddedToken(token, special=False, normalized=False))
    if special:
        tokenizer.add_special_tokens(special)
    if added:
        tokenizer.add_tokens(added)


# ---- Hugging Face folders ----------------------------------------------------


def _read_json(path: Path) -> dict:
    if not path.is_file():
        return {}
    try:
        with open(path, encoding="utf-8") as handle:
            return json.load(handle)
    except (OSError, ValueError) as error:
        raise TokenizerError(f"{path}: cannot read: {error}") from error


def _token_content(token: Any) -> str | None:
    """A special token as tokenizer_config.json writes it: a string or an AddedToken dict."""
    if isinstance(token, dict):
        return token.get("content")
    return token if isinstance(token, str) else None


def _added_tokens(config: Mapping[str, Any]) -> dict[str, int]:
    """tokenizer_config.json's `added_tokens_decoder`, as {content: id}."""
    decoder = config.get("added_tokens_decoder") or {}
    return {entry["content"]: int(token_id) for token_id, entry in decoder.items() if "content" in entry}


def _backend_from_dir(folder: Path, config: Mapping[str, Any]) -> tuple[_Backend, str | None, str | None, bool] | None:
    """(backend, its BOS token, its EOS token, whether it adds BOS) for a folder, or None.

    A tokenizer.json adds BOS when its post-processor does; a sentencepiece
    model names its own BOS/EOS pieces and adds BOS by convention (Llama).
    """
    if (folder / "tokenizer.json").is_file():
        tokenizer = _load_tokenizer_json(folder / "tokenizer.json")
        bos_id = _bos_added_by_post_processor(tokenizer)
        bos = tokenizer.id_to_token(bos_id) if bos_id is not None else None
        return _TokenizersBackend(tokenizer), bos, None, bos_id is not None
    if (folder / "tokenizer.model").is_file():
        processor = _load_sentencepiece(folder / "tokenizer.model")

        def piece(token_id: int) -> str | None:
            return processor.id_to_piece(token_id) if token_id >= 0 else None

        backend = _SentencePieceBackend(processor, _added_tokens(config))
        return backend, piece(processor.bos_id()), piece(processor.eos_id()), True
    return None


def _load_tokenizer_json(path: Path) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer.from_file(str(path))
    except Exception as error:  # the Rust side raises plain Exception
        raise TokenizerError(f"{path}: not a valid tokenizer.json: {error}") from error


def _load_sentencepiece(path: Path) -> sentencepiece.SentencePieceProcessor:
    processor = sentencepiece.SentencePieceProcessor()
    try:
        processor.load(str(path))
    except (OSError, RuntimeError) as error:
        raise TokenizerError(f"{path}: not a valid sentencepiece model: {error}") from error
    return processor


def _bos_added_by_post_processor(tokenizer: tokenizers.Tokenizer) -> int | None:
    """The id the tokenizer's post-processor puts before the text, if any."""
    with_special = tokenizer.encode("a", add_special_tokens=True).ids
    plain = tokenizer.encode("a", add_special_tokens=False).ids
    if len(with_special) > len(plain) and with_special[len(with_special) - len(plain) :] == plain:
        return with_special[0]
    return None


def _chat_template_from_dir(folder: Path, config: Mapping[str, Any]) -> str | None:
    """The folder's chat template: chat_template.jinja, else tokenizer_config.json, else chat_template.json."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None:
        template = _read_json(folder / "chat_template.json").get("chat_template")
    if isinstance(template, list):  # named templates: [{"name": ..., "template": ...}]
        named = {entry.get("name"): entry.get("template") for entry in template}
        template = named.get("default")
    return template if isinstance(template, str) else None


def _generation_eos_ids(folder: Path) -> list[int]:
    """generation_config.json's eos_token_id (an int or a list)."""
    eos = _read_json(folder / "generation_config.json").get("eos_token_id")
    if eos is None:
        return []
    return [int(i) for i in (eos if isinstance(eos, list) else [eos])]


# ---- chat templates ----------------------------------------------------------


def _raise_exception(message: str) -> None:
    """Templates call this to reject a conversation (e.g. roles out of order)."""
    raise InvalidParameterError("messages", message)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, sort_keys: bool = False) -> str:
    """JSON without Jinja's HTML escaping, which would corrupt prompts."""
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, sort_keys=sort_keys)


def _strftime_now(format_string: str) -> str:
    return datetime.datetime.now().strftime(format_string)


def _chat_environment() -> jinja2.Environment:
    """A sandboxed Jinja environment configured like Hugging Face chat templates expect."""
    environment = jinja2.sandbox.ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols]
    )
    environment.filters["tojson"] = _tojson
    environment.globals["raise_exception"] = _raise_exception
    environment.globals["strftime_now"] = _strftime_now
    return environment


CHAT_ROLES = ("system", "developer", "user", "assistant", "tool", "function")  # OpenAI's


def _check_messages(messages: Any) -> None:
    """A conversation a chat template can be given: a non-empty list of messages with a known role."""
    if not isinstance(messages, list) or not messages:
        raise InvalidParameterError("messages", "must be a non-empty list of messages")
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise InvalidParameterError("messages", f"message {i} is a {type(m).__name__}, not a dict")
        if m.get("role") not in CHAT_ROLES:
            raise InvalidParameterError("messages", f"message {i} has role {m.get('role')!r}, not one of {list(CHAT_ROLES)}")
        content = m.get("content")
        if isinstance(content, str):
            check_unicode(content, "messages", f"message {i}'s content")


def check_unicode(text: str, field: str, what: str = "the text") -> None:
    """Text a tokenizer can take: no lone surrogates ("\ud800", which JSON and Python strings may carry)."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as error:
        raise InvalidParameterError(field, f"{what} is not valid Unicode: {error.reason} at {error.start}") from None
