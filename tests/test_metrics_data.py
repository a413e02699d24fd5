"""Metrics against brute-force definitions, and the synthetic generator's contract."""

import math

import pytest
import torch

import anchor_ext
from anchor_ext import metrics, synthetic
from anchor_ext import reference as ref
from conftest import make_inputs

CFG = ref.SparseConfig(block_size=16, step=2)
GEOMETRY = dict(block_size=16, step=2)


def brute_force_keep(selection, n, cfg):
    rows = torch.arange(n)
    keep = torch.zeros(selection.shape[0], selection.shape[1], n, n, dtype=torch.bool)
    for r0 in range(0, n, cfg.block_size):
        r1 = min(n, r0 + cfg.block_size)
        for b in range(selection.shape[0]):
            for h in range(selection.shape[1]):
                keep[b, h, r0:r1, :r1] = ref.computed_mask(rows[r0:r1], r1,
                                                           selection[b, h, r0 // cfg.group_rows], cfg)
    return keep


def test_sparsity_and_recall_match_brute_force():
    n = 150
    q, k, v = make_inputs(1, 4, 2, n, 32, seed=8)
    anchors = anchor_ext.anchor(q, k, **GEOMETRY)
    selection = anchor_ext.identify(q, k, anchors, theta=2.0, **GEOMETRY)
    keep = brute_force_keep(selection, n, CFG)
    causal_pairs = n * (n + 1) / 2
    expected = 1 - keep.sum((-1, -2)).double() / causal_pairs
    got = metrics.sparsity(selection, n, CFG)
    torch.testing.assert_close(got["per_head"], expected)
    assert 0 < got["overall"] < 1

    s = (q.float() @ k.float().repeat_interleave(2, 1).transpose(-1, -2)) / math.sqrt(32)
    s = s.masked_fill(torch.ones(n, n, dtype=torch.bool).triu(1), -math.inf)
    p = torch.softmax(s, -1)
    expected_recall = (p * keep).sum(-1)
    recall = metrics.mass_recall(q, k, selection, CFG)
    torch.testing.assert_close(recall, expected_recall, rtol=1e-5, atol=1e-5)
    summary = metrics.recall_summary(recall)
    assert summary["min"] <= summary["p01"] <= summary["mean"] <= 1.0


def test_recall_sampling_and_dense_limits():
    n = 200
    q, k, v = make_inputs(1, 2, 1, n, 32, seed=3)
    full = torch.full((1, 2, ref.num_groups(n, CFG), ref.selection_words(n)), -1, dtype=torch.int32)
    recall = metrics.mass_recall(q, k, full, CFG, block_stride=3)
    sampled = recall[~torch.isnan(recall)]
    assert sampled.numel() == 2 * sum(min(16, n - r0) for r0 in range(0, n, 48))
    torch.testing.assert_close(sampled, torch.ones_like(sampled))
    assert metrics.sparsity(full, n, CFG)["overall"] == pytest.approx(0.0, abs=1e-12)


def test_output_error():
    ref_out = torch.randn(1, 2, 10, 8)
    err = metrics.output_error(ref_out * 1.01, ref_out)
    assert err["max"] == pytest.approx(0.01, rel=1e-4) and err["mean"] == pytest.approx(0.01, rel=1e-4)
    assert err["per_head_max"].shape == (1, 2)


@pytest.mark.parametrize("n,dtype", [(1, torch.float32), (127, torch.float16), (300, torch.bfloat16)])
def test_synthetic_shapes_dtypes_and_determinism(n, dtype):
    q, k, v = synthetic.make_qkv(n, q_heads=4, kv_heads=2, head_dim=64, dtype=dtype, seed=1)
    assert q.shape == (1, 4, n, 64) and k.shape == v.shape == (1, 2, n, 64)
    assert q.dtype == k.dtype == v.dtype == dtype
    assert all(torch.isfinite(t).all() for t in (q, k, v))
    q2, _, _ = synthetic.make_qkv(n, q_heads=4, kv_heads=2, head_dim=64, dtype=dtype, seed=1)
    assert torch.equal(q, q2)


def test_synthetic_rejects_bad_heads():
    with pytest.raises(ValueError, match="kv_heads"):
        synthetic.make_qkv(64, q_heads=6, kv_heads=4)


def test_synthetic_attention_is_concentrated():
    """The documented property: a typical head needs few keys for 95% of the mass."""
    q, k, _ = synthetic.make_qkv(4096, q_heads=4, kv_heads=1, head_dim=128, seed=0)
    stats = synthetic.concentration_stats(q, k, rows=128)
    assert stats["keys_frac_median"] < 0.10, stats
    diffuse_q, diffuse_k, _ = synthetic.make_qkv(4096, q_heads=4, kv_heads=1, head_dim=128, seed=0,
                                                 profile="diffuse")
    assert synthetic.concentration_stats(diffuse_q, diffuse_k, rows=128)["keys_frac_median"] > 0.25


def _diagonal_inputs(n=256, d=64, sharpness=40.0):
    """Each row puts nearly all its mass on its own key: orthogonal-ish random keys."""
    gen = torch.Generator().manual_seed(0)
    k = torch.nn.functional.normalize(torch.randn(1, 1, n, d, generator=gen), dim=-1)
    q = k * sharpness * math.sqrt(d)
    return q, k


def test_oracle_density_per_row_on_uniform_attention():
    """Uniform attention (q = 0): a row needs ceil(t * (i + 1)) of its i + 1 keys."""
    n, d = 200, 16
    q, k = torch.zeros(1, 1, n, d), torch.randn(1, 1, n, d)
    got = metrics.oracle_density(q, k, block_rows=1, targets=(0.5, 0.9), blocks=n)
    rows = torch.arange(n, dtype=torch.float64)
    for t in (0.5, 0.9):
        kept = torch.ceil(t * (rows + 1) - 1e-9)
        expected = float((kept / (rows + 1)).mean())
        assert abs(got[t] - expected) < 1e-6, (t, got[t], expected)
        # Pair-weighted: kept pairs over causal pairs of all sampled rows.
        weighted = float(kept.sum() / (rows + 1).sum())
        assert abs(got["pair_weighted"][t] - weighted) < 1e-6, (t, got["pair_weighted"][t], weighted)


def test_block_oracle_pays_for_sharing_on_diagonal_heads():
    """Per row one key is enough; a block shared by 128 rows needs all of their keys."""
    q, k = _diagonal_inputs()
    per_row = metrics.oracle_density(q, k, block_rows=1, targets=(0.95,), blocks=256)[0.95]
    block = metrics.oracle_density(q, k, block_rows=128, targets=(0.95,), blocks=2)[0.95]
    rows = torch.arange(256, dtype=torch.float64)
    assert abs(per_row - float((1.0 / (rows + 1)).mean())) < 1e-3
    assert block > 5 * per_row
    targets = metrics.oracle_density(q, k, block_rows=64, targets=(0.9, 0.95, 0.99), blocks=4)
    assert targets[0.9] <= targets[0.95] <= targets[0.99] <= 1.0
