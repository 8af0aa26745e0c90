"""Architecture configuration, built from a Hugging Face `config.json` by exact keys.

Two families share one transformer (model.py):
- "llama" style (Llama, Mistral, Qwen2): RMSNorm, rotary positions, SwiGLU MLP.
- "gpt2" style (GPT-2, GPT-BigCode): LayerNorm, learned positions, GELU MLP.

Batch size and maximum sequence length are not architecture: they belong to the cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

from .errors import CheckpointError, UnsupportedModelError

LLAMA_STYLE = ("llama", "mistral", "qwen2")
GPT2_STYLE = ("gpt2", "gpt_bigcode")
SUPPORTED_MODEL_TYPES = LLAMA_STYLE + GPT2_STYLE
_ARCHITECTURE_TO_TYPE = {
    "LlamaForCausalLM": "llama",
    "MistralForCausalLM": "mistral",
    "Qwen2ForCausalLM": "qwen2",
    "GPT2LMHeadModel": "gpt2",
    "GPTBigCodeForCausalLM": "gpt_bigcode",
}


@dataclass
class RopeScaling:
    """Llama-3 style frequency scaling (rope_type "llama3"); "default" means none."""

    factor: float
    low_freq_factor: float
    high_freq_factor: float
    original_max_position_embeddings: int


@dataclass
class ModelConfig:
    model_type: str  # one of SUPPORTED_MODEL_TYPES
    vocab_size: int
    dim: int  # hidden size
    n_layers: int
    n_heads: int  # query heads
    n_kv_heads: int  # key/value heads (== n_heads: MHA, 1: MQA, else GQA)
    intermediate_size: int  # MLP hidden size
    max_position_embeddings: int  # the model's context length
    norm_eps: float
    head_dim: int = 0  # 0: dim // n_heads
    tie_word_embeddings: bool = False
    # llama style only
    rope_theta: float = 10000.0
    rope_scaling: RopeScaling | None = None
    qkv_bias: bool = False  # Qwen2: bias on q/k/v projections
    sliding_window: int | None = None  # Mistral / Qwen2: attention window (not implemented: bounds the context)
    # gpt2 style only
    activation: str = "silu"  # "silu" (SwiGLU) or "gelu_tanh" / "gelu"
    bos_token_id: int | None = None
    eos_token_ids: list[int] = field(default_factory=list)

    def __post_init__(self):
        if self.head_dim == 0:
            self.head_dim = self.dim // self.n_heads
        if self.n_heads % self.n_kv_heads:
            raise CheckpointError(
                f"config.json: num_attention_heads ({self.n_heads}) is not a multiple "
                f"of num_key_value_heads ({self.n_kv_heads})"
            )

    @property
    def family(self) -> str:
        """'llama' for RMSNorm/RoPE/SwiGLU models, 'gpt2' for LayerNorm/learned-position/GELU ones."""
        return "llama" if self.model_type in LLAMA_STYLE else "gpt2"

    @property
    def n_groups(self) -> int:
        """Query heads per kv head (G)."""
        return self.n_heads // self.n_kv_heads

    @property
    def attn_scale(self) -> float:
        return 1.0 / math.sqrt(self.head_dim)

    @classmethod
    def from_hf(cls, cfg: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        """Build from a config.json dict. The family comes from `model_type` (or `architectures`)."""
        model_type = cfg.get("model_type")
        if model_type is None:
            for arch in cfg.get("architectures") or []:
                model_type = _ARCHITECTURE_TO_TYPE.get(arch)
                if model_type:
                    break
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise UnsupportedModelError(
                f"{source}: model_type {model_type!r} (architectures {cfg.get('architectures')}) "
                f"is not supported; supported model_type values: {', '.join(SUPPORTED_MODEL_TYPES)}"
            )

        def need(key: str):
            if key not in cfg:
                raise CheckpointError(f"{source}: required field {key!r} is missing for {model_type}")
            return cfg[key]

        eos = cfg.get("eos_token_id")
        eos_ids = [] if eos is None else ([eos] if isinstance(eos, int) else list(eos))
        if model_type in LLAMA_STYLE:
            n_heads = need("num_attention_heads")
            act = cfg.get("hidden_act", "silu")
            if act != "silu":
                raise UnsupportedModelError(f"{source}: hidden_act {act!r} is not supported (only 'silu')")
            return cls(
                model_type=model_type,
                vocab_size=need("vocab_size"),
                dim=need("hidden_size"),
                n_layers=need("num_hidden_layers"),
                n_heads=n_heads,
                n_kv_heads=cfg.get("num_key_value_heads") or n_heads,
                intermediate_size=need("intermediate_size"),
                max_position_embeddings=need("max_position_embeddings"),
                norm_eps=cfg.get("rms_norm_eps", 1e-6),
                head_dim=cfg.get("head_dim") or 0,
                tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
                rope_theta=_rope_theta(cfg),
                rope_scaling=_rope_scaling(cfg, source),
                qkv_bias=model_type == "qwen2" or bool(cfg.get("attention_bias", False)),
                sliding_window=_sliding_window(cfg),
                activation="silu",
                bos_token_id=cfg.get("bos_token_id"),
                eos_token_ids=eos_ids,
            )
        # GPT-2 / GPT-BigCode
        dim = need("n_embd")
        if cfg.get("scale_attn_by_inverse_layer_idx") or cfg.get("reorder_and_upcast_attn"):
            raise UnsupportedModelError(
                f"{source}: scale_attn_by_inverse_layer_idx / reorder_and_upcast_attn are not supported"
            )
        if cfg.get("scale_attn_weights", True) is False:
            raise UnsupportedModelError(f"{source}: scale_attn_weights=false is not supported")
        act = cfg.get("activation_function", "gelu_new")
        activation = {"gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu": "gelu"}.get(act)
        if activation is None:
            raise UnsupportedModelError(f"{source}: activation_function {act!r} is not supported")
        n_heads = need("n_head")
        multi_query = model_type == "gpt_bigcode" and cfg.get("multi_query", True)
        return cls(
            model_type=model_type,
            vocab_size=need("vocab_size"),
            dim=dim,
            n_layers=need("n_layer"),
            n_heads=n_heads,
            n_kv_heads=1 if multi_query else n_heads,
            intermediate_size=cfg.get("n_inner") or 4 * dim,
            max_position_embeddings=need("n_positions"),
            norm_eps=cfg.get("layer_norm_epsilon", 1e-5),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            activation=activation,
            bos_token_id=cfg.get("bos_token_id"),
            eos_token_ids=eos_ids,
        )


def _sliding_window(cfg: dict) -> int | None:
    """The window that actually applies: Qwen2 only uses it with use_sliding_window."""
    window = cfg.get("sliding_window")
    if cfg.get("model_type") == "qwen2" and not cfg.get("use_sliding_window", False):
        return None
    return int(window) if window else None


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    return float(cfg.get("rope_theta") or params.get("rope_theta") or 10000.0)


def _rope_scaling(cfg: dict, source: str) -> RopeScaling | None:
    rs = cfg.get("rope_scaling") or cfg.get("rope_parameters")
    if not rs:
        return None
    kind = rs.get("rope_type", rs.get("type", "default"))
    if kind == "default":
        return None
    if kind != "llama3":
        raise UnsupportedModelError(f"{source}: rope_scaling type {kind!r} is not supported (default, llama3)")
    return RopeScaling(
        factor=float(rs["factor"]),
        low_freq_factor=float(rs["low_freq_factor"]),
        high_freq_factor=float(rs["high_freq_factor"]),
        original_max_position_embeddings=int(rs["original_max_position_embeddings"]),
    )
