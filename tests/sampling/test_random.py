"""The counter-based uniforms: range, determinism, independence from the batch, rough quality."""

from __future__ import annotations

import pytest
import torch

from forklm.sampling.random import fresh_seed, hash32, seed_to_int64, uniform, uniform_at


def _counters(S: int, seed: int = 7):
    seeds = torch.full((S,), seed, dtype=torch.int64)
    index = torch.arange(S, dtype=torch.int64)
    step = torch.zeros(S, dtype=torch.int64)
    return seeds, index, step


def test_open_interval_and_dtype():
    seeds, index, step = _counters(64)
    u = uniform(seeds, index, step, 5000)
    assert u.shape == (64, 5000) and u.dtype == torch.float32
    assert float(u.min()) > 0.0 and float(u.max()) < 1.0


def test_deterministic_and_independent_of_batch():
    seeds = torch.tensor([1, 2, 3, -5, 2**62, -(2**63)], dtype=torch.int64)
    index = torch.tensor([0, 1, 2, 3, 4, 5])
    step = torch.tensor([0, 9, 4, 1, 7, 3])
    u = uniform(seeds, index, step, 300)
    assert torch.equal(u, uniform(seeds, index, step, 300))
    perm = torch.tensor([4, 0, 5, 2, 1, 3])
    assert torch.equal(uniform(seeds[perm], index[perm], step[perm], 300), u[perm])
    for i in range(6):  # one row alone gives the same values
        assert torch.equal(uniform(seeds[i : i + 1], index[i : i + 1], step[i : i + 1], 300)[0], u[i])
    # a wider vocabulary extends the row, it does not change the first tokens
    assert torch.equal(uniform(seeds, index, step, 500)[:, :300], u)


def test_every_counter_matters():
    base = uniform(*[torch.tensor([v]) for v in (11, 3, 5)], 1000)
    for changed in [(12, 3, 5), (11, 4, 5), (11, 3, 6), (11 + 2**32, 3, 5)]:
        other = uniform(*[torch.tensor([v]) for v in changed], 1000)
        assert (other != base).float().mean() > 0.99, changed


def test_uniform_at_matches_uniform():
    seeds, index, step = _counters(8)
    u = uniform(seeds, index, step, 1000)
    ids = torch.randint(0, 1000, (8, 17), generator=torch.Generator().manual_seed(0))
    assert torch.equal(uniform_at(seeds, index, step, ids), u.gather(1, ids))


def test_rough_quality():
    seeds, index, step = _counters(256)
    u = uniform(seeds, index, step, 4096).double()  # 1M values
    n = u.numel()
    assert abs(float(u.mean()) - 0.5) < 5 * (1 / 12 / n) ** 0.5
    assert abs(float(u.var()) - 1 / 12) < 0.002
    hist = torch.histc(u, bins=64, min=0, max=1)
    chi2 = float(((hist - n / 64) ** 2 / (n / 64)).sum())
    assert chi2 < 63 + 6 * (2 * 63) ** 0.5  # chi-square with 63 d.o.f., ~6 sigma
    x = u - 0.5
    for a, b in [(x[:, 1:], x[:, :-1]), (x[1:], x[:-1])]:  # neighbouring tokens, neighbouring rows
        corr = float((a * b).mean() / (a.std() * b.std()))
        assert abs(corr) < 6 / n**0.5
    # neighbouring steps of one row
    steps = uniform(torch.full((256,), 7), torch.zeros(256, dtype=torch.int64), torch.arange(256), 4096).double() - 0.5
    corr = float((steps[1:] * steps[:-1]).mean() / steps.var())
    assert abs(corr) < 6 / n**0.5


def test_hash32_is_a_bijection_on_a_sample():
    x = torch.arange(1 << 16, dtype=torch.int64) * 65537  # distinct 32-bit values
    h = hash32(x)
    assert int(h.min()) >= 0 and int(h.max()) < 2**32
    assert h.unique().numel() == x.numel()


def test_fresh_seed_and_seed_mapping():
    seeds = {fresh_seed() for _ in range(100)}
    assert len(seeds) == 100 and all(0 <= s < 2**63 for s in seeds)
    assert seed_to_int64(2**64 + 5) == 5
    assert seed_to_int64(2**64 - 1) == -1
    assert seed_to_int64(-3) == -3


def test_traceable_by_torch_compile():
    """Dynamo captures `uniform` as one graph (fullgraph: no break); the eager backend keeps it quick."""
    seeds, index, step = _counters(4)
    compiled = torch.compile(uniform, backend="eager", fullgraph=True)
    assert torch.equal(compiled(seeds, index, step, 64), uniform(seeds, index, step, 64))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_same_values_on_cuda():
    seeds = torch.tensor([1, -5, 2**62, -(2**63)], dtype=torch.int64)
    index, step = torch.tensor([0, 3, 1, 7]), torch.tensor([0, 2, 9, 4])
    cpu = uniform(seeds, index, step, 50000)
    cuda = uniform(seeds.cuda(), index.cuda(), step.cuda(), 50000)
    assert torch.equal(cuda.cpu(), cpu)


def _uniform_bits_int64(keys: torch.Tensor, token_keys: torch.Tensor) -> torch.Tensor:
    """The slow reference: the same mixer on int64 with every product masked back to 32 bits."""
    mask = 0xFFFFFFFF
    x = keys ^ token_keys
    x = (x * 0x21F0AAAD) & mask
    x = x ^ (x >> 15)
    x = (x * 0x735A2D97) & mask
    x = x >> 9
    return (x.to(torch.float32) + 0.5) * (1.0 / (1 << 23))


@pytest.mark.parametrize("K", [1, 7, 64, 1001])
def test_int32_uniform_bits_equal_the_int64_reference(K):
    from forklm.sampling.random import _uniform_bits

    g = torch.Generator().manual_seed(K)
    edges = torch.tensor([0, 1, 2**31 - 1, 2**31, 2**32 - 1], dtype=torch.int64)
    keys = torch.cat([edges, torch.randint(0, 2**32, (59,), generator=g)])[:, None]  # [64, 1]
    token_keys = torch.randint(0, 2**32, (1, K), generator=g)
    token_keys[0, : min(K, 5)] = edges[: min(K, 5)]
    assert torch.equal(_uniform_bits(keys, token_keys), _uniform_bits_int64(keys, token_keys))
    per_row = torch.randint(0, 2**32, (64, K), generator=g)  # uniform_at's [S, K] token keys
    assert torch.equal(_uniform_bits(keys, per_row), _uniform_bits_int64(keys, per_row))
