"""prefill(method="skeleton" | "hybrid"): the skeleton selection fed to the shared stage 3."""

from __future__ import annotations

import pytest
import torch

import anchor_ext
from anchor_ext import reference as ref, skeleton, synthetic

N = 1024
ROPE = dict(rope_base=synthetic.ROPE_BASE)


@pytest.fixture(scope="module")
def qkv():
    return synthetic.make_qkv(N, q_heads=4, kv_heads=2, head_dim=64, dtype=torch.float32, seed=3)


@pytest.mark.parametrize("granularity", ["block", "key"])
def test_skeleton_prefill_is_stage3_on_the_skeleton_selection(qkv, granularity):
    q, k, v = qkv
    out, stats = anchor_ext.prefill(q, k, v, method="skeleton", return_stats=True,
                                    granularity=granularity, block_size=64, **ROPE)
    selection = skeleton.select(q, k, granularity=granularity, block_size=64, step=1, **ROPE)
    assert torch.equal(stats["selection"], selection)
    expected, _ = ref.sparse_attention(q, k, v, selection, block_size=64, step=1)
    torch.testing.assert_close(out, expected, rtol=2e-5, atol=2e-5)
    assert 0 < stats["sparsity"] < 1
    torch.testing.assert_close(anchor_ext.prefill(q, k, v, method="skeleton", granularity=granularity,
                                                  block_size=64, **ROPE), out, rtol=0, atol=0)


def test_hybrid_selection_is_the_union(qkv):
    q, k, v = qkv
    geometry = dict(block_size=64, step=1)
    _, stats = anchor_ext.prefill(q, k, v, method="hybrid", theta=8.0, return_stats=True, **geometry,
                                  **ROPE)
    skel = skeleton.select(q, k, **geometry, **ROPE)
    anch = ref.identify(q, k, ref.anchor(q, k, **geometry), theta=8.0, **geometry)
    assert torch.equal(stats["selection"], skel | anch)
    assert not torch.equal(skel, anch)  # the union adds something to each part


def test_skeleton_arguments_are_checked(qkv):
    q, k, v = qkv
    with pytest.raises(ValueError, match="rope_base: method='skeleton' unRoPEs the keys"):
        anchor_ext.prefill(q, k, v, method="skeleton")
    with pytest.raises(TypeError, match=r"unexpected options \['window'\]"):
        anchor_ext.prefill(q, k, v, method="hybrid", window=3, **ROPE)
    with pytest.raises(ValueError, match="method: expected 'anchor', 'skeleton' or 'hybrid'"):
        anchor_ext.prefill(q, k, v, method="minference")
    with pytest.raises(ValueError, match="rotary_dim"):
        anchor_ext.prefill(q, k, v, method="skeleton", rotary_dim=63, **ROPE)
