"""Recall-targeted identification: a per-head threshold chosen from an exact probe.

A fixed ``theta`` (natural-log units) buys a different recall on every head and input,
so a user cannot choose it. Here the user names the recall instead:

1. **Vote units.** Identification compares, for every middle-region key ``j`` of a group,
   ``abar_u - sm_scale * qbar_u . k_j < theta_h`` for each *vote unit* ``u`` of the group
   (``vote_rows`` consecutive query rows: their mean query ``qbar_u`` and mean anchor
   ``abar_u``); the group keeps the union of its units' votes. ``vote_rows = block_size``
   is the paper's block mean, smaller units see keys that only some rows need, 1 is an
   exact per-row compare. The smallest gap ``min_u (abar_u - score_uj)`` decides key
   ``j``: it is selected exactly when its gap is below ``theta_h``.
2. **Probe.** For a few groups spread over the sequence (``probe_groups``), a few rows of
   each (``probe_rows``, the group's first row among them: its local window is the
   shortest) get their exact dense softmax over all earlier keys, and their group's gaps
   are computed. A key adds its probability to a probe row's recall once ``theta_h``
   exceeds its gap, so a histogram of probability over gap bins gives every row's recall
   as a function of ``theta_h`` at once (no sort).
3. **Threshold.** ``theta_h`` is the smallest grid value at which the probe rows' *mean*
   recall reaches the target; a head that cannot reach it below :data:`THETA_GRID`'s top
   gets ``+inf``: every middle key, i.e. dense (a head whose block means miss its rows'
   keys gets more keys, or goes dense on its own).

Everything is tensor code on the inputs' device with fixed shapes: no host
synchronisation, CUDA-graph capturable. The gaps are those of
:func:`anchor_ext.reference.unit_gaps`, which defines ``identify`` with ``vote_rows`` and
per-head thresholds.
"""

from __future__ import annotations

import math

import torch

from .reference import (SparseConfig, always_mask, check_vote_rows, middle_range, num_groups,
                        unit_gaps)

__all__ = ["THETA_GRID", "probe_plan", "calibrate_theta"]

# Candidate thresholds (natural-log units). Gaps below the first edge are kept at any
# threshold; a head needing keys whose gap is above the last edge goes dense (+inf).
THETA_GRID = torch.arange(-8.0, 40.0 + 1e-6, 0.25)


def probe_plan(n: int, cfg: SparseConfig, probe_groups: int, probe_rows: int, device):
    """The probe's groups and rows: ``(groups (P,), rows (P, R))`` long tensors.

    Groups: ``probe_groups`` of those with a middle region, evenly spaced, the last one
    included. Rows: ``probe_rows`` per group, the group's first row then evenly spaced
    over the group's rows (clipped to ``n``). Empty tensors when no group has a middle
    region.
    """
    total = num_groups(n, cfg)
    candidates = [g for g in range(total) if middle_range(g, cfg)[1] > middle_range(g, cfg)[0]]
    if not candidates:
        empty = torch.zeros(0, dtype=torch.long, device=device)
        return empty, empty.view(0, probe_rows)
    count = min(probe_groups, len(candidates))
    picked = sorted({candidates[round(i * (len(candidates) - 1) / max(1, count - 1))]
                     for i in range(count)}) if count > 1 else [candidates[-1]]
    rows = []
    for g in picked:
        start = cfg.group_start(g)
        size = min(n, start + cfg.group_rows) - start
        offsets = [0] + [round((r + 0.5) * size / max(1, probe_rows - 1)) for r in range(probe_rows - 1)]
        rows.append([start + min(size - 1, o) for o in offsets])
    return (torch.tensor(picked, dtype=torch.long, device=device),
            torch.tensor(rows, dtype=torch.long, device=device))


@torch.no_grad()
def calibrate_theta(q, k, anchors, *, recall: float, cfg: SparseConfig, vote_rows: int,
                    probe_groups: int = 16, probe_rows: int = 8, sm_scale=None) -> torch.Tensor:
    """Per-head thresholds whose probe rows reach mean ``recall``: fp32 ``(B, Hq)`` on
    ``q``'s device, ``+inf`` for heads that need every middle key (see the module
    docstring). ``anchors`` are stage 1's row maxima (natural log)."""
    if not (isinstance(recall, (int, float)) and 0.0 < recall <= 1.0):
        raise ValueError(f"recall: expected a number in (0, 1], got {recall!r}")
    bsz, hq, n, d = q.shape
    hkv = k.shape[1]
    scale = 1.0 / math.sqrt(d) if sm_scale is None else float(sm_scale)
    vote_rows = check_vote_rows(vote_rows, cfg.block_size)
    groups, rows = probe_plan(n, cfg, probe_groups, probe_rows, q.device)
    theta = torch.full((bsz, hq), math.inf, dtype=torch.float32, device=q.device)
    if groups.numel() == 0:
        return theta  # no middle region anywhere: every key is always computed
    grid = THETA_GRID.to(q.device)
    flat_rows = rows.flatten()                                               # (P*R,)
    gaps = unit_gaps(q, k, anchors, cfg, vote_rows=vote_rows, groups=groups, sm_scale=sm_scale)
    keys = torch.arange(n, device=q.device)
    causal = keys[None, :] <= flat_rows[:, None]
    always = always_mask(flat_rows, n, cfg)
    bins = grid.numel() + 1
    for b in range(bsz):
        for h in range(hq):
            kh = k[b, h // (hq // hkv)].float()
            scores = (q[b, h, flat_rows].float() @ kh.T) * scale
            probs = torch.softmax(scores.masked_fill(~causal, -math.inf), dim=-1)  # (P*R, N)
            row_gap = gaps[b, h].repeat_interleave(rows.shape[1], dim=0)            # (P*R, N)
            # Key j counts at grid edge e once gap_j < e: bin = number of edges <= gap.
            index = torch.searchsorted(grid, row_gap.contiguous(), right=True)
            index = index.masked_fill(~torch.isfinite(row_gap), bins - 1)
            middle_mass = torch.zeros(len(flat_rows), bins, device=q.device).scatter_add_(
                1, index, probs.masked_fill(always | ~torch.isfinite(row_gap), 0.0))
            curve = (probs * always).sum(-1, keepdim=True) + middle_mass.cumsum(1)[:, :-1]
            reached = curve.mean(0) >= recall - 1e-6                                # (E,)
            first = torch.argmax(reached.int())
            theta[b, h] = torch.where(reached.any(), grid[first], math.inf)
    return theta
