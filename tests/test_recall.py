"""Vote units and per-head thresholds in identify, the recall probe, and prefill(recall=...).

Each kernel (CPU, and CUDA when present) is compared with anchor_ext.reference over a grid
of shapes, dtypes, tails, GQA ratios and vote units; the calibration is checked against
the reference selection at the chosen threshold and the grid value below it.
"""

import itertools
import math

import pytest
import torch

import anchor_ext
from anchor_ext import families, recall as recall_mode
from anchor_ext import reference as ref
from anchor_ext.reference import SparseConfig
from conftest import HAS_CUDA, assert_selection_equal, make_inputs

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])
# (batch, q_heads, kv_heads, head_dim)
HEADS = [(1, 2, 2, 64), (2, 4, 1, 128), (1, 8, 2, 64)]
SEQLENS = [129, 1000, 2500]
VOTE_ROWS = [1, 4, 16, 128]


def head_thresholds(batch, q_heads, device):
    """Per-head thresholds spanning nothing (-inf), a few keys, many keys and all (+inf)."""
    values = torch.tensor([-math.inf, 1.0, 4.0, math.inf, 2.5, 0.0, 7.0, -1.0])
    return values[torch.arange(batch * q_heads) % len(values)].view(batch, q_heads).to(device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("heads,n,vote_rows", list(itertools.product(HEADS, SEQLENS, VOTE_ROWS)))
def test_identify_vote_units_match_reference(device, heads, n, vote_rows):
    batch, hq, hkv, d = heads
    dtype = torch.bfloat16 if device == "cuda" else (torch.float32, torch.bfloat16)[n % 2]
    q, k, _ = make_inputs(batch, hq, hkv, n, d, dtype, device=device, seed=n + vote_rows,
                          contiguous=n != 1000)
    for step, per_head in ((1, True), (2, False), (16, True)):
        if device == "cuda" and step * 128 // vote_rows > 256:
            continue  # beyond the CUDA kernel's vote units per group (tested below)
        geometry = dict(step=step)
        anchors = anchor_ext.anchor(q, k, **geometry)
        head_theta = head_thresholds(batch, hq, device) if per_head else None
        selection = anchor_ext.identify(q, k, anchors, theta=3.0, vote_rows=vote_rows,
                                        head_theta=head_theta, **geometry)
        expected, margin = ref.identify(q, k, anchors, theta=3.0, vote_rows=vote_rows,
                                        head_theta=head_theta, return_margin=True, **geometry)
        assert selection.shape == expected.shape
        assert_selection_equal(selection.cpu(), expected.cpu(), margin.cpu(), n)


@pytest.mark.parametrize("device", DEVICES)
def test_infinite_head_theta_selects_every_middle_key_and_minus_inf_none(device):
    q, k, _ = make_inputs(1, 2, 1, 1500, 64, torch.bfloat16, device=device)
    anchors = anchor_ext.anchor(q, k, step=1)
    head_theta = torch.tensor([[math.inf, -math.inf]], device=device)
    selection = anchor_ext.identify(q, k, anchors, step=1, vote_rows=16, head_theta=head_theta)
    bits = ref.unpack_bits(selection.cpu(), 1500)
    cfg = SparseConfig(128, 1, 1, 1)
    for g in range(selection.shape[2]):
        m0, m1 = ref.middle_range(g, cfg)
        assert bits[0, 0, g, m0:m1].all() and not bits[0, 0, g, :m0].any() and not bits[0, 0, g, m1:].any()
    assert not bits[0, 1].any()


def test_vote_rows_default_is_the_block_mean_rule():
    q, k, _ = make_inputs(1, 4, 2, 3000, 64, torch.float32, seed=3)
    anchors = anchor_ext.anchor(q, k)
    for vote_rows in (0, 128):
        torch.testing.assert_close(anchor_ext.identify(q, k, anchors, theta=3.0, vote_rows=vote_rows),
                                   anchor_ext.identify(q, k, anchors, theta=3.0), rtol=0, atol=0)


@pytest.mark.parametrize("vote_rows,message", [(3, "vote_rows: expected a positive divisor of block_size=128"),
                                               (-4, "vote_rows: expected a positive divisor"),
                                               (256, "got 256")])
def test_bad_vote_rows_raise(vote_rows, message):
    q, k, _ = make_inputs(1, 2, 1, 300, 64)
    anchors = anchor_ext.anchor(q, k)
    with pytest.raises(ValueError, match=message):
        anchor_ext.identify(q, k, anchors, vote_rows=vote_rows)


@pytest.mark.parametrize("head_theta,message", [
    (torch.zeros(1, 3), r"head_theta: expected shape \(B, Hq\) = \[1, 2\], got \[1, 3\]"),
    (torch.zeros(1, 2, dtype=torch.float64), "head_theta: expected dtype float32, got Double"),
    (torch.tensor([[1.0, math.nan]]), "head_theta: expected numbers .* found NaN"),
])
def test_bad_head_theta_raise(head_theta, message):
    q, k, _ = make_inputs(1, 2, 1, 300, 64)
    anchors = anchor_ext.anchor(q, k)
    with pytest.raises(ValueError, match=message):
        anchor_ext.identify(q, k, anchors, head_theta=head_theta)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a CUDA build")
def test_cuda_vote_unit_limit_and_device_of_head_theta():
    q, k, _ = make_inputs(1, 2, 1, 300, 64, torch.bfloat16, device="cuda")
    anchors = anchor_ext.anchor(q, k)
    with pytest.raises(ValueError, match="at most|<= 256 vote units per group, got 2048"):
        anchor_ext.identify(q, k, anchors, vote_rows=1)  # step 16: 2048 single-row units
    with pytest.raises(ValueError, match="head_theta: expected device cuda"):
        anchor_ext.identify(q, k, anchors, head_theta=torch.zeros(1, 2))


def probe_recall(q, k, anchors, head_theta, cfg, vote_rows, groups, rows, sm_scale=None):
    """Mean recall of the probe rows per head under the *reference* selection at head_theta."""
    selection = ref.identify(q, k, anchors, head_theta=head_theta, vote_rows=vote_rows,
                             block_size=cfg.block_size, step=cfg.step, init_blocks=cfg.init_blocks,
                             local_blocks=cfg.local_blocks, sm_scale=sm_scale)
    bsz, hq, n, d = q.shape
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    result = torch.zeros(bsz, hq, dtype=torch.float64)
    for b in range(bsz):
        for h in range(hq):
            kh = k[b, h // (hq // k.shape[1])].float()
            total = []
            for g, group_rows in zip(groups.tolist(), rows.tolist()):
                for i in group_rows:
                    scores = (q[b, h, i].float() @ kh[:i + 1].T) * scale
                    probs = torch.softmax(scores, -1)
                    keep = ref.computed_mask(torch.tensor([i]), i + 1, selection[b, h, g], cfg)[0]
                    total.append(float((probs * keep).sum()))
            result[b, h] = sum(total) / len(total)
    return result


@pytest.mark.parametrize("family,vote_rows,target", [("mixed", 16, 0.95), ("slash", 4, 0.9),
                                                     ("retrieval", 1, 0.99), ("realistic", 32, 0.8)])
def test_calibrated_theta_is_the_smallest_grid_value_reaching_the_target(family, vote_rows, target):
    q, k, _, scale = families.make(family, 2048, q_heads=4, kv_heads=2, head_dim=64, seed=1)
    q, k = q.float(), k.float()
    cfg = SparseConfig(64, 2, 1, 1)
    anchors = ref.anchor(q, k, block_size=64, step=2)
    theta = recall_mode.calibrate_theta(q, k, anchors, recall=target, cfg=cfg, vote_rows=vote_rows,
                                        probe_groups=4, probe_rows=3)
    groups, rows = recall_mode.probe_plan(2048, cfg, 4, 3, q.device)
    assert rows[:, 0].tolist() == [g * cfg.group_rows for g in groups.tolist()]  # first rows probed
    reached = probe_recall(q, k, anchors, theta, cfg, vote_rows, groups, rows)
    assert (reached >= target - 1e-5).all(), (theta, reached)
    grid = recall_mode.THETA_GRID
    below = torch.tensor([[float(grid[(grid < t).nonzero().max()]) if t > grid[0] else -math.inf
                           for t in row] for row in theta.tolist()])
    finite_below = torch.isfinite(below)
    if finite_below.any():
        missed = probe_recall(q, k, anchors, below, cfg, vote_rows, groups, rows)
        assert (missed[finite_below] < target + 1e-5).all(), (theta, missed)


def test_calibration_full_recall_goes_dense_and_needs_no_middle_region():
    q, k, v = make_inputs(1, 2, 1, 600, 64, seed=5)
    cfg = SparseConfig(64, 1, 1, 1)
    anchors = ref.anchor(q, k, block_size=64, step=1)
    theta = recall_mode.calibrate_theta(q, k, anchors, recall=1.0, cfg=cfg, vote_rows=8)
    assert theta.shape == (1, 2) and theta.dtype == torch.float32
    # No group with a middle region: nothing to calibrate, every key is always computed.
    short = recall_mode.calibrate_theta(q[:, :, :100], k[:, :, :100], anchors[:, :, :100], recall=0.9,
                                        cfg=cfg, vote_rows=8)
    assert torch.isinf(short).all()


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_recall_reaches_its_target_per_head(device):
    from bench.accuracy import eval_blocks, quality

    q, k, v, _ = families.make("mixed", 4096, q_heads=8, kv_heads=2, device=device)
    for target in (0.9, 0.97):
        out, stats = anchor_ext.prefill(q, k, v, recall=target, path="sparse", return_stats=True)
        cfg = SparseConfig(128, 1, 1, 1)
        measured = quality(q, k, stats["selection"], cfg, None, eval_blocks(4096, 128, 12, seed=11))
        assert measured["recall_mean"] >= target - 0.01, measured
        assert min(measured["head_means"]) >= target - 0.05, measured["head_means"]
        assert stats["head_theta"].shape == (1, 8) and stats["path"] == "sparse"


@pytest.mark.parametrize("device", DEVICES)
def test_prefill_recall_one_is_dense(device):
    q, k, v = make_inputs(1, 4, 2, 1500, 64, torch.bfloat16 if device == "cuda" else torch.float32,
                          device=device)
    out, stats = anchor_ext.prefill(q, k, v, recall=1.0, path="sparse", return_stats=True)
    dense, _ = ref.dense_attention(q, k, v)
    assert stats["sparsity"] < 0.02  # only the grid's top is short of every key
    torch.testing.assert_close(out.float(), dense, rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("value", [0.0, 1.5, -0.1, True, "0.9"])
def test_bad_recall_raises(value):
    q, k, v = make_inputs(1, 2, 1, 300, 64)
    with pytest.raises(ValueError, match="recall: expected a number in"):
        anchor_ext.prefill(q, k, v, recall=value)


def test_recall_options_are_checked():
    q, k, v = make_inputs(1, 2, 1, 300, 64)
    with pytest.raises(TypeError, match="unexpected options"):
        anchor_ext.prefill(q, k, v, recall=0.9, eps=0.1)
    with pytest.raises(ValueError, match="vote_rows: expected a positive divisor of block_size=128, got 256"):
        anchor_ext.prefill(q, k, v, recall=0.9, vote_rows=256, path="sparse")  # not clamped
    with pytest.raises(ValueError, match="recall: supported with method='anchor' only"):
        anchor_ext.prefill(q, k, v, recall=0.9, method="skeleton", rope_base=1e4)


def test_recall_mode_traces_under_torch_compile():
    """Probe, calibration and identify with per-head thresholds are tensor code and ops
    with fake impls: fullgraph compile works and gives the eager result."""
    q, k, v = make_inputs(1, 4, 2, 600, 64, seed=3)
    options = dict(recall=0.9, path="sparse", block_size=64)
    compiled = torch.compile(lambda q, k, v: anchor_ext.prefill(q, k, v, **options), fullgraph=True)
    torch.testing.assert_close(compiled(q, k, v), anchor_ext.prefill(q, k, v, **options), rtol=0, atol=0)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a CUDA build")
def test_recall_mode_is_graph_capturable():
    q, k, v = make_inputs(1, 4, 2, 3000, 128, torch.bfloat16, device="cuda", seed=5)
    options = dict(recall=0.95, path="sparse")
    expected = anchor_ext.prefill(q, k, v, **options)
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        anchor_ext.prefill(q, k, v, **options)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = anchor_ext.prefill(q, k, v, **options)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(captured, expected, rtol=0, atol=0)


def test_estimated_fraction_is_the_selected_share_of_the_probe_groups_middle_keys():
    q, k, _, _ = families.make("mixed", 2048, q_heads=4, kv_heads=2, head_dim=64, seed=2)
    q, k = q.float(), k.float()
    cfg = SparseConfig(64, 1, 1, 1)
    anchors = ref.anchor(q, k, block_size=64, step=1)
    theta, fraction = recall_mode.calibrate_theta(q, k, anchors, recall=0.9, cfg=cfg, vote_rows=16,
                                                  probe_groups=5, return_fraction=True)
    groups, _ = recall_mode.probe_plan(2048, cfg, 5, 8, q.device)
    selection = ref.identify(q, k, anchors, head_theta=theta, vote_rows=16, block_size=64, step=1)
    bits = ref.unpack_bits(selection, 2048)[:, :, groups]                  # (B, Hq, P, N)
    middle = sum(ref.middle_range(int(g), cfg)[1] - ref.middle_range(int(g), cfg)[0] for g in groups)
    expected = bits.sum().item() / (middle * 4)
    assert 0 < expected < 1
    assert abs(float(fraction) - expected) < 1e-6, (float(fraction), expected)


@pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a CUDA build")
def test_cuda_auto_recall_mode_goes_dense_where_its_selection_cannot_pay():
    from anchor_ext import dispatch

    q, k, v = make_inputs(1, 2, 1, 20000, 64, torch.bfloat16, device="cuda", seed=4)
    with pytest.warns(dispatch.DensePathWarning):
        dispatch._warned.clear()
        out, stats = anchor_ext.prefill(q, k, v, recall=0.95, return_stats=True)
    assert stats["path"] == "dense" and stats["reason"] == "input too short for sparse to win"
    torch.testing.assert_close(out, anchor_ext.prefill(q, k, v, path="dense"), rtol=0, atol=0)
