"""The path="auto" rule (anchor_ext.dispatch) and the dense path, on the CPU.

The CUDA side (probe on real kernels, graph capture) is in test_cuda.py.
"""

from __future__ import annotations

import pytest
import torch

import anchor_ext
from anchor_ext import dispatch, reference as ref
from anchor_ext.metrics import computed_pairs
from anchor_ext.reference import SparseConfig

from conftest import make_inputs

GEOMETRIES = [SparseConfig(), SparseConfig(64, 2, 1, 1), SparseConfig(32, 3, 2, 0),
              SparseConfig(16, 1, 0, 2)]


@pytest.mark.parametrize("cfg", GEOMETRIES)
@pytest.mark.parametrize("n", [1, 100, 1000, 5000])
def test_region_pair_counts_match_the_masks(cfg, n):
    """always = pairs of always_mask; always + middle = pairs of a full selection."""
    rows = torch.arange(n)
    always = int(ref.always_mask(rows, n, cfg).sum())
    full = torch.full((1, 1, ref.num_groups(n, cfg), ref.selection_words(n)), -1, dtype=torch.int32)
    counted_always, counted_middle = ref.region_pair_counts(n, cfg)
    assert counted_always == always
    assert counted_always + counted_middle == float(computed_pairs(full, n, cfg)[0, 0])


@pytest.mark.parametrize("cfg", GEOMETRIES[:2])
def test_selected_fraction_counts_bits(cfg):
    n = 3000
    q, k, _ = make_inputs(2, 4, 2, n, 16, seed=3)
    selection = ref.identify(q, k, ref.anchor(q, k, block_size=cfg.block_size, step=cfg.step),
                             theta=10.0, block_size=cfg.block_size, step=cfg.step)
    bits = ref.unpack_bits(selection, n).sum()
    middle = sum(end - start for start, end in
                 (ref.middle_range(g, cfg) for g in range(ref.num_groups(n, cfg))))
    expected = float(bits) / (middle * 2 * 4)
    assert 0 < expected < 1
    assert float(dispatch.selected_fraction(selection, n, cfg)) == pytest.approx(expected, rel=1e-6)


def test_rule_goes_dense_for_short_inputs_and_full_selections():
    cfg = SparseConfig()
    assert dispatch.decide(8192, cfg)["path"] == "dense"
    assert dispatch.decide(12288, cfg)["path"] == "dense"
    assert dispatch.decide(16384, cfg)["path"] == "probe"
    # A diffuse input (every middle key selected) is dense at any length ...
    for n in (32768, 131072, 1 << 20):
        assert dispatch.decide(n, cfg, probe_fraction=1.0)["path"] == "dense"
    # ... a concentrated one is sparse, and the prediction grows with the selection.
    assert dispatch.decide(131072, cfg, probe_fraction=0.1)["path"] == "sparse"
    costs = [dispatch.predicted_cost(131072, cfg, f) for f in (0.0, 0.1, 0.3, 1.0)]
    assert costs == sorted(costs)
    assert dispatch.decide(131072, cfg, can_probe=False)["path"] == "sparse"
    assert dispatch.decide(8192, cfg, can_probe=False)["path"] == "dense"


def test_cpu_auto_follows_the_length_rule_and_dense_path_is_exact(monkeypatch):
    from anchor_ext import dispatch

    monkeypatch.setattr(dispatch, "_warned", set())  # warned once per process: reset
    q, k, v = make_inputs(1, 4, 2, 300, 32, seed=1)
    with pytest.warns(dispatch.DensePathWarning, match="CPU: input too short"):
        out, stats = anchor_ext.prefill(q, k, v, theta=3.0, return_stats=True, step=2, block_size=64)
    assert stats["path"] == "dense" and stats["sparsity"] == 0.0
    torch.testing.assert_close(out, ref.dense_attention(q, k, v)[0], rtol=2e-5, atol=2e-5)
    assert dispatch.decide_cpu(dispatch.CPU_SPARSE_FROM_TOKENS - 1)["path"] == "dense"
    assert dispatch.decide_cpu(dispatch.CPU_SPARSE_FROM_TOKENS)["path"] == "sparse"
    out, stats = anchor_ext.prefill(q, k, v, theta=3.0, return_stats=True, step=2, block_size=64,
                                    path="sparse")
    assert stats["path"] == "sparse" and 0 < stats["sparsity"] < 1
    torch.testing.assert_close(out, ref.prefill(q, k, v, theta=3.0, step=2, block_size=64))
    out, stats = anchor_ext.prefill(q, k, v, path="dense", return_stats=True)
    assert stats == {"path": "dense", "reason": "requested", "sparsity": 0.0}
    torch.testing.assert_close(out, ref.dense_attention(q, k, v)[0], rtol=2e-5, atol=2e-5)


def test_dense_path_checks_inputs_like_the_sparse_path():
    q, k, v = make_inputs(1, 4, 2, 100, 32, seed=2)
    with pytest.raises(ValueError, match="path: expected 'auto', 'sparse' or 'dense', got 'fast'"):
        anchor_ext.prefill(q, k, v, path="fast")
    with pytest.raises(ValueError, match="k: the number of kv heads must divide"):
        anchor_ext.prefill(q, k[:, :1].expand(1, 3, 100, 32), v[:, :1].expand(1, 3, 100, 32),
                           path="dense")
    q[0, 0, 5, 5] = float("inf")
    with pytest.raises(ValueError, match="q: expected finite values"):
        anchor_ext.prefill(q, k, v, path="dense")
    with pytest.raises(ValueError, match="theta"):
        anchor_ext.prefill(q.nan_to_num(), k, v, path="dense", theta=float("nan"))


def test_dense_choice_warns_once_per_reason():
    import warnings

    dispatch._warned.clear()
    choice = dispatch.decide(8192, SparseConfig())
    with pytest.warns(dispatch.DensePathWarning, match="input too short for sparse to win"):
        dispatch.warn_dense_once(choice)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        dispatch.warn_dense_once(choice)  # the same reason again: silent
    with pytest.warns(dispatch.DensePathWarning, match="probe"):
        dispatch.warn_dense_once(dispatch.decide(131072, SparseConfig(), probe_fraction=1.0))


@pytest.mark.parametrize("step", [1, 16, 64])
def test_probe_prefix_always_has_a_middle_region(step):
    """With large groups a fixed prefix would lie in groups without middle keys and read
    as 'nothing selected'; the prefix covers two groups and a block instead."""
    cfg = SparseConfig(step=step)
    for n in (16384, 131072, 1 << 20):
        p = dispatch.probe_tokens(n, cfg)
        if p < n:
            assert ref.region_pair_counts(p, cfg)[1] > 0
    empty = torch.zeros(1, 2, 1, ref.selection_words(100), dtype=torch.int32)
    assert torch.isnan(dispatch.selected_fraction(empty, 100, SparseConfig()))


def test_recall_mode_rule_charges_its_own_selection_cost():
    """The recall mode's stages 1-2 cost more than the fixed-theta ones (probe, step 1):
    at 32k even an empty selection does not pay; at 128k a sparse estimate runs sparse and
    a diffuse one dense; without a host read the bound decides."""
    from anchor_ext import dispatch

    cfg = ref.SparseConfig(128, 1, 1, 1)
    assert dispatch.decide(32768, cfg, stage12_tokens=dispatch.RECALL_STAGE12_TOKENS)["path"] == "dense"
    assert dispatch.decide(131072, cfg, stage12_tokens=dispatch.RECALL_STAGE12_TOKENS)["path"] == "probe"
    fraction = torch.tensor(0.05)
    assert dispatch.choose_path_from_fraction(131072, fraction, cfg)["path"] == "sparse"
    assert dispatch.choose_path_from_fraction(131072, torch.tensor(0.9), cfg)["path"] == "dense"
    assert dispatch.choose_path_from_fraction(131072, torch.tensor(float("nan")), cfg)["path"] == "sparse"
    q = torch.zeros(1, 1, 131072, 8)  # CPU: the length rule
    assert dispatch.recall_bound(q, cfg)["path"] == "sparse"
    assert dispatch.recall_bound(q[:, :, :4096], cfg)["path"] == "dense"
