"""Python API over the compiled ops, and their fake (meta) implementations.

Layers: ``anchor_ext.prefill`` (this module, the user API) -> ``torch.ops.anchor.*``
(schema, checks and dispatch in ``csrc/ops.cpp``) -> CUDA kernels (``csrc/cuda/``)
or the CPU path (``csrc/cpu/``). ``anchor_ext.reference`` defines what each op means.
"""

from __future__ import annotations

import torch

from . import _C  # noqa: F401  (loading the library registers torch.ops.anchor.*)
from .reference import SparseConfig, num_groups, selection_words

__all__ = ["prefill", "anchor", "identify", "sparse_attention", "built_with_cuda",
           "set_check_finite"]

_GEOMETRY_KEYS = ("block_size", "step", "init_blocks", "local_blocks", "sm_scale")


def built_with_cuda() -> bool:
    """True when the installed extension contains the CUDA kernels."""
    return _C.built_with_cuda()


def set_check_finite(enabled: bool) -> None:
    """Scan ``q`` and ``k`` for NaN/Inf before each op (default on).

    The scan costs one reduction and, on CUDA, one host synchronisation per call;
    it is skipped automatically while a CUDA graph is being captured.
    """
    _C.set_check_finite(bool(enabled))


def anchor(q, k, *, block_size=128, step=16, init_blocks=1, local_blocks=1, sm_scale=None):
    """Stage 1: per-row max scaled score over the always-computed keys, fp32 ``(B, Hq, N)``."""
    return torch.ops.anchor.anchor(q, k, block_size=block_size, step=step,
                                   init_blocks=init_blocks, local_blocks=local_blocks,
                                   sm_scale=sm_scale)


def identify(q, k, anchor_scores, *, theta=12.0, block_size=128, step=16, init_blocks=1,
             local_blocks=1, sm_scale=None):
    """Stage 2: stripe selection bitmask, int32 ``(B, Hq, num_groups, ceil(N/32))``.

    Bit ``j % 32`` of word ``j // 32`` of group ``g`` marks middle-region key ``j``
    as selected for every row of the group (see :mod:`anchor_ext.reference`).
    """
    return torch.ops.anchor.identify(q, k, anchor_scores, theta=theta, block_size=block_size,
                                     step=step, init_blocks=init_blocks,
                                     local_blocks=local_blocks, sm_scale=sm_scale)


def sparse_attention(q, k, v, selection, *, block_size=128, step=16, init_blocks=1,
                     local_blocks=1, sm_scale=None):
    """Stage 3: attention over always-computed keys plus selected stripes.

    Returns ``(out, lse)``: ``out`` in the input dtype, ``lse`` fp32 natural log.
    Accepts any selection in the bitmask format, e.g. from another method.
    """
    return torch.ops.anchor.sparse_attention(q, k, v, selection, block_size=block_size,
                                             step=step, init_blocks=init_blocks,
                                             local_blocks=local_blocks, sm_scale=sm_scale)


def prefill(q, k, v, *, method="anchor", return_stats=False, theta=12.0, **options):
    """Sparse causal attention prefill (AnchorAttention, SPEC §2).

    Args:
        q: ``(B, Hq, N, D)``; k, v: ``(B, Hkv, N, D)`` with ``Hq % Hkv == 0``. fp16/bf16 on
            CUDA (D in {64, 128}), also fp32 on CPU. Any strides with unit stride on D.
        method: ``"anchor"`` (the only method so far).
        return_stats: also return a dict with the selection and the fraction of causal
            (query, key) pairs that were skipped (``sparsity``).
        theta: identification threshold in natural-log units (larger keeps more keys).
        **options: ``block_size`` (128), ``step`` (16), ``init_blocks`` (1),
            ``local_blocks`` (1), ``sm_scale`` (``1/sqrt(D)``).

    Returns:
        ``out`` like ``q``; or ``(out, stats)`` with ``return_stats=True``.
    """
    if method != "anchor":
        raise ValueError(f"method: expected 'anchor', got {method!r}")
    unknown = set(options) - set(_GEOMETRY_KEYS)
    if unknown:
        raise TypeError(f"prefill() got unexpected options {sorted(unknown)}; "
                        f"expected a subset of {list(_GEOMETRY_KEYS)}")
    if not return_stats:
        return torch.ops.anchor.prefill(q, k, v, theta=theta, **options)
    anchors = anchor(q, k, **options)
    selection = identify(q, k, anchors, theta=theta, **options)
    out, lse = sparse_attention(q, k, v, selection, **options)
    from .metrics import sparsity  # local import: metrics is not needed on the fast path

    cfg = SparseConfig(*(options.get(key, default) for key, default in
                         (("block_size", 128), ("step", 16), ("init_blocks", 1), ("local_blocks", 1))))
    stats = {"selection": selection, "lse": lse, "anchor": anchors,
             "sparsity": sparsity(selection, q.shape[2], cfg)["overall"]}
    return out, stats


# --------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes and dtypes only, for torch.compile / FakeTensor.
# --------------------------------------------------------------------------------------

@torch.library.register_fake("anchor::anchor")
def _anchor_fake(q, k, *, block_size=128, step=16, init_blocks=1, local_blocks=1, sm_scale=None):
    return q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.register_fake("anchor::identify")
def _identify_fake(q, k, anchor, *, theta=12.0, block_size=128, step=16, init_blocks=1,
                   local_blocks=1, sm_scale=None):
    n = q.shape[2]
    groups = num_groups(n, SparseConfig(block_size, step, init_blocks, local_blocks))
    return q.new_empty((q.shape[0], q.shape[1], groups, selection_words(n)), dtype=torch.int32)


@torch.library.register_fake("anchor::sparse_attention")
def _sparse_attention_fake(q, k, v, selection, *, block_size=128, step=16, init_blocks=1,
                           local_blocks=1, sm_scale=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format), \
        q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.register_fake("anchor::prefill")
def _prefill_fake(q, k, v, *, theta=12.0, block_size=128, step=16, init_blocks=1,
                  local_blocks=1, sm_scale=None):
    return torch.empty_like(q, memory_format=torch.contiguous_format)


# --------------------------------------------------------------------------------------
# No autograd: prefill is inference-only. With requires_grad inputs the ops still compute,
# and a backward through them raises instead of returning silently wrong (zero) gradients.
# --------------------------------------------------------------------------------------

def _no_backward(ctx, *grads):
    raise NotImplementedError("anchor_ext ops are inference-only (prefill): they have no backward")


for _op in ("anchor", "identify", "sparse_attention", "prefill"):
    torch.library.register_autograd(f"anchor::{_op}", _no_backward)
