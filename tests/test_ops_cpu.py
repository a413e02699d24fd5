"""Every CPU op against anchor_ext.reference over a grid of shapes, dtypes, tails and GQA."""

import itertools

import pytest
import torch

import anchor_ext
from anchor_ext import reference as ref
from conftest import compare_stages_with_reference, make_inputs

# (batch, q_heads, kv_heads, head_dim): MHA, GQA 4:1, GQA 8:1 (MQA-like)
HEADS = [(1, 2, 2, 64), (2, 4, 1, 128), (1, 8, 1, 64)]
SEQLENS = [1, 127, 128, 129, 1000, 4096]
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# Default geometry, and a small one that makes many groups at small N.
GEOMETRIES = [dict(), dict(block_size=32, step=2, init_blocks=1, local_blocks=1)]


def geometry_config(geometry):
    return ref.SparseConfig(**{"block_size": 128, "step": 16, "init_blocks": 1, "local_blocks": 1,
                               **geometry})


def run_and_compare(q, k, v, theta, geometry):
    return compare_stages_with_reference(q, k, v, theta, geometry, anchor_tol=1e-5, lse_tol=1e-4)


@pytest.mark.parametrize("heads,n,dtype", list(itertools.product(HEADS, SEQLENS, DTYPES)))
def test_stages_match_reference(heads, n, dtype):
    batch, hq, hkv, d = heads
    q, k, v = make_inputs(batch, hq, hkv, n, d, dtype, seed=n, contiguous=(n % 2 == 0))
    for geometry in GEOMETRIES:
        run_and_compare(q, k, v, theta=3.0, geometry=geometry)


@pytest.mark.parametrize("theta", [0.0, 1.0, 3.0, 6.0, 12.0, 1e9])
def test_theta_sweep_small_geometry(theta):
    q, k, v = make_inputs(1, 4, 2, 700, 64, torch.float32, seed=7)
    geometry = dict(block_size=32, step=2)
    run_and_compare(q, k, v, theta, geometry)
    if theta >= 1e9:
        # every middle key selected: the result is dense attention
        out = anchor_ext.prefill(q, k, v, theta=theta, path="sparse", **geometry)
        dense, _ = ref.dense_attention(q, k, v)
        torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def test_more_theta_keeps_more_keys():
    from anchor_ext.metrics import sparsity

    q, k, v = make_inputs(1, 4, 2, 1500, 64, seed=11)
    geometry = dict(block_size=32, step=2)
    cfg = geometry_config(geometry)
    anchors = anchor_ext.anchor(q, k, **geometry)
    values = [sparsity(anchor_ext.identify(q, k, anchors, theta=t, **geometry), 1500, cfg)["overall"]
              for t in (0.0, 2.0, 4.0, 8.0, 1e9)]
    assert all(a >= b for a, b in zip(values, values[1:])), values
    assert values[0] > values[-1] and values[-1] == pytest.approx(0.0, abs=1e-12)


def test_theta_huge_equals_dense_default_geometry():
    q, k, v = make_inputs(2, 4, 1, 4096 + 77, 64, torch.float32, seed=5)
    out = anchor_ext.prefill(q, k, v, theta=1e9)
    dense, _ = ref.dense_attention(q, k, v)
    torch.testing.assert_close(out, dense, rtol=2e-5, atol=2e-5)


def test_sm_scale_and_region_options():
    q, k, v = make_inputs(1, 2, 1, 300, 64, seed=9)
    for geometry in (dict(block_size=16, step=3, init_blocks=0, local_blocks=0, sm_scale=0.07),
                     dict(block_size=16, step=1, init_blocks=3, local_blocks=2, sm_scale=0.2)):
        run_and_compare(q, k, v, theta=2.0, geometry=geometry)


def test_stage3_ignores_bits_outside_the_middle_region():
    q, k, v = make_inputs(1, 2, 1, 300, 64, seed=2)
    geometry = dict(block_size=16, step=2)
    n = 300
    groups = ref.num_groups(n, geometry_config(geometry))
    all_bits = torch.full((1, 2, groups, ref.selection_words(n)), -1, dtype=torch.int32)
    out, _ = anchor_ext.sparse_attention(q, k, v, all_bits, **geometry)
    dense, _ = ref.dense_attention(q, k, v)
    torch.testing.assert_close(out, dense, rtol=1e-5, atol=1e-5)


def test_requires_grad_inputs_compute_and_backward_raises():
    q, k, v = (t.requires_grad_() for t in make_inputs(1, 2, 1, 64, 64))
    out = anchor_ext.prefill(q, k, v, path="sparse")
    expected = anchor_ext.prefill(q.detach(), k.detach(), v.detach(), path="sparse")
    torch.testing.assert_close(out.detach(), expected)
    with pytest.raises(NotImplementedError, match="no backward"):
        out.sum().backward()


def test_empty_batch():
    q, k, v = make_inputs(0, 2, 1, 50, 64)
    assert anchor_ext.prefill(q, k, v).shape == q.shape
