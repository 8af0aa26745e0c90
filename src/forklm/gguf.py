"""GGUF checkpoints: a Hugging Face style config, tensors and tokenizer from one file.

A GGUF file (llama.cpp's format) holds metadata (architecture hyper-parameters
under `<arch>.*` keys, the vocabulary under `tokenizer.*`) and tensors under
llama.cpp's names, many of them quantized. `load_gguf` turns that into what a
Hugging Face folder would give: a config.json dict, tensors under Hugging Face
names in Hugging Face layout (dequantized one at a time to `dtype`), and a
`forklm.tokenizer.Tokenizer`.

Two layout differences from Hugging Face are undone here:

- llama.cpp's converter permutes the rows of Llama q/k projections so that the
  two elements of each rotary pair are adjacent; Hugging Face keeps the two
  halves of each head apart. Qwen2 files are not permuted.
- GPT-2's Hugging Face checkpoints store linear weights transposed (Conv1D);
  GGUF stores them as (out, in).
"""

from __future__ import annotations

import hashlib
import json
import logging
import math
import mmap
import re
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import gguf.quants
import numpy as np
import torch

from forklm.errors import CheckpointError, TokenizerError, UnsupportedModelError
from forklm.host import cache_dir, write_cache_file
from forklm.quant import LOW_PRECISION_TYPES
from forklm.tokenizer import GGUF_TOKENIZER_MODELS, Tokenizer

logger = logging.getLogger(__name__)

_MAGIC = b"GGUF"


@dataclass
class GGUFCheckpoint:
    """Everything a GGUF file describes, in Hugging Face terms."""

    config: dict  # a config.json dict
    tensors: dict[str, torch.Tensor]  # Hugging Face names -> dequantized weights
    tokenizer: Tokenizer | None  # None when the file's tokenizer kind is not supported
    chat_template: str | None  # `tokenizer.chat_template`, if the file has one
    eos_token_ids: list[int]  # ids that end generation
    bos_token_id: int | None
    low_precision: set[str] = field(default_factory=set)  # names of tensors stored in quant.LOW_PRECISION_TYPES
    dtype: torch.dtype = torch.float32  # the dtype the tensors were converted to


@dataclass(frozen=True)
class _Architecture:
    """How one `general.architecture` maps onto Hugging Face."""

    model_type: str
    hf_class: str
    top_level: dict[str, str]  # GGUF tensor base name -> Hugging Face module path
    block: dict[str, str]  # GGUF per-block base name -> module path inside a layer
    layer_prefix: str  # Hugging Face prefix of layer i, with {i}
    permute_qk: bool  # rows of attn_q / attn_k are in llama.cpp's rotary order
    transpose_linear: bool  # Hugging Face stores block linear weights as (in, out)


_LLAMA_TOP = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
_LLAMA_BLOCK = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
_GPT2_TOP = {
    "token_embd": "transformer.wte",
    "position_embd": "transformer.wpe",
    "output_norm": "transformer.ln_f",
    "output": "lm_head",
}
_GPT2_BLOCK = {
    "attn_norm": "ln_1",
    "attn_qkv": "attn.c_attn",
    "attn_output": "attn.c_proj",
    "ffn_norm": "ln_2",
    "ffn_up": "mlp.c_fc",
    "ffn_down": "mlp.c_proj",
}
_ARCHITECTURES = {
    "llama": _Architecture("llama", "LlamaForCausalLM", _LLAMA_TOP, _LLAMA_BLOCK, "model.layers.{i}.", True, False),
    "qwen2": _Architecture("qwen2", "Qwen2ForCausalLM", _LLAMA_TOP, _LLAMA_BLOCK, "model.layers.{i}.", False, False),
    "gpt2": _Architecture("gpt2", "GPT2LMHeadModel", _GPT2_TOP, _GPT2_BLOCK, "transformer.h.{i}.", False, True),
}
SUPPORTED_ARCHITECTURES = tuple(_ARCHITECTURES)

_BLOCK_TENSOR = re.compile(r"blk\.(\d+)\.(\w+)\.(weight|bias)")
_TOP_TENSOR = re.compile(r"(\w+)\.(weight|bias)")


def stored_dtype(reader: gguf.GGUFReader | list[_TensorInfo]) -> str:
    """"quantized" if any tensor is in a block format, else the float type of the file's weights."""
    tensors = reader.tensors if isinstance(reader, gguf.GGUFReader) else reader
    types = {t.tensor_type.name for t in tensors}
    if types - {"F32", "F16", "BF16"}:
        return "quantized"
    return {"F16": "float16", "BF16": "bfloat16"}.get(next(iter(sorted(types - {"F32"})), "F32"), "float32")


def load_gguf(path: str | Path, dtype) -> GGUFCheckpoint:
    """Read a GGUF file into a Hugging Face config, tensors and tokenizer.

    Raises CheckpointError (naming the file, and the tensor where one is at
    fault) for a missing, non-GGUF, truncated or inconsistent file, and
    UnsupportedModelError for an architecture or feature forklm does not run.
    """
    path = Path(path)
    metadata, infos = _read_header(path)
    if callable(dtype):  # chosen from what the file stores (checkpoint.DtypeChoice)
        dtype = dtype(stored_dtype(infos))
    architecture = _architecture(metadata, path)
    config = _build_config(architecture, metadata, {tensor.name for tensor in infos}, path)
    tokenizer = _tokenizer(metadata, path)
    bos_token_id, eos_token_ids = _special_ids(tokenizer, metadata)
    config["bos_token_id"] = bos_token_id
    config["eos_token_id"] = eos_token_ids[0] if eos_token_ids else None
    tensors, low_precision = _load_tensors(infos, architecture, config, dtype, path)
    return GGUFCheckpoint(
        config=config,
        tensors=tensors,
        low_precision=low_precision,
        dtype=dtype,
        tokenizer=tokenizer,
        chat_template=metadata.get("tokenizer.chat_template"),
        eos_token_ids=eos_token_ids,
        bos_token_id=bos_token_id,
    )


# bump when what _read_header caches changes
HEADER_CACHE_VERSION = 2


def _read_header(path: Path) -> tuple[dict[str, Any], list[_TensorInfo]]:
    """The file's metadata and tensor list, parsed by gguf's GGUFReader once per file and kept in
    host.cache_dir() as JSON, keyed by the file's path, size and modification time (one entry per path:
    a changed file's entry is replaced, not kept beside the new one). GGUFReader builds
    a numpy view per element of the vocabulary's arrays: 2.5 s and ~150 MB for the embedded model's
    49152 tokens and 48900 merges (measured); reading the JSON back takes ~0.05 s."""
    stat = path.stat() if path.is_file() else None
    key = None if stat is None else {"version": HEADER_CACHE_VERSION, "path": str(path.resolve()),
                                     "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    cached = None
    if key is not None:
        cached = cache_dir() / f"gguf-header-{hashlib.sha1(key['path'].encode()).hexdigest()[:16]}.json"
        try:
            entry = json.loads(cached.read_text())
            if entry["key"] == key:
                return entry["metadata"], [_TensorInfo.from_json(t) for t in entry["tensors"]]
        except (OSError, ValueError, KeyError, TypeError):
            pass
    reader = _open_reader(path)
    metadata = _read_metadata(reader, path)
    infos = [_TensorInfo.of(t) for t in reader.tensors]
    del reader  # its parsed fields: ~150 MB of small arrays (above), gone before any tensor loads
    if cached is not None:
        try:
            write_cache_file(cached, json.dumps({"key": key, "metadata": metadata,
                                                 "tensors": [t.to_json() for t in infos]}))
        except (OSError, TypeError, ValueError) as error:  # unwritable, or a value JSON cannot hold
            logger.debug("GGUF header of %s not cached: %s", path, error)
    return metadata, infos


@dataclass(frozen=True)
class _TensorInfo:
    """Where one tensor's bytes are in the file, and how to read them (from a GGUFReader's tensor)."""

    name: str
    tensor_type: gguf.GGMLQuantizationType
    shape: tuple[int, ...]  # GGUF order: the fastest dimension first
    raw_shape: tuple[int, ...]  # the raw array: (rows, ..., bytes per row) for quantized types
    raw_dtype: np.dtype  # uint8 for quantized types, else the element type
    offset: int  # of the first byte in the file

    @staticmethod
    def of(tensor: Any) -> "_TensorInfo":
        return _TensorInfo(tensor.name, tensor.tensor_type, tuple(int(d) for d in tensor.shape),
                           tuple(tensor.data.shape), tensor.data.dtype, int(tensor.data_offset))

    def to_json(self) -> list:
        return [self.name, int(self.tensor_type), list(self.shape), list(self.raw_shape), self.raw_dtype.str,
                self.offset]

    @staticmethod
    def from_json(v: list) -> "_TensorInfo":
        name, kind, shape, raw_shape, raw_dtype, offset = v
        return _TensorInfo(str(name), gguf.GGMLQuantizationType(kind), tuple(shape), tuple(raw_shape),
                           np.dtype(raw_dtype), int(offset))


def _load_tensors(
    infos: list[_TensorInfo], arch: _Architecture, config: dict, dtype: torch.dtype, path: Path
) -> tuple[dict[str, torch.Tensor], set[str]]:
    """Every tensor under its Hugging Face name, dequantized one at a time, and the names of those
    the file stores in a low-precision type (quant.LOW_PRECISION_TYPES).

    `rope_freqs.weight` is not a weight: it becomes config["rope_scaling"].
    """
    tensors, low_precision = {}, set()
    with open(path, "rb") as handle:  # read, not mapped: the file's pages are not held in this process
        for tensor in infos:
            if tensor.name == _ROPE_FREQS and arch.model_type == "llama":
                config["rope_scaling"] = _llama3_rope_scaling(_dequantize(tensor, handle, path), config, path)
                continue
            hf_name, value = _convert_tensor(tensor, handle, arch, config, dtype, path)
            tensors[hf_name] = value
            if tensor.tensor_type.name in LOW_PRECISION_TYPES:
                low_precision.add(hf_name)
    return tensors, low_precision


def _special_ids(tokenizer: Tokenizer | None, metadata: dict[str, Any]) -> tuple[int | None, list[int]]:
    """(BOS id, ids that end generation), from the tokenizer or, without one, the metadata."""
    if tokenizer is not None:
        return tokenizer.bos_token_id, list(tokenizer.eos_token_ids)
    end_keys = ("eos_token_id", "eot_token_id", "eom_token_id")
    end_ids = [metadata[f"tokenizer.ggml.{key}"] for key in end_keys if f"tokenizer.ggml.{key}" in metadata]
    return metadata.get("tokenizer.ggml.bos_token_id"), list(dict.fromkeys(end_ids))


def _tokenizer(metadata: dict[str, Any], path: Path) -> Tokenizer | None:
    """The file's tokenizer; None (with a warning) for a kind forklm cannot build."""
    model = metadata.get("tokenizer.ggml.model")
    if model not in GGUF_TOKENIZER_MODELS:
        logger.warning(
            "%s: GGUF tokenizer model %r is not supported (supported: %s); loading without a tokenizer, "
            "so only token-id prompts work",
            path, model, ", ".join(GGUF_TOKENIZER_MODELS),
        )
        return None
    try:
        return Tokenizer.from_gguf_metadata(metadata)
    except TokenizerError as error:
        raise CheckpointError(f"{path}: tokenizer metadata: {error}") from None


# ---- reading the file ----------------------------------------------------------


def _open_reader(path: Path) -> gguf.GGUFReader:
    """A GGUFReader for `path`, or a CheckpointError saying what is wrong with the file."""
    if not path.is_file():
        raise CheckpointError(f"{path}: no such GGUF file")
    with open(path, "rb") as handle:
        magic = handle.read(len(_MAGIC))
    if magic != _MAGIC:
        raise CheckpointError(f"{path}: not a GGUF file (it does not start with {_MAGIC!r})")
    try:
        return gguf.GGUFReader(path)
    except (ValueError, IndexError, struct.error, OSError) as error:
        tensor = _first_tensor_past_end(path)
        where = f"tensor {tensor!r} extends past the end of the file" if tensor else f"header unreadable ({error})"
        raise CheckpointError(f"{path}: truncated or corrupt GGUF file: {where}") from None


def _read_metadata(reader: gguf.GGUFReader, path: Path) -> dict[str, Any]:
    """Every metadata key with its Python value (strings, numbers, lists)."""
    metadata = {}
    for key, field in reader.fields.items():
        try:
            metadata[key] = field.contents()
        except (ValueError, IndexError, UnicodeDecodeError) as error:
            raise CheckpointError(f"{path}: metadata key {key!r} is unreadable ({error})") from None
    return metadata


def _first_tensor_past_end(path: Path) -> str | None:
    """In a file GGUFReader rejected, the first tensor whose data the file lacks.

    Parses the (little-endian) header directly; None when the header itself
    is cut short or not understood.
    """
    try:
        with open(path, "rb") as handle, mmap.mmap(handle.fileno(), 0, access=mmap.ACCESS_READ) as data:
            return _scan_tensor_extents(data)
    except (ValueError, IndexError, KeyError, OverflowError, struct.error, OSError):
        return None


def _scan_tensor_extents(data: mmap.mmap) -> str | None:
    """Walk a GGUF v2/v3 header; return the first tensor ending past len(data)."""
    offset = 4 + 4  # magic, version
    n_tensors, n_kv = struct.unpack_from("<QQ", data, offset)
    offset += 16
    alignment = 32
    for _ in range(n_kv):
        key, offset = _scan_string(data, offset)
        (value_type,) = struct.unpack_from("<I", data, offset)
        value, offset = _scan_value(data, offset + 4, value_type)
        if key == "general.alignment":
            alignment = int(value)
    infos = []
    for _ in range(n_tensors):
        name, offset = _scan_string(data, offset)
        (n_dims,) = struct.unpack_from("<I", data, offset)
        dims = struct.unpack_from(f"<{n_dims}Q", data, offset + 4)
        tensor_type, tensor_offset = struct.unpack_from("<IQ", data, offset + 4 + 8 * n_dims)
        offset += 4 + 8 * n_dims + 12
        infos.append((name, dims, tensor_type, tensor_offset))
    data_start = -(-offset // alignment) * alignment
    for name, dims, tensor_type, tensor_offset in infos:
        block_size, block_bytes = gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType(tensor_type)]
        n_bytes = math.prod(dims) // block_size * block_bytes
        if data_start + tensor_offset + n_bytes > len(data):
            return name
    return None


_SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?", 10: "<Q", 11: "<q", 12: "<d"}
_STRING, _ARRAY = 8, 9


def _scan_string(data: mmap.mmap, offset: int) -> tuple[str, int]:
    (length,) = struct.unpack_from("<Q", data, offset)
    end = offset + 8 + length
    if end > len(data):
        raise ValueError("string past the end of the file")
    return data[offset + 8 : end].decode("utf-8", errors="replace"), end


def _scan_value(data: mmap.mmap, offset: int, value_type: int) -> tuple[Any, int]:
    if value_type == _STRING:
        return _scan_string(data, offset)
    if value_type == _ARRAY:
        element_type, count = struct.unpack_from("<IQ", data, offset)
        offset += 12
        if element_type in _SCALAR_FORMATS:  # skip a numeric array in one step
            return None, offset + count * struct.calcsize(_SCALAR_FORMATS[element_type])
        for _ in range(count):
            _, offset = _scan_value(data, offset, element_type)
        return None, offset
    fmt = _SCALAR_FORMATS[value_type]
    return struct.unpack_from(fmt, data, offset)[0], offset + struct.calcsize(fmt)


# ---- config ---------------------------------------------------------------------


def _architecture(metadata: dict[str, Any], path: Path) -> _Architecture:
    name = metadata.get("general.architecture")
    if name not in _ARCHITECTURES:
        raise UnsupportedModelError(
            f"{path}: GGUF architecture {name!r} is not supported; "
            f"supported: {', '.join(SUPPORTED_ARCHITECTURES)}"
        )
    return _ARCHITECTURES[name]


def _build_config(arch: _Architecture, metadata: dict[str, Any], names: set[str], path: Path) -> dict:
    """The config.json a Hugging Face folder of this model would have."""

    def need(key: str) -> Any:
        full_key = f"{arch.model_type}.{key}"
        if full_key not in metadata:
            raise CheckpointError(f"{path}: required metadata key {full_key!r} is missing")
        value = metadata[full_key]
        if isinstance(value, list):
            raise UnsupportedModelError(f"{path}: per-layer {full_key!r} is not supported")
        return value

    def get(key: str, default: Any = None) -> Any:
        return metadata.get(f"{arch.model_type}.{key}", default)

    vocab_size = get("vocab_size") or len(metadata.get("tokenizer.ggml.tokens", ()))
    tied = "output.weight" not in names
    if arch.model_type == "gpt2":
        return {
            "model_type": "gpt2",
            "architectures": [arch.hf_class],
            "n_embd": need("embedding_length"),
            "n_layer": need("block_count"),
            "n_head": need("attention.head_count"),
            "n_positions": need("context_length"),
            "n_ctx": need("context_length"),
            "n_inner": need("feed_forward_length"),
            "layer_norm_epsilon": need("attention.layer_norm_epsilon"),
            "activation_function": "gelu_new",
            "vocab_size": vocab_size,
            "tie_word_embeddings": tied,
        }
    heads = need("attention.head_count")
    config = {
        "model_type": arch.model_type,
        "architectures": [arch.hf_class],
        "hidden_size": need("embedding_length"),
        "intermediate_size": need("feed_forward_length"),
        "num_hidden_layers": need("block_count"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv") or heads,
        "rms_norm_eps": need("attention.layer_norm_rms_epsilon"),
        "rope_theta": get("rope.freq_base", 10000.0),
        "max_position_embeddings": need("context_length"),
        "vocab_size": vocab_size,
        "tie_word_embeddings": tied,
        "hidden_act": "silu",
    }
    if arch.model_type == "llama":
        config["attention_bias"] = "blk.0.attn_q.bias" in names
    head_dim = get("attention.key_length") or get("rope.dimension_count")
    if head_dim:
        config["head_dim"] = head_dim
    rope_scaling = _rope_scaling(get)
    if rope_scaling:
        config["rope_scaling"] = rope_scaling
    return config


def _rope_scaling(get) -> dict | None:
    """`rope.scaling.*` metadata as a config.json rope_scaling dict."""
    kind = get("rope.scaling.type")
    if kind in (None, "none"):
        return None
    scaling = {"rope_type": kind, "factor": get("rope.scaling.factor")}
    original = get("rope.scaling.original_context_length")
    if original:
        scaling["original_max_position_embeddings"] = original
    return scaling


# Llama 3.1 / 3.2 files carry their rope scaling as per-frequency divisors in this tensor
# instead of metadata. Every released Llama 3.x uses these parameters but the factor; the
# divisors they imply are checked against the tensor, so no other scheme passes silently.
_ROPE_FREQS = "rope_freqs.weight"
_LLAMA3_ROPE = {"low_freq_factor": 1.0, "high_freq_factor": 4.0, "original_max_position_embeddings": 8192}


def _llama3_rope_scaling(divisors: torch.Tensor, config: dict, path: Path) -> dict:
    """The config.json rope_scaling whose per-frequency divisors are `divisors`."""
    factor = round(float(divisors.max()), 3)  # long wavelengths are divided by exactly the factor
    scaling = {"rope_type": "llama3", "factor": factor, **_LLAMA3_ROPE}
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    expected = _llama3_rope_divisors(head_dim, config["rope_theta"], scaling)
    if divisors.shape != expected.shape or not torch.allclose(divisors.float(), expected, rtol=1e-3):
        raise UnsupportedModelError(
            f"{path}: tensor {_ROPE_FREQS!r} is not Llama 3 rope scaling "
            f"(factor {scaling['factor']:g} with {_LLAMA3_ROPE}); other per-frequency scalings are not supported"
        )
    return scaling


def _llama3_rope_divisors(head_dim: int, theta: float, scaling: dict) -> torch.Tensor:
    """What each rotary frequency is divided by under Llama 3 rope scaling, (head_dim / 2,)."""
    inv_freq = theta ** -(torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim)
    wavelength = 2 * math.pi / inv_freq
    original = scaling["original_max_position_embeddings"]
    low, high, factor = scaling["low_freq_factor"], scaling["high_freq_factor"], scaling["factor"]
    # 0 for long wavelengths (divide by factor), 1 for short ones (keep), linear between.
    smooth = ((original / wavelength - low) / (high - low)).clamp(0.0, 1.0)
    return (1.0 / ((1.0 - smooth) / factor + smooth)).float()


# ---- tensors ----------------------------------------------------------------------


def _convert_tensor(
    tensor: _TensorInfo, handle, arch: _Architecture, config: dict, dtype: torch.dtype, path: Path
) -> tuple[str, torch.Tensor]:
    """One GGUF tensor as (Hugging Face name, dequantized tensor in Hugging Face layout)."""
    hf_name, base = _hf_name(tensor.name, arch, path)
    value = _dequantize(tensor, handle, path, dtype)
    if arch.permute_qk and base in ("attn_q", "attn_k"):
        heads = config["num_attention_heads"] if base == "attn_q" else config["num_key_value_heads"]
        value = _unpermute_rotary_rows(value, heads, tensor.name, path)
    if arch.transpose_linear and value.dim() == 2 and base in arch.block:
        value = value.t().contiguous()  # (out, in) -> Conv1D's (in, out)
    return hf_name, value


def _hf_name(name: str, arch: _Architecture, path: Path) -> tuple[str, str]:
    """(Hugging Face parameter name, GGUF base name) for a GGUF tensor name."""
    block = _BLOCK_TENSOR.fullmatch(name)
    if block and block.group(2) in arch.block:
        layer, base, kind = block.groups()
        return f"{arch.layer_prefix.format(i=int(layer))}{arch.block[base]}.{kind}", base
    top = _TOP_TENSOR.fullmatch(name)
    if top and top.group(1) in arch.top_level:
        base, kind = top.groups()
        return f"{arch.top_level[base]}.{kind}", base
    raise CheckpointError(f"{path}: tensor {name!r} is not one forklm knows for a {arch.model_type} model")


# rows dequantized at a time: float32 temporaries of a block, not of a 49152-row embedding (peak memory at load)
DEQUANT_BLOCK_ROWS = 4096


def _dequantize(tensor: _TensorInfo, handle, path: Path, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """A `dtype` tensor of the GGUF tensor's values, shaped (rows, ..., columns), read from the open file;
    a 2-D quantized tensor is read and dequantized DEQUANT_BLOCK_ROWS rows at a time into its `dtype` copy."""
    shape = tuple(reversed(tensor.shape))  # (rows, ..., columns), Hugging Face order
    raw = tensor.raw_shape
    if len(shape) == 2 and len(raw) == 2 and raw[0] == shape[0] and tensor.raw_dtype == np.uint8:
        out = torch.empty(shape, dtype=dtype)
        for a in range(0, shape[0], DEQUANT_BLOCK_ROWS):
            rows = min(DEQUANT_BLOCK_ROWS, shape[0] - a)
            data = _read(handle, tensor, a * raw[1], (rows, raw[1]), path)
            block = _dequantize_rows(tensor, data, path)  # [rows, columns] float32
            if block.shape != (rows, shape[1]):
                raise CheckpointError(f"{path}: tensor {tensor.name!r} has rows of {block.shape[-1]} values, "
                                      f"expected shape {shape}")
            out[a:a + rows] = torch.from_numpy(block)
        return out
    array = _dequantize_rows(tensor, _read(handle, tensor, 0, raw, path), path)
    if array.size != math.prod(shape):
        raise CheckpointError(f"{path}: tensor {tensor.name!r} has {array.size} values, expected shape {shape}")
    return torch.from_numpy(array.reshape(shape)).to(dtype)


def q8_0_blocks(path: str | Path, name: str) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The file's 2-D Q8_0 tensor `name` (a GGUF name, e.g. "token_embd.weight") as its blocks: codes int8
    [rows, columns] and scales float16 [rows, columns / 32] (value = code * scale, in float32); None when
    the file has no such tensor or stores it otherwise."""
    path = Path(path)
    _, infos = _read_header(path)
    tensor = next((t for t in infos if t.name == name), None)
    if tensor is None or tensor.tensor_type != gguf.GGMLQuantizationType.Q8_0 or len(tensor.shape) != 2:
        return None
    cols, rows = tensor.shape  # GGUF order: columns first
    size, block_bytes = gguf.GGML_QUANT_SIZES[tensor.tensor_type]  # a block: float16 scale, `size` int8 codes
    per_row = cols // size * block_bytes
    codes = torch.empty((rows, cols), dtype=torch.int8)
    scales = torch.empty((rows, cols // size), dtype=torch.float16)
    with open(path, "rb") as handle:
        for a in range(0, rows, DEQUANT_BLOCK_ROWS):
            n = min(DEQUANT_BLOCK_ROWS, rows - a)
            raw = _read(handle, tensor, a * per_row, (n, per_row), path).reshape(n, cols // size, block_bytes)
            scales[a:a + n] = torch.from_numpy(raw[..., :2].copy().view(np.float16)[..., 0])
            codes[a:a + n] = torch.from_numpy(raw[..., 2:].copy().view(np.int8).reshape(n, cols))
    return codes, scales


def _read(handle, tensor: _TensorInfo, start: int, raw_shape: tuple[int, ...], path: Path) -> np.ndarray:
    """The raw array of raw_shape at byte `start` of the tensor's data (a writable copy)."""
    buf = bytearray(math.prod(raw_shape) * tensor.raw_dtype.itemsize)
    handle.seek(tensor.offset + start)
    if handle.readinto(buf) != len(buf):
        raise CheckpointError(f"{path}: truncated or corrupt GGUF file: tensor {tensor.name!r} extends past "
                              "the end of the file")
    return np.frombuffer(buf, dtype=tensor.raw_dtype).reshape(raw_shape)


def _dequantize_rows(tensor: _TensorInfo, data: np.ndarray, path: Path) -> np.ndarray:
    """float32 values of `data`, some of the GGUF tensor's raw rows (or all of it)."""
    try:
        return np.asarray(gguf.quants.dequantize(data, tensor.tensor_type), dtype=np.float32)
    except NotImplementedError:
        raise CheckpointError(
            f"{path}: tensor {tensor.name!r}: quantization {tensor.tensor_type.name} is not supported"
        ) from None
    except (ValueError, IndexError) as error:
        raise CheckpointError(f"{path}: tensor {tensor.name!r} is corrupt ({error})") from None


def _unpermute_rotary_rows(weight: torch.Tensor, n_heads: int, name: str, path: Path) -> torch.Tensor:
    """Undo llama.cpp's q/k row order.

    Per head, llama.cpp stores row pairs (j, j + head_dim/2) next to each other
    (rotary pairs adjacent); Hugging Face stores the first half of the head's
    rows, then the second half. Works for weights (2-D) and biases (1-D).
    """
    rows = weight.shape[0]
    if rows % (2 * n_heads):
        raise CheckpointError(f"{path}: tensor {name!r} has {rows} rows, not a multiple of 2 x {n_heads} heads")
    head_dim = rows // n_heads
    paired = weight.reshape(n_heads, head_dim // 2, 2, *weight.shape[1:])  # (heads, head_dim/2, 2, [in])
    halves = paired.transpose(1, 2)  # (heads, 2, head_dim/2, [in])
    return halves.reshape(weight.shape).contiguous()  # (heads * head_dim, [in])
