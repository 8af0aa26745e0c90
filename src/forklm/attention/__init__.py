"""Attention: pure kernels with log-sum-exp and their references (`ops`), and the backends bound to a
step plan that the model calls through `attend(layer, q, k, v)` (`cascade`)."""

from .ops import (  # noqa: F401
    _cpu_flash_with_lse,
    _cpu_gemm_with_lse,
    _fast_path,
    attention_with_lse,
    attention_with_lse_reference,
    bifurcated_decode_attention,
    causal_attention,
    causal_attention_with_lse,
    decode_rows_from_counts,
    merge_attention,
    merge_with_lse,
    replicated_decode_attention,
)
