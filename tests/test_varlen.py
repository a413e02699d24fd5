"""prefill_varlen: packed prompts (FlashAttention's cu_seqlens layout) against per-sequence calls."""

from __future__ import annotations

import pytest
import torch

import anchor_ext

from conftest import HAS_CUDA, OUT_TOL, make_inputs

DEVICES = ["cpu"] + (["cuda"] if HAS_CUDA else [])


def packed(lengths, hq, hkv, d, dtype, device, seed=0):
    total = sum(lengths)
    q, k, v = make_inputs(1, hq, hkv, total, d, dtype, device=device, seed=seed)
    # (1, H, total, D) -> (total, H, D), the varlen layout
    q, k, v = (t[0].transpose(0, 1).contiguous() for t in (q, k, v))
    offsets = torch.tensor([0] + lengths, dtype=torch.int32).cumsum(0).to(torch.int32)
    return q, k, v, offsets


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("lengths, hq, hkv", [([1, 130, 0, 300, 257], 4, 2), ([700], 2, 2),
                                              ([64, 64, 1000], 6, 1)])
def test_varlen_equals_per_sequence_calls(device, lengths, hq, hkv):
    dtype = torch.float32 if device == "cpu" else torch.bfloat16
    geometry = dict(block_size=64, step=2) if device == "cpu" else dict(step=2)
    q, k, v, cu = packed(lengths, hq, hkv, 64, dtype, device, seed=len(lengths))
    out = anchor_ext.prefill_varlen(q, k, v, cu.to(device), theta=3.0, path="sparse", **geometry)
    assert out.shape == q.shape and out.dtype == q.dtype
    for start, end in zip(cu.tolist(), cu.tolist()[1:]):
        if end == start:
            continue
        seq = [t[start:end].transpose(0, 1).unsqueeze(0).contiguous() for t in (q, k, v)]
        expected = anchor_ext.prefill(*seq, theta=3.0, path="sparse", **geometry)[0].transpose(0, 1)
        torch.testing.assert_close(out[start:end], expected, rtol=0, atol=0)


def test_varlen_sequences_do_not_see_each_other():
    """Changing one sequence's tokens leaves every other sequence's output unchanged."""
    q, k, v, cu = packed([200, 300], 2, 1, 32, torch.float32, "cpu", seed=7)
    base = anchor_ext.prefill_varlen(q, k, v, cu, theta=3.0, block_size=64, step=2)
    k2 = k.clone()
    k2[:200] += 1.0
    moved = anchor_ext.prefill_varlen(q, k2, v, cu, theta=3.0, block_size=64, step=2)
    torch.testing.assert_close(moved[200:], base[200:], rtol=0, atol=0)
    assert not torch.equal(moved[:200], base[:200])


def test_varlen_rejects_bad_arguments():
    q, k, v, cu = packed([100, 50], 2, 1, 32, torch.float32, "cpu")
    with pytest.raises(ValueError, match=r"cu_seqlens: expected non-decreasing offsets from 0 to 150"):
        anchor_ext.prefill_varlen(q, k, v, torch.tensor([0, 100, 149], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"cu_seqlens: expected non-decreasing"):
        anchor_ext.prefill_varlen(q, k, v, torch.tensor([0, 120, 100, 150], dtype=torch.int32))
    with pytest.raises(ValueError, match="cu_seqlens: expected a 1-D int32/int64 tensor"):
        anchor_ext.prefill_varlen(q, k, v, cu.float())
    with pytest.raises(ValueError, match=r"q: expected a 3-D tensor \(total, heads, D\), got \[1, 150, 2, 32\]"):
        anchor_ext.prefill_varlen(q[None], k, v, cu)
    with pytest.raises(ValueError, match="k, v: expected 150 rows"):
        anchor_ext.prefill_varlen(q, k[:149], v, cu)
    with pytest.raises(ValueError, match="q: expected finite values"):  # the op's own checks still run
        anchor_ext.prefill_varlen(q.index_fill(0, torch.tensor([3]), float("nan")), k, v, cu)
