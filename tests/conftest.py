"""Shared test helpers: input factories and tolerances."""

from __future__ import annotations

import pytest
import torch

import anchor_ext  # noqa: F401  (registers torch.ops.anchor.*)
# Tolerance on `out` against the fp32 reference, and identify's tie margin: one table for
# the tests and the randomized run.
from anchor_ext.fuzz import OUT_TOL, TIE_MARGIN, bits_off_threshold  # noqa: F401  (OUT_TOL re-exported)

HAS_CUDA = torch.cuda.is_available() and anchor_ext.built_with_cuda()

requires_cuda = pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA device and a CUDA build")


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


def assert_selection_equal(actual, expected, margin, n, tol=TIE_MARGIN):
    """Selections agree except where the reference's |abar - score - theta| < tol (ties)."""
    bad = bits_off_threshold(actual, expected, margin, n, tol)
    assert not bad, f"{bad} selection bits differ away from the threshold"


def compare_stages_with_reference(q, k, v, theta, geometry, *, anchor_tol, lse_tol, prefill_exact=True):
    """Each op against anchor_ext.reference, each stage fed the op's own previous output
    (so one stage's rounding does not hide another's error); returns the selection."""
    import anchor_ext
    from anchor_ext import reference as ref

    n = q.shape[2]
    anchors = anchor_ext.anchor(q, k, **geometry)
    torch.testing.assert_close(anchors, ref.anchor(q, k, **geometry), rtol=anchor_tol, atol=anchor_tol)

    selection = anchor_ext.identify(q, k, anchors, theta=theta, **geometry)
    expected, margin = ref.identify(q, k, anchors, theta=theta, return_margin=True, **geometry)
    assert selection.shape == expected.shape and selection.dtype == torch.int32
    assert_selection_equal(selection, expected, margin, n)

    out, lse = anchor_ext.sparse_attention(q, k, v, selection, **geometry)
    out_ref, lse_ref = ref.sparse_attention(q, k, v, selection, **geometry)
    assert out.dtype == q.dtype and out.shape == q.shape and lse.dtype == torch.float32
    tol = OUT_TOL[q.dtype]
    torch.testing.assert_close(out.float(), out_ref, rtol=tol, atol=tol)
    torch.testing.assert_close(lse, lse_ref, rtol=lse_tol, atol=lse_tol)

    # prefill is the three stages chained (CPU: exactly). On CUDA it fuses stage 1 with
    # stage 3's always-computed keys and merges the stripes into a partial output kept in
    # the input dtype, so it equals the chained ops up to that rounding.
    exact = dict(rtol=0, atol=0) if prefill_exact else dict(rtol=tol, atol=tol)
    torch.testing.assert_close(anchor_ext.prefill(q, k, v, theta=theta, path="sparse", **geometry), out,
                               **exact)
    return selection


@pytest.fixture(scope="session")
def smollm2_or_skip():
    """The SmolLM2 loader module, or a skip naming what to install when its GGUF is missing."""
    from anchor_ext.models import smollm2

    try:
        smollm2.gguf_path()
    except FileNotFoundError as err:
        pytest.skip(str(err))
    return smollm2
