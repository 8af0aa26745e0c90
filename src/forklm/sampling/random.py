"""Counter-based random numbers: one uniform per (seed, sample index, step, token id).

A row's draws are a pure function of its own counters, so a sample is the same whatever other
rows share the batch and wherever it sits in it; no `torch.Generator` is created or advanced.
The per-row keys are integer arithmetic on int64 tensors whose values stay in [0, 2^32): every
product is a value below 2^32 times a multiplier below 2^31, so it never overflows int64 and is
masked back to 32 bits at once. The per-token part, over the whole vocabulary, computes the same
32-bit values in int32 (products wrap modulo 2^32). The results are bit-identical on CPU and CUDA,
eager or compiled (`torch.compile` traces it as plain elementwise ops).
"""

from __future__ import annotations

import secrets

import torch
from torch import Tensor

_MASK32 = 0xFFFFFFFF
# Multipliers of a two-round xorshift-multiply 32-bit mixer (shifts 16, 15, 15), chosen below
# 2^31 so that (x < 2^32) * multiplier < 2^63 fits int64 without wrapping.
_MUL_1 = 0x21F0AAAD
_MUL_2 = 0x735A2D97
# Distinct odd salts so that the seed words, the sample index, the step and the token id
# enter the hash through different keys (and a zero input does not hash to zero).
_SALT_SEED = 0x9E3779B9
_SALT_TOKEN = 0x85EBCA6B
# 23 random bits per uniform: (k + 0.5) / 2^23 is exact in float32 and lies in (0, 1).
_MANTISSA_BITS = 23


def hash32(x: Tensor) -> Tensor:
    """A bijective mixer of 32-bit values held in an int64 tensor (any shape, values in [0, 2^32))."""
    x = x ^ (x >> 16)
    x = (x * _MUL_1) & _MASK32
    x = x ^ (x >> 15)
    x = (x * _MUL_2) & _MASK32
    x = x ^ (x >> 15)
    return x


def row_keys(seed: Tensor, sample_index: Tensor, step: Tensor) -> Tensor:
    """One 32-bit key per row from its counters: [S] int64 each -> [S] int64 in [0, 2^32).

    `seed` may be any int64 (both halves are used); `sample_index` and `step` are taken modulo 2^32.
    """
    key = hash32((seed & _MASK32) ^ _SALT_SEED)
    key = hash32(key ^ ((seed >> 32) & _MASK32))
    key = hash32(key ^ (sample_index & _MASK32))
    return hash32(key ^ (step & _MASK32))


def _as_int32(x: Tensor) -> Tensor:
    """int64 values in [0, 2^32) -> int32 holding the same 32 bits (two's complement)."""
    return (x - ((x >> 31) << 32)).to(torch.int32)


def _uniform_bits(keys: Tensor, token_keys: Tensor) -> Tensor:
    """keys [S, 1] (int64 in [0, 2^32)) x token_keys [S or 1, K] (int32: `vocab_keys32`'s form) -> [S, K]
    float32 uniforms in (0, 1).

    The per-element work is kept lean (it runs over the whole vocabulary): xor the two keys, one
    multiply / xorshift round, a second multiply, and the top 23 bits of the product, which
    depend on every input bit through the carries. It runs on int32, 7x faster than int64 on CPU:
    an int32 product wraps modulo 2^32, the same bits as the int64 product masked to 32 bits, and
    the bits an int32 right shift copies from the sign are masked off, so the result is the same.
    """
    x = _as_int32(keys) ^ token_keys  # [S, K] int32
    x.mul_(_MUL_1)  # modulo 2^32
    x ^= (x >> 15) & ((1 << 17) - 1)  # logical shift of the 32 bits
    x.mul_(_MUL_2)
    x = (x >> (32 - _MANTISSA_BITS)) & ((1 << _MANTISSA_BITS) - 1)  # [S, K] integers in [0, 2^23)
    return x.to(torch.float32).add_(0.5).mul_(1.0 / (1 << _MANTISSA_BITS))


def vocab_keys(vocab: int, device) -> Tensor:
    """The per-token keys of `uniform` for token ids 0 .. vocab - 1: [1, V] int64 in [0, 2^32)."""
    return hash32(torch.arange(vocab, device=device, dtype=torch.int64) ^ _SALT_TOKEN)[None, :]  # [1, V]


def vocab_keys32(vocab: int, device) -> Tensor:
    """`vocab_keys` as the int32 holding the same 32 bits, the form the uniforms use: [1, V] int32. A
    caller drawing every step makes it once (SamplingTensors.token_keys): ~11 operators over [V] a step
    otherwise, and 4 more per block of rows."""
    return _as_int32(vocab_keys(vocab, device))


def uniform(seed: Tensor, sample_index: Tensor, step: Tensor, vocab: int, token_keys: Tensor | None = None) -> Tensor:
    """Uniforms in the open interval (0, 1), deterministic in (seed, sample_index, step, token id).

    seed, sample_index, step: [S] int64 on the target device. Returns [S, vocab] float32.
    token_keys: `vocab_keys32(vocab, device)`, when the caller has it (made once for many draws).
    """
    keys = row_keys(seed.long(), sample_index.long(), step.long())  # [S]
    return uniform_from_keys(keys, vocab_keys32(vocab, keys.device) if token_keys is None else token_keys)


def uniform_from_keys(keys: Tensor, token_keys: Tensor) -> Tensor:
    """`uniform` from the rows' `row_keys` [S] and `vocab_keys32` [1, V]: [S, V] float32 (a caller drawing
    blocks of rows makes the keys once)."""
    return _uniform_bits(keys[:, None], token_keys)  # [S, V]


def uniform_at(seed: Tensor, sample_index: Tensor, step: Tensor, token_ids: Tensor) -> Tensor:
    """The same uniforms as `uniform`, only at token_ids [S, K]: uniform(...)[s, token_ids[s, j]].

    Lets a sampler that knows its candidates (e.g. top-k) skip the rest of the vocabulary.
    """
    keys = row_keys(seed.long(), sample_index.long(), step.long())  # [S]
    return _uniform_bits(keys[:, None], _as_int32(hash32(token_ids.long() ^ _SALT_TOKEN)))  # [S, K]


def fresh_seed() -> int:
    """A new random seed for a request that gave none: 63 bits from the OS, fits int64."""
    return secrets.randbits(63)


def seed_to_int64(seed: int) -> int:
    """Any Python int seed mapped to the int64 range (two's complement of its low 64 bits)."""
    seed &= (1 << 64) - 1
    return seed - (1 << 64) if seed >= (1 << 63) else seed
