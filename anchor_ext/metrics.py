"""Quality metrics of a sparse prefill (SPEC §5), computed in query-block chunks.

* :func:`sparsity`: ``1 - computed causal pairs / all causal pairs``, counting the
  always-computed region as computed, per (batch, head) and overall.
* :func:`mass_recall`: per query row, the dense softmax mass on the keys it computes.
* :func:`output_error`: row-wise relative error of ``out`` against dense fp32 attention.
* :func:`oracle_density`: the (block) oracle densities of SPEC §5, what any selection
  shared by ``block_rows`` rows needs for a mean recall target.

Nothing here builds an ``N x N`` tensor; ``mass_recall`` can also sample query blocks
(``block_stride``) so that 32k-token inputs are affordable on a CPU.
"""

from __future__ import annotations

import math

import torch

from .reference import (SparseConfig, always_pairs_per_group, computed_mask, middle_range, num_groups,
                        unpack_bits)

__all__ = ["computed_pairs", "sparsity", "mass_recall", "recall_summary", "output_error",
           "sampled_quality", "oracle_density"]


def computed_pairs(selection: torch.Tensor, n: int, cfg: SparseConfig) -> torch.Tensor:
    """Number of (query, key) pairs stage 3 computes, per (batch, head): float64 ``(B, Hq)``."""
    device = selection.device
    always = always_pairs_per_group(n, cfg)
    total = torch.full(selection.shape[:2], float(always.sum()), dtype=torch.float64, device=device)
    keys = torch.arange(n, device=device)
    for g in range(num_groups(n, cfg)):
        g0 = cfg.group_start(g)
        rows = min(n, g0 + cfg.group_rows) - g0
        m0, m1 = middle_range(g, cfg)
        in_middle = (keys >= m0) & (keys < m1)
        total += (unpack_bits(selection[:, :, g], n) & in_middle).sum(-1).double() * rows
    return total


def sparsity(selection: torch.Tensor, n: int, cfg: SparseConfig) -> dict:
    """``{"per_head": (B, Hq) tensor, "overall": float}`` of skipped causal pairs."""
    causal = n * (n + 1) / 2
    per_head = 1.0 - computed_pairs(selection, n, cfg) / causal
    return {"per_head": per_head, "overall": float(per_head.mean())}


def _dense_blocks(q, k, selection, cfg: SparseConfig, sm_scale, block_starts):
    """For each (batch, head) and each query block starting at a row of ``block_starts``:
    ``(b, h, r0, r1, probs, keep)`` with the block's dense causal fp32 softmax ``probs``
    over keys ``[0, r1)`` and the boolean mask ``keep`` of the keys stage 3 computes."""
    bsz, hq, n, d = q.shape
    group_size = hq // k.shape[1]
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    for b in range(bsz):
        for h in range(hq):
            kh = k[b, h // group_size].float()
            for r0 in block_starts:
                r1 = min(n, r0 + cfg.block_size)
                rows = torch.arange(r0, r1, device=q.device)
                scores = (q[b, h, r0:r1].float() @ kh[:r1].T) * scale
                causal = torch.arange(r1, device=q.device)[None, :] <= rows[:, None]
                probs = torch.softmax(scores.masked_fill(~causal, -math.inf), dim=-1)
                keep = computed_mask(rows, r1, selection[b, h, r0 // cfg.group_rows], cfg)
                yield b, h, r0, r1, probs, keep


@torch.no_grad()
def mass_recall(q, k, selection, cfg: SparseConfig, *, sm_scale=None, block_stride=1, starts=None):
    """Per-row dense softmax mass on the computed keys, fp32 ``(B, Hq, N)``.

    With ``block_stride > 1`` only every ``block_stride``-th query block is
    evaluated, with ``starts`` only the blocks starting at those rows (others are NaN);
    :func:`recall_summary` ignores NaN rows.
    """
    n = q.shape[2]
    recall = torch.full(q.shape[:3], math.nan, dtype=torch.float32, device=q.device)
    if starts is None:
        starts = range(0, n, cfg.block_size * block_stride)
    for b, h, r0, r1, probs, keep in _dense_blocks(q, k, selection, cfg, sm_scale, starts):
        recall[b, h, r0:r1] = (probs * keep).sum(-1)
    return recall


def recall_summary(recall: torch.Tensor) -> dict:
    """Mean and 1st percentile of the per-row recall (NaN rows, i.e. unsampled, ignored)."""
    flat = recall.flatten()
    flat = flat[~torch.isnan(flat)].double()
    return {"mean": float(flat.mean()), "p01": float(torch.quantile(flat.cpu(), 0.01)),
            "min": float(flat.min())}


@torch.no_grad()
def output_error(out: torch.Tensor, ref: torch.Tensor) -> dict:
    """Row-wise relative error ``|out_i - ref_i| / |ref_i|`` (L2 over D).

    Returns ``{"max": float, "mean": float, "per_head_max": (B, Hq), "per_head_mean": (B, Hq)}``.
    """
    err = (out.float() - ref.float()).norm(dim=-1) / ref.float().norm(dim=-1).clamp_min(1e-12)
    return {"max": float(err.max()), "mean": float(err.mean()),
            "per_head_max": err.amax(-1), "per_head_mean": err.mean(-1)}


@torch.no_grad()
def sampled_quality(q, k, v, out, selection, cfg: SparseConfig, *, sm_scale=None, blocks=16):
    """Mass recall and output error on ``blocks`` query blocks per (batch, head), spread
    evenly over the sequence (for long inputs, where dense fp32 attention of every row
    is too costly). Dense rows are computed in fp32, one query block at a time.

    Returns ``{"recall": recall_summary(...), "error": {"max", "mean"}}``.
    """
    hq, n = q.shape[1], q.shape[2]
    group_size = hq // k.shape[1]
    num_blocks = -(-n // cfg.block_size)
    picked = sorted({round(i * (num_blocks - 1) / max(1, blocks - 1)) for i in range(min(blocks, num_blocks))})
    recalls, errors = [], []
    starts = [qb * cfg.block_size for qb in picked]
    for b, h, r0, r1, probs, keep in _dense_blocks(q, k, selection, cfg, sm_scale, starts):
        recalls.append((probs * keep).sum(-1))
        dense = probs @ v[b, h // group_size, :r1].float()
        errors.append((out[b, h, r0:r1].float() - dense).norm(dim=-1) /
                      dense.norm(dim=-1).clamp_min(1e-12))
    err = torch.cat(errors)
    return {"recall": recall_summary(torch.cat(recalls)),
            "error": {"max": float(err.max()), "mean": float(err.mean())}}


@torch.no_grad()
def oracle_density(q, k, *, block_rows=128, targets=(0.90, 0.95, 0.99), blocks=16, sm_scale=None):
    """Block oracle densities (SPEC §5) on ``blocks`` blocks of ``block_rows`` query rows
    per (batch, head), spread evenly over the sequence.

    For a block, keys are ranked by the block's summed dense causal probability; the
    oracle keeps the shortest prefix of that ranking whose *mean* row recall reaches the
    target, and its density is the pairs it computes (each row only its causal keys)
    over the block's causal pairs. ``block_rows=1`` is the per-row oracle (each row's
    fewest keys holding the target mass, over its causal keys); 64 or 128 bound any
    selection shared by a kernel row tile, ``step * block_size`` one shared by a group.
    Dense rows are computed in fp32, one block at a time (never an N x N tensor).

    Returns ``{target: mean density over (batch, head, block)}``, ``"per_head"``:
    ``{target: (B, Hq) tensor}``, and ``"pair_weighted"``: ``{target: kept pairs over causal
    pairs, summed over the sampled blocks}`` (late blocks weigh more, as in a method's
    overall density, so the two compare at equal cost).
    """
    bsz, hq, n, d = q.shape
    group_size = hq // k.shape[1]
    scale = 1.0 / math.sqrt(d) if sm_scale is None else sm_scale
    num_blocks = -(-n // block_rows)
    picked = sorted({round(i * (num_blocks - 1) / max(1, blocks - 1))
                     for i in range(min(blocks, num_blocks))})
    per_head = {t: torch.zeros(bsz, hq, dtype=torch.float64) for t in targets}
    kept_pairs = {t: 0.0 for t in targets}
    causal_pairs = 0.0
    for b in range(bsz):
        for h in range(hq):
            kh = k[b, h // group_size].float()
            for block in picked:
                r0, r1 = block * block_rows, min(n, (block + 1) * block_rows)
                rows = torch.arange(r0, r1, device=q.device)
                keys = torch.arange(r1, device=q.device)
                causal = keys[None, :] <= rows[:, None]
                scores = (q[b, h, r0:r1].float() @ kh[:r1].T) * scale
                probs = torch.softmax(scores.masked_fill(~causal, -math.inf), dim=-1)
                order = probs.sum(0).argsort(descending=True)
                mean_recall = (probs[:, order].sum(0) / (r1 - r0)).double().cumsum(0)
                pairs = causal[:, order].sum(0).double().cumsum(0)
                total_pairs = float(pairs[-1])
                causal_pairs += total_pairs
                for t in targets:
                    # The shortest prefix reaching t within fp32 rounding of the softmax
                    # (1e-6), the whole block when rounding leaves it just short.
                    prefix = min(int((mean_recall < t - 1e-6).sum()), r1 - 1)
                    per_head[t][b, h] += float(pairs[prefix]) / total_pairs
                    kept_pairs[t] += float(pairs[prefix])
    for t in targets:
        per_head[t] /= len(picked)
    return {**{t: float(per_head[t].mean()) for t in targets}, "per_head": per_head,
            "pair_weighted": {t: kept_pairs[t] / causal_pairs for t in targets}}
