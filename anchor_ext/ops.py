"""Python API over the compiled ops, and their fake (meta) implementations.

Layers: ``anchor_ext.prefill`` (this module, the user API) -> ``torch.ops.anchor.*``
(schema, checks and dispatch in ``csrc/ops.cpp``) -> CUDA kernels (``csrc/cuda/``)
or the CPU path (``csrc/cpu/``). ``anchor_ext.reference`` defines what each op means.
"""

from __future__ import annotations

import torch

from . import _C  # loading the library registers torch.ops.anchor.*
from . import dispatch
from .reference import SparseConfig, num_groups, selection_words

__all__ = ["prefill", "prefill_varlen", "anchor", "identify", "sparse_attention", "built_with_cuda",
           "set_check_finite", "RECALL_DEFAULTS"]

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
             local_blocks=1, sm_scale=None, vote_rows=0, head_theta=None):
    """Stage 2: stripe selection bitmask, int32 ``(B, Hq, num_groups, ceil(N/32))``.

    Bit ``j % 32`` of word ``j // 32`` of group ``g`` marks middle-region key ``j``
    as selected for every row of the group (see :func:`anchor_ext.reference.identify`).
    ``vote_rows``: rows per vote unit, a divisor of ``block_size`` (0: ``block_size``,
    the paper's block means; 1: every row votes with its own score). ``head_theta``:
    fp32 ``(B, Hq)`` thresholds replacing ``theta`` per head (``+inf``: every middle key).
    """
    return torch.ops.anchor.identify(q, k, anchor_scores, head_theta, theta=theta,
                                     block_size=block_size, step=step, init_blocks=init_blocks,
                                     local_blocks=local_blocks, sm_scale=sm_scale,
                                     vote_rows=vote_rows)


def sparse_attention(q, k, v, selection, *, block_size=128, step=16, init_blocks=1,
                     local_blocks=1, sm_scale=None):
    """Stage 3: attention over always-computed keys plus selected stripes.

    Returns ``(out, lse)``: ``out`` in the input dtype, ``lse`` fp32 natural log.
    Accepts any selection in the bitmask format, e.g. from another method.
    """
    return torch.ops.anchor.sparse_attention(q, k, v, selection, block_size=block_size,
                                             step=step, init_blocks=init_blocks,
                                             local_blocks=local_blocks, sm_scale=sm_scale)


def _config(options: dict, *, step: int) -> SparseConfig:
    """The geometry of ``options`` (SPEC §2 defaults; ``step`` is the method's default)."""
    return SparseConfig(options.get("block_size", 128), options.get("step", step),
                        options.get("init_blocks", 1), options.get("local_blocks", 1))


# The recall mode's geometry defaults (bench/accuracy.py measures the alternatives).
RECALL_DEFAULTS = {"step": 1, "vote_rows": 16}
_RECALL_KEYS = ("vote_rows", "probe_groups", "probe_rows")


def prefill(q, k, v, *, method="anchor", path="auto", return_stats=False, theta=12.0, recall=None,
            **options):
    """Causal attention prefill, sparse (AnchorAttention, SPEC §2) where that is faster.

    Args:
        q: ``(B, Hq, N, D)``; k, v: ``(B, Hkv, N, D)`` with ``Hq % Hkv == 0``. fp16/bf16 on
            CUDA (D in {64, 128}), also fp32 on CPU. Any strides with unit stride on D.
        method: ``"anchor"`` (stripes from block-mean queries, SPEC §2); ``"skeleton"``
            (SparseSkeleton's decomposition, SPEC §3, :mod:`anchor_ext.skeleton`: needs
            ``rope_base``, takes ``rotary_dim``, ``eps``, ``sparsity``, ``granularity``;
            geometry ``step`` defaults to 1); ``"hybrid"``: the union of both selections
            (same options; ``theta`` for the anchor part). Skeleton and hybrid identify
            with pure-PyTorch code (any device, no CUDA graph capture) and share the
            stage-3 kernel; ``path="auto"`` is not applied to them.
        path: ``"auto"`` (default): on CUDA, dense attention (cuDNN SDPA) when the
            sparse path is predicted to be slower: short inputs, or a selection too full
            to pay off (the rule and its measured constants: :mod:`anchor_ext.dispatch`).
            ``"sparse"``: always the three sparse stages. ``"dense"``: always dense.
            On the CPU, ``"auto"`` is dense below ``dispatch.CPU_SPARSE_FROM_TOKENS``
            tokens (measured: ``bench/cpu_auto.py``), sparse from there.
        return_stats: also return a dict with the path taken (``path``, ``reason``) and,
            on the sparse path, the selection and the fraction of causal pairs skipped
            (``sparsity``; 0 on the dense path). The sparse stages then run one by one so
            their outputs can be returned; ``out`` equals the fused CUDA prefill up to
            rounding (the fused op keeps a partial output in the input dtype).
        theta: identification threshold in natural-log units (larger keeps more keys): the
            paper's fixed-threshold rule, used when ``recall`` is None.
        recall: a target mean row recall in (0, 1], e.g. 0.95: each head's threshold is
            calibrated from an exact probe so that the probe rows keep that share of their
            dense softmax mass (:mod:`anchor_ext.recall`); heads that cannot reach it with
            a selection go dense on their own. Takes ``vote_rows`` (rows per vote unit,
            default ``RECALL_DEFAULTS``), ``probe_groups`` (8) and ``probe_rows`` (8);
            its geometry default is ``step=1`` (one selection per query block);
            ``theta`` is not used then.
            ``return_stats`` adds ``head_theta``. With ``path="auto"`` on CUDA it goes dense
            when even an empty selection cannot pay for its stages 1-2, else when the
            probe's density estimate predicts dense faster (read back once, before
            identify; :func:`anchor_ext.dispatch.recall_bound`).
        **options: ``block_size`` (128), ``step`` (16), ``init_blocks`` (1),
            ``local_blocks`` (1), ``sm_scale`` (``1/sqrt(D)``).

    Returns:
        ``out`` like ``q``; or ``(out, stats)`` with ``return_stats=True``.
    """
    if method not in ("anchor", "skeleton", "hybrid"):
        raise ValueError(f"method: expected 'anchor', 'skeleton' or 'hybrid', got {method!r}")
    if path not in ("auto", "sparse", "dense"):
        raise ValueError(f"path: expected 'auto', 'sparse' or 'dense', got {path!r}")
    if method != "anchor":
        if recall is not None:
            raise ValueError(f"recall: supported with method='anchor' only, got method={method!r}")
        return _prefill_skeleton(q, k, v, method=method, path=path, return_stats=return_stats,
                                 theta=theta, **options)
    if recall is not None:
        return _prefill_recall(q, k, v, recall=recall, path=path, return_stats=return_stats,
                               theta=theta, **options)
    unknown = set(options) - set(_GEOMETRY_KEYS)
    if unknown:
        raise TypeError(f"prefill() got unexpected options {sorted(unknown)}; "
                        f"expected a subset of {list(_GEOMETRY_KEYS)}")
    cfg = _config(options, step=16)
    choice = {"path": path, "reason": "requested"}
    checks = (not torch.compiler.is_compiling()) and path != "sparse"

    def check_args(scan_finite):
        # The same checks and messages as the sparse op, whichever path runs.
        _C.check_prefill_args(q, k, v, float(theta), cfg.block_size, cfg.step, cfg.init_blocks,
                              cfg.local_blocks, options.get("sm_scale"), scan_finite=scan_finite)

    if checks:
        check_args(scan_finite=path == "dense")  # the sparse op scans for NaN/Inf itself
    if path == "auto":
        if q.is_cuda:
            choice = dispatch.choose_path(q, k, theta, cfg, options.get("sm_scale"))
        else:
            choice = dispatch.decide_cpu(q.shape[2])
    if choice["path"] == "dense":
        if path == "auto":
            if checks:
                check_args(scan_finite=True)
            dispatch.warn_dense_once(choice)
        out = dispatch.dense_prefill(q, k, v, options.get("sm_scale"))
        return (out, {**choice, "sparsity": 0.0}) if return_stats else out
    if not return_stats:
        return torch.ops.anchor.prefill(q, k, v, theta=theta, **options)
    anchors = anchor(q, k, **options)
    selection = identify(q, k, anchors, theta=theta, **options)
    out, lse = sparse_attention(q, k, v, selection, **options)
    from .metrics import sparsity  # local import: metrics is not needed on the fast path

    stats = {**choice, "selection": selection, "lse": lse, "anchor": anchors,
             "sparsity": sparsity(selection, q.shape[2], cfg)["overall"]}
    return out, stats


def _prefill_recall(q, k, v, *, recall, path, return_stats, theta, **options):
    """``prefill`` with a recall target: stage 1, the probe's per-head thresholds, identify
    with vote units and those thresholds, stage 3 (see :mod:`anchor_ext.recall`)."""
    from . import recall as recall_mode
    from .metrics import sparsity

    unknown = set(options) - set(_GEOMETRY_KEYS) - set(_RECALL_KEYS)
    if unknown:
        raise TypeError(f"prefill(recall=...) got unexpected options {sorted(unknown)}; "
                        f"expected a subset of {list(_GEOMETRY_KEYS + _RECALL_KEYS)}")
    recall = recall_mode.check_recall(recall)
    geometry = {key: options[key] for key in _GEOMETRY_KEYS if key in options}
    geometry.setdefault("step", RECALL_DEFAULTS["step"])
    cfg = _config(geometry, step=RECALL_DEFAULTS["step"])
    # The default unit fits small CPU blocks too; a vote_rows the user gives is checked as given.
    vote_rows = options.get("vote_rows", min(RECALL_DEFAULTS["vote_rows"], cfg.block_size))
    def check_args(scan_finite):
        # The op checks before any work. The NaN/Inf scan only where dense runs: on the
        # sparse path the stage ops scan their inputs themselves (q, k in anchor; v in
        # sparse_attention), as with the fixed threshold.
        if not torch.compiler.is_compiling():
            _C.check_prefill_args(q, k, v, float(theta), cfg.block_size, cfg.step, cfg.init_blocks,
                                  cfg.local_blocks, geometry.get("sm_scale"), scan_finite=scan_finite)

    check_args(scan_finite=path == "dense")
    if path == "dense":
        out = dispatch.dense_prefill(q, k, v, geometry.get("sm_scale"))
        return (out, {"path": "dense", "reason": "requested", "sparsity": 0.0}) if return_stats else out
    choice = {"path": "sparse", "reason": "requested"}
    if path == "auto":  # before any work: the CPU length rule, or CUDA's bound
        choice = dispatch.recall_bound(q, cfg)
        if choice["path"] == "dense":
            check_args(scan_finite=True)
            return _auto_dense(q, k, v, choice, geometry.get("sm_scale"), return_stats)
    anchors = anchor(q, k, **geometry)
    head_theta, fraction = recall_mode.calibrate_theta(
        q, k, anchors, recall=recall, cfg=cfg, vote_rows=vote_rows,
        probe_groups=options.get("probe_groups", 8), probe_rows=options.get("probe_rows", 8),
        sm_scale=geometry.get("sm_scale"), return_fraction=True)
    if choice["path"] == "probe":  # the probe's own density estimate, before identify runs
        choice = dispatch.choose_path_from_fraction(q.shape[2], fraction, cfg)
        if choice["path"] == "dense":
            check_args(scan_finite=True)  # v has not been scanned yet
            return _auto_dense(q, k, v, choice, geometry.get("sm_scale"), return_stats,
                               head_theta=head_theta)
    selection = identify(q, k, anchors, vote_rows=vote_rows, head_theta=head_theta, **geometry)
    out, lse = sparse_attention(q, k, v, selection, **geometry)
    if not return_stats:
        return out
    return out, {**choice, "selection": selection, "lse": lse, "anchor": anchors,
                 "head_theta": head_theta, "sparsity": sparsity(selection, q.shape[2], cfg)["overall"]}


def _auto_dense(q, k, v, choice, sm_scale, return_stats, **stats):
    """The dense path that ``path="auto"`` chose: warned once, stats say why."""
    dispatch.warn_dense_once(choice)
    out = dispatch.dense_prefill(q, k, v, sm_scale)
    return (out, {**choice, "sparsity": 0.0, **stats}) if return_stats else out


_SKELETON_KEYS = ("rope_base", "rotary_dim", "eps", "sparsity", "granularity", "samples", "ridge",
                  "seed")


def _prefill_skeleton(q, k, v, *, method, path, return_stats, theta, **options):
    """``prefill`` for ``method="skeleton"`` / ``"hybrid"``: selection by
    :func:`anchor_ext.skeleton.select` (OR-ed with anchor's for hybrid), then stage 3."""
    from . import skeleton
    from .metrics import sparsity

    unknown = set(options) - set(_GEOMETRY_KEYS) - set(_SKELETON_KEYS)
    if unknown:
        raise TypeError(f"prefill(method={method!r}) got unexpected options {sorted(unknown)}; "
                        f"expected a subset of {list(_GEOMETRY_KEYS + _SKELETON_KEYS)}")
    if options.get("rope_base") is None:
        raise ValueError(f"rope_base: method={method!r} unRoPEs the keys and needs the model's "
                         "RoPE base (e.g. 500000.0 for LLaMA-3.1), got None")
    geometry = {key: options[key] for key in _GEOMETRY_KEYS if key in options}
    geometry.setdefault("step", 1)
    if not torch.compiler.is_compiling():  # the op checks, NaN/Inf scan included, before any work
        _C.check_prefill_args(q, k, v, float(theta), geometry.get("block_size", 128), geometry["step"],
                              geometry.get("init_blocks", 1), geometry.get("local_blocks", 1),
                              geometry.get("sm_scale"))
    if path == "dense":
        out = dispatch.dense_prefill(q, k, v, geometry.get("sm_scale"))
        return (out, {"path": "dense", "reason": "requested", "sparsity": 0.0}) if return_stats else out
    skeleton_options = {key: options[key] for key in _SKELETON_KEYS if key in options}
    selection = skeleton.select(q, k, **skeleton_options, **geometry)
    if method == "hybrid":
        selection = selection | identify(q, k, anchor(q, k, **geometry), theta=theta, **geometry)
    out, lse = sparse_attention(q, k, v, selection, **geometry)
    if not return_stats:
        return out
    cfg = _config(geometry, step=1)
    return out, {"path": "sparse", "reason": "requested" if path == "sparse" else
                 f"method={method!r} always runs sparse", "selection": selection, "lse": lse,
                 "sparsity": sparsity(selection, q.shape[2], cfg)["overall"]}


def prefill_varlen(q, k, v, cu_seqlens, *, max_seqlen=None, **kwargs):
    """Prefill of several prompts packed along the token axis (FlashAttention's varlen layout).

    Args:
        q: ``(total, Hq, D)``; k, v: ``(total, Hkv, D)``: the sequences' tokens one after the
            other, sequence ``i`` at rows ``cu_seqlens[i]:cu_seqlens[i+1]``.
        cu_seqlens: int32/int64 ``(num_seqs + 1,)``, non-decreasing, from 0 to ``total``
            (CPU or the device of q).
        max_seqlen: accepted for API compatibility with FlashAttention; not needed.
        **kwargs: as :func:`prefill` (``method``, ``path``, ``theta``, geometry).

    Returns:
        ``out`` ``(total, Hq, D)``: each sequence attends causally to itself only.

    Each sequence runs as its own :func:`prefill` on views of the packed tensors (no copies,
    no padding), so the sparse/dense choice is made per sequence. Reading ``cu_seqlens``
    costs one host read when it lives on the GPU.
    """
    del max_seqlen
    if "return_stats" in kwargs:
        raise TypeError("prefill_varlen() does not support return_stats; call prefill per sequence")
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or t.dim() != 3:
            shape = list(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
            raise ValueError(f"{name}: expected a 3-D tensor (total, heads, D), got {shape}")
    if k.shape[0] != q.shape[0] or v.shape[0] != q.shape[0]:
        raise ValueError(f"k, v: expected {q.shape[0]} rows (the rows of q), got "
                         f"{k.shape[0]} and {v.shape[0]}")
    if (not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1
            or cu_seqlens.dtype not in (torch.int32, torch.int64)):
        raise ValueError("cu_seqlens: expected a 1-D int32/int64 tensor (num_seqs + 1,), got "
                         f"{cu_seqlens!r:.80}")
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != q.shape[0] or any(b < a for a, b in zip(bounds, bounds[1:])):
        raise ValueError(f"cu_seqlens: expected non-decreasing offsets from 0 to {q.shape[0]} "
                         f"(the rows of q), got {bounds[:8]}{'...' if len(bounds) > 8 else ''}")
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    for start, end in zip(bounds, bounds[1:]):
        if end == start:
            continue
        # (n, H, D) rows -> (1, H, n, D) views: unit stride on D, as the ops require.
        seq = [t[start:end].transpose(0, 1).unsqueeze(0) for t in (q, k, v)]
        out[start:end] = prefill(*seq, **kwargs)[0].transpose(0, 1)
    return out


# --------------------------------------------------------------------------------------
# Fake (meta) implementations: shapes and dtypes only, for torch.compile / FakeTensor.
# --------------------------------------------------------------------------------------

@torch.library.register_fake("anchor::anchor")
def _anchor_fake(q, k, *, block_size=128, step=16, init_blocks=1, local_blocks=1, sm_scale=None):
    return q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.register_fake("anchor::identify")
def _identify_fake(q, k, anchor, head_theta=None, *, theta=12.0, block_size=128, step=16,
                   init_blocks=1, local_blocks=1, sm_scale=None, vote_rows=0):
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
