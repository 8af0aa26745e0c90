"""Checkpoints -> a ready Transformer: Hugging Face folders (safetensors, sharded or not), hub ids, GGUF files.

Weights are mapped strictly: every parameter of the model is filled from the file or the load
fails naming the file and tensor; tensors in the file that the model does not use are listed
(and ignored) only when they are known buffers. The model is built on the meta device and each
parameter is materialised once, in the target dtype and device: no second full copy of the weights.
"""

from __future__ import annotations

import json
import logging
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple
from pathlib import Path

import torch
from torch import Tensor

from .config import ModelConfig
from .errors import CheckpointError, ModelNotAvailableError
from .model import Transformer

log = logging.getLogger(__name__)

# Tensors some checkpoints carry that are buffers, not weights (GPT-2's causal mask, rotary caches).
_IGNORED = re.compile(r"(\.attn\.bias|\.attn\.masked_bias|rotary_emb\.inv_freq)$")


@dataclass
class LoadedCheckpoint:
    model: Transformer
    config: ModelConfig
    source: str  # the folder or file it came from
    tokenizer: object | None = None  # forklm.tokenizer.Tokenizer
    eos_token_ids: list[int] = field(default_factory=list)
    # linears (forklm module names) whose weights the file stores at low precision (GGUF Q8_0, Q4_1, ...)
    low_precision_linears: frozenset[str] = frozenset()
    dtype: torch.dtype = torch.float32  # the dtype the weights were loaded in


def resolve_model(name_or_path: str) -> Path:
    """A local folder or .gguf file as is; otherwise a hub id `org/name`, downloaded if online."""
    path = Path(name_or_path).expanduser()
    if path.exists():
        return path
    if name_or_path.count("/") != 1 or name_or_path.startswith((".", "/")):
        raise ModelNotAvailableError(f"model {name_or_path!r}: no such file or folder, and not a hub id (org/name)")
    try:
        from huggingface_hub import snapshot_download

        local = snapshot_download(
            name_or_path,
            allow_patterns=["*.json", "*.safetensors", "tokenizer.model", "*.txt"],
        )
    except Exception as e:  # offline, unknown repo, gated repo: all mean "not available here"
        raise ModelNotAvailableError(
            f"model {name_or_path!r} is not available locally and could not be downloaded from the "
            f"Hugging Face hub ({type(e).__name__}); pass a local folder or .gguf file instead"
        ) from None
    return Path(local)


def config_dtype(raw: dict) -> str | None:
    """The dtype a Hugging Face config says its weights are stored in (`torch_dtype`, or `dtype`)."""
    value = raw.get("torch_dtype", raw.get("dtype"))
    return value if isinstance(value, str) else None


# dtype: a torch dtype, or a function of the stored dtype (config_dtype / gguf.stored_dtype: "float32",
# "bfloat16", "float16", "quantized" or None) returning one, resolved once the checkpoint is open
DtypeChoice = torch.dtype | Callable[[str | None], torch.dtype]


def load_checkpoint(name_or_path: str | os.PathLike, dtype: DtypeChoice, device: str | torch.device) -> LoadedCheckpoint:
    path = resolve_model(str(name_or_path))
    if path.is_file():
        if path.suffix != ".gguf":
            raise CheckpointError(f"{path}: a model file must be a .gguf; otherwise pass a Hugging Face folder")
        return _load_gguf(path, dtype, device)
    return _load_hf_folder(path, dtype, device)


def _load_hf_folder(path: Path, dtype: DtypeChoice, device) -> LoadedCheckpoint:
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{config_file}: missing (a Hugging Face model folder needs config.json)")
    try:
        raw = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{config_file}: not valid JSON ({e})") from None
    cfg = ModelConfig.from_hf(raw, source=str(config_file))
    if callable(dtype):
        dtype = dtype(config_dtype(raw))
    gen_file = path / "generation_config.json"
    if gen_file.is_file():
        eos = json.loads(gen_file.read_text()).get("eos_token_id")
        if eos is not None:
            cfg.eos_token_ids = [eos] if isinstance(eos, int) else list(eos)
    reader = SafetensorsReader(path)
    model = build_model(cfg, reader.names(), reader.get, dtype, device)
    from .tokenizer import Tokenizer

    tokenizer = Tokenizer.from_dir(path)
    eos_ids = list(cfg.eos_token_ids) or (list(tokenizer.eos_token_ids) if tokenizer else [])
    return LoadedCheckpoint(model, cfg, str(path), tokenizer, eos_ids, dtype=dtype)


def _load_gguf(path: Path, dtype: DtypeChoice, device) -> LoadedCheckpoint:
    from .gguf import load_gguf

    ckpt = load_gguf(path, dtype)
    cfg = ModelConfig.from_hf(ckpt.config, source=str(path))
    tensors = ckpt.tensors
    rules = weight_rules(cfg, set(tensors))
    model = build_model(cfg, set(tensors), lambda name: tensors.pop(name), ckpt.dtype, device)
    eos_ids = list(ckpt.eos_token_ids) or list(cfg.eos_token_ids)
    head = "lm_head.weight" if "lm_head.weight" in rules else "tok_embeddings.weight"  # tied: the embedding
    low = frozenset(  # a fused linear (q/k/v, gate/up) when every part is low precision
        name for name, module in model.named_modules() if isinstance(module, torch.nn.Linear)
        and set(rule_names(rules[head if name == "lm_head" else f"{name}.weight"])) <= ckpt.low_precision)
    return LoadedCheckpoint(model, cfg, str(path), ckpt.tokenizer, eos_ids, low, ckpt.dtype)


class SafetensorsReader:
    """Reads tensors by name from model.safetensors or a sharded index, one tensor at a time."""

    def __init__(self, folder: Path):
        self._handles: dict[Path, object] = {}
        index = folder / "model.safetensors.index.json"
        single = folder / "model.safetensors"
        if index.is_file():
            try:
                weight_map = json.loads(index.read_text(encoding="utf-8"))["weight_map"]
            except (ValueError, KeyError, TypeError, RecursionError, OSError) as e:  # JSON, UTF-8, shape
                raise CheckpointError(f"{index}: not a valid safetensors index ({type(e).__name__})") from None
            if not isinstance(weight_map, dict) or not all(
                    isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()):
                raise CheckpointError(f"{index}: weight_map must map tensor names to shard file names")
            self.file_of = {name: folder / shard for name, shard in weight_map.items()}
        elif single.is_file():
            self.file_of = {name: single for name in self._open(single).keys()}
        else:
            raise CheckpointError(f"{folder}: no model.safetensors or model.safetensors.index.json")

    def _open(self, file: Path):
        if file not in self._handles:
            if not file.is_file():
                raise CheckpointError(f"{file}: missing checkpoint shard")
            from safetensors import safe_open

            try:
                self._handles[file] = safe_open(str(file), framework="pt")
            except Exception as e:
                raise CheckpointError(f"{file}: cannot read safetensors file ({e})") from None
        return self._handles[file]

    def names(self) -> set[str]:
        return set(self.file_of)

    def get(self, name: str) -> Tensor:
        file = self.file_of[name]
        try:
            return self._open(file).get_tensor(name)
        except CheckpointError:
            raise
        except Exception as e:
            raise CheckpointError(f"{file}: tensor {name!r} cannot be read ({e})") from None


# ---- Hugging Face names -> forklm names ------------------------------------------------------------
# Each rule maps one forklm parameter to its parts: (HF name, transform of the HF tensor), stacked along
# the first dimension. Most parameters have one part; forklm's fused q/k/v and gate/up linears stack
# Hugging Face's separate tensors (q_proj, k_proj, v_proj / gate_proj, up_proj).

class Part(NamedTuple):
    hf_name: str
    transform: Callable[[Tensor], Tensor]
    rows: int | None = None  # a part of a fused parameter: how many of its rows this part gives


Rule = tuple[Part, ...]


def _same(t: Tensor) -> Tensor:
    return t


def _transposed(t: Tensor) -> Tensor:
    return t.t()  # GPT-2's Conv1D stores [in, out]; nn.Linear wants [out, in]


def _heads_to_qkv(n_heads: int, head_dim: int) -> Callable[[Tensor], Tensor]:
    """GPT-BigCode without multi_query fuses q/k/v per head: rows [H, 3, D]. Reorder them to forklm's
    [3, H, D] (all of q, then k, then v)."""

    def take(t: Tensor) -> Tensor:
        per_head = t.reshape(n_heads, 3, head_dim, *t.shape[1:])  # [H, 3, D, (E)]
        return per_head.transpose(0, 1).reshape(3 * n_heads * head_dim, *t.shape[1:])  # [3*H*D, (E)]

    return take


def weight_rules(cfg: ModelConfig, prefix_names: set[str]) -> dict[str, Rule]:
    rules: dict[str, Rule] = {}
    q_out, kv_out = cfg.n_heads * cfg.head_dim, cfg.n_kv_heads * cfg.head_dim
    if cfg.family == "llama":
        p = "model." if any(n.startswith("model.") for n in prefix_names) else ""
        rules["tok_embeddings.weight"] = (Part(f"{p}embed_tokens.weight", _same),)
        rules["norm.weight"] = (Part(f"{p}norm.weight", _same),)
        if not cfg.tie_word_embeddings:
            rules["lm_head.weight"] = (Part("lm_head.weight", _same),)
        for i in range(cfg.n_layers):
            hf, me = f"{p}layers.{i}.", f"layers.{i}."
            rules[me + "attn_norm.weight"] = (Part(hf + "input_layernorm.weight", _same),)
            rules[me + "mlp_norm.weight"] = (Part(hf + "post_attention_layernorm.weight", _same),)
            for kind in ("weight", "bias") if cfg.qkv_bias else ("weight",):
                rules[f"{me}attn.wqkv.{kind}"] = tuple(Part(f"{hf}self_attn.{x}_proj.{kind}", _same, rows)
                                                       for x, rows in zip("qkv", (q_out, kv_out, kv_out)))
            rules[f"{me}attn.wo.weight"] = (Part(f"{hf}self_attn.o_proj.weight", _same),)
            rules[f"{me}mlp.w_gate_up.weight"] = tuple(Part(f"{hf}mlp.{x}_proj.weight", _same, cfg.intermediate_size)
                                                       for x in ("gate", "up"))
            rules[f"{me}mlp.w_down.weight"] = (Part(f"{hf}mlp.down_proj.weight", _same),)
        return rules

    # GPT-2 (Conv1D weights, stored transposed) and GPT-BigCode (nn.Linear weights); c_attn is q/k/v fused
    p = "transformer." if any(n.startswith("transformer.") for n in prefix_names) else ""
    conv = cfg.model_type == "gpt2"
    interleaved = cfg.model_type == "gpt_bigcode" and cfg.n_kv_heads > 1
    fix = _transposed if conv else _same
    rules["tok_embeddings.weight"] = (Part(f"{p}wte.weight", _same),)
    rules["pos_embeddings.weight"] = (Part(f"{p}wpe.weight", _same),)
    rules["norm.weight"] = (Part(f"{p}ln_f.weight", _same),)
    rules["norm.bias"] = (Part(f"{p}ln_f.bias", _same),)
    if not cfg.tie_word_embeddings:
        rules["lm_head.weight"] = (Part("lm_head.weight", _same),)
    qkv = _heads_to_qkv(cfg.n_heads, cfg.head_dim) if interleaved else None
    for i in range(cfg.n_layers):
        hf, me = f"{p}h.{i}.", f"layers.{i}."
        for kind in ("weight", "bias"):
            rules[f"{me}attn_norm.{kind}"] = (Part(f"{hf}ln_1.{kind}", _same),)
            rules[f"{me}mlp_norm.{kind}"] = (Part(f"{hf}ln_2.{kind}", _same),)
            qkv_fix = qkv or (fix if kind == "weight" else _same)
            rules[f"{me}attn.wqkv.{kind}"] = (Part(f"{hf}attn.c_attn.{kind}", qkv_fix),)
            for mine, theirs in (("attn.wo", "attn.c_proj"), ("mlp.fc", "mlp.c_fc"), ("mlp.proj", "mlp.c_proj")):
                rules[f"{me}{mine}.{kind}"] = (Part(f"{hf}{theirs}.{kind}", fix if kind == "weight" else _same),)
    return rules


def part_shape(part: Part, shape: tuple[int, ...]) -> tuple[int, ...]:
    """The shape `part` must have in forklm's layout, of a parameter of `shape`."""
    return shape if part.rows is None else (part.rows, *shape[1:])


def rule_names(rule: Rule) -> list[str]:
    """The Hugging Face tensors a forklm parameter is made of."""
    return [part.hf_name for part in rule]


def build_model(
    cfg: ModelConfig,
    names: set[str],
    get: Callable[[str], Tensor],
    dtype: torch.dtype,
    device,
) -> Transformer:
    """Build on the meta device, then fill every parameter from `get(hf_name)` (strict)."""
    with torch.device("meta"):
        model = Transformer(cfg)
    rules = weight_rules(cfg, names)
    params = dict(model.named_parameters())  # tied lm_head appears once, as tok_embeddings
    missing = [h for n in params if n in rules for h in rule_names(rules[n]) if h not in names]
    unmapped = [n for n in params if n not in rules]
    if unmapped:
        raise CheckpointError(f"internal error: no weight mapping for {unmapped}")
    if missing:
        raise CheckpointError(f"checkpoint is missing tensor(s) {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    used = {h for n in params for h in rule_names(rules[n])}
    unused = sorted(n for n in names - used if not _IGNORED.search(n))
    if unused:
        log.warning("checkpoint tensors not used by the model: %s", unused[:10])

    for name, param in params.items():
        parts = []
        for part in rules[name]:
            value = part.transform(get(part.hf_name))  # each tensor read once
            need = part_shape(part, tuple(param.shape))
            if tuple(value.shape) != need:
                raise CheckpointError(
                    f"tensor {part.hf_name!r}: shape {tuple(value.shape)} does not match the model's "
                    f"{name}{' part' if part.rows else ''} {need} (from config.json)"
                )
            parts.append(value)
        value = parts[0] if len(parts) == 1 else torch.cat(parts)  # a fused parameter: its parts' rows stacked
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        tensor = value.to(device=device, dtype=dtype).contiguous()
        setattr(module, attr, torch.nn.Parameter(tensor, requires_grad=False))
    if cfg.tie_word_embeddings:
        model.lm_head.weight = model.tok_embeddings.weight
    for name, buf in model.named_buffers():  # non-persistent buffers (rope frequencies) are rebuilt
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name) if module_name else model
        setattr(module, attr, _rebuild_buffer(model, attr).to(device))
    return model.eval()


# ---- weights replaced in a live model ---------------------------------------------------------------
@dataclass
class PartialUpdate:
    """Some parts of a fused parameter (a layer's q_proj without its k_proj and v_proj): (first row, new
    rows in forklm's layout) each. The other rows keep the values the model holds."""

    spans: list[tuple[int, Tensor]]

    def map(self, fn: Callable[[Tensor], Tensor]) -> PartialUpdate:
        """The same spans, each new tensor through `fn` (a rounding row by row, as quantization's)."""
        return PartialUpdate([(start, fn(t)) for start, t in self.spans])


def holds_values(module: torch.nn.Module, attr: str) -> bool:
    """Whether a linear keeps its `attr` ("weight" / "bias") exactly: nn.Linear, any kernel's bias, or a
    float32-packed weight; not cpu_linear's low-precision kernels, which hold packed codes of it."""
    return attr == "bias" or not hasattr(module, "repack") or hasattr(module, "dense_weight")


def held_weight(module: torch.nn.Module, attr: str) -> Tensor:
    """The values a linear that `holds_values` keeps for `attr`, in a plain layout."""
    if attr == "bias" or not hasattr(module, "repack"):
        return getattr(module, attr)
    return module.dense_weight()  # unpacked: a copy


def weight_updates(model: Transformer, named_tensors) -> dict[str, Tensor | PartialUpdate]:
    """(Hugging Face name, tensor) pairs -> {forklm parameter name: tensor in forklm's layout}, checked as
    strictly as loading: every name must be one the model maps (or a known buffer, skipped), every
    tensor floating point and of the shape config.json implies. Nothing is copied yet, so a bad
    update raises (CheckpointError naming the tensor) before anything changes. Any subset of the
    weights may be given; for a model with tied embeddings, `lm_head.weight` is the embedding's
    (taken only when the embedding itself is not given). Of a fused parameter (q/k/v, gate/up) some
    parts alone give a `PartialUpdate`, where the model holds that linear's values exactly (dense or
    float32-packed kernels); with low-precision kernels its parts must come together."""
    cfg = model.config
    given: dict[str, Tensor] = {}
    for item in named_tensors:
        if not (isinstance(item, tuple) and len(item) == 2 and isinstance(item[0], str)):
            raise CheckpointError(f"weight update: expected (name, tensor) pairs, got {type(item).__name__}")
        name, tensor = item
        if not isinstance(tensor, Tensor):
            raise CheckpointError(f"weight update: {name!r} is a {type(tensor).__name__}, not a tensor")
        given[name] = tensor
    with torch.device("meta"):
        shapes = {n: tuple(p.shape) for n, p in Transformer(cfg).named_parameters()}
    rules = weight_rules(cfg, set(given))
    by_hf: dict[str, tuple[str, int]] = {}  # HF name -> (forklm parameter, its part)
    for mine, rule in rules.items():
        for i, part in enumerate(rule):
            by_hf[part.hf_name] = (mine, i)
    embed_hf = rules["tok_embeddings.weight"][0].hf_name
    if cfg.tie_word_embeddings and "lm_head.weight" in given and embed_hf not in given:
        given[embed_hf] = given["lm_head.weight"]
    parts: dict[str, dict[int, Tensor]] = {}
    for hf_name, tensor in given.items():
        if hf_name == "lm_head.weight" and cfg.tie_word_embeddings:
            target = None  # checked against the embedding's shape, used above
        elif hf_name in by_hf:
            target = by_hf[hf_name]
        elif _IGNORED.search(hf_name):
            continue
        else:
            raise CheckpointError(f"weight update: {hf_name!r} is not a tensor of this {cfg.model_type} model")
        if not tensor.is_floating_point():
            raise CheckpointError(f"weight update: {hf_name!r} has dtype {tensor.dtype}, not a floating point one")
        if tensor.is_meta or tensor.layout != torch.strided:  # offloaded (meta) or sparse: no values to copy
            raise CheckpointError(f"weight update: {hf_name!r} holds no dense values (device {tensor.device}, "
                                  f"layout {tensor.layout}); gather offloaded weights first")
        mine, i = target or ("tok_embeddings.weight", 0)
        part = rules[mine][i]
        value = part.transform(tensor.detach())
        need = part_shape(part, shapes[mine])
        if tuple(value.shape) != need:
            raise CheckpointError(
                f"weight update: {hf_name!r} has shape {tuple(tensor.shape)}; the model's {mine} needs "
                f"{need} (from config.json)")
        if target is not None:
            parts.setdefault(mine, {})[i] = value
    updates: dict[str, Tensor | PartialUpdate] = {}
    for mine, got in parts.items():
        rule = rules[mine]
        if len(got) == len(rule):
            updates[mine] = got[0] if len(rule) == 1 else torch.cat([got[i] for i in range(len(rule))])
            continue
        module_name, _, attr = mine.rpartition(".")
        if not holds_values(model.get_submodule(module_name), attr):
            missing = [p.hf_name for i, p in enumerate(rule) if i not in got]
            raise CheckpointError(
                f"weight update: {rule[min(got)].hf_name!r} without {missing}: forklm holds them as one "
                f"low-precision linear ({mine}); give them together")
        starts = [0]
        for p in rule:
            starts.append(starts[-1] + p.rows)
        updates[mine] = PartialUpdate([(starts[i], got[i]) for i in sorted(got)])
    return updates


def read_weights(path: str | os.PathLike):
    """(name, tensor) pairs of a .safetensors file or a Hugging Face folder (sharded or not), read one at
    a time; a missing or unreadable file is a CheckpointError naming it."""
    try:
        path = Path(path).expanduser()
        is_dir, is_file = path.is_dir(), path.is_file()
    except (OSError, RuntimeError, ValueError) as e:  # a name too long, an unknown ~user, a NUL byte
        raise CheckpointError(f"{str(path)[:200]!r}: not a usable path ({type(e).__name__}: {e})") from None
    if is_dir:
        reader = SafetensorsReader(path)
        return ((name, reader.get(name)) for name in sorted(reader.names()))
    if not is_file:
        raise CheckpointError(f"{path}: no such file or folder")
    if path.suffix != ".safetensors":
        raise CheckpointError(f"{path}: weights must be a .safetensors file or a folder of them")
    from safetensors import safe_open

    try:
        handle = safe_open(str(path), framework="pt")
        names = sorted(handle.keys())
    except Exception as e:
        raise CheckpointError(f"{path}: cannot read safetensors file ({e})") from None

    def read(name: str) -> Tensor:
        try:
            return handle.get_tensor(name)
        except Exception as e:
            raise CheckpointError(f"{path}: tensor {name!r} cannot be read ({e})") from None

    return ((name, read(name)) for name in names)


def apply_weight_updates(model: Transformer, updates: dict[str, Tensor | PartialUpdate]) -> None:
    """Copy `updates` (from `weight_updates`) into `model` in place, converting dtype and device; packed
    linears are packed again (and the packed copy of a tied embedding in the LM head with them, unless
    `updates` has its own "lm_head.weight", as a quantized LLM's does). A `PartialUpdate` replaces its
    rows of the values the linear holds."""
    with torch.no_grad():
        for name, value in updates.items():
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name)
            if isinstance(value, PartialUpdate):
                held = held_weight(module, attr).detach().clone()  # [rows, ...]: the parts not given stay
                for start, rows in value.spans:
                    held[start:start + len(rows)] = rows
                value = held
            if hasattr(module, "repack") and attr == "weight":  # cpu_linear's packed kernels
                module.repack(value)
            else:
                getattr(module, attr).copy_(value)
        if (model.config.tie_word_embeddings and "tok_embeddings.weight" in updates
                and "lm_head.weight" not in updates and hasattr(model.lm_head, "repack")):
            model.lm_head.repack(model.tok_embeddings.weight)


def _rebuild_buffer(model: Transformer, attr: str) -> Tensor:
    from .model import rope_inv_freq

    cfg = model.config
    if attr == "inv_freq":
        return rope_inv_freq(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling).float()
    raise CheckpointError(f"internal error: unknown buffer {attr}")
