"""The references against naive dense math on small inputs (full N x N here is fine)."""

import math

import pytest
import torch

from anchor_ext import reference as ref
from conftest import make_inputs


def naive_scores(q, k, sm_scale=None):
    group = q.shape[1] // k.shape[1]
    k = k.float().repeat_interleave(group, dim=1)
    scale = 1 / math.sqrt(q.shape[-1]) if sm_scale is None else sm_scale
    return (q.float() @ k.transpose(-1, -2)) * scale


def naive_regions(n, cfg):
    """Dense (n, n) masks of always-computed keys and of each row's middle region."""
    i = torch.arange(n)[:, None]
    j = torch.arange(n)[None, :]
    g0 = (i // cfg.group_rows) * cfg.group_rows
    local_start = (g0 - cfg.local_blocks * cfg.block_size).clamp_min(0)
    always = (j <= i) & ((j < cfg.sink_end) | (j >= local_start))
    middle = (j >= cfg.sink_end) & (j < g0 - cfg.local_blocks * cfg.block_size)
    return always, middle


@pytest.mark.parametrize("n", [1, 37, 64, 200])
def test_dense_attention_matches_naive(n):
    q, k, v = make_inputs(2, 4, 2, n, 16)
    out, lse = ref.dense_attention(q, k, v, block_size=32)
    s = naive_scores(q, k).masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
    expected = torch.softmax(s, -1) @ v.float().repeat_interleave(2, dim=1)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(s, -1), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cfg", [ref.SparseConfig(16, 2, 1, 1), ref.SparseConfig(8, 3, 2, 0),
                                 ref.SparseConfig(8, 1, 0, 2)])
def test_regions_partition_the_causal_triangle(cfg):
    n = 150
    always, middle = naive_regions(n, cfg)
    causal = torch.ones(n, n, dtype=torch.bool).tril()
    assert not (always & middle).any(), "a key is both always computed and a candidate"
    assert torch.equal(always | middle, causal), "some causal key is out of every region"
    torch.testing.assert_close(ref.always_mask(torch.arange(n), n, cfg), always)


@pytest.mark.parametrize("cfg", [ref.SparseConfig(16, 2, 1, 1), ref.SparseConfig(8, 3, 2, 0)])
@pytest.mark.parametrize("theta", [0.0, 1.5, 3.0, 1e9])
def test_stages_match_naive(cfg, theta):
    n = 130
    q, k, v = make_inputs(1, 4, 2, n, 16, seed=3)
    geometry = dict(block_size=cfg.block_size, step=cfg.step, init_blocks=cfg.init_blocks,
                    local_blocks=cfg.local_blocks)
    s = naive_scores(q, k)
    always, middle = naive_regions(n, cfg)
    anchors = ref.anchor(q, k, **geometry)
    torch.testing.assert_close(anchors, s.masked_fill(~always, -math.inf).amax(-1))

    # Identification by the definition: block means, union over the group's blocks.
    selection = ref.identify(q, k, anchors, theta=theta, **geometry)
    bits = ref.unpack_bits(selection, n)
    for g in range(ref.num_groups(n, cfg)):
        m0, m1 = ref.middle_range(g, cfg)
        expected = torch.zeros(1, 4, n, dtype=torch.bool)
        for qb in range(g * cfg.step, min((g + 1) * cfg.step, -(-n // cfg.block_size))):
            r0, r1 = qb * cfg.block_size, min(n, (qb + 1) * cfg.block_size)
            score = (q[:, :, r0:r1].mean(2, keepdim=True) @
                     k.repeat_interleave(2, 1).transpose(-1, -2))[:, :, 0] / 4.0
            vote = anchors[:, :, r0:r1].mean(-1, keepdim=True) - score < theta
            expected |= vote & (torch.arange(n) >= m0) & (torch.arange(n) < m1)
        assert torch.equal(bits[:, :, g], expected)

    # Stage 3 = softmax restricted to always | (selected & middle).
    out, lse = ref.sparse_attention(q, k, v, selection, **geometry)
    group_of_row = torch.arange(n) // cfg.group_rows
    keep = always[None, None] | (bits[:, :, group_of_row] & middle[None, None])
    masked = s.masked_fill(~keep, -math.inf)
    torch.testing.assert_close(out, torch.softmax(masked, -1) @ v.float().repeat_interleave(2, 1),
                               rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(lse, torch.logsumexp(masked, -1), rtol=1e-5, atol=1e-5)
    if theta >= 1e9:  # every candidate kept: exactly dense attention
        dense, _ = ref.dense_attention(q, k, v)
        torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def test_pack_unpack_roundtrip():
    bits = torch.rand(3, 5, 77) < 0.3
    packed = ref.pack_bits(bits)
    assert packed.dtype == torch.int32 and packed.shape == (3, 5, 3)
    assert torch.equal(ref.unpack_bits(packed, 77), bits)
    top = torch.zeros(1, 32, dtype=torch.bool)
    top[0, 31] = True
    assert int(ref.pack_bits(top)[0, 0]) == -(2**31)  # bit 31 is the sign bit
