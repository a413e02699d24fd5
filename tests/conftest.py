"""Shared test helpers: input factories and tolerances."""

from __future__ import annotations

import pytest
import torch

import anchor_ext  # noqa: F401  (registers torch.ops.anchor.*)

HAS_CUDA = torch.cuda.is_available() and anchor_ext.built_with_cuda()

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a CUDA build")

# Tolerance on `out` (stored in the input dtype) against an fp32 reference.
OUT_TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}


def make_inputs(batch, q_heads, kv_heads, n, head_dim, dtype=torch.float32, *, device="cpu",
                seed=0, contiguous=True, spread=1.5):
    """Random q, k, v whose scores spread over several natural-log units.

    A shared direction gives key 0 a sink-like score so anchors are meaningful.
    With ``contiguous=False`` the tensors are views of (B, N, H, D) storage,
    i.e. SDPA-layout views with non-standard strides (unit stride on D).
    """
    gen = torch.Generator().manual_seed(seed)

    def rand(heads):
        if contiguous:
            return torch.randn(batch, heads, n, head_dim, generator=gen)
        return torch.randn(batch, n, heads, head_dim, generator=gen).transpose(1, 2)

    q, k, v = rand(q_heads) * spread, rand(kv_heads) * spread, rand(kv_heads)
    k[:, :, 0] += 2.0 * spread  # a sink key that every query likes a little more
    q += 0.5 * spread
    return tuple(t.to(device=device, dtype=dtype) for t in (q, k, v))


def assert_selection_equal(actual, expected, margin, n, tol=1e-3):
    """Selections agree except where the reference's |abar - score - theta| < tol (ties)."""
    from anchor_ext.reference import unpack_bits

    diff = unpack_bits(actual, n) != unpack_bits(expected, n)
    bad = diff & (margin.to(diff.device) >= tol)
    assert not bad.any(), f"{int(bad.sum())} selection bits differ away from the threshold"
